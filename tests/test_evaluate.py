"""Tests of evaluate.py: features of clips of any length, the feature API, corpus embedding, the metrics."""

import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import evaluate
import model as m2d


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return m2d.M2DCLAP(m2d.preset("tiny", text_dim=8)).eval()


def test_feature_crops_pad_the_normalised_log_mel_and_never_exceed_the_crop():
    mel = torch.randn(80, 201)
    crops = evaluate.feature_crops(mel, 192, 16)
    assert [c.shape[-1] for c in crops] == [192, 16]
    assert torch.equal(crops[0], mel[:, :192]) and torch.equal(crops[1][:, :9], mel[:, 192:])
    assert not crops[1][:, 9:].any()  # zeros in normalised units
    # A last crop of 190 frames would pad to 192 (12 patches) and one of 1000 frames to 1008: the crop
    # stays at 1001 frames (62 patches), as the authors' runtime has it.
    assert [c.shape[-1] for c in evaluate.feature_crops(torch.randn(80, 1001 + 1000), 1001, 16)] == [1001, 1001]
    assert [c.shape[-1] for c in evaluate.feature_crops(torch.randn(80, 2002), 1001, 16)] == [1001, 1001]
    assert [c.shape[-1] for c in evaluate.feature_crops(torch.randn(80, 1), 1001, 16)] == [16]


def test_features_equal_a_direct_encoder_computation(tiny):
    # 192 frames: one crop; 400: two crops and 16 frames; 30: padded to 32 frames, 2 columns.
    mels = [torch.randn(80, 192) - 8, torch.randn(80, 400) - 8, torch.randn(80, 30) - 8]
    frames = evaluate.frame_features(tiny, mels, batch_size=2)
    assert [f.shape for f in frames] == [(12, 5 * 192), (12 + 12 + 1, 5 * 192), (2, 5 * 192)]
    with torch.no_grad():
        # Second clip, second crop, by hand: encode, drop CLS, stack the 5 rows of each column.
        tokens = tiny.encode(mels[1][None, None, :, 192:384])[0, 1:]                # [5 * 12, D]
        by_hand = tokens.reshape(5, 12, -1).permute(1, 0, 2).reshape(12, -1)        # [12, 5 * D]
        torch.testing.assert_close(frames[1][12:24], by_hand, atol=1e-5, rtol=1e-5)
        # Third clip: normalised first, then zero-padded to 32 frames.
        x = torch.nn.functional.pad(tiny.normalize(mels[2]), (0, 2))
        tokens = tiny.encode_normalized(x[None, None])[0, 1:]                       # [5 * 2, D]
        by_hand = tokens.reshape(5, 2, -1).permute(1, 0, 2).reshape(2, -1)
        torch.testing.assert_close(frames[2], by_hand, atol=1e-5, rtol=1e-5)
    clip = evaluate.clip_features(tiny, mels)
    torch.testing.assert_close(clip[1], frames[1].mean(dim=0), atol=1e-5, rtol=1e-5)


def test_streaming_gives_the_same_features_in_order_for_any_batch_size(tiny):
    torch.manual_seed(1)
    mels = [torch.randn(80, n) - 8 for n in (5, 192, 700, 30, 193, 384, 1, 64)]
    reference = evaluate.patch_features(tiny, mels, batch_size=64)
    for batch_size in (1, 2, 3):
        streamed = list(evaluate.iter_patch_features(tiny, iter(mels), batch_size))
        assert len(streamed) == len(mels)
        for a, b in zip(streamed, reference):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_clap_audio_embedding_of_a_crop_length_clip_is_encode_audio(tiny):
    mel = torch.randn(2, 80, 192) - 8
    ours = evaluate.clap_audio_embeddings(tiny, list(mel))
    torch.testing.assert_close(ours, tiny.encode_audio(mel[:, None]), atol=1e-5, rtol=1e-5)


# --- the HEAR-style API on waveforms ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_embedder(tiny):
    return evaluate.Embedder(tiny, {"stage": "1", "missing_parts": []},
                             evaluate.TextSide("none", unavailable="no text side in this test"))


