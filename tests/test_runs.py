"""Tests of runs.py, the run machinery, on plain values: no Config, no training run."""

import json
import random

import numpy as np
import pytest
import torch

import runs


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "state.bin"
    runs.atomic_write(path, lambda f: f.write(b"old"))

    def half_then_fail(f):
        f.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        runs.atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    runs.atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"


def resumable(path, stage="1", **extra):
    runs.save_checkpoint(path, stage=stage, step=3, resume={"run": {"seed": 0}}, **extra)
    return path


def test_find_resume_goes_on_from_a_run_of_the_same_stage_only(tmp_path):
    path = tmp_path / "last.pt"
    assert runs.find_resume(path, False, "1") is None  # a new run
    with pytest.raises(runs.ResumeError, match=r"last.pt: not found, so there is nothing to resume"):
        runs.find_resume(path, True, "1")
    resumable(path, stage="2")
    with pytest.raises(runs.ResumeError, match=r"last.pt: a stage-2 run, so stage 1 cannot resume it"):
        runs.find_resume(path, True, "1")
    assert runs.find_resume(path, True, "2")["step"] == 3
    runs.save_checkpoint(path, stage="2", step=3)
    with pytest.raises(runs.ResumeError, match=r"last.pt: holds no resume state.*--no-resume"):
        runs.find_resume(path, True, "2")


def test_restore_training_checks_the_settings_and_restores_optimizer_and_scaler(tmp_path):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    param.grad = torch.ones(3)
    optimizer.step()
    scaler = runs.LossScaler(torch.device("cpu"), True, init_scale=256.0)
    settings = {"seed": 0, "batch_size": 8}
    path = tmp_path / "last.pt"
    runs.save_checkpoint(path, stage="1", step=5, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                         resume=runs.resume_state(settings, 1e-3, [runs.rng_state(torch.device("cpu"))], 12.5))
    ckpt = runs.load_checkpoint(path)

    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1, fused=True)
    fresh_scaler, printed = runs.LossScaler(torch.device("cpu"), True), []
    assert runs.restore_training(ckpt, path, settings, 2e-3, fresh, fresh_scaler, printed.append) == (5, 12.5)
    assert printed == ["peak lr changed on resume: 1.00e-03 -> 2.00e-03"]
    assert fresh_scaler.scale.item() == 256.0
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(runs.ResumeError, match=r"last.pt: cannot resume with other settings .*batch_size 8 -> 16"):
        runs.restore_training(ckpt, path, {**settings, "batch_size": 16}, 1e-3, fresh, fresh_scaler)


def test_a_changed_setting_is_named_down_to_the_field_of_a_nested_one(tmp_path):
    saved = {"init": "a.pt", "recipe": {"epochs": 100, "lr": 0.5, "seeds": [43, 44]}, "folds": None}
    runs.check_same_run(tmp_path / "resume.pt", saved, json.loads(json.dumps(saved)))
    now = {**saved, "recipe": {**saved["recipe"], "epochs": 10}, "folds": ["1"]}
    with pytest.raises(runs.ResumeError) as e:
        runs.check_same_run(tmp_path / "resume.pt", saved, now)
    assert "(recipe.epochs 100 -> 10; folds None -> ['1'])." in str(e.value)
    assert "lr" not in str(e.value) and "seeds" not in str(e.value)


def test_an_optimiser_state_of_other_groups_is_refused_naming_the_file(tmp_path):
    weights = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    old = torch.optim.AdamW([{"params": weights[:1]}, {"params": weights[1:]}])  # another grouping
    runs.save_checkpoint(tmp_path / "last.pt", step=3, optimizer=old.state_dict(), scaler={},
                         resume={"run": {}, "peak_lr": 1e-3, "elapsed_s": 0.0})
    new = torch.optim.AdamW([{"params": weights}, {"params": []}])
    with pytest.raises(runs.ResumeError, match=r"last.pt: its optimiser state has other parameter groups.*"
                                               r"--no-resume"):
        runs.restore_training(runs.load_checkpoint(tmp_path / "last.pt"), tmp_path / "last.pt", {}, 1e-3, new,
                              runs.LossScaler(torch.device("cpu"), False), print)


