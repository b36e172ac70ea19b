"""Tests of bench.py: both steps compute the same loss, and the JSON has its fields."""

import json

import pytest
import torch

import bench
import model as m2d


def test_baseline_and_optimised_steps_compute_the_same_loss_and_report_the_fields(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--device", "cpu", "--batch", "4", "--steps", "2", "--warmup", "1",
                "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["first_loss_difference"] < 1e-5
    assert result["baseline"]["first_loss"] == pytest.approx(result["optimized"]["first_loss"], abs=1e-5)
    for key in ("baseline", "optimized"):  # the figures agree with each other
        assert result[key]["clips_per_s"] == pytest.approx(4 / (result[key]["ms_per_step"] / 1000), rel=0.02)
        assert result[key]["peak_memory_bytes"] > 4 * 2.6e6  # at least the tiny model's fp32 weights
    assert result["speedup"] == pytest.approx(result["optimized"]["clips_per_s"] / result["baseline"]["clips_per_s"],
                                              rel=0.02)
    # The analytic count agrees with torch's flop counter to within 10 %.
    assert result["flops_per_clip"] == pytest.approx(result["flops_per_clip_counted"], rel=0.1)


def test_stage2_step_too():
    args = bench.parse_args(["--stage", "2", "--device", "cpu", "--batch", "4", "--steps", "1", "--warmup", "1"])
    config, fresh, mel, text, variants, _ = bench.build_variants(args)
    results = bench.measure(variants, torch.device("cpu"), args.warmup, args.steps)
    assert results["baseline"]["first_loss"] == pytest.approx(results["optimized"]["first_loss"], abs=1e-5)
    # Stage 2 backpropagates into the CLAP heads only: far fewer FLOPs than stage 1, as torch counts them.
    analytic = bench.analytic_flops_per_clip(config, "2")
    assert analytic == pytest.approx(bench.counted_flops_per_clip(fresh(), mel[:2], text[:2], True), rel=0.1)
    assert analytic < 0.7 * bench.analytic_flops_per_clip(m2d.preset("tiny"), "1")


def test_the_prepared_gpu_run_runs_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "prepared.json"
    bench.main(["prepared", "--device", "cpu", "--preset", "tiny", "--batch", "4", "--big-batch", "8",
                "--large-preset", "tiny", "--large-batch", "2", "--steps", "1", "--warmup", "1", "--train-steps", "6",
                "--json", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert list(rows) == ["authors' recipe", "ours", "ours, larger batch", "train.py, synthetic shards",
                          "ours, tiny + grad checkpointing"]
    assert [r["batch"] for r in rows.values()] == [4, 4, 8, 4, 2]
    assert result["steps"]["first_loss_difference"] == 0  # the authors' recipe and ours: the same first step
    for name in ("ours", "ours, larger batch"):
        assert rows[name]["clips_per_s"] == pytest.approx(rows[name]["batch"] / rows[name]["ms_per_step"] * 1000)
    printed = capsys.readouterr().out
    assert "prepared run on cpu" in printed and "step      6/6" in printed  # train.py itself ran its 6 steps


def test_our_variant_times_engine_train_step_with_the_stages_recipe(monkeypatch):
    real_step, calls = bench.engine.train_step, []

    def counted(model, stepper, micro_batches, clap_weight, ema_decay, token_drop):
        calls.append((clap_weight, ema_decay, token_drop, stepper.clip_grad_norm,
                      stepper.optimizer.param_groups[0]["betas"]))
        return real_step(model, stepper, micro_batches, clap_weight, ema_decay, token_drop)

    monkeypatch.setattr(bench.engine, "train_step", counted)
    for stage, ema_decay in (("1", 0.995), ("2", None)):
        args = bench.parse_args(["--stage", stage, "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "1"])
        _, _, _, _, variants, _ = bench.build_variants(args, only="optimized")
        variants["optimized"]()
        recipe = bench.engine.RECIPES[(stage, "tiny")]
        assert calls.pop() == (recipe.clap_weight, ema_decay, recipe.token_drop, recipe.clip_grad_norm, recipe.betas)
    assert bench.engine.RECIPES[("2", "tiny")].token_drop == 0.3  # the token drop stage 2 trains with