@pytest.mark.parametrize("samples", [1, 160, 1601, 16000 * 2 + 7, 30_720 * 2 + 33])
def test_hear_functions_give_shapes_dtypes_and_centred_timestamps(tiny_embedder, samples):
    audio = torch.rand(3, samples) * 2 - 1
    frames_per_crop = 192  # the tiny preset's crop: 12 columns of 160 ms, then the next crop at 1.92 s
    frames = 1 + samples // 160
    crops = -(-frames // frames_per_crop)
    last = frames - (crops - 1) * frames_per_crop
    columns = (crops - 1) * 12 + -(-last // 16)
    scene = evaluate.get_scene_embeddings(audio, tiny_embedder)
    assert scene.shape == (3, tiny_embedder.scene_embedding_size) == (3, 5 * 192) and scene.dtype == torch.float32
    emb, times = evaluate.get_timestamp_embeddings(audio, tiny_embedder)
    assert emb.shape == (3, columns, tiny_embedder.timestamp_embedding_size) and emb.dtype == torch.float32
    assert times.shape == (3, columns) and times.dtype == torch.float32
    expected = [k * 1920 + j * 160 + 80 for k in range(crops) for j in range(12)][:columns]
    assert times[2].tolist() == expected
    torch.testing.assert_close(scene, emb.mean(dim=1))
    flat, _ = evaluate.get_timestamp_embeddings(audio, tiny_embedder, flat=True)
    assert flat.shape == (3, columns, 192)
    torch.testing.assert_close(flat, emb.reshape(3, columns, 5, 192).mean(dim=2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(evaluate.get_scene_embeddings(audio, tiny_embedder, flat=True), flat.mean(dim=1))
    assert evaluate.encode_clap_audio(audio, tiny_embedder).shape == (3, 192)


def test_clips_in_a_batch_do_not_affect_each_other(tiny_embedder):
    audio = torch.rand(4, 5000) * 2 - 1
    together = evaluate.get_scene_embeddings(audio, tiny_embedder)
    alone = torch.cat([evaluate.get_scene_embeddings(a[None], tiny_embedder) for a in audio])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_bad_waveforms_and_missing_text_side_say_what_to_do(tiny_embedder):
    with pytest.raises(ValueError, match=r"\[n_sounds, n_samples\].*got shape \(2, 3, 100\)"):
        evaluate.get_scene_embeddings(torch.zeros(2, 3, 100), tiny_embedder)
    with pytest.raises(ValueError, match="cannot encode text: no text side in this test"):
        evaluate.encode_clap_text(["a dog"], tiny_embedder)


def test_retrieval_metrics_by_hand():
    # 3 clips; captions 0,1 -> clip 0, caption 2 -> clip 1, caption 3 -> clip 2.
    caption_clip = torch.tensor([0, 0, 1, 2])
    similarity = torch.tensor([[0.1, 0.9, 0.5, 0.0],    # clip 0: ranks caption 1 first (correct)
                               [0.8, 0.0, 0.7, 0.05],   # clip 1: caption 2 second
                               [0.9, 0.0, 0.2, 0.1]])   # clip 2: caption 3 third
    r = evaluate.retrieval_metrics(similarity, caption_clip)
    a2t, t2a = r["audio_to_text"], r["text_to_audio"]
    assert a2t["R@1"] == pytest.approx(100 / 3) and a2t["R@5"] == pytest.approx(100)
    # AP@10: clip 0 hits at ranks 1 and 3 -> (1 + 2/3) / 2; clip 1 -> 1/2; clip 2 -> 1/3.
    assert a2t["mAP@10"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 / 2 + 1 / 3) / 3)
    # Text -> audio ranks: caption 0 -> clip 0 third; 1 -> first; 2 -> clip 1 first; 3 -> clip 2 first.
    assert t2a["R@1"] == pytest.approx(75) and t2a["R@5"] == pytest.approx(100)
    assert t2a["mAP@10"] == pytest.approx(100 * (1 / 3 + 1 + 1 + 1) / 4)


def test_zero_shot_accuracy_counts_a_hit_when_the_top_class_is_among_the_labels():
    audio = torch.eye(3)
    class_text = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    assert evaluate.zero_shot_accuracy(audio, class_text, [{0}, {0, 2}, {2}]) == pytest.approx(200 / 3)
    assert evaluate.zero_shot_accuracy(audio, class_text, [{0}, {0, 1}, {2}]) == pytest.approx(100)


def test_retrieval_ties_count_against_the_model_and_several_captions_per_clip():
    # A collapsed model: every similarity equal. Ties rank the correct item last.
    caption_clip = torch.tensor([0, 0, 1, 1, 2, 2])
    r = evaluate.retrieval_metrics(torch.zeros(3, 6), caption_clip)
    assert r["audio_to_text"]["R@1"] == 0 and r["text_to_audio"]["R@1"] == 0
    assert r["audio_to_text"]["R@5"] == 100  # 4 wrong captions, then the 2 correct ones at ranks 5 and 6
    assert r["audio_to_text"]["mAP@10"] == pytest.approx(100 * (1 / 5 + 2 / 6) / 2)
    assert r["text_to_audio"]["R@5"] == 100 and r["text_to_audio"]["mAP@10"] == pytest.approx(100 / 3)
    # Clip 0 ties its correct caption 1 with a wrong caption 2 at the top: the wrong one ranks first.
    similarity = torch.tensor([[0.2, 0.9, 0.9, 0.0, 0.0, 0.0],
                               [0.0, 0.0, 0.8, 0.7, 0.0, 0.0],
                               [0.0, 0.0, 0.0, 0.0, 0.6, 0.5]])
    r = evaluate.retrieval_metrics(similarity, caption_clip)
    a2t = r["audio_to_text"]
    assert a2t["R@1"] == pytest.approx(200 / 3)  # clips 1 and 2
    # AP@10, clip 0: ranks 1 (wrong), 2 (caption 1), 3 (caption 0) -> (1/2 + 2/3) / 2; clips 1, 2: 1.
    assert a2t["mAP@10"] == pytest.approx(100 * ((1 / 2 + 2 / 3) / 2 + 1 + 1) / 3)
    # Caption 2 (clip 1) scores 0.9 for clip 0 and 0.8 for clip 1: rank 2. The others rank 1.
    assert r["text_to_audio"]["R@1"] == pytest.approx(500 / 6)


def test_zero_shot_tie_between_a_true_and_a_false_class_is_a_miss():
    class_text = torch.eye(3)
    audio = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert evaluate.zero_shot_accuracy(audio, class_text, [{0}, {2}]) == pytest.approx(50)
    assert evaluate.zero_shot_accuracy(audio, class_text, [{0, 1}, {2}]) == pytest.approx(100)


def test_mean_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.1, 0.6]])
    labels = [{0}, {1}, {0, 1}]
    # class 0: positives at ranks 1 and 3 -> (1 + 2/3) / 2; class 1: ranks 1, 2 -> 1.
    assert evaluate.mean_average_precision(scores, labels) == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1) / 2)


