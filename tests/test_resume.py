"""Exact resume after SIGKILL (mid-run and mid-save), and skipping non-finite steps."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import conftest
import engine
import model as m2d
import runs
import train

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY = 12, 3  # 4 steps an epoch: the run crosses epochs and resumes mid-epoch
# The tests wait on what the runs print and on their exit, never on a wall clock. This bound only ends a
# run that hangs for good: a run here takes seconds on an idle machine and minutes on a crowded one.
HANG_GUARD_S = 3600


def write_corpus(root: Path) -> Path:
    """16 clips of different lengths, so that random crops matter, with two captions each."""
    return conftest.write_corpus(root, n_clips=16, longer_by_s=0.1, captions_per_clip=2)


def command(root: Path, out_dir: Path, *extra) -> list[str]:
    return ["--stage", "1", "--data", str(root / "captions.csv"), "--batch-size", "4", "--max-steps", str(STEPS),
            "--save-every", str(SAVE_EVERY), "--log-every", "1", "--out-dir", str(out_dir), "--workers", "2", *extra]


# Runs train.main; with KILL_WHILE_SAVING_STEP set, the save of that step writes
# part of the file, says so on stdout and waits, however long it takes, to be killed.
RUNNER = textwrap.dedent("""
    import os, sys, time
    import torch
    sys.path.insert(0, {root!r})
    import train
    real_save, kill_step = torch.save, int(os.environ.get("KILL_WHILE_SAVING_STEP", 0))

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == kill_step:
            f.write(b"the first bytes of a checkpoint")
            f.flush()
            print("SAVING", flush=True)
            while True:
                time.sleep(60)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    train.main(sys.argv[1:])
