"""Run machinery shared by the training programs (train.py, finetune.py).

Like MAE's util/misc.py: plain values in, torch, numpy and the standard
library only, never a file of this project, so any piece can be copied alone.

- Checkpoint files: atomic_write, save_checkpoint, load_checkpoint (no code
  from the file runs; CheckpointError for a file that is not one), keep_periodic.
- Run folders and resuming: prepare_out_dir, find_resume, check_same_run,
  resume_state / restore_training (optimiser, scaler, step, clock of a
  resumed run), RNG states (rng_state, set_rng_state, gather_rng_states,
  seed_everything, restore_rng), read_log.
- torchrun: Distributed (rank, world size, barrier, DDP wrapping, gather and
  mean over ranks, replica check), setup_distributed, check_device, set_threads.
- Precision and compilation: amp_defaults (the one place that chooses them),
  autocast, compiled, LossScaler (fp16 loss scaling without host syncs).
- The optimiser step: Stepper (gradient accumulation, autocast, loss scaling,
  optional clipping, and a non-finite step skipped: on the device with a
  fused optimiser, fused_step), for pre-training's AdamW and fine-tuning's SGD.
- NonFiniteGuard: the warnings and the stop for skipped non-finite steps.
- RunLog: log.jsonl, the progress line with its ETA, and the end summary.
- Loaders: to_device, stop_workers. format_duration for people.

A training program composes them; train.py and finetune.py show how:

    ddp, device = setup_distributed(torch.device("cuda"))
    precision, use_compile = amp_defaults(device.type)
    stepper = Stepper.build(ddp.wrap(model, device), optimizer, device, precision, use_compile, 3.0)
    sums, grad_norm, finite = stepper.step(micro_batches, lambda x, y: {"loss": loss_fn(stepper.forward(x), y)})
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


# -----------------------------------------------------------------------------
# Checkpoint files


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (a full disk, say)."""


def atomic_write(path: str | Path, write):
    """Call write(file) on a temporary file beside `path`, then rename it over `path`.

    The file is flushed and fsynced before the rename, and the folder after it,
    so a crash or a full disk mid-write leaves `path` either as it was or
    complete, never half written. OSError passes through, `path` untouched.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def save_checkpoint(path: Path, **state):
    """torch.save(state) atomically: a crash or a full disk mid-save never harms `path`."""
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise CheckpointWriteError(f"{path}: could not write the checkpoint ({e}); the previous checkpoint there, "
                                   "if any, is unchanged. Free some disk space, or write to another folder.") from e


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint: not one, empty, truncated or corrupted."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would have to run code from the file to be loaded."""