def test_effective_rank_detects_collapse():
    assert evaluate.effective_rank(torch.eye(16)) == pytest.approx(16, rel=1e-6)
    collapsed = torch.randn(100, 1) @ torch.randn(1, 32)
    assert evaluate.effective_rank(collapsed) < 1.01


def test_linear_probe_separates_separable_classes():
    torch.manual_seed(0)
    centres = torch.randn(4, 20) * 3
    labels = torch.randint(0, 4, (200,))
    x = centres[labels] + 0.3 * torch.randn(200, 20)
    sets = [{int(c)} for c in labels]
    result, scores = evaluate.linear_probe(x[:150], sets[:150], x[150:], sets[150:], n_classes=4)
    assert result == {"accuracy": 100.0} and scores.shape == (50, 4)


def test_random_init_copy_replaces_the_encoder_and_keeps_the_heads(tiny):
    baseline = evaluate.random_init_copy(tiny, seed=1)  # tiny itself was initialised with seed 0
    assert not torch.equal(baseline.blocks[0].attn.qkv.weight, tiny.blocks[0].attn.qkv.weight)
    assert torch.equal(baseline.audio_proj.sem_token, tiny.audio_proj.sem_token)
    assert torch.equal(baseline.text_proj.weight, tiny.text_proj.weight)
    assert torch.equal(baseline.norm_stats, tiny.norm_stats)


