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
    for key in ("baseline", "optimized"):
        assert result[key]["clips_per_s"] > 0 and result[key]["ms_per_step"] > 0
        assert result[key]["peak_memory_bytes"] > 0
    assert result["speedup"] > 0
    # The analytic count agrees with torch's flop counter to within 10 %.
    assert result["flops_per_clip"] == pytest.approx(result["flops_per_clip_counted"], rel=0.1)


def test_stage2_step_too(tmp_path):
    summary = bench.run(bench.parse_args(["--stage", "2", "--device", "cpu", "--batch", "4", "--steps", "1",
                                          "--warmup", "1"]))
    assert summary["first_loss_difference"] < 1e-5
    config = m2d.preset("tiny")
    assert summary["flops_per_clip"] == pytest.approx(bench.analytic_flops_per_clip(config, "2"))