def keep_periodic(out_dir: Path, step: int, keep: int):
    """Keep last.pt of this step as step_<N>.pt (a hard link, no copy) and only the newest `keep` of them."""
    periodic = out_dir / f"step_{step:08d}.pt"
    periodic.unlink(missing_ok=True)
    os.link(out_dir / "last.pt", periodic)
    for old in sorted(out_dir.glob("step_*.pt"))[:-keep]:
        old.unlink()


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint (ours or a released one) without unpickling arbitrary objects.

    torch.load(weights_only=True) rebuilds tensors and plain containers only;
    argparse.Namespace, which the released files keep their 'args' in, is the
    one class allowed besides. Anything else is refused, never constructed.
    A file that is not a checkpoint at all (empty, text, truncated) raises
    CheckpointError naming the file and what it holds instead.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    check_checkpoint_format(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # no forbidden class named: the pickle itself is damaged
            raise CheckpointError(f"{path}: not a readable checkpoint, its pickled data is damaged "
                                  f"({_torch_reason(e)}). Copy or download it again.") from e
        raise UnsafeCheckpointError(
            f"{path}: refused. The file holds a pickled object other than tensors, plain containers and "
            f"argparse.Namespace, and loading it would run code from the file ({_torch_reason(e)}). If you trust "
            "its source, re-save just its state dict: torch.save({'model': ckpt['model']}, new_path).") from e
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:  # torch's reader on a damaged file
        raise CheckpointError(f"{path}: the checkpoint is truncated or corrupted ({_torch_reason(e)}). Copy or "
                              "download it again, or take another one (a run folder keeps step_*.pt).") from e


# torch.save's two formats: a zip archive (since torch 1.6), or a pickle stream starting with a
# PROTO opcode (protocol 2 to 5), as the oldest released files are written.
ZIP_MAGIC = b"PK\x03\x04"


def check_checkpoint_format(path: Path):
    """Raise CheckpointError, saying what the file holds instead, unless it starts like a torch.save file."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), not a checkpoint. It was probably cut "
                              "off while being written or copied; copy or download it again.")
    if head.startswith(ZIP_MAGIC) or (head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5):
        return
    start = head.split(b"\n")[0][:40]
    try:
        text = start.decode("utf-8")
        kind = "JSON" if text.lstrip()[:1] in ("{", "[") else "text"
        what = f"a {kind} file starting {text!r}"
    except UnicodeDecodeError:
        what = f"binary data of another kind (it starts with bytes {head[:8].hex(' ')})"
    raise CheckpointError(f"{path}: not a PyTorch checkpoint; it is {what}. Pass a file written by train.py or "
                          "finetune.py (runs/<stage>/last.pt, best.pt) or a released .pth.")


def _torch_reason(e: Exception) -> str:
    """The telling line of one of torch.load's errors (they run to several paragraphs)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    telling = ([line for line in lines if "GLOBAL" in line] + [line for line in lines if "Unsupported" in line]
               + lines)
    return telling[0].split(". ")[0].rstrip(".") if telling else type(e).__name__


# -----------------------------------------------------------------------------
# torchrun: this process's place in the job


@dataclass
class Distributed:
    """This process's place in a torchrun job (a single process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model itself in one process, else its DistributedDataParallel wrapper (which copies rank 0's weights)."""
        if self.world_size == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.local_rank] if device.type == "cuda" else None)

    def gather(self, value) -> list:
        """Every rank's value (any picklable object), in rank order (every rank must call this)."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over the ranks (every rank must call this)."""
        if self.world_size > 1:
            dist.all_reduce(values)
            values /= self.world_size
        return values

    def check_replicas(self, model: torch.nn.Module) -> bool:
        """Stop if the ranks' parameters differ; True when there were replicas to compare."""
        if self.world_size == 1:
            return False
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, parameter_checksums(model))
        if any(g != gathered[0] for g in gathered):
            raise RuntimeError("the ranks' parameters diverged; this is a bug, please report it")
        return True

    def leave(self):
        """Leave the process group (after a barrier, so that rank 0 finishes writing first)."""
        if self.world_size > 1:
            dist.barrier()
            dist.destroy_process_group()


