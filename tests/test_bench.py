"""Tests of bench.py: both steps compute the same loss, and the JSON has its fields."""

import json

import pytest

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


def test_stage2_step_too(tmp_path):
    summary = bench.run(bench.parse_args(["--stage", "2", "--device", "cpu", "--batch", "4", "--steps", "1",
                                          "--warmup", "1"]))
    assert summary["first_loss_difference"] < 1e-5
    # Stage 2 backpropagates into the CLAP heads only: far fewer FLOPs than stage 1, as torch counts them.
    assert summary["flops_per_clip"] == pytest.approx(summary["flops_per_clip_counted"], rel=0.1)
    stage1 = bench.analytic_flops_per_clip(m2d.preset("tiny"), "1")
    assert summary["flops_per_clip"] < 0.7 * stage1
