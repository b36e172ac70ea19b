"""The fine-tuning program end to end: manifests of WAV files (single-label folds, multi-label splits),
bit-identical resume after a stop (in one process and in two), the fine-tuned file through
features.load_model and tag_audio, and the errors bad input gets."""

import json
import os
import shutil
import socket

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import evaluate
import features
import finetune as ft
import runs

SMALL = ["--epochs", "2", "--warmup-epochs", "1", "--batch-size", "4", "--input-frames", "33",
         "--time-mask-frames", "8", "--seeds", "43", "--device", "cpu"]


def write_clips(root, labels: list[str], parts: list[str], column: str) -> str:
    """One 0.5-s WAV per row, a tone whose pitch follows its first label; the manifest CSV's path."""
    rows = []
    for i, (label, part) in enumerate(zip(labels, parts)):
        pitch = 300 + 500 * (sorted({c for ls in labels for c in ls.split(";")}).index(label.split(";")[0]))
        t = np.arange(8000) / 16000
        wave = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.01 * np.random.default_rng(i).standard_normal(8000)
        sf.write(root / f"c{i}.wav", wave.astype(np.float32), 16000)
        rows.append(f"c{i}.wav,{label},{part}")
    (root / "manifest.csv").write_text(f"file_name,label,{column}\n" + "\n".join(rows) + "\n")
    return str(root / "manifest.csv")


def multi_label_manifest(root) -> str:
    labels = ["dog", "cat;dog", "cat", "bird", "bird;cat", "dog"] * 2
    return write_clips(root, labels, ["train"] * 8 + ["test"] * 4, "split")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def init(stage1_run):
    return str(stage1_run / "last.pt")