def check_device(name: str | torch.device) -> torch.device:
    """torch.device(name), or a ValueError saying why this machine cannot compute there and what to pass."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: not a device name ({e}); pass cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch is a CPU-only build" if torch.version.cuda is None else
                   "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
            raise ValueError(f"--device {name}: {why}. Pass --device cpu, or install PyTorch's CUDA build "
                             "(the README's GPU install).")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible, "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: Apple's MPS is not available on this machine; pass --device cpu")
    return device


def set_threads(n: int | None):
    """torch's CPU threads for this process: n, or torch's own choice (one per core) when None.

    On a machine other jobs share, torch's choice oversubscribes the cores and
    a step can take several times as long as with fewer threads.
    """
    if n is not None:
        if n < 1:
            raise ValueError(f"--threads {n}: must be at least 1")
        torch.set_num_threads(n)


def setup_distributed(device: str | torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes in the environment: NCCL on GPUs, Gloo on CPUs.

    Returns this process's place and its device (on CUDA, the GPU of its local rank); a device this
    machine does not have is refused first (check_device).
    """
    device = check_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Distributed(), device
    ddp = Distributed(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world_size)
    if device.type == "cuda":
        torch.cuda.set_device(ddp.local_rank)
        device = torch.device("cuda", ddp.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ddp, device


def parameter_checksums(model: torch.nn.Module) -> list[float]:
    """One float64 sum per parameter tensor: equal lists mean equal replicas, to rounding."""
    return [p.detach().double().sum().item() for p in model.parameters()]


# -----------------------------------------------------------------------------
# Run folders and exact resume


class ResumeError(ValueError):
    """A run folder that cannot be resumed as asked."""


def prepare_out_dir(out_dir: Path, new_run: bool, ddp: Distributed, also_stale: tuple[str, ...] = ()):
    """Create the run folder; a new run first clears the checkpoints (and also_stale) an earlier run left."""
    if ddp.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if new_run:  # nothing of an earlier run in this folder may mix in
            for stale in [*out_dir.glob("step_*.pt"), out_dir / "last.pt", out_dir / "last.pt.tmp",
                          *(out_dir / name for name in also_stale)]:
                stale.unlink(missing_ok=True)
    ddp.barrier()


def find_resume(path: Path, resume: bool, stage: str) -> dict | None:
    """The checkpoint at `path` to go on from, or None for a new run; it must be a resumable run of `stage`."""
    if not resume:
        return None
    if not path.is_file():
        raise ResumeError(f"{path}: not found, so there is nothing to resume. Check --out-dir, or drop "
                          "--resume to start a new run.")
    ckpt = load_checkpoint(path)
    if ckpt.get("stage") != stage:
        raise ResumeError(f"{path}: a stage-{ckpt.get('stage')} run, so stage {stage} cannot resume it. "
                          "Pass another --out-dir, or --no-resume to start over there (it overwrites that run).")
    if "resume" not in ckpt:
        raise ResumeError(f"{path}: holds no resume state. Pass --no-resume to start over (it overwrites the "
                          "run), or another --out-dir.")
    return ckpt


def check_same_run(path: Path, saved: dict, now: dict):
    """A resume must continue the same run: every setting in `now` as it was `saved`.

    The error names each setting that differs, down to the field of a nested
    one ("recipe.epochs 100 -> 10"), never the whole record.
    """
    changed = [f"{key} {old!r} -> {new!r}" for key, old, new in differences(saved, now)]
    if changed:
        raise ResumeError(f"{path}: cannot resume with other settings than the run's ({'; '.join(changed)}). "
                          "Run the interrupted command again unchanged, or pass "
                          "--no-resume (starts over, overwriting the run) or another --out-dir.")


def differences(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, saved value, value now) of each setting in `now` that differs, nested dicts key by key."""
    out = []
    for key, value in now.items():
        old = saved.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            out += differences(old, value, f"{prefix}{key}.")
        elif old != value:
            out.append((f"{prefix}{key}", old, value))
    return out


def resume_state(settings: dict, peak_lr: float, rng: list[dict], elapsed_s: float) -> dict:
    """What a checkpoint keeps (as its "resume" entry) beyond weights, optimiser, scaler and step."""
    return dict(run=settings, peak_lr=peak_lr, rng=rng, elapsed_s=elapsed_s)


def restore_training(ckpt: dict, path: Path, settings: dict, peak_lr: float, optimizer: torch.optim.Optimizer,
                     scaler: LossScaler, log=print) -> tuple[int, float]:
    """Optimiser and scaler of a resumed run, after checking it is the same run: (its step, its elapsed seconds)."""
    check_same_run(path, ckpt["resume"]["run"], settings)
    if ckpt["resume"]["peak_lr"] != peak_lr:
        log(f"peak lr changed on resume: {ckpt['resume']['peak_lr']:.2e} -> {peak_lr:.2e}")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as e:  # torch: "... parameter group that doesn't match the size of optimizer's group"
        raise ResumeError(f"{path}: its optimiser state has other parameter groups than this version builds "
                          f"({e}); a version with another weight-decay rule wrote it. Resume it with that "
                          "version, or pass --no-resume to start over.") from e
    scaler.load_state_dict(ckpt["scaler"])
    return ckpt["step"], ckpt["resume"]["elapsed_s"]


def read_log(path: Path, last_step: int | None) -> list[dict]:
    """The records of log.jsonl up to last_step (None: all): what a resumed run keeps of its log."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if last_step is None or r["step"] <= last_step]


def seed_everything(seed: int):
    """Seed Python's, NumPy's and torch's global random number generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """This process's Python, NumPy and torch RNG states, in types that load with weights_only=True."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                            "pos": numpy_state["state"]["pos"]}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device):
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {"key": state["numpy"]["state"]["key"].numpy().astype(np.uint32),
                            "pos": state["numpy"]["state"]["pos"]}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(ddp: Distributed, device: torch.device) -> list[dict]:
    """Every rank's RNG states, in rank order (every rank must call this)."""
    return ddp.gather(rng_state(device))


def restore_rng(states: list[dict], ddp: Distributed, device: torch.device, seed: int, step: int, log=print):
    """Each rank's saved RNG states; a job of another size draws from new seeds, and says so."""
    if len(states) == ddp.world_size:
        set_rng_state(states[ddp.rank], device)
        return
    log(f"the run had {len(states)} processes and now has {ddp.world_size}: masks come from new seeds, "
        "so it is no longer bit-identical to an uninterrupted run")
    torch.manual_seed(seed + ddp.rank + 1_000_003 * step)


# -----------------------------------------------------------------------------
# Precision and compilation


def amp_defaults(device_type: str, precision: str | None = None, compile: bool | None = None,
                 compile_on_cuda: bool = True) -> tuple[str, bool]:
    """(precision, whether to torch.compile): the given ones, else bf16 and compiled on CUDA, fp32 eager elsewhere.

    compile_on_cuda=False keeps a step eager on CUDA too, for inputs whose
    shapes vary from step to step (a text encoder's token counts) and would
    recompile.
    """
    cuda = device_type == "cuda"
    precision = precision or ("bf16" if cuda else "fp32")
    return precision, (cuda and compile_on_cuda) if compile is None else compile


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a precision: fp32 runs as written, bf16 and fp16 under torch.autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def compiled(module: torch.nn.Module, backend: str = "inductor"):
    """torch.compile with static shapes, keeping eager's random numbers so that masks do not depend on compilation.

    Static shapes give the fastest kernels and allow CUDA graphs; a new batch
    size (a user's last partial batch, a second benchmark shape) compiles
    again, and past torch's recompile limit runs eagerly: it never fails.
    """
    import torch._inductor.config
    torch._inductor.config.fallback_random = True
    return torch.compile(module, dynamic=False, backend=backend)


class LossScaler:
    """Dynamic fp16 loss scaling whose state stays on the device, so that no step waits for the host.

    The scale halves on a step with a non-finite gradient and doubles after
    growth_interval good steps in a row (torch.amp.GradScaler's rule, and its
    state_dict layout, so checkpoints written with either load in both).
    Disabled (bf16, fp32), every method is the identity.
    """

    def __init__(self, device: torch.device, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled, self.growth_interval = enabled, growth_interval
        self.scale = torch.full((1,), init_scale, device=device)
        self.growth_tracker = torch.zeros(1, dtype=torch.int32, device=device)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale[0] if self.enabled else loss

    def unscale_(self, grads: list[torch.Tensor]):
        if self.enabled:
            torch._foreach_mul_(grads, self.scale[0].double().reciprocal().float())

    def update(self, found_inf: torch.Tensor):
        if self.enabled:
            torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, 2.0, 0.5, self.growth_interval)

    def state_dict(self) -> dict:
        if not self.enabled:
            return {}
        return {"scale": self.scale.item(), "growth_factor": 2.0, "backoff_factor": 0.5,
                "growth_interval": self.growth_interval, "_growth_tracker": int(self.growth_tracker.item())}

    def load_state_dict(self, state: dict):
        if self.enabled and state:
            self.scale.fill_(state["scale"])
            self.growth_tracker.fill_(state["_growth_tracker"])


# -----------------------------------------------------------------------------
# The optimiser step


def fused_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor):
    """optimizer.step(), except where the device flag found_inf is 1: then weights and state stay exactly as they were.

    A fused Adam or AdamW (fused=True) checks the flag on the device itself,
    so the host never waits to read it. The optimiser takes it as an
    attribute, the way torch.amp.GradScaler hands it over; it is set for
    this one call only.
    """
    if not optimizer.defaults.get("fused"):
        raise ValueError("fused_step needs an optimiser made with fused=True (Adam, AdamW or SGD)")
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