def test_rng_states_survive_a_checkpoint_and_replay_the_same_draws(tmp_path):
    runs.seed_everything(7)
    runs.save_checkpoint(tmp_path / "rng.pt", rng=runs.gather_rng_states(runs.Distributed(), torch.device("cpu")))
    draws = (random.random(), np.random.rand(), torch.rand(2))
    runs.seed_everything(8)
    states = runs.load_checkpoint(tmp_path / "rng.pt")["rng"]
    runs.restore_rng(states, runs.Distributed(), torch.device("cpu"), seed=0, step=3)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])

    printed = []  # a job of another size cannot replay them, and says so
    runs.restore_rng(states * 2, runs.Distributed(), torch.device("cpu"), seed=0, step=3, log=printed.append)
    assert "the run had 2 processes and now has 1" in printed[0]


def test_the_log_keeps_a_resumed_runs_records_and_writes_progress(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss_m2d": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)))
    log = runs.RunLog(path, total_steps=10)
    log.start(start_step=2, elapsed_s=30.0)  # steps 3 and 4 were after the checkpoint: logged again later
    assert [r["step"] for r in log.records] == [1, 2]
    assert log.elapsed_s() >= 30.0
    log.write({"step": 3, "loss_m2d": 0.25})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    log.progress(3, {"loss": 0.5, "loss_m2d": 0.25}, ["lr 1.00e-03"], clips_per_s=12.4)
    line = capsys.readouterr().out
    assert line.startswith("step      3/10 | loss 0.5000 | m2d 0.2500 | lr 1.00e-03 | 12 clips/s | ETA ")
    assert log.summary() == "losses, step 1 -> mean of the last 3 logged steps: loss_m2d 1.000 -> 0.583"

    other_rank = runs.RunLog(tmp_path / "rank1.jsonl", total_steps=10, main=False)
    other_rank.start()
    other_rank.print("not printed")
    assert not (tmp_path / "rank1.jsonl").exists() and capsys.readouterr().out == ""


def test_the_guard_warns_for_each_skipped_step_and_stops_after_too_many_in_a_row(tmp_path):
    printed = []
    guard = runs.NonFiniteGuard(3, tmp_path / "last.pt", lambda *args, **kwargs: printed.append(args[0]))
    flags = [True, False, True, False, False]
    for step, finite in enumerate(flags, 1):
        guard.record(step, torch.tensor(finite), {"loss_clap": torch.tensor(1.0 if finite else float("nan"))},
                     torch.tensor(2.0))
    guard.check(last_saved=None)
    assert guard.pending == [] and guard.skipped_steps == 3 and guard.bad_streak == 2
    assert printed[0] == ("warning: step 2: non-finite loss or gradient (clap nan, grad norm 2); step skipped, "
                          "weights unchanged")
    guard.record(6, torch.tensor(False), {}, torch.tensor(float("inf")))
    with pytest.raises(runs.NonFiniteError, match=r"3 steps in a row \(4 to 6\) .*last.pt \(step 2\), is intact"):
        guard.check(last_saved=2)


def test_amp_defaults_bf16_and_compiled_on_cuda_fp32_eager_elsewhere():
    assert runs.amp_defaults("cpu") == ("fp32", False)
    assert runs.amp_defaults("cuda") == ("bf16", True)
    assert runs.amp_defaults("cuda", compile_on_cuda=False) == ("bf16", False)
    assert runs.amp_defaults("cpu", "fp16", True) == ("fp16", True)
    assert isinstance(runs.autocast("cpu", "bf16"), torch.autocast)


def linear_step(micro_batches):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
    stepper = runs.Stepper.build(net, optimizer, torch.device("cpu"), "fp32", use_compile=False, clip_grad_norm=1.0)
    sums, grad_norm, finite = stepper.step(micro_batches, lambda x, y: {"loss": ((stepper.forward(x) - y) ** 2).mean()})
    return net, sums, grad_norm, finite


def test_the_stepper_accumulates_micro_batches_into_the_whole_batchs_step():
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    whole, sums, grad_norm, finite = linear_step([(x, y)])
    split, split_sums, split_norm, _ = linear_step([(x[:4], y[:4]), (x[4:], y[4:])])
    assert finite and grad_norm > 0
    torch.testing.assert_close(split_sums["loss"], sums["loss"])
    torch.testing.assert_close(split_norm, grad_norm)
    torch.testing.assert_close(split.weight, whole.weight)
    y[0] = float("nan")
    skipped, sums, _, finite = linear_step([(x, y)])
    assert not finite and not torch.isfinite(sums["loss"])
    torch.manual_seed(0)
    assert torch.equal(skipped.weight, torch.nn.Linear(4, 1).weight)  # the step changed nothing


def test_fused_step_refuses_an_optimizer_that_cannot_skip_on_the_device():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])
    with pytest.raises(ValueError, match="fused=True"):
        runs.fused_step(optimizer, torch.zeros(()))