# --- manifests and the command line ---------------------------------------------------------


def write_manifest(root, rows, header="file_name,label,caption,split"):
    for name in {r.split(",")[0] for r in rows}:
        if not (root / name).exists() and not name.startswith("gone"):
            freq = 300 if "low" in name else 2000
            t = np.arange(32000) / 16000
            sf.write(root / name, 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(0).standard_normal(t.size), 16000)
    path = root / "eval.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


GOOD_ROWS = [f"low{i}.wav,tone;low,A low tone.,{'train' if i < 3 else 'test'}" for i in range(5)] + \
            [f"high{i}.wav,tone;high,A high tone.,{'train' if i < 3 else 'test'}" for i in range(5)] + \
            ["low4.wav,tone;low,A deep hum.,test"]


def test_manifest_reading(tmp_path):
    es = evaluate.read_manifest(write_manifest(tmp_path, GOOD_ROWS))
    assert len(es.files) == 10 and es.classes == ["high", "low", "tone"]
    assert es.labels[0] == ["tone", "low"] and es.split.count("test") == 4
    assert len(es.captions) == 11 and es.caption_clip[-1] == es.files.index("low4.wav")


@pytest.mark.parametrize("rows,message", [
    (GOOD_ROWS + ["gone.wav,tone,A tone.,test"], r"eval.csv, line 13: audio file .*gone.wav not found"),
    ([r.replace(",test", ",train") for r in GOOD_ROWS], r"eval.csv: the test split is empty"),
    (GOOD_ROWS[:3] + GOOD_ROWS[5:8] + ["high4.wav,tone;whistle,A whistle.,test"],
     r"test clip high4.wav has label\(s\) \['whistle'\] that no training clip has"),
    (GOOD_ROWS[:9] + ["high4.wav,tone;high,A tone.,dev"], r"line 11: split must be 'train' or 'test', got 'dev'"),
    (GOOD_ROWS + ["low4.wav,tone;high,A tone.,test"], r"low4.wav has labels \['tone', 'high'\] here but"),
])
def test_bad_manifests_stop_with_a_clear_message(tmp_path, rows, message):
    path = write_manifest(tmp_path, rows)
    with pytest.raises(evaluate.ManifestError, match=message):
        evaluate.read_manifest(path)


@pytest.fixture
def stage1_checkpoint(stage1_run):
    return stage1_run / "last.pt"


def test_command_line_on_a_manifest_writes_json_and_plots(stage1_checkpoint, tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("matplotlib")
    path = write_manifest(tmp_path, GOOD_ROWS)
    evaluate.main(["--checkpoint", str(stage1_checkpoint), "--data", str(path), "--json", str(tmp_path / "r.json"),
                   "--plot", str(tmp_path / "plots")])
    results = json.loads((tmp_path / "r.json").read_text())
    for part in (results, results["random_init"]):
        assert 0 <= part["linear_probe"]["accuracy"] <= 100
        assert 0 <= part["zero_shot"]["accuracy"] <= 100
        assert 0 <= part["retrieval"]["audio_to_text"]["R@1"] <= 100
        assert 0 <= part["retrieval"]["text_to_audio"]["R@1"] <= 100
        assert part["rankme"]["clip_features"] >= 1
    assert results["stage"] == "1"
    printed = capsys.readouterr().out
    assert "linear_probe.accuracy" in printed and "random_init" in printed
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "confusion.png", "similarity.png", "training_curves.png"]