""")


def start(tmp_path: Path, args: list[str], **env) -> subprocess.Popen:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(root=str(ROOT)))
    return subprocess.Popen([sys.executable, str(runner), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path, env={**os.environ, **env})


def run_to_end(tmp_path: Path, args: list[str]) -> str:
    proc = start(tmp_path, args)
    out, _ = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, out
    return out


def kill_when(proc: subprocess.Popen, marker: str) -> str:
    """SIGKILL the process as soon as a line starting with marker appears (the run's own progress line or
    the runner's SAVING); its output so far."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(marker):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=HANG_GUARD_S)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    return "".join(seen)


def params(out_dir: Path) -> dict:
    ckpt = torch.load(out_dir / "last.pt", weights_only=True)
    assert ckpt["step"] == STEPS
    return {**ckpt["model"], **{f"optimizer.{i}.{k}": v for i, s in ckpt["optimizer"]["state"].items()
                                for k, v in s.items()}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    run_to_end(root, command(root, root / "uninterrupted"))
    return root, params(root / "uninterrupted")


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # EMA target (target_*) and optimiser moments included


def test_sigkill_mid_run_then_resume_is_bit_identical(uninterrupted, tmp_path):
    root, expected = uninterrupted
    out_dir = tmp_path / "run"
    killed = kill_when(start(root, command(root, out_dir)), "step      8/")  # last saved at step 6
    assert "step      7/" in killed
    assert torch.load(out_dir / "last.pt", weights_only=True)["step"] == 6
    resumed = run_to_end(root, command(root, out_dir))  # the same command resumes on its own
    assert "resuming" in resumed and "at step 6 of 12 (epoch 1, batch 2 of 4)" in resumed
    assert_bit_identical(params(out_dir), expected)
    steps = [json.loads(line)["step"] for line in (out_dir / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # steps 7 and 8 of the killed run are logged once, not twice


def test_sigkill_while_saving_leaves_the_previous_checkpoint_and_resume_is_bit_identical(uninterrupted, tmp_path):
    root, expected = uninterrupted
    out_dir = tmp_path / "run"
    kill_when(start(root, command(root, out_dir), KILL_WHILE_SAVING_STEP="9"), "SAVING")
    assert (out_dir / "last.pt.tmp").read_bytes() == b"the first bytes of a checkpoint"
    assert torch.load(out_dir / "last.pt", weights_only=True)["step"] == 6  # loadable, the save before
    resumed = run_to_end(root, command(root, out_dir, "--resume"))
    assert "at step 6 of 12" in resumed
    assert_bit_identical(params(out_dir), expected)


def test_resume_refuses_other_settings_and_a_finished_run_says_so(uninterrupted, tmp_path, capsys):
    root, _ = uninterrupted
    train.main(command(root, root / "uninterrupted"))
    assert "this run finished at step 12; nothing to resume" in capsys.readouterr().out
    (tmp_path / "run").mkdir()  # a run stopped at step 9: its periodic copy as last.pt
    shutil.copy(root / "uninterrupted" / "step_00000009.pt", tmp_path / "run" / "last.pt")
    with pytest.raises(SystemExit, match=r"last.pt: cannot resume with other settings .*total_steps 12 -> 20"):
        train.main(command(root, tmp_path / "run")[:-2] + ["--max-steps", "20", "--workers", "0"])
    with pytest.raises(SystemExit, match=r"last.pt: a stage-1 run, so stage 2 cannot resume it"):
        train.main(["--stage", "2", "--out-dir", str(tmp_path / "run"), "--init", str(tmp_path / "run" / "last.pt")])
    with pytest.raises(SystemExit, match=r"last.pt: not found, so there is nothing to resume"):
        train.main(command(root, tmp_path / "nothing-here", "--resume"))


def tiny_step_setup(scaler=None):
    torch.manual_seed(0)
    model = m2d.M2DCLAP(m2d.preset("tiny", text_dim=16))
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=1e-3, fused=True)
    scaler = scaler or runs.LossScaler(torch.device("cpu"), enabled=False)
    mel, text = torch.randn(4, 1, 80, 192) * 4 - 7, torch.randn(4, 16)
    return model, optimizer, scaler, mel, text


def step(model, optimizer, scaler, mel, text):
    stepper = runs.Stepper(model, model, optimizer, scaler, torch.autocast("cpu", enabled=False), clip_grad_norm=3.0)
    return engine.train_step(model, stepper, [(mel, text)], 0.01, 0.99)


def test_a_non_finite_loss_skips_the_step_and_changes_nothing():
    model, optimizer, scaler, mel, text = tiny_step_setup()
    step(model, optimizer, scaler, mel, text)  # one good step, so the optimiser has state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[model.cls_token].items()}
    text[1, 3] = float("nan")  # one caption embedding gone bad
    _, grad_norm, finite = step(model, optimizer, scaler, mel, text)
    assert isinstance(finite, torch.Tensor)  # a device flag: the step itself never read it back
    assert not finite and not torch.isfinite(grad_norm)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # online weights and EMA target
    assert set(moments) == {"step", "exp_avg", "exp_avg_sq"}
    for key, value in optimizer.state[model.cls_token].items():  # the step count too: bias correction goes on as before
        assert torch.equal(value, moments[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_an_fp16_scaler_overflow_is_a_skipped_step_that_lowers_the_scale():
    scaler = runs.LossScaler(torch.device("cpu"), True, init_scale=2.0**127)
    model, optimizer, scaler, mel, text = tiny_step_setup(scaler)
    model.cls_token.register_hook(lambda grad: grad * 1e4)  # large enough to overflow at this loss scale
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, _, applied = step(model, optimizer, scaler, mel, text)
    assert not applied and scaler.scale.item() == 2.0**126
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    while not step(model, optimizer, scaler, mel, text)[2]:  # the scale keeps halving until a step fits
        pass
    assert not torch.equal(model.cls_token, before["cls_token"])


def test_the_loss_scaler_state_is_torch_gradscalers_both_ways():
    """Checkpoints written with torch.amp.GradScaler's state resume with LossScaler, and the other way round."""
    theirs = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2000)
    ours = runs.LossScaler(torch.device("cpu"), True)
    ours.load_state_dict(theirs.state_dict())
    assert ours.scale.item() == 1024.0
    ours.update(torch.tensor(1.0))  # an overflow halves the scale
    theirs.load_state_dict(ours.state_dict())
    assert theirs.get_scale() == 512.0
    assert runs.LossScaler(torch.device("cpu"), False).state_dict() == {}  # as a disabled GradScaler's


def test_non_finite_steps_are_skipped_with_a_warning_and_too_many_stop_the_run(tmp_path, monkeypatch, capsys):
    write_corpus(tmp_path)
    real_losses, calls = engine.m2d_clap_loss, []

    def losses_bad_at(bad_calls):
        def m2d_clap_loss(*args):
            calls.append(1)
            losses = real_losses(*args)
            return {**losses, "loss": losses["loss"] * float("nan")} if len(calls) in bad_calls else losses
        return m2d_clap_loss

    args = command(tmp_path, tmp_path / "once")[:-2] + ["--workers", "0", "--max-bad-steps", "3"]
    monkeypatch.setattr(engine, "m2d_clap_loss", losses_bad_at({5, 6}))  # two bad steps, then good ones
    train.main(args)
    out = capsys.readouterr()
    assert "warning: step 5: non-finite" in out.err and "warning: step 6: non-finite" in out.err
    assert "2 step(s) skipped for a non-finite loss or gradient" in out.out
    log = [json.loads(line) for line in (tmp_path / "once" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in log] == [0] * 4 + [1] + [2] * 7

    # The flags are read back every --max-bad-steps steps between log lines: the stop still names the first three.
    args = command(tmp_path, tmp_path / "run")[:-2] + ["--workers", "0", "--max-bad-steps", "3", "--log-every", "50"]
    calls.clear()
    monkeypatch.setattr(engine, "m2d_clap_loss", losses_bad_at(range(8, 100)))
    with pytest.raises(SystemExit, match=r"3 steps in a row \(8 to 10\) had a non-finite loss or gradient.*"
                                         r"last good checkpoint, .*last.pt \(step 6\), is intact.*--lr"):
        train.main(args)
    err = capsys.readouterr().err
    assert "warning: step 8: non-finite loss or gradient" in err and "step skipped, weights unchanged" in err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 6


def test_stage2_resumes_bit_identically_too(uninterrupted, tmp_path):
    root, _ = uninterrupted
    args = ["--stage", "2", "--text-side", "embeddings", "--init", str(root / "uninterrupted" / "last.pt"),
            "--data", str(root / "captions.csv"), "--batch-size", "4", "--max-steps", "6", "--save-every", "2",
            "--log-every", "1"]
    train.main([*args, "--out-dir", str(tmp_path / "whole")])
    (tmp_path / "resumed").mkdir()  # stopped after step 4: its periodic copy as last.pt
    shutil.copy(tmp_path / "whole" / "step_00000004.pt", tmp_path / "resumed" / "last.pt")
    train.main([*args, "--out-dir", str(tmp_path / "resumed")])
    whole, resumed = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("whole", "resumed"))
    assert whole["step"] == resumed["step"] == 6
    logged = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert logged == [5, 6]  # it went on from step 4 rather than starting over
    assert_bit_identical(whole["model"], resumed["model"])