def test_a_new_run_clears_what_an_earlier_run_left(tmp_path):
    for name in ("last.pt", "last.pt.tmp", "step_00000004.pt", "bad_clips.csv", "notes.txt"):
        (tmp_path / name).write_text("x")
    runs.prepare_out_dir(tmp_path, new_run=False, ddp=runs.Distributed(), also_stale=("bad_clips.csv",))
    assert len(list(tmp_path.iterdir())) == 5  # a resumed run keeps them
    runs.prepare_out_dir(tmp_path, new_run=True, ddp=runs.Distributed(), also_stale=("bad_clips.csv",))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_an_sgd_stepper_without_clipping_takes_the_plain_step_and_skips_a_non_finite_one():
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    reference = torch.nn.Linear(4, 1)
    reference.load_state_dict(layer.state_dict())
    stepper = runs.Stepper.build(layer, torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9),
                                 torch.device("cpu"), "fp32", False, clip_grad_norm=None)
    sums, grad_norm, finite = stepper.step([(x, y)], lambda a, b: {"loss": ((stepper.forward(a) - b) ** 2).mean()})
    assert finite and grad_norm is None
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    ((reference(x) - y) ** 2).mean().backward()
    plain.step()
    assert torch.equal(layer.weight, reference.weight) and torch.equal(layer.bias, reference.bias)
    before = layer.weight.detach().clone()
    y[0] = float("nan")
    _, _, finite = stepper.step([(x, y)], lambda a, b: {"loss": ((stepper.forward(a) - b) ** 2).mean()})
    assert not finite and torch.equal(layer.weight, before)


def test_one_process_gathers_its_own_value_and_progress_names_its_position(tmp_path, capsys):
    assert runs.Distributed().gather({"a": 1}) == [{"a": 1}]
    log = runs.RunLog(tmp_path / "log.jsonl", total_steps=4)
    log.start()
    log.progress(2, {"loss": 0.5}, ["lr 0.1"], where="seed 43 | epoch 2/4")
    line = capsys.readouterr().out.strip()
    assert line.startswith("seed 43 | epoch 2/4 | loss 0.5000 | lr 0.1 | ETA") and "clips/s" not in line


def truncated_checkpoint(path):
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:2000])


# (how the file is made, what the message must say): none of them is a checkpoint
NOT_CHECKPOINTS = {
    "text": (lambda p: p.write_text("hello world\n"), r"not a PyTorch checkpoint; it is a text file starting 'hello"),
    "json": (lambda p: p.write_text('{"model": 1}'), r"not a PyTorch checkpoint; it is a JSON file starting"),
    "empty": (lambda p: p.write_bytes(b""), r"the file is empty \(0 bytes\), not a checkpoint.*copy or download"),
    "random bytes": (lambda p: p.write_bytes(bytes(range(200, 256)) * 20),
                     r"not a PyTorch checkpoint; it is binary data of another kind \(it starts with bytes c8 c9"),
    "truncated": (truncated_checkpoint, r"the checkpoint is truncated or corrupted \(PytorchStreamReader failed "
                                        r"reading zip archive.*\). Copy or download it again"),
    "damaged pickle": (lambda p: p.write_bytes(b"\x80\x02" + bytes(range(40))),
                       r"not a readable checkpoint, its pickled data is damaged"),
}


@pytest.mark.parametrize("kind", list(NOT_CHECKPOINTS))
def test_a_file_that_is_not_a_checkpoint_gets_one_error_saying_what_it_is(tmp_path, kind):
    make, message = NOT_CHECKPOINTS[kind]
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(runs.CheckpointError, match=message) as e:
        runs.load_checkpoint(path)
    assert str(e.value).startswith(f"{path}: ")
    assert not isinstance(e.value, runs.UnsafeCheckpointError)  # nothing in it would have run code
    assert "\n" not in str(e.value)  # torch's paragraphs boiled down to one line


def test_both_formats_of_torch_save_load(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "step": 2}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        loaded = runs.load_checkpoint(tmp_path / name)
        assert loaded["step"] == 2 and torch.equal(loaded["model"]["w"], state["model"]["w"])


def test_threads_are_set_only_when_asked():
    before = torch.get_num_threads()
    try:
        runs.set_threads(None)
        assert torch.get_num_threads() == before  # torch's own choice
        runs.set_threads(1)
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="--threads 0: must be at least 1"):
            runs.set_threads(0)
    finally:
        torch.set_num_threads(before)