def test_tasks_a_checkpoint_cannot_serve_are_skipped_with_the_reason(stage1_checkpoint, tmp_path, capsys):
    ckpt = torch.load(stage1_checkpoint, weights_only=True)
    ckpt["embedding_model"] = None  # no record of the sentence model: new text cannot be embedded
    torch.save(ckpt, tmp_path / "anon.pt")
    path = write_manifest(tmp_path, [r.rsplit(",", 2)[0] + ",," + r.rsplit(",", 1)[1] for r in GOOD_ROWS[:10]])
    evaluate.main(["--checkpoint", str(tmp_path / "anon.pt"), "--data", str(path), "--no-baseline",
                   "--json", str(tmp_path / "r.json")])
    results = json.loads((tmp_path / "r.json").read_text())
    assert "linear_probe" in results and "zero_shot" not in results and "retrieval" not in results
    assert "does not record which sentence model" in results["skipped"]["zero_shot"]
    assert "no captions" in results["skipped"]["retrieval"]
    assert "zero_shot: skipped" in capsys.readouterr().out


# --- embedding a corpus ----------------------------------------------------------------------


def test_embed_command_writes_every_readable_file_resumes_and_reports_the_rest(stage1_checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    sf.write(corpus / "stereo44k.flac", 0.1 * rng.standard_normal((44100 * 3, 2)), 44100)
    sf.write(corpus / "sub" / "narrow8k.wav", 0.1 * rng.standard_normal(8000 * 2), 8000)
    sf.write(corpus / "ten_seconds.wav", 0.1 * rng.standard_normal(160000), 16000)
    sf.write(corpus / "three_minutes.wav", 0.1 * rng.standard_normal(16000 * 180).astype(np.float32), 16000)
    (corpus / "corrupt.wav").write_bytes(b"RIFF\x00\x10\x00\x00WAVEfmt garbage")
    (corpus / "notes.txt").write_text("not audio")
    out = tmp_path / "features"
    first = tmp_path / "first.csv"
    first.write_text("file_name\nten_seconds.wav\nsub/narrow8k.wav\n")
    evaluate.main(["embed", "--checkpoint", str(stage1_checkpoint), "--audio", str(first), "--audio-root",
                   str(corpus), "--out", str(out), "--frames"])
    assert "2 file(s) written, 0 done before, 0 unreadable" in capsys.readouterr().out

    evaluate.main(["embed", "--checkpoint", str(stage1_checkpoint), "--audio", str(corpus), "--out", str(out),
                   "--frames", "--workers", "1"])  # audio decoded in a loader worker
    printed = capsys.readouterr()
    assert "2 file(s) written, 2 done before, 1 unreadable" in printed.out
    assert "notes.txt" in printed.out and "files/s" in printed.err
    with open(out / "index.csv", newline="") as f:
        index = {row["file_name"]: row for row in csv.DictReader(f)}
    assert sorted(index) == ["stereo44k.flac", "sub/narrow8k.wav", "ten_seconds.wav", "three_minutes.wav"]
    with open(out / "unreadable.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert [r["file_name"] for r in report] == ["corrupt.wav"] and "cannot be decoded" in report[0]["error"]

    model = evaluate.load_model(stage1_checkpoint)
    for name, row in index.items():
        wave = data.load_audio(corpus / name)  # downmixed and resampled to 16 kHz
        clip = np.load(out / row["clip"])
        frames = np.load(out / row["frames"])
        assert clip.dtype == frames.dtype == np.float32 and clip.shape == (5 * 192,)
        assert frames.shape == (int(row["columns"]), 5 * 192)
        assert float(row["seconds"]) == pytest.approx(len(wave) / 16000, abs=1e-3)
        expected = evaluate.get_scene_embeddings(wave[None], model)[0]
        np.testing.assert_allclose(clip, expected.numpy(), atol=1e-4)
        np.testing.assert_allclose(np.load(out / row["clap"]), evaluate.encode_clap_audio(wave[None], model)[0],
                                   atol=1e-4)
    # 18001 frames: 93 full 192-frame crops of 12 columns, then 145 frames padded to 10 patches
    assert int(index["three_minutes.wav"]["columns"]) == 93 * 12 + 10
