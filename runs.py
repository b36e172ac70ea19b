"""Run machinery shared by the training programs (train.py, finetune.py).

Checkpoint files (atomic save, safe load, upgrades of older files, periodic
copies), and small helpers for progress lines. Like MAE's util/misc.py, it
takes plain values, imports torch, numpy and the standard library only, and
never a file of this project, so any function here can be copied alone.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import torch


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
                                   "if any, is unchanged. Free some disk space or pass another --out-dir.") from e


class UnsafeCheckpointError(ValueError):
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
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused. The file holds a pickled object other than tensors, plain containers and "
            f"argparse.Namespace, and loading it would run code from the file ({reason}). If you trust "
            "its source, re-save just its state dict: torch.save({'model': ckpt['model']}, new_path).") from e


def upgraded(ckpt: dict) -> tuple[dict, dict]:
    """(model config, state dict) of a checkpoint of ours, written by this version or an earlier one.

    Earlier versions saved a Linear text projector without a bias (a zero bias
    is the same function) and mean-pooled every stage-2 text encoder.
    """
    model_config, state = dict(ckpt["model_config"]), dict(ckpt["model"])
    if model_config.get("text_proj") == "linear" and "text_proj.bias" not in state:
        state["text_proj.bias"] = torch.zeros(state["text_proj.weight"].shape[0])
    if ckpt.get("text_encoder") and "text_pooling" not in model_config:
        model_config["text_pooling"] = "mean"
    return model_config, state


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
