"""Tests of evaluate.py: the metrics, the linear probe, manifests and the command line."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate
import features
import model as m2d


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return m2d.M2DCLAP(m2d.preset("tiny", text_dim=8)).eval()


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


def test_moved_commands_say_where_they_went():
    for command in ("embed", "export"):
        with pytest.raises(SystemExit, match=f"'python evaluate.py {command}' is now 'python features.py {command}'"):
            evaluate.main([command, "--checkpoint", "x.pt"])


def test_the_report_gives_the_fine_tuning_result_beside_a_checkpoint_or_its_command(tmp_path):
    ckpt = tmp_path / "best.pt"
    assert f"python finetune.py --init {ckpt}" in evaluate.fine_tuning_line(ckpt)
    (tmp_path / "result.json").write_text(json.dumps({"recipe_name": "esc50", "rule": "best_test_fold_mean",
                                                      "metric": "accuracy", "score": 91.25, "best_epoch": 7}))
    line = evaluate.fine_tuning_line(ckpt)
    assert "esc50 recipe" in line and "accuracy 91.2" in line and "best epoch 7" in line