def test_folds_each_held_out_and_the_fold_mean_reported(tmp_path, init, capsys):
    csv_path = write_clips(tmp_path, ["dog", "cat"] * 6, ["1", "2", "3"] * 4, "fold")
    out = tmp_path / "run"
    ft.main(["--init", init, "--manifest", csv_path, "--recipe", "esc50", "--folds", "1", "2",
             "--out-dir", str(out), *SMALL])
    result = json.loads((out / "result.json").read_text())
    printed = capsys.readouterr().out
    best = result["runs"][result["best_run"]]  # the summary line names the same run as result.json
    assert f"wrote {out / 'best.pt'}: seed 43, fold {best['fold']}, epoch {best['best_epoch']} " \
           f"(runs[{result['best_run']}] in result.json), the run with the highest selected score" in printed
    assert result["model"] == str(out / "best.pt")
    assert [r["fold"] for r in result["runs"]] == ["1", "2"] and result["rule"] == "best_test_fold_mean"
    scores = [r["score"] for r in result["runs"]]
    assert result["score"] == pytest.approx(np.mean(scores))
    # the spread over folds beside the one over seeds, and the last epoch's score beside the selected one
    assert result["over_folds"]["n"] == 2 and result["over_folds"]["std"] == pytest.approx(np.std(scores, ddof=1))
    lasts = [r["last_score"] for r in result["runs"]]
    assert result["last_epoch"]["mean"] == pytest.approx(np.mean(lasts))
    probes = [r["frozen_probe"]["accuracy"] for r in result["runs"]]
    assert result["frozen_probe"]["mean"] == pytest.approx(np.mean(probes))
    assert f"accuracy {np.mean(scores):.2f} (std 0.00 over 1 seed(s); std {np.std(scores, ddof=1):.2f} over 2 " \
           f"folds); last epoch {np.mean(lasts):.2f}; frozen encoder's linear probe on the same clips " \
           f"{np.mean(probes):.2f}\nselected: each run's best epoch on the test clips: the recipe's rule " \
           "(best_test_fold_mean), as the authors report this task" in printed
    # the probe is evaluate.py's, on the same folds
    manifest = data.read_manifest(csv_path)
    clip = features.clip_features(features.load_model(init).model, evaluate.manifest_log_mels(manifest))
    targets = data.label_targets(manifest.labels, manifest.classes)
    for fold, probe in zip(("1", "2"), probes):
        train_ids, test_ids = manifest.indices("train", fold), manifest.indices("test", fold)
        expected, _ = features.linear_probe(clip[train_ids], targets[train_ids], clip[test_ids], targets[test_ids])
        assert probe == pytest.approx(expected["accuracy"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4  # 2 folds x 2 epochs
    # steps are optimiser steps of each run: 8 training clips a fold at batch 4 are 2 steps an epoch
    assert [(r["fold"], r["epoch"], r["step"]) for r in log] == [("1", 1, 2), ("1", 2, 4), ("2", 1, 2), ("2", 2, 4)]
    assert [r["steps"] for r in result["runs"]] == [4, 4]
    assert (out / "per_class.csv").read_text().splitlines()[0] == "class,AP,roc_auc,positives"
    assert runs.load_checkpoint(out / "best.pt")["classes"] == ["cat", "dog"]


def test_a_rule_that_selects_on_validation_clips_never_selects_on_the_test_clips(tmp_path, init, capsys):
    # spcv2's rule is the best validation epoch, then one test; this manifest has train and test clips only
    csv_path = write_clips(tmp_path, ["dog", "cat"] * 8, ["train"] * 12 + ["test"] * 4, "split")
    args = ["--init", init, "--manifest", csv_path, "--recipe", "spcv2", *SMALL, "--input-frames", "48"]
    with pytest.raises(SystemExit, match=r"manifest.csv: the recipe selects its epoch on validation clips .* "
                                         r"--valid-share 0 holds none out. Add rows with split 'valid'"):
        ft.main([*args, "--out-dir", str(tmp_path / "none"), "--valid-share", "0"])
    out = tmp_path / "run"
    ft.main([*args, "--out-dir", str(out)])  # the default: 10 % of each class's training clips held out
    result = json.loads((out / "result.json").read_text())
    run = result["runs"][0]
    assert (run["train_clips"], run["valid_clips"]) == (10, 2)  # one of each class's 6, seeded
    assert result["selection"] == "the best epoch on 2 validation clips held out of the training clips (10% of " \
                                  "each class's, seed 0), then tested once"
    assert "selected: the best epoch on 2 validation clips held out" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("valid" in r and "test" not in r for r in log)  # the test clips are never scored while selecting


def test_the_held_out_validation_part_is_class_balanced_seeded_and_leaves_a_training_clip(tmp_path):
    targets = torch.zeros(23, 3)
    targets[:10, 0] = 1
    targets[10:22, 1] = 1
    targets[22, 2] = 1  # a class of one clip
    clips = data.ClipSet([torch.full((4,), float(i)) for i in range(23)], targets, [f"c{i}" for i in range(23)])
    rest, valid = ft.held_out_valid(clips, 0.2, "m.csv")
    assert valid.targets.sum(0).tolist() == [2, 2, 0]  # round(0.2 x 10), round(0.2 x 12), none of the single clip
    assert sorted(rest.names + valid.names) == sorted(clips.names) and not set(rest.names) & set(valid.names)
    assert [int(c[0]) for c in valid.clips] == [int(n[1:]) for n in valid.names]  # clips follow their names
    assert ft.held_out_valid(clips, 0.2, "m.csv")[1].names == valid.names  # the same part every time
    with pytest.raises(ValueError, match="m.csv: no class has 2 training clips"):
        ft.held_out_valid(data.ClipSet(clips.clips[:1], targets[:1], clips.names[:1]), 0.2, "m.csv")


def test_resume_after_a_stop_is_bit_identical(tmp_path, init):
    csv_path = multi_label_manifest(tmp_path)
    args = ["--init", init, "--manifest", csv_path, "--recipe", "as20k", *SMALL]
    ft.main([*args, "--out-dir", str(tmp_path / "whole")])
    ft.main([*args, "--out-dir", str(tmp_path / "parts"), "--epochs-limit", "1"])
    assert not (tmp_path / "parts" / "best.pt").exists()
    ft.main([*args, "--out-dir", str(tmp_path / "parts")])
    for name, key in (("resume.pt", "model"), ("resume.pt", "optimizer"), ("best.pt", "model"), ("best.pt", "head")):
        whole, parts = (runs.load_checkpoint(tmp_path / run / name)[key] for run in ("whole", "parts"))
        flat_whole, flat_parts = (torch.utils._pytree.tree_flatten(x)[0] for x in (whole, parts))
        assert len(flat_whole) == len(flat_parts)
        assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(flat_whole, flat_parts))
    with pytest.raises(SystemExit, match=r"resume.pt: cannot resume with other settings than the run's "
                                         r"\(recipe.epochs 2 -> 3\)\. Run the interrupted command again unchanged"):
        ft.main([*args, "--out-dir", str(tmp_path / "parts"), "--epochs", "3"])


def test_fine_tuned_file_loads_and_tags_as_finetune_predicts(tmp_path, init):
    csv_path = multi_label_manifest(tmp_path)
    out = tmp_path / "run"
    ft.main(["--init", init, "--manifest", csv_path, "--recipe", "as20k", "--out-dir", str(out), *SMALL])
    ckpt = runs.load_checkpoint(out / "best.pt")
    embedder = features.load_model(out / "best.pt")
    assert embedder.classes == ["bird", "cat", "dog"] and embedder.model.config.crop_frames == 33
    assert features.get_scene_embeddings(torch.zeros(1, 8000), embedder).shape[0] == 1
    recipe = ft.recipe("as20k", **{k: v for k, v in ckpt["recipe"].items() if k != "seeds"})
    model = ft.classifier_for(embedder.model, 3, recipe)            # built as fine-tuning builds it
    model.load_state_dict({**model.state_dict(), **ckpt["head"]})
    waves = [torch.from_numpy(sf.read(tmp_path / f"c{i}.wav", dtype="float32")[0]) for i in range(12)]
    expected = ft.predict(model, waves, recipe).sigmoid()
    scores = features.tag_audio(torch.stack(waves), embedder)
    assert scores.shape == (12, 3)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(scores.argmax(1), expected.argmax(1))
    with pytest.raises(ValueError, match="not a fine-tuned checkpoint"):
        features.tag_audio(torch.zeros(1, 8000), features.load_model(init))


def test_bad_input_is_named(tmp_path, init, capsys):
    def error(csv_text: str, *extra) -> str:
        (tmp_path / "bad.csv").write_text(csv_text)
        with pytest.raises(SystemExit) as stop:
            ft.main(["--init", init, "--manifest", str(tmp_path / "bad.csv"), "--recipe", "esc50",
                     "--out-dir", str(tmp_path / "run"), *SMALL, *extra])
        return str(stop.value)
    sf.write(tmp_path / "a.wav", np.zeros(8000, dtype=np.float32), 16000)
    assert "missing.wav not found" in error("file_name,label,split\nmissing.wav,dog,train\na.wav,dog,test\n")
    assert "needs file_name, label" in error("file_name,split\na.wav,train\n")
    sf.write(tmp_path / "b.wav", np.zeros(8000, dtype=np.float32), 16000)
    assert "at least 2 folds" in error("file_name,label,fold\na.wav,dog,1\nb.wav,cat,1\n")
    assert "bad.csv, line 3 (b.wav): a test clip with label(s) ['cat'] that no training clip has;" in error(
        "file_name,label,split\na.wav,dog,train\nb.wav,cat,test\n")
    # a fold manifest: a label only the held-out fold has, checked for every fold before any training
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    for name in "cde":
        sf.write(tmp_path / f"{name}.wav", np.zeros(8000, dtype=np.float32), 16000)
    assert "bad.csv, line 6 (e.wav): a test clip with label(s) ['bird'] that no training clip has (fold 3 held " \
           "out); a classifier cannot learn them. Fix the label, or move a clip of 'bird' into the training folds." \
        in error("file_name,label,fold\na.wav,dog,1\nb.wav,cat,2\nc.wav,cat,1\nd.wav,dog,2\ne.wav,bird,3\n")
    assert not (tmp_path / "run" / "log.jsonl").exists()  # refused before the first fold trained
    assert "a file belongs to one split" in error("file_name,label,split\na.wav,dog,train\na.wav,dog,test\n")
    (tmp_path / "garbage.wav").write_bytes(b"not audio")
    assert "garbage.wav: cannot be decoded as audio" in error(
        "file_name,label,split\na.wav,dog,train\ngarbage.wav,dog,train\nb.wav,dog,test\n")
    assert "It is listed in " + str(tmp_path / "bad.csv") + ", line 3 (garbage.wav): fix the file or remove its " \
           "row." in error("file_name,label,split\na.wav,dog,train\ngarbage.wav,dog,train\nb.wav,dog,test\n")
    assert "checkpoint to fine-tune was not found" in error("file_name,label,split\na.wav,dog,train\n"
                                                            "a.wav,dog,test\n", "--init", str(tmp_path / "no.pt"))


def test_a_run_where_no_epoch_scores_above_0_says_that_it_wrote_no_model(tmp_path, init, capsys, monkeypatch):
    csv_path = write_clips(tmp_path, ["cat", "dog", "dog", "dog"], ["train", "train", "test", "test"], "split")
    monkeypatch.setattr(ft, "predict", lambda model, clips, recipe: torch.tensor([[1.0, 0.0]] * len(clips)))
    out = tmp_path / "run"  # every test clip is a dog and every prediction a cat: accuracy 0 in every epoch
    ft.main(["--init", init, "--manifest", csv_path, "--recipe", "esc50", "--out-dir", str(out), *SMALL])
    printed = capsys.readouterr().out
    assert "accuracy 0.00 (std 0.00 over 1 seed(s)); last epoch 0.00; frozen encoder's linear probe" in printed
    assert "no epoch of any run scored above 0, so no model was written (no best.pt, no per_class.csv)." in printed
    assert "wrote" not in printed
    assert not (out / "best.pt").exists() and not (out / "per_class.csv").exists()
    result = json.loads((out / "result.json").read_text())
    assert result["model"] is None and result["best_epoch"] is None
    import train  # as stage 2 finds it, had this been stage 1.1
    with pytest.raises(FileNotFoundError, match=r"last.pt: stage 1.1 ran but kept no model, since none of its epochs "
                                                r"scored above 0"):
        train.load_previous_stage("2", out / "last.pt")


def test_a_warm_up_that_does_not_fit_in_the_run_is_refused(tmp_path, init):
    csv_path = multi_label_manifest(tmp_path)
    with pytest.raises(SystemExit, match=r"recipe esc50: --warmup-epochs 5 does not fit in --epochs 1: the learning "
                                         r"rate would rise from 0 for the whole run.*--warmup-epochs 0"):
        ft.main(["--init", init, "--manifest", csv_path, "--recipe", "esc50", "--epochs", "1",
                 "--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    ft.recipe("esc50", epochs=1, warmup_epochs=0)  # without a warm-up, one epoch is a run like any


def test_stage11_through_train_py_then_stage2_starts_from_it(tmp_path, init, corpus):
    import train
    csv_path = multi_label_manifest(tmp_path)
    s11 = tmp_path / "stage1.1"
    train.main(["--stage", "1.1", "--init", init, "--manifest", csv_path, "--recipe", "as20k",
                "--out-dir", str(s11), *SMALL])
    ckpt = runs.load_checkpoint(s11 / "last.pt")
    assert ckpt["stage"] == "1.1" and ckpt["model_config"]["crop_frames"] == 33
    assert torch.equal(ckpt["model"]["blocks.0.attn.qkv.weight"],
                       runs.load_checkpoint(s11 / "best.pt")["model"]["blocks.0.attn.qkv.weight"])
    captions = corpus(tmp_path, n_clips=4, dim=ckpt["model_config"]["text_dim"])
    train.main(["--stage", "2", "--init", str(s11 / "last.pt"), "--data", str(captions), "--text-side", "embeddings",
                "--max-steps", "1", "--batch-size", "4", "--out-dir", str(tmp_path / "s2")])
    s2 = runs.load_checkpoint(tmp_path / "s2" / "last.pt")
    for key in ("pos_embed", "blocks.3.mlp.fc2.weight", "norm.weight"):
        assert torch.equal(s2["model"][key], ckpt["model"][key]), key
    assert s2["model_config"]["crop_frames"] == 33 and s2["args"]["token_drop"] == 0.3


def finetune_worker(rank, world, port, args):
    import finetune
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    finetune.main(args)


def test_two_process_fine_tuning_stopped_and_resumed_equals_the_uninterrupted_run(tmp_path, init):
    labels = ["dog", "cat;dog", "cat", "bird"] * 3
    for i, label in enumerate(labels):
        sf.write(tmp_path / f"c{i}.wav", 0.1 * torch.randn(8000, generator=torch.Generator().manual_seed(i)).numpy(),
                 16000)
    (tmp_path / "m.csv").write_text("file_name,label,split\n" + "".join(
        f"c{i}.wav,{label},{'train' if i < 8 else 'test'}\n" for i, label in enumerate(labels)))
    args = ["--init", init, "--manifest", str(tmp_path / "m.csv"), "--recipe", "as20k",
            "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "4", "--input-frames", "33", "--seeds", "43",
            "--device", "cpu"]
    torch.multiprocessing.spawn(finetune_worker, args=(2, free_port(), [*args, "--out-dir", str(tmp_path / "whole")]), nprocs=2)
    for extra in (["--epochs-limit", "1"], []):  # each rank's augmentation generator travels in resume.pt
        torch.multiprocessing.spawn(finetune_worker, args=(2, free_port(), [*args, "--out-dir", str(tmp_path / "parts"), *extra]),
                 nprocs=2)
    whole, parts = (torch.load(tmp_path / run / "best.pt", weights_only=True) for run in ("whole", "parts"))
    for key in ("model", "head"):
        assert all(torch.equal(value, parts[key][k]) for k, value in whole[key].items()), key
    resume = torch.load(tmp_path / "parts" / "resume.pt", weights_only=True)
    assert len(resume["resume"]["rng"]) == 2 and resume["fit"]["epoch"] == 2


def test_train_per_class_keeps_a_seeded_label_scarce_part_of_the_training_clips():
    targets = torch.zeros(30, 3)
    targets[:12, 0] = 1
    targets[12:15, 1] = 1
    targets[15:, 2] = 1
    targets[15:20, 0] = 1  # multi-label clips count under their first class
    clips = data.ClipSet([torch.full((4,), float(i)) for i in range(30)], targets, [f"c{i}" for i in range(30)])
    scarce = ft.labelled_subset(clips, 4)
    first = scarce.targets.argmax(dim=1).tolist()
    assert [first.count(c) for c in range(3)] == [4, 3, 4]  # 4 of 17, all 3 of the class of 3, 4 of 10
    assert ft.labelled_subset(clips, 4).names == scarce.names
    assert [int(c[0]) for c in scarce.clips] == [int(n[1:]) for n in scarce.names]


def test_the_small_recipe_sizes_itself_to_the_clips_and_reports_the_wise_ft_average_beside_the_probe(
        tmp_path, init, capsys):
    csv_path = write_clips(tmp_path, ["dog", "cat"] * 6, ["1", "2", "3"] * 4, "fold")
    t = np.arange(16000) / 16000                       # one clip of 1 s among the 0.5-s ones: 101 frames
    sf.write(tmp_path / "c0.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    out = tmp_path / "run"
    ft.main(["--init", init, "--manifest", csv_path, "--recipe", "small", "--folds", "1", "--epochs", "2",
             "--warmup-epochs", "1", "--batch-size", "4", "--seeds", "43", "--device", "cpu", "--out-dir", str(out)])
    result = json.loads((out / "result.json").read_text())
    recipe = result["recipe"]
    assert (recipe["input_frames"], recipe["encoder_frames"], recipe["time_mask_frames"]) == (101, 112, 10)
    assert recipe["head_init"] == "probe" and recipe["wise_ft"] == 0.5 and result["rule"] == "last"
    run = result["runs"][0]
    assert run["best_epoch"] == 2 and run["frozen_probe"] is not None
    printed = capsys.readouterr().out
    assert "1 run(s) of 2 epochs at 101 frames" in printed
    assert f"; last epoch without WiSE-FT {run['last_score']:.2f}; frozen encoder's linear probe" in printed
    assert "selected: none: each run's last epoch, averaged with the weights it started from (WiSE-FT, 0.5 of " \
           "the way to the fine-tuned ones), then its head fitted again on that encoder's features of the training " \
           "clips, the recipe's rule (last)" in printed
    model = features.load_model(out / "best.pt")       # the average is the file written
    assert model.classifier.config.crop_frames == 112
    assert model.task["padding"] == "masked"           # tagging reads a clip as the evaluation did: whole
    short = data.load_audio(tmp_path / "c1.wav")
    tagged = features.tag_audio(short[None], model)
    masked = features.classify(model.classifier, [short], "wave", 101, padding="masked").softmax(dim=-1)
    counted = features.classify(model.classifier, [short], "wave", 101).softmax(dim=-1)
    assert torch.allclose(tagged, masked) and not torch.allclose(tagged, counted, atol=1e-4)
