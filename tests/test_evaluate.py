"""Tests of evaluate.py: the linear probe, the evaluation set and the command line (the scores: test_metrics.py)."""

import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import evaluate
import features
import model as m2d


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return m2d.M2DCLAP(m2d.preset("tiny", text_dim=8)).eval()


def test_linear_probe_separates_separable_classes():
    torch.manual_seed(0)
    centres = torch.randn(4, 20) * 3
    labels = torch.randint(0, 4, (200,))
    x = centres[labels] + 0.3 * torch.randn(200, 20)
    targets = torch.nn.functional.one_hot(labels, 4).float()
    result, scores = features.linear_probe(x[:150], targets[:150], x[150:], targets[150:])
    assert result == {"accuracy": 100.0} and scores.shape == (50, 4)


def test_random_init_copy_replaces_the_encoder_and_keeps_the_heads(tiny):
    baseline = features.random_init_copy(tiny, seed=1)  # tiny itself was initialised with seed 0
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
    es = evaluate.evaluation_set(write_manifest(tmp_path, GOOD_ROWS))
    assert len(es.files) == 10 and es.classes == ["high", "low", "tone"]
    assert es.labels[0] == ["tone", "low"] and es.split.count("test") == 4
    assert len(es.captions) == 11 and es.caption_clip[-1] == es.files.index("low4.wav")


@pytest.mark.parametrize("rows,message", [
    (GOOD_ROWS + ["gone.wav,tone,A tone.,test"], r"eval.csv: 1 audio file\(s\) such as .*gone.wav not found"),
    ([r.replace(",test", ",train") for r in GOOD_ROWS], r"eval.csv: no clip in the test split"),
    (GOOD_ROWS[:3] + GOOD_ROWS[5:8] + ["high4.wav,tone;whistle,A whistle.,test"],
     r"eval.csv, line 8 \(high4.wav\): a test clip with label\(s\) \['whistle'\] that no training "
     r"clip has.*move a clip of 'whistle' into the training split"),
    (GOOD_ROWS[:9] + ["high4.wav,tone;high,A tone.,dev"], r"line 11: split must be train, valid or test, got 'dev'"),
    (GOOD_ROWS + ["low4.wav,tone;high,A tone.,test"], r"low4.wav has labels \['tone', 'high'\] here but"),
])
def test_bad_manifests_stop_with_a_clear_message(tmp_path, rows, message):
    path = write_manifest(tmp_path, rows)
    with pytest.raises(data.ManifestError, match=message):
        evaluate.evaluation_set(path)


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
    printed = capsys.readouterr().out
    assert "zero_shot: skipped" in printed
    header = next(line for line in printed.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "checkpoint"]  # --no-baseline: no empty random_init column
    assert re.search(r"^linear_probe.accuracy +\d+\.\d$", printed, re.M)


def test_an_unreadable_clip_stops_evaluate_naming_its_manifest_line(stage1_checkpoint, tmp_path):
    path = write_manifest(tmp_path, GOOD_ROWS)
    (tmp_path / "high1.wav").write_bytes(b"not audio")
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--checkpoint", str(stage1_checkpoint), "--data", str(path), "--no-baseline"])
    assert re.search(r"^error: .*high1.wav: cannot be decoded as audio.*Re-encode it as WAV or FLAC\. It is listed "
                     r"in .*eval.csv, line 8 \(high1.wav\): fix the file or remove its row\.$", str(stop.value))


def test_bad_checkpoint_files_stop_evaluate_with_one_line(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("my notes\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, message in (("notes.pt", "not a PyTorch checkpoint; it is a text file starting 'my notes'"),
                          ("empty.pt", "the file is empty (0 bytes)"), ("gone.pt", "gone.pt: checkpoint not found")):
        with pytest.raises(SystemExit) as stop:
            evaluate.main(["--checkpoint", str(tmp_path / name)])
        assert str(stop.value).startswith("error: ") and message in str(stop.value)


def test_a_fold_manifest_probes_each_fold_and_its_valid_split_is_not_used(tmp_path):
    rows = [f"{'low' if i % 2 else 'high'}{i}.wav,{'low' if i % 2 else 'high'},,{i % 3}" for i in range(9)]
    manifest = evaluate.evaluation_set(write_manifest(tmp_path, rows, header="file_name,label,caption,fold"))
    assert manifest.folds == ["0", "1", "2"] and manifest.classes == ["high", "low"]
    clip = torch.tensor([[1.0, 0.0] if "low" in f else [0.0, 1.0] for f in manifest.files])
    targets = data.label_targets(manifest.labels, manifest.classes)
    results, skipped, arrays = {}, {}, {}
    evaluate.run_linear_probe(clip, manifest, targets, results, skipped, arrays)
    assert results["linear_probe"]["accuracy"] == 100.0 and arrays["probe"][0].shape == (3, 2)


def test_the_report_gives_the_fine_tuning_result_beside_a_checkpoint_or_its_command(tmp_path):
    ckpt = tmp_path / "best.pt"
    assert f"python finetune.py --init {ckpt}" in evaluate.fine_tuning_line(ckpt)
    (tmp_path / "result.json").write_text(json.dumps({"recipe_name": "esc50", "rule": "best_test_fold_mean",
                                                      "metric": "accuracy", "score": 91.25, "best_epoch": 7}))
    line = evaluate.fine_tuning_line(ckpt)
    assert "esc50 recipe" in line and "accuracy 91.2" in line and "best epoch 7" in line