@dataclass
class Stepper:
    """How a model takes an optimiser step, whatever the method: everything but the losses.

    net is the model or its DistributedDataParallel wrapper, forward the same
    possibly compiled (call it for the training forward); the autocast
    context, loss scaler and clipping norm (None: no clipping) come with them.
    Build one with Stepper.build.
    """

    net: torch.nn.Module
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    autocast: contextlib.AbstractContextManager
    clip_grad_norm: float | None
    precision: str = "fp32"
    compiled: bool = False

    @classmethod
    def build(cls, net: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, precision: str,
              use_compile: bool, clip_grad_norm: float | None) -> "Stepper":
        """The step for a precision (amp_defaults chooses it): fp16 brings a loss scaler, use_compile a compiled net."""
        return cls(net, compiled(net) if use_compile else net, optimizer, LossScaler(device, precision == "fp16"),
                   autocast(device.type, precision), clip_grad_norm, precision, use_compile)

    def step(self, micro_batches: list, losses_of) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """One optimiser step over micro-batches already on the device.

        losses_of(*micro_batch) runs the forward (under autocast) and returns
        a dict of scalar losses whose "loss" is back-propagated. Gradients are
        averaged across ranks only on the last micro-batch. Nothing here waits
        for the device: a non-finite loss or gradient norm on any rank skips
        the step on all of them, on the device itself (fused_step), and with
        fp16 the loss scale halves; an optimiser without a fused kernel (the
        SGD of fine-tuning) reads the flag on the host instead. Returns each
        loss averaged over the micro-batches, the gradient norm (None without
        clipping) and the step's finite flag, as device tensors for the caller
        to read when it logs (and for what the method updates after a step,
        such as an EMA target).
        """
        sums = {}
        ddp = isinstance(self.net, DistributedDataParallel)
        for k, micro_batch in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            with contextlib.nullcontext() if last or not ddp else self.net.no_sync():
                with self.autocast:
                    losses = losses_of(*micro_batch)
                self.scaler.scaled(losses["loss"] / len(micro_batches)).backward()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0) + value.detach().float() / len(micro_batches)
        params = [p for p in self.net.parameters() if p.grad is not None]
        self.scaler.unscale_([p.grad for p in params])
        checked, grad_norm = list(sums.values()), None
        if self.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm, foreach=True)
            checked.append(grad_norm.float())
        finite = torch.isfinite(torch.stack(checked)).all()
        if ddp:  # a loss is per rank: skip on all ranks or none
            finite = finite.int()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            finite = finite.bool()
        found_inf = (~finite).float()
        if self.optimizer.defaults.get("fused"):
            fused_step(self.optimizer, found_inf)
        elif finite:
            self.optimizer.step()
        self.scaler.update(found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        return sums, grad_norm, finite


# -----------------------------------------------------------------------------
# Non-finite steps


class NonFiniteError(RuntimeError):
    """Too many steps in a row with a non-finite loss or gradient."""


class NonFiniteGuard:
    """Skipped non-finite steps: a warning for each, a count, and a stop after max_bad_steps in a row.

    The steps' finite flags stay on the device in `pending` until check()
    reads them all at once (a training loop calls it at log lines,
    checkpoints and every max_bad_steps steps), so that the device never
    waits for the host. `checkpoint` is the file the stop message points to.
    """

    def __init__(self, max_bad_steps: int, checkpoint: Path, print_fn=print):
        self.max_bad_steps, self.checkpoint, self.print = max_bad_steps, checkpoint, print_fn
        self.bad_streak = 0     # non-finite steps in a row, up to the last check
        self.skipped_steps = 0  # in this session
        self.pending = []       # (step, finite flag, losses, grad norm) of the steps not yet checked

    def record(self, step: int, finite: torch.Tensor, losses: dict, grad_norm: torch.Tensor | None):
        """Keep a step's device flag (and what its warning would print) for the next check()."""
        self.pending.append((step, finite, losses, grad_norm))

    def check(self, last_saved: int | None, scaler: LossScaler | None = None):
        """Read the pending flags back in one transfer; warn for each skipped step, stop after too many in a row."""
        pending, self.pending = self.pending, []
        flags = torch.stack([finite for _, finite, _, _ in pending]).tolist() if pending else []
        for (step, _, losses, grad_norm), finite in zip(pending, flags):
            if finite:
                self.bad_streak = 0
                continue
            self.bad_streak += 1
            self.skipped_steps += 1
            values = ", ".join(f"{key.removeprefix('loss_')} {value.item():.4g}" for key, value in losses.items())
            scale = f"; fp16 loss scale now {scaler.scale.item():g}" if scaler is not None and scaler.enabled else ""
            norm = f", grad norm {grad_norm.item():.4g}" if grad_norm is not None else ""
            self.print(f"warning: step {step}: non-finite loss or gradient ({values}{norm}); step skipped, weights "
                       f"unchanged{scale}", file=sys.stderr, flush=True)
            if self.bad_streak >= self.max_bad_steps:
                kept = (f"the last good checkpoint, {self.checkpoint} (step {last_saved}), is intact"
                        if last_saved else "no checkpoint had been written yet")
                raise NonFiniteError(
                    f"{self.bad_streak} steps in a row ({step - self.bad_streak + 1} to {step}) had a non-finite loss "
                    f"or gradient, so the run stopped; {kept}. Lower the learning rate (--lr; a resume may change "
                    "it), prefer --precision bf16 to fp16, or look for extreme clips or caption embeddings.")


# -----------------------------------------------------------------------------
# The run's log: log.jsonl, progress lines, the end summary


class RunLog:
    """log.jsonl (one JSON record per logged step) and the lines a run prints, on the main process only.

    start() opens it: a resumed run keeps its records up to its checkpoint's
    step, and its clock goes on from the elapsed time the checkpoint recorded.
    """

    def __init__(self, path: Path, total_steps: int, main: bool = True):
        self.path, self.total_steps, self.main = path, total_steps, main
        self.records = []
        self.started = self.logged_at = time.perf_counter()
        self.logged_step = 0

    def start(self, start_step: int = 0, elapsed_s: float = 0.0, keep_records: int | None = None):
        """(Re)write log.jsonl with the records up to start_step (or its first keep_records records, for a log
        whose step restarts, one run after another), and start the clock at elapsed_s."""
        if keep_records is not None:
            self.records = read_log(self.path, None)[:keep_records]
        else:
            self.records = read_log(self.path, start_step) if start_step else []
        self.started = time.perf_counter() - elapsed_s
        self.logged_step, self.logged_at = start_step, time.perf_counter()  # for the pace between log lines
        if self.main:
            with open(self.path, "w") as log_file:
                log_file.writelines(json.dumps(r) + "\n" for r in self.records)

    def print(self, *args, **kwargs):
        if self.main:
            print(*args, **kwargs)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def pace(self, step: int, clips_per_step: int) -> float:
        """Clips per second since the previous call (or the start)."""
        now = time.perf_counter()
        clips_per_s = (step - self.logged_step) * clips_per_step / (now - self.logged_at)
        self.logged_step, self.logged_at = step, now
        return clips_per_s

    def write(self, record: dict):
        self.records.append(record)
        if self.main:
            with open(self.path, "a") as log_file:
                log_file.write(json.dumps(record) + "\n")

    def progress(self, step: int, losses: dict[str, float], extras: list[str], clips_per_s: float | None = None,
                 where: str | None = None):
        """step N/T (or `where`) | loss ... | each other loss | extras | clips/s | ETA (from the steps done)."""
        eta_s = self.elapsed_s() / step * (self.total_steps - step)
        parts = [where or f"step {step:>6}/{self.total_steps}",
                 *(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in losses.items()), *extras,
                 *([f"{clips_per_s:.0f} clips/s"] if clips_per_s is not None else []), f"ETA {format_duration(eta_s)}"]
        self.print(" | ".join(parts), flush=True)

    def summary(self, prefix: str = "loss_") -> str | None:
        """The logged values named prefix*: the first record's, then the mean of the last ten."""
        if not self.records:
            return None
        first, last = self.records[0], self.records[-10:]
        return (f"losses, step {first['step']} -> mean of the last {len(last)} logged steps: "
                + ", ".join(f"{key} {first[key]:.3f} -> {sum(r[key] for r in last) / len(last):.3f}"
                            for key in first if key.startswith(prefix)))


# -----------------------------------------------------------------------------
# Loaders and people


def to_device(batch, device: torch.device):
    """A tensor, or a dict of them (tokenised text), on the device without waiting for the copy."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def stop_workers(loader: torch.utils.data.DataLoader):
    """Stop the loader's worker processes now, error or not.

    After an error they would wait for the garbage collector (the traceback
    keeps the loader in a reference cycle), which kills each one only after a
    5-s timeout: a pause in notebooks and test suites that call train().
    """
    iterator = getattr(loader, "_iterator", None)  # the persistent workers' iterator
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def format_duration(seconds: float) -> str:
    """12m05s, or 3h07m from an hour on."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class EpochLimit(Exception):
    """Raised after a program's --epochs-limit epochs: the run stops cleanly and the same command resumes it."""


# -----------------------------------------------------------------------------
# A program's command line from its two dataclasses: the run's settings and the recipe


def recipe_values(recipes: dict, name: str) -> str:
    """A recipe field's value in every named recipe, for --help: 'as2m 2.0, esc50 0.5, ...' or one value for all."""
    values = {r: getattr(recipes[r], name) for r in recipes}
    if len(set(values.values())) == 1:
        return f"every recipe: {next(iter(values.values()))}"
    return ", ".join(f"{r} {v}" for r, v in values.items())


def command_line(description: str, settings_type, recipe_type, recipes: dict) -> argparse.ArgumentParser:
    """One flag per field of settings_type (its metadata: help, an optional other flag name, argparse's
    options), then one per field of recipe_type (help, choices; its value in each of `recipes` shown), every
    default None: not given, so that the program settles defaults itself."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(settings_type):
        options = {k: v for k, v in f.metadata.items() if k not in ("help", "flag")}
        shown = "" if "default" in f.metadata["help"] or f.default in (None, False) else f" (default: {f.default})"
        p.add_argument(f.metadata.get("flag", "--" + f.name.replace("_", "-")), dest=f.name, default=None,
                       help=f.metadata["help"] + shown, **options)
    group = p.add_argument_group("recipe fields (default: the --recipe's value, listed per recipe)")
    for f in fields(recipe_type):
        kind = type(getattr(recipe_type(), f.name))
        options = ({"action": argparse.BooleanOptionalAction} if kind is bool else
                   {"nargs": "+", "type": int} if kind is tuple else {"type": kind})
        group.add_argument("--" + f.name.replace("_", "-"), default=None, choices=f.metadata["choices"],
                           help=f"{f.metadata['help']} ({recipe_values(recipes, f.name)})", **options)
    return p


def pyplot(log=print, what: str = "the plot"):
    """matplotlib's pyplot on its file-only backend (Agg), or None, with a line saying what is skipped, where
    matplotlib (an optional extra) is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed: {what} skipped")
        return None
    return plt
