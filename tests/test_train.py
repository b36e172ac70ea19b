"""End-to-end tests of train.py: a short real run, checkpoints, and bad --data."""

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import model as m2d
import features
import runs
import engine
import train


def authors_lr(epoch: float, lr: float, warmup_epochs: float, epochs: float, min_lr: float = 0.0) -> float:
    """The rule of MAE's util/lr_sched.adjust_learning_rate, which the authors call before every step with the
    fractional epoch (data_iter_step / len(data_loader) + epoch), restated here as the reference."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_lr_schedule_is_the_authors_from_a_first_step_at_rate_0():
    steps_per_epoch, epochs, warmup = 7, 12, 2
    lrs = [engine.lr_at(s, epochs * steps_per_epoch, warmup * steps_per_epoch, 1.5e-4)
           for s in range(epochs * steps_per_epoch)]
    expected = [authors_lr(s / steps_per_epoch, 1.5e-4, warmup, epochs) for s in range(epochs * steps_per_epoch)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1.5e-4 / 14)   # the first step only moves AdamW's moments
    assert lrs[14] == pytest.approx(1.5e-4)                         # the peak, right after the warm-up
    assert all(a >= b for a, b in zip(lrs[14:], lrs[15:])) and lrs[-1] < 1e-6


def test_short_stage1_run_learns(stage1_run):
    records = [json.loads(line) for line in (stage1_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] + list(range(5, 81, 5))
    for key in ("loss", "loss_m2d", "loss_clap", "lr", "ema_decay", "clips_per_s"):
        assert all(math.isfinite(r[key]) for r in records), key
    first, last = records[0], records[-3:]
    assert np.mean([r["loss_m2d"] for r in last]) < 0.6 * first["loss_m2d"]
    assert np.mean([r["loss_clap"] for r in last]) < first["loss_clap"] - 0.5  # chance is log(32) = 3.47
    assert records[-1]["lr"] < records[5]["lr"]
    assert records[-1]["ema_decay"] > records[0]["ema_decay"]


def test_checkpoint_round_trip(stage1_run):
    ckpt = torch.load(stage1_run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["stage"] == "1" and ckpt["step"] == 80
    model, tokenizer = features.model_from_checkpoint(ckpt)
    assert tokenizer is None
    assert model.config == m2d.preset("tiny", text_dim=384)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key
    assert torch.allclose(model.norm_stats, torch.tensor(ckpt["norm_stats"]))
    # Training moved the encoder away from a fresh initialisation, and the EMA target followed.
    fresh = m2d.M2DCLAP(model.config)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, fresh.blocks[0].attn.qkv.weight)
    assert not torch.equal(model.target_blocks[0].attn.qkv.weight, fresh.target_blocks[0].attn.qkv.weight)
    assert not torch.equal(model.target_blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_the_ema_target_moves_by_exactly_the_schedules_amount():
    torch.manual_seed(0)
    model = m2d.M2DCLAP(m2d.preset("tiny", depth=2, predictor_depth=1, text_dim=16))
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=1e-3, fused=True)
    mel, text = torch.randn(4, 1, 80, 192) * 4 - 7, torch.randn(4, 16)
    target_before = [p.clone() for p in model.target_parameters()]
    online_before = [p.clone() for p in model.online_parameters()]
    decay = engine.ema_decay_at(3, 10, 0.9, 0.99)  # 0.927
    stepper = runs.Stepper.build(model, optimizer, torch.device("cpu"), "fp32", use_compile=False, clip_grad_norm=3.0)
    _, _, applied = engine.train_step(model, stepper, [(mel, text)], 0.01, decay)
    assert applied
    for target, before, online, online_was in zip(model.target_parameters(), target_before,
                                                  model.online_parameters(), online_before):
        assert not torch.equal(online, online_was)  # the step moved the online network first
        torch.testing.assert_close(target, decay * before + (1 - decay) * online, atol=1e-7, rtol=1e-6)


def run_user_data(tmp_path, *extra):
    return ["--stage", "1", "--data", str(tmp_path / "captions.csv"), "--batch-size", "2",
            "--max-steps", "2", "--out-dir", str(tmp_path / "run"), *extra]


def test_training_on_user_data(tmp_path, corpus):
    corpus(tmp_path, n_clips=4)
    train.main(run_user_data(tmp_path))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["model_config"]["text_dim"] == 16


def test_unreadable_audio_stops_with_the_file_name(tmp_path, corpus, capsys):
    corpus(tmp_path, n_clips=4)
    (tmp_path / "c2.wav").write_bytes(b"not audio")
    with pytest.raises(SystemExit, match=r"c2.wav: cannot be decoded as audio"):
        train.main(run_user_data(tmp_path))


def test_caption_row_for_a_missing_clip_stops_with_the_file_name(tmp_path, corpus):
    corpus(tmp_path, n_clips=4)
    (tmp_path / "c3.wav").unlink()
    with pytest.raises(SystemExit, match=r"captions.csv: 1 of 4 audio file\(s\).*c3.wav.*--audio-root"):
        train.main(run_user_data(tmp_path))


def test_mismatched_embedding_file_stops_with_the_file_name(tmp_path, corpus):
    corpus(tmp_path, n_clips=4)
    np.save(tmp_path / "captions.npy", np.zeros((3, 16), np.float32))
    with pytest.raises(SystemExit, match=r"captions.npy: 3 embedding rows but .*captions.csv has 4"):
        train.main(run_user_data(tmp_path))
    np.save(tmp_path / "captions.npy", np.zeros((4, 16, 2), np.float32))
    with pytest.raises(SystemExit, match=r"captions.npy: expected a 2-D float array"):
        train.main(run_user_data(tmp_path))


def test_periodic_checkpoints_keep_only_the_newest(tmp_path, corpus):
    corpus(tmp_path, n_clips=4)
    train.main(run_user_data(tmp_path)[:-4] + ["--max-steps", "7", "--save-every", "2", "--keep", "2",
                                               "--out-dir", str(tmp_path / "run")])
    names = sorted(p.name for p in (tmp_path / "run").glob("*.pt"))
    assert names == ["last.pt", "step_00000004.pt", "step_00000006.pt"]
    assert torch.load(tmp_path / "run" / "step_00000006.pt", weights_only=True)["step"] == 6
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 7


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, corpus, monkeypatch):
    corpus(tmp_path, n_clips=4)
    real_save, saves = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) > 1:
            f.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(SystemExit, match=r"last.pt: could not write the checkpoint.*No space left on device.*"
                                         r"previous checkpoint there, if any, is unchanged"):
        train.main(run_user_data(tmp_path)[:-4] + ["--max-steps", "4", "--save-every", "2", "--keep", "0",
                                                   "--out-dir", str(tmp_path / "run")])
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "run" / "last.pt.tmp").exists()


def test_ema_schedule_is_linear_from_the_recipes_start_to_end():
    start, end = engine.Recipe().ema_decay
    assert (start, end) == (0.99995, 0.99999)  # the paper's
    assert engine.ema_decay_at(0, 100, start, end) == pytest.approx(0.99995)
    assert engine.ema_decay_at(50, 100, start, end) == pytest.approx(0.99997)
    assert engine.ema_decay_at(100, 100, start, end) == pytest.approx(0.99999)
    assert engine.ema_decay_at(25, 100, 0.9, 1.0) == pytest.approx(0.925)


def test_flags_of_another_stage_stop_with_the_stage_they_belong_to(capsys):
    for argv, message in [(["--stage", "2", "--mask-ratio", "0.5"], "--mask-ratio is for stage 1 only"),
                          (["--stage", "1", "--text-side", "embeddings"], "--text-side is for stage 2 only"),
                          (["--stage", "1", "--init", "x.pt"], "--init is for stage 2 and 2.1 only"),
                          (["--stage", "2.1", "--ema-decay", "0.9", "0.99"], "--ema-decay is for stage 1 only")]:
        with pytest.raises(SystemExit):
            train.parse_config(argv)
        assert message in capsys.readouterr().err
    assert train.parse_config(["--stage", "2", "--text-side", "embeddings"]).text_side == "embeddings"


def test_help_shows_the_defaults_and_the_recipes(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for default in ("between checkpoint saves (last.pt is replaced atomically each time) (default: 1000)",
                    "Default: tiny in stage 1", "(default: bf16 on CUDA, fp32 on CPU)", "(default: 8 on CUDA, 0 on CPU)"):
        assert default in shown
    assert "Recipes" in shown and "1 tiny 64 2.00e-03 40 2 (0.9, 0.95) (0.995, 0.999) 0.01 -" in shown
    assert "2 tiny 64 4.00e-04 8 0.5 (0.9, 0.999) - - 0.3" in shown
    # Each recipe flag lists its default per stage and preset.
    for default in ("total clips per optimiser step (default: stage 1: tiny 64, base/large 2048; stage 2: tiny 64, "
                    "base/large 2048; stage 2.1: tiny 64, base/large 2048)",
                    "(default: stage 1: tiny 0.0005, base/large 0.0024; stage 2: tiny 0.0001, base/large 2.4e-05;",
                    "keeps its own (default: stage 2: 0.3; stage 2.1: 0)",
                    "over training (default: stage 1: tiny 0.995 0.999, base/large 0.99995 0.99999)"):
        assert default in shown, default


def tiny_training_model():
    torch.manual_seed(0)
    model = m2d.M2DCLAP(m2d.preset("tiny", depth=2, predictor_depth=1, text_dim=16))
    return model, torch.optim.AdamW(model.param_groups(0.05), lr=1e-3, fused=True)


def test_a_compiled_step_survives_a_batch_size_change():
    """A user's last partial batch, or a second shape in one process, compiles again rather than failing.

    aot_eager traces exactly as the default inductor backend does (where a
    symbolic batch size used to reach torch.rand and crash), without the
    minute of C++ compilation.
    """
    model, optimizer = tiny_training_model()
    stepper = runs.Stepper(model, runs.compiled(model, backend="aot_eager"), optimizer,
                           runs.LossScaler(torch.device("cpu"), False), contextlib.nullcontext(), clip_grad_norm=3.0)
    for batch in (4, 3, 4):
        mel, text = torch.randn(batch, 1, 80, 192) * 4 - 7, torch.randn(batch, 16)
        sums, _, finite = engine.train_step(model, stepper, [(mel, text)], 0.01, 0.99)
        assert finite and torch.isfinite(sums["loss"])


@pytest.mark.parametrize("frozen_encoder", [False, True])
def test_the_training_forward_compiles_as_one_graph(frozen_encoder):
    model, _ = tiny_training_model()
    mel, text = torch.randn(2, 1, 80, 192) * 4 - 7, torch.randn(2, 16)
    explanation = torch._dynamo.explain(model)(mel, text, frozen_encoder=frozen_encoder)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_defaults_are_settled_once_right_after_parsing(tmp_path):
    stage1 = train.parse_config(["--stage", "1", "--device", "cpu"])
    assert (stage1.preset, stage1.out_dir, stage1.init) == ("tiny", Path("runs/stage1"), None)
    assert (stage1.precision, stage1.compile, stage1.workers, stage1.preload) == ("fp32", False, 0, True)
    assert stage1.embedding_model == "all-MiniLM-L6-v2" and stage1.resume is (Path("runs/stage1/last.pt").is_file())
    stage2 = train.parse_config(["--stage", "2", "--device", "cpu", "--data", str(tmp_path / "c.csv"),
                                 "--out-dir", str(tmp_path), "--precision", "bf16"])
    assert stage2.preset is None and stage2.init == Path("runs/stage1.1/last.pt")  # the preset comes from --init
    assert (stage2.audio_root, stage2.preload, stage2.embedding_model) == (tmp_path, False, None)
    assert stage2.embeddings == tmp_path / "c.npy"
    assert (stage2.precision, stage2.resume) == ("bf16", False)
    (tmp_path / "last.pt").touch()
    assert train.parse_config(["--stage", "2", "--out-dir", str(tmp_path)]).resume is True


def test_the_recipe_row_holds_each_stages_defaults_and_the_command_line_overrides_it():
    assert [engine.RECIPES[(stage, "base")].token_drop for stage in ("1", "2", "2.1")] == [0.0, 0.3, 0.0]
    assert engine.RECIPES[("1", "base")].peak_lr == pytest.approx(3e-4 * 2048 / 256)  # base_lr x batch / 256
    init = {"stage": "1.1", "args": {"preset": "base"}, "embedding_model": "gte-base"}
    config, recipe = train.settle_run(train.parse_config(["--stage", "2", "--device", "cpu"]), None, init)
    assert recipe == engine.RECIPES[("2", "base")] and recipe.token_drop == 0.3
    assert (config.preset, config.embedding_model, config.token_drop) == ("base", "all-MiniLM-L6-v2", 0.3)
    assert (config.batch_size, config.lr, config.clap_weight) == (2048, recipe.peak_lr, None)  # as it trains
    argv = ["--stage", "1", "--device", "cpu", "--batch-size", "32", "--lr", "1e-3", "--ema-decay", "0.9", "0.99"]
    config, recipe = train.settle_run(train.parse_config(argv), None, None)
    assert (recipe.batch_size, recipe.peak_lr, recipe.ema_decay, recipe.base_lr) == (32, 1e-3, (0.9, 0.99), 2e-3)
    assert (config.mask_ratio, config.token_drop) == (0.7, None)
    with pytest.raises(ValueError, match="of the base preset, but this run asks for --preset tiny"):
        train.settle_run(train.parse_config(["--stage", "2", "--preset", "tiny"]), None, init)
