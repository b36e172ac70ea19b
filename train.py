"""Stage-wise training of M2D-CLAP.

Stage 1 learns general-purpose audio features and CLAP features together,
    L = L_M2D + lambda * L_CLAP,
with the online/target M2D networks and frozen precomputed sentence
embeddings on the text side (a trainable text projector maps them to the
audio width).
Stage 2 freezes that audio encoder and trains the CLAP parts on it: the audio
projector and the text side, either a pretrained Transformer text encoder
(--text-side encoder, the paper) or the precomputed sentence embeddings with a
projector (--text-side embeddings, no text model needed).
Stage 2.1 continues stage 2 on a smaller target-domain caption set with a
lower learning rate.

    python train.py --stage 1        # tiny preset, built-in data, CPU friendly
    python train.py --stage 2        # from runs/stage1/last.pt
    python train.py --stage 2.1      # from runs/stage2/last.pt
    python train.py --stage 1 --preset base --data captions.csv --audio-root /audio
                                     # the paper's ViT-Base recipe
    torchrun --nproc_per_node=4 train.py --stage 1 --preset base --data captions.csv --shards shards/
                                     # data parallel on 4 GPUs, log-mels from 'data.py prepare'
    python train.py export runs/stage2/last.pt out.pth
                                     # our weights in the released M2D-CLAP layout

Outputs in --out-dir (default runs/stage<STAGE>): last.pt (a checkpoint that
loads with torch.load(weights_only=True) and holds all a resume needs),
log.jsonl (one JSON object per logged step) and, with --skip-bad,
bad_clips.csv. Running the same command again resumes the run exactly where
it stopped. This file is the only place that knows about AMP, torch.compile,
data parallelism, schedules, resuming and checkpoints, ours and the released
ones.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import pickle
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import builtin_data
import data
import model as m2d
import text_embed
from losses import ClapLoss, m2d_loss

STAGES = ("1", "2", "2.1")
PREVIOUS_STAGE = {"2": "1", "2.1": "2"}


# -----------------------------------------------------------------------------
# Recipes: training hyperparameters, one named instance per (stage, preset)


@dataclass(frozen=True)
class Recipe:
    """Training hyperparameters. The defaults are the paper's stage 1 (SPEC 7).

    ema_decay and clap_weight matter in stage 1 only.
    """

    batch_size: int = 2048            # total clips per optimiser step (all GPUs, all micro-batches)
    base_lr: float = 3e-4             # learning rate = base_lr * batch_size / 256
    epochs: float = 300
    warmup_epochs: float = 20
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad_norm: float = 3.0
    ema_decay: tuple[float, float] = (0.99995, 0.99999)  # linear from start to end over training
    clap_weight: float = 0.01         # lambda


# Stages 2 and 2.1 of the paper recipe are not specified in the method
# description; these are our choices: fine-tuning-sized learning rates for the
# pretrained text encoder, and a short refinement at a quarter of stage 2's.
PAPER_STAGE2 = Recipe(batch_size=256, base_lr=5e-5, epochs=20, warmup_epochs=1, betas=(0.9, 0.999))
PAPER_STAGE21 = Recipe(batch_size=256, base_lr=1.25e-5, epochs=10, warmup_epochs=0.5, betas=(0.9, 0.999))

RECIPES: dict[tuple[str, str], Recipe] = {
    # A few hundred steps on the built-in data: a larger learning rate and a
    # faster-moving EMA target, since the paper's 0.99995 would leave the target
    # at its random initialisation for a run this short.
    ("1", "tiny"): Recipe(batch_size=64, base_lr=2e-3, epochs=40, warmup_epochs=2, ema_decay=(0.995, 0.999)),
    ("1", "base"): Recipe(),
    ("1", "large"): Recipe(),
    # Stage 2 on the built-in data fine-tunes all-MiniLM-L6-v2 at 1e-4 for 8
    # epochs; stage 2.1 refines on the built-in "refine" subset at 2.5e-5.
    ("2", "tiny"): Recipe(batch_size=64, base_lr=4e-4, epochs=8, warmup_epochs=0.5, betas=(0.9, 0.999)),
    ("2", "base"): PAPER_STAGE2,
    ("2", "large"): PAPER_STAGE2,
    ("2.1", "tiny"): Recipe(batch_size=64, base_lr=1e-4, epochs=6, warmup_epochs=0.5, betas=(0.9, 0.999)),
    ("2.1", "base"): PAPER_STAGE21,
    ("2.1", "large"): PAPER_STAGE21,
}


# -----------------------------------------------------------------------------
# Schedules


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up to peak_lr, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# -----------------------------------------------------------------------------
# Checkpoints


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (a full disk, say)."""


def save_checkpoint(path: Path, **state):
    """Write atomically and durably: a crash or a full disk mid-save never harms `path`.

    The state goes to a temporary file in the same folder, is flushed and
    fsynced, and only then renamed over `path`, so `path` always holds either
    the previous complete checkpoint or the new one.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"{path}: could not write the checkpoint ({e}); the previous checkpoint there, "
                                   "if any, is unchanged. Free some disk space or pass another --out-dir.") from e
    folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


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


def build_model(ckpt: dict, with_tokenizer: bool = True) -> tuple[m2d.M2DCLAP, object | None]:
    """The model of a checkpoint and, if it has a text encoder (and with_tokenizer), its tokenizer.

    A checkpoint is self-contained: model weights (text encoder included),
    shapes, normalisation statistics, and the text encoder's architecture with
    a reference to its tokenizer.
    """
    model_config, state = dict(ckpt["model_config"]), dict(ckpt["model"])
    # Checkpoints of earlier versions: a Linear text projector without a bias (a zero
    # bias is the same function), and stage-2 text encoders that were mean-pooled.
    if model_config.get("text_proj") == "linear" and "text_proj.bias" not in state:
        state["text_proj.bias"] = torch.zeros(state["text_proj.weight"].shape[0])
    if ckpt.get("text_encoder") and "text_pooling" not in model_config:
        model_config["text_pooling"] = "mean"
    text_encoder = tokenizer = None
    if ckpt.get("text_encoder"):
        text_encoder = text_embed.text_encoder_from_config(ckpt["text_encoder"]["config"])
        if with_tokenizer:
            tokenizer = text_embed.load_tokenizer(ckpt["text_encoder"]["name"])
    model = m2d.M2DCLAP(m2d.M2DConfig(**model_config), tuple(ckpt["norm_stats"]), text_encoder)
    model.load_state_dict(state)
    return model, tokenizer


def load_previous_stage(stage: str, path: Path) -> dict:
    """The checkpoint a stage starts from, checked to be of the stage before it."""
    previous = PREVIOUS_STAGE[stage]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no stage-{previous} checkpoint to start stage {stage} from. "
                                f"Run 'python train.py --stage {previous}' first, or pass --init PATH.")
    ckpt = load_checkpoint(path)
    if ckpt.get("stage") != previous:
        raise ValueError(f"{path}: is a stage-{ckpt.get('stage')} checkpoint, but stage {stage} starts "
                         f"from stage {previous}. Run 'python train.py --stage {previous}' first, or pass "
                         f"--init with a stage-{previous} checkpoint.")
    return ckpt


# -----------------------------------------------------------------------------
# Export in the released M2D-CLAP layout (loading released files: evaluate.py)


def export_released(ckpt_path: Path, out_path: Path, training_parts: bool = False) -> dict:
    """Write one of our checkpoints as a released-layout file: {'model': state dict}.

    The state dict has the released key names and norm_stats: the encoder and
    the CLAP heads (text encoder included), plus the target network and
    predictor with training_parts=True.
    """
    ckpt = load_checkpoint(ckpt_path)
    if "model_config" not in ckpt:
        raise ValueError(f"{ckpt_path}: not a checkpoint written by train.py")
    training = ("target_", "decoder_", "mask_token")
    state = {k: v for k, v in build_model(ckpt)[0].state_dict().items()
             if training_parts or not k.startswith(training)}
    # The released files keep their text encoder as a module inside a text_encoder module.
    state = {"text_encoder." + k if k.startswith("text_encoder.") else k: v for k, v in state.items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_path, model=state)
    return state


def conventional_folder_name(config: m2d.M2DConfig, text_encoder: bool) -> str:
    """The released folder naming, e.g. m2d_clap_vit_base-80x1001p16x16p16kpBpTI, so tools infer the setup.

    With a text encoder, its letter says how its feature is taken: B (BERT, CLS
    token) or A (GTE-style, mean over tokens); TI says its weights are included.
    """
    size = {768: "base", 1024: "large"}.get(config.embed_dim, f"d{config.embed_dim}")
    p = config.patch_size
    text = f"p{'B' if config.text_pooling == 'cls' else 'A'}pTI" if text_encoder else ""
    return f"m2d_clap_vit_{size}-{config.n_mels}x{config.crop_frames}p{p}x{p}p16k{text}"


def export_main(argv):
    p = argparse.ArgumentParser(prog="train.py export",
                                description="Write a checkpoint of ours in the released M2D-CLAP layout.")
    p.add_argument("checkpoint", type=Path, help="a last.pt written by train.py")
    p.add_argument("out", type=Path, help="output .pth")
    p.add_argument("--training-parts", action="store_true", help="also write the target network and predictor")
    args = p.parse_args(argv)
    try:
        state = export_released(args.checkpoint, args.out, args.training_parts)
        config = m2d.M2DConfig(**load_checkpoint(args.checkpoint)["model_config"])
    except (ValueError, FileNotFoundError, CheckpointWriteError) as e:
        sys.exit(f"error: {e}")
    has_text_encoder = any(k.startswith("text_encoder.") for k in state)
    print(f"wrote {args.out}: {len(state)} tensors with the released key names. Tools that read the setup "
          f"from the folder name expect it in a folder named like "
          f"{conventional_folder_name(config, has_text_encoder)}/")


# -----------------------------------------------------------------------------
# Command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=STAGES, help="training stage")
    p.add_argument("--preset", default=None, choices=sorted(m2d.PRESETS),
                   help="stage 1: model size and recipe, tiny (CPU, built-in data, the default), "
                        "base (the paper) or large; stages 2 and 2.1 take it from --init")
    p.add_argument("--data", type=Path, default=None,
                   help="captions CSV (columns file_name, caption; see text_embed.py). Default: the "
                        "built-in synthetic training set (stage 2.1: its refinement subset)")
    p.add_argument("--embeddings", type=Path, default=None,
                   help="caption embeddings .npy, row-aligned with --data (default: --data with .npy)")
    p.add_argument("--embedding-model", default=None,
                   help="name or path of the sentence model that made --embeddings, recorded in the "
                        "checkpoint so that new text (zero-shot prompts) can be embedded the same way")
    p.add_argument("--audio-root", type=Path, default=None,
                   help="folder the CSV's file_name paths are relative to (default: the CSV's folder)")
    p.add_argument("--shards", type=Path, default=None,
                   help="read log-mels from the shards 'python data.py prepare' wrote, instead of decoding audio")
    p.add_argument("--init", type=Path, default=None,
                   help="stages 2 and 2.1: checkpoint to start from (default: runs/stage1/last.pt, "
                        "runs/stage2/last.pt)")
    p.add_argument("--text-side", choices=["encoder", "embeddings"], default="encoder",
                   help="stage 2: train a pretrained text encoder on caption text (encoder, needs the "
                        "transformers extra), or a projector on the precomputed sentence embeddings")
    p.add_argument("--text-encoder", default=text_embed.DEFAULT_MODEL,
                   help="stage 2: local Hugging Face folder of the text encoder, e.g. bert-base-uncased "
                        f"(default: the bundled {text_embed.DEFAULT_MODEL})")
    p.add_argument("--text-pooling", choices=["auto", "cls", "mean"], default="auto",
                   help="stage 2: the text encoder's feature: its CLS token (as the paper's BERT) or the mean "
                        "over real tokens; auto takes the pooling a sentence-transformers folder declares "
                        "(mean for all-MiniLM-L6-v2 and GTE-base) and CLS for any other encoder")
    p.add_argument("--out-dir", type=Path, default=None, help="run folder (default: runs/stage<STAGE>)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimiser steps; schedules span them (default: the recipe's epochs)")
    p.add_argument("--epochs", type=float, default=None, help="epochs over the data (default: the recipe's)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="total clips per optimiser step")
    p.add_argument("--accum-steps", type=positive_int, default=1,
                   help="split each step's batch into this many micro-batches (gradient accumulation)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: base_lr * batch / 256)")
    p.add_argument("--clap-weight", type=float, default=None, help="stage 1: lambda, the weight of the CLAP loss")
    p.add_argument("--mask-ratio", type=float, default=None, help="stage 1: share of masked patches (default 0.7)")
    p.add_argument("--ema-decay", type=float, nargs=2, default=None, metavar=("START", "END"),
                   help="stage 1: EMA decay of the target, linear from START to END over training")
    p.add_argument("--norm-stats", type=float, nargs=2, default=None, metavar=("MEAN", "STD"),
                   help="stage 1: log-mel normalisation statistics (default: measured on the training clips)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="autocast precision (default: bf16 on CUDA, fp32 on CPU); fp16 uses a GradScaler")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for stage 1 on CUDA, off otherwise)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes (default: 8 on CUDA, 0 on CPU)")
    p.add_argument("--preload", action=argparse.BooleanOptionalAction, default=None,
                   help="decode every clip into memory once (default: on for the built-in data)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="stage 1: recompute block activations in the backward pass, trading time for memory "
                        "(fits the large preset at batch 64 per 80 GB GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between progress lines and log records")
    p.add_argument("--save-every", type=positive_int, default=1000,
                   help="steps between checkpoint saves (last.pt is replaced atomically each time)")
    p.add_argument("--keep", type=int, default=2,
                   help="also keep the last K periodic checkpoints as step_<N>.pt (0: only last.pt)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue the run in --out-dir from its last.pt, exactly where it stopped (default: "
                        "resume when last.pt exists; --no-resume starts over and overwrites the run)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip audio files that cannot be read, listing them in <out-dir>/bad_clips.csv "
                        "(default: the first one stops the run)")
    p.add_argument("--convert-audio", action="store_true",
                   help="downmix and resample files that are not 16 kHz mono while loading (default: such a "
                        "file stops the run; 'python data.py prepare' converts a corpus once)")
    p.add_argument("--max-bad-steps", type=positive_int, default=10,
                   help="stop after this many steps in a row with a non-finite loss or gradient (each is "
                        "skipped with a warning)")
    args = p.parse_args(argv)
    if args.data is None and (args.embeddings or args.audio_root):
        p.error("--embeddings and --audio-root describe your own data; pass --data CSV with them")
    if args.stage == "1" and args.init:
        p.error("--init is for stages 2 and 2.1; stage 1 starts from scratch")
    return args


# -----------------------------------------------------------------------------
# The models of each stage


def stage1_model(args, text_dim: int, norm_stats) -> m2d.M2DCLAP:
    overrides = {"text_dim": text_dim, "grad_checkpointing": args.grad_checkpointing}
    if args.mask_ratio is not None:
        overrides["mask_ratio"] = args.mask_ratio
    return m2d.M2DCLAP(m2d.preset(args.preset or "tiny", **overrides), norm_stats)


def stage2_model(args, ckpt: dict) -> tuple[m2d.M2DCLAP, object | None]:
    """The stage-1 model with the text side of stage 2, and its tokenizer (or None).

    With a text encoder, a projector is added only when its width differs from
    the audio width. When the encoder is as wide as stage 1's sentence
    embeddings, stage 1's projector is kept: on the built-in data stage 1's
    embeddings come from the very model stage 2 fine-tunes (mean-pooled
    all-MiniLM-L6-v2), so stage 2 starts from stage 1's alignment.
    """
    model, _ = build_model(ckpt)
    if args.text_side == "embeddings":
        return model, None
    encoder, tokenizer = text_embed.load_text_encoder(args.text_encoder)
    width = encoder.config.hidden_size
    pooling = (text_embed.default_text_pooling(args.text_encoder) if args.text_pooling == "auto"
               else args.text_pooling)
    config = replace(model.config, text_dim=width, text_pooling=pooling,
                     text_proj="none" if width == model.config.embed_dim else "linear")
    keep_proj = config.text_dim == model.config.text_dim and config.text_proj == model.config.text_proj
    state = {k: v for k, v in model.state_dict().items() if keep_proj or not k.startswith("text_proj.")}
    model = m2d.M2DCLAP(config, tuple(ckpt["norm_stats"]), encoder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("text_encoder.", "text_proj.")) for k in missing)
    print(f"text side: {args.text_encoder} ({width}-d, {pooling} feature), "
          f"{'stage-1 projector kept' if keep_proj else f'new {config.text_proj} projector'}")
    return model, tokenizer


# -----------------------------------------------------------------------------
# One step's losses


def step_losses(outputs, logit_scale, clap_loss, clap_weight: float):
    """Stage 1: L = L_M2D + lambda * L_CLAP. Stages 2 and 2.1 (no prediction): L = L_CLAP."""
    prediction, target, audio_emb, text_emb = outputs
    loss_clap = clap_loss(audio_emb, text_emb, logit_scale)
    if prediction is None:
        return loss_clap, {"loss_clap": loss_clap}
    loss_m2d = m2d_loss(prediction, target)
    return loss_m2d + clap_weight * loss_clap, {"loss_m2d": loss_m2d, "loss_clap": loss_clap}


def compiled(module: torch.nn.Module):
    """torch.compile, keeping eager's random numbers so that masks do not depend on compilation."""
    import torch._inductor.config
    torch._inductor.config.fallback_random = True
    return torch.compile(module)


def train_step(model, net, forward, optimizer, scaler, autocast, clap_loss, micro_batches, clap_weight: float,
               clip_grad_norm: float, ema_decay: float | None):
    """One optimiser step over the micro-batches [(log_mel, text), ...] already on the device.

    net is the model or its DistributedDataParallel wrapper, forward the same
    possibly compiled; gradients are averaged across ranks only on the last
    micro-batch. Stage 1 (ema_decay given) updates the EMA target after the
    step. A non-finite loss or gradient norm on any rank skips the step on
    every rank: no weight, optimiser state or EMA target changes (with fp16
    the scaler lowers its scale, as it does for its own overflow skips).
    Returns each loss averaged over micro-batches and the gradient norm, as
    device tensors, and whether the step was applied: reading that flag is
    the step's one wait for the device.
    """
    sums = {}
    frozen_encoder = ema_decay is None
    for k, (mel, text) in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        with contextlib.nullcontext() if last or net is model else net.no_sync():
            with autocast:
                outputs = forward(mel, text, frozen_encoder=frozen_encoder)
                loss, parts = step_losses(outputs, model.logit_scale, clap_loss, clap_weight)
            scaler.scale(loss / len(micro_batches)).backward()
        for key, value in parts.items():
            sums[key] = sums.get(key, 0) + value.detach() / len(micro_batches)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_grad_norm)
    finite = torch.isfinite(torch.stack([grad_norm.float(), *(v.float() for v in sums.values())])).all()
    if net is not model:  # a loss is per rank: skip on all ranks or none
        finite = finite.int()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    applied = bool(finite)
    if applied:
        scaler.step(optimizer)
        model.clamp_logit_scale()
        if ema_decay is not None:
            model.ema_update(ema_decay)  # every rank holds the same online weights, so the same target
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm, applied


# -----------------------------------------------------------------------------
# Training


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError, ImportError, CheckpointWriteError, NonFiniteError) as e:
        # AudioError and CaptionFileError are ValueErrors too
        message = str(e)
        if message.startswith("Caught ") and "Original Traceback" in message:  # raised in a DataLoader worker
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        sys.exit(f"error: {message}")


@dataclass
class Distributed:
    """This process's place in a torchrun job (a single process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> Distributed:
    """Join the process group torchrun describes in the environment: NCCL on GPUs, Gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Distributed()
    ddp = Distributed(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world_size)
    if device_type == "cuda":
        torch.cuda.set_device(ddp.local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return ddp


def parameter_checksums(model: torch.nn.Module) -> list[float]:
    """One float64 sum per parameter tensor: equal lists mean equal replicas, to rounding."""
    return [p.detach().double().sum().item() for p in model.parameters()]


# -----------------------------------------------------------------------------
# Resuming: everything a run needs to go on exactly as if it had never stopped


class ResumeError(ValueError):
    """A run folder that cannot be resumed as asked."""


class NonFiniteError(RuntimeError):
    """Too many steps in a row with a non-finite loss or gradient."""


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
    if ddp.world_size == 1:
        return [rng_state(device)]
    states = [None] * ddp.world_size
    dist.all_gather_object(states, rng_state(device))
    return states


def find_resume(args, out_dir: Path, stage: str) -> dict | None:
    """The checkpoint to go on from, or None for a new run: --resume, --no-resume, or last.pt if present."""
    path = out_dir / "last.pt"
    if args.resume is False or (args.resume is None and not path.is_file()):
        return None
    if not path.is_file():
        raise ResumeError(f"{path}: not found, so there is nothing to resume. Check --out-dir, or drop "
                          "--resume to start a new run.")
    ckpt = load_checkpoint(path)
    if ckpt.get("stage") != stage:
        raise ResumeError(f"{path}: a stage-{ckpt.get('stage')} run, so stage {stage} cannot resume it. Pass "
                          f"another --out-dir, or --no-resume to start over there (it overwrites that run).")
    if "resume" not in ckpt:
        raise ResumeError(f"{path}: holds no resume state. Pass --no-resume to start over (it overwrites the "
                          "run), or another --out-dir.")
    return ckpt


def check_same_run(path: Path, saved: dict, now: dict):
    """A resume must continue the same run: data, model, batch, seed and schedule length."""
    changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in now.items() if saved.get(key) != value]
    if changed:
        raise ResumeError(f"{path}: cannot resume with other settings than the run's ({'; '.join(changed)}). "
                          "Run the interrupted command again unchanged (--lr may change), or pass "
                          "--no-resume (starts over, overwriting the run) or another --out-dir.")


def read_log(path: Path, last_step: int) -> list[dict]:
    """The records of log.jsonl up to last_step: what a resumed run keeps of its log."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= last_step]


# -----------------------------------------------------------------------------
# The training loop


def train(args: argparse.Namespace):
    stage = args.stage
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    ddp = setup_distributed(device.type)
    if cuda and ddp.world_size > 1:
        device = torch.device("cuda", ddp.local_rank)
    log = print if ddp.main else (lambda *a, **k: None)
    precision = args.precision or ("bf16" if cuda else "fp32")
    # Compiled by default for the stage-1 step on CUDA; a text encoder's varying token counts would recompile.
    use_compile = (cuda and stage == "1") if args.compile is None else args.compile
    workers = args.workers if args.workers is not None else (8 if cuda else 0)
    out_dir = args.out_dir or Path("runs") / f"stage{stage}"

    resume = find_resume(args, out_dir, stage)
    if resume is not None and resume["step"] >= resume["resume"]["run"]["total_steps"]:
        log(f"{out_dir / 'last.pt'}: this run finished at step {resume['step']}; nothing to resume. Pass "
            "--no-resume to train it again from scratch (overwrites it), or another --out-dir.")
        if ddp.world_size > 1:
            dist.destroy_process_group()
        return

    # Every rank draws its own masks; the weights start equal because
    # DistributedDataParallel copies rank 0's to the others. A resumed run
    # restores each rank's states just before its first step.
    random.seed(args.seed + ddp.rank)
    np.random.seed(args.seed + ddp.rank)
    torch.manual_seed(args.seed + ddp.rank)

    # --- where a stage starts: scratch, the previous stage, or its own last.pt --
    init_path = init = None
    if stage != "1" and resume is None:
        init_path = args.init or Path("runs") / f"stage{PREVIOUS_STAGE[stage]}" / "last.pt"
        init = load_previous_stage(stage, init_path)
    start = resume or init  # what a stage-2 run takes its preset, text side and crop length from
    if start is not None:
        preset = start["args"].get("preset") or "tiny"
        if init is not None and args.preset not in (None, preset):
            raise ValueError(f"{init_path}: a stage-{init['stage']} checkpoint of the {preset} preset, but this "
                             f"run asks for --preset {args.preset}. Drop --preset (stages 2 and 2.1 take it from "
                             f"the checkpoint they start from), or pass --init with a {args.preset} checkpoint.")
        args.preset = args.preset or preset
    args.preset = args.preset or "tiny"
    recipe = RECIPES[(stage, args.preset)]
    recipe = replace(recipe, **{k: v for k, v in dict(
        batch_size=args.batch_size, clap_weight=args.clap_weight, epochs=args.epochs,
        ema_decay=tuple(args.ema_decay) if args.ema_decay else None).items() if v is not None})
    if recipe.batch_size % (args.accum_steps * ddp.world_size):
        raise ValueError(f"--batch-size {recipe.batch_size} is not divisible by {args.accum_steps} accumulation "
                         f"steps x {ddp.world_size} processes")
    micro_batch = recipe.batch_size // (args.accum_steps * ddp.world_size)
    if stage == "1":
        text_side, text_encoder_name = "embeddings", None
    elif stage == "2":
        text_side, text_encoder_name = args.text_side, args.text_encoder
    else:  # stage 2.1 keeps the text side of the stage-2 checkpoint it starts from
        text_side = start["text_side"]
        text_encoder_name = start["text_encoder"]["name"] if start["text_encoder"] else None

    # --- run folder ------------------------------------------------------------
    if ddp.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:  # a new run: nothing of an earlier one in this folder may mix in
            for stale in [*out_dir.glob("step_*.pt"), out_dir / "last.pt", out_dir / "last.pt.tmp",
                          out_dir / "bad_clips.csv"]:
                stale.unlink(missing_ok=True)
    if ddp.world_size > 1:
        dist.barrier()

    # --- data ------------------------------------------------------------------
    if args.data is None:
        split = "refine" if stage == "2.1" else "train"
        if ddp.main:
            builtin_data.builtin_dataset(split)  # renders the audio cache once, before the other ranks read it
        if ddp.world_size > 1:
            dist.barrier()
        csv_path, audio_root = builtin_data.builtin_dataset(split)
        npy_path, preload = None, True if args.preload is None else args.preload
        data_name = f"built-in {split}"
    else:
        csv_path, npy_path = args.data, args.embeddings
        audio_root = args.audio_root or args.data.parent
        preload = bool(args.preload)
        data_name = str(args.data)
    # The sentence model behind the embeddings, kept for embedding new text later.
    if args.embedding_model or args.data is None:
        embedding_model = args.embedding_model or text_embed.DEFAULT_MODEL
    else:
        embedding_model = start.get("embedding_model") if start else None
    table = (text_embed.load_captions(csv_path) if text_side == "encoder"
             else text_embed.load_caption_embeddings(csv_path, npy_path))
    crop_frames = (m2d.preset(args.preset).crop_frames if stage == "1"
                   else start["model_config"]["crop_frames"])
    source = data.ShardStore(args.shards) if args.shards else data.AudioFolder(audio_root, args.convert_audio)
    bad_clips = data.BadClipReport(out_dir / "bad_clips.csv") if args.skip_bad else None
    dataset = data.ClipDataset(table, source, crop_frames, preload=preload, skip_bad=bad_clips)
    # The clip order depends on the seed and the global batch only, and starts mid-epoch on resume.
    order = data.ClipOrder(len(dataset), recipe.batch_size, args.seed, ddp.rank, ddp.world_size, args.accum_steps)
    if order.batches_per_epoch == 0:
        raise ValueError(f"{csv_path} has {len(dataset)} usable clips, fewer than one batch of "
                         f"{recipe.batch_size}; lower --batch-size")

    # --- model -----------------------------------------------------------------
    tokenizer = None
    if resume is not None:  # the run's own weights, EMA target and normalisation statistics
        model, tokenizer = build_model({**resume, "model_config": {
            **resume["model_config"], "grad_checkpointing": args.grad_checkpointing}})
    elif stage == "1":
        if args.norm_stats:
            norm_stats = tuple(args.norm_stats)
        elif isinstance(source, data.ShardStore) and source.norm_stats:  # from 'python data.py stats'
            norm_stats = source.norm_stats
        else:
            norm_stats = data.compute_norm_stats(dataset)
        model = stage1_model(args, table.dim, norm_stats)
    elif stage == "2":
        model, tokenizer = stage2_model(args, init)
    else:
        model, tokenizer = build_model(init)
    if stage != "1":
        model.freeze_encoder()
    if text_side == "embeddings":
        text_embed.check_dim(table, model.config.text_dim)
    norm_stats = tuple(model.norm_stats.tolist())
    model.to(device)
    frozen_encoder = stage != "1"
    if frozen_encoder:
        model.train_clap()
    else:
        model.train()
    net = model
    if ddp.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[ddp.local_rank] if cuda else None)
    forward = compiled(net) if use_compile else net

    # The loader gets a generator of its own: starting an epoch must not draw
    # from the global RNG that the masks come from.
    loader = DataLoader(dataset, batch_size=micro_batch, sampler=order, num_workers=workers, pin_memory=cuda,
                        persistent_workers=workers > 0, generator=torch.Generator())
    steps_per_epoch = order.batches_per_epoch
    total_steps = args.max_steps or max(1, round(recipe.epochs * steps_per_epoch))
    warmup_steps = max(1, round(total_steps * recipe.warmup_epochs / recipe.epochs))
    peak_lr = args.lr or recipe.base_lr * recipe.batch_size / 256

    clap_loss = ClapLoss()
    optimizer = torch.optim.AdamW(model.param_groups(recipe.weight_decay), lr=peak_lr,
                                  betas=recipe.betas, fused=True)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # What makes a run this run: a resume must match it (the peak learning rate may change).
    run = dict(stage=stage, preset=args.preset, data=data_name,
               embeddings=str(npy_path) if npy_path else None, shards=str(args.shards) if args.shards else None,
               text_side=text_side, text_encoder=text_encoder_name, clips=len(dataset), seed=args.seed,
               batch_size=recipe.batch_size, mask_ratio=model.config.mask_ratio if args.mask_ratio is None
               else args.mask_ratio, total_steps=total_steps, warmup_steps=warmup_steps, recipe=asdict(recipe))
    start_step, records, last_saved = 0, [], None
    t_start = time.perf_counter()
    if resume is not None:
        check_same_run(out_dir / "last.pt", resume["resume"]["run"], run)
        if model.config.text_proj == "linear" and "text_proj.bias" not in resume["model"]:
            raise ValueError(f"{out_dir / 'last.pt'}: written by an earlier version whose text projector had no "
                             "bias, so its optimiser state does not fit this one. Train it again with --no-resume, "
                             "or go on from its weights with the next stage (--init).")
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        start_step = last_saved = resume["step"]
        t_start -= resume["resume"]["elapsed_s"]
        records = read_log(out_dir / "log.jsonl", start_step)
    if ddp.main:
        with open(out_dir / "log.jsonl", "w") as log_file:  # a resumed run drops what came after its checkpoint
            log_file.writelines(json.dumps(r) + "\n" for r in records)
        log_file = open(out_dir / "log.jsonl", "a")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"stage {stage} | preset {args.preset} ({n_params / 1e6:.1f}M trainable parameters) | "
        f"{len(dataset)} clips from {csv_path} | norm stats {norm_stats[0]:.4f} {norm_stats[1]:.4f}")
    log(f"{total_steps} steps ({steps_per_epoch} per epoch) | global batch {recipe.batch_size} = "
        f"{ddp.world_size} processes x {args.accum_steps} accumulation steps x {micro_batch} clips | "
        f"peak lr {peak_lr:.2e} = {recipe.base_lr:.2e} x {recipe.batch_size} / 256"
        f"{'' if args.lr is None else ' (overridden by --lr)'} | {device} {precision}"
        f"{' compiled' if use_compile else ''} | writing {out_dir}")
    if resume is not None:
        epoch, batch = divmod(start_step, steps_per_epoch)
        log(f"resuming {out_dir / 'last.pt'} at step {start_step} of {total_steps} (epoch {epoch}, batch {batch} "
            f"of {steps_per_epoch}): weights, EMA target, optimiser, scaler, schedules, data order and RNG states")
        if resume["resume"]["peak_lr"] != peak_lr:
            log(f"peak lr changed on resume: {resume['resume']['peak_lr']:.2e} -> {peak_lr:.2e}")

    def checkpoint(step: int):
        nonlocal last_saved
        rng = gather_rng_states(ddp, device)  # every rank takes part
        if not ddp.main:
            return
        text_encoder = None
        if model.text_encoder is not None:
            text_encoder = {"name": text_encoder_name, "config": model.text_encoder.config.to_dict()}
        save_checkpoint(out_dir / "last.pt", stage=stage, step=step, model=model.state_dict(),
                        model_config=asdict(model.config), norm_stats=list(norm_stats),
                        text_side=text_side, text_encoder=text_encoder, embedding_model=embedding_model,
                        recipe=asdict(recipe), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                        resume=dict(run=run, peak_lr=peak_lr, rng=rng, elapsed_s=time.perf_counter() - t_start))
        last_saved = step

    def batches():
        first_epoch, batch = divmod(start_step, steps_per_epoch)
        for epoch in itertools.count(first_epoch):
            order.set_position(epoch, batch if epoch == first_epoch else 0)  # a new shuffle every epoch
            yield from loader

    if resume is not None:  # last, so that nothing above draws from them
        states = resume["resume"]["rng"]
        if len(states) == ddp.world_size:
            set_rng_state(states[ddp.rank], device)
        else:
            log(f"the run had {len(states)} processes and now has {ddp.world_size}: masks come from new seeds, so "
                "it is no longer bit-identical to an uninterrupted run")
            torch.manual_seed(args.seed + ddp.rank + 1_000_003 * start_step)

    batch_iter = batches()
    t_log, logged_step = time.perf_counter(), start_step
    bad_streak, skipped_steps, bad_reported = 0, 0, len(bad_clips.names()) if bad_clips else 0
    for step in range(start_step, total_steps):
        lr = lr_at(step, total_steps, warmup_steps, peak_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ema_decay = m2d.ema_decay_at(step, total_steps, *recipe.ema_decay)

        micro_batches = []
        for _ in range(args.accum_steps):
            mel, text = next(batch_iter)
            if tokenizer is not None:
                text = text_embed.tokenize(tokenizer, text)
            micro_batches.append((to_device(mel, device), to_device(text, device)))
        sums, grad_norm, applied = train_step(model, net, forward, optimizer, scaler, autocast, clap_loss,
                                              micro_batches, recipe.clap_weight, recipe.clip_grad_norm,
                                              ema_decay if stage == "1" else None)
        done = step + 1
        if applied:
            bad_streak = 0
        else:
            bad_streak += 1
            skipped_steps += 1
            losses = ", ".join(f"{key.removeprefix('loss_')} {value.item():.4g}" for key, value in sums.items())
            scale = f"; fp16 loss scale lowered to {scaler.get_scale():g}" if scaler.is_enabled() else ""
            log(f"warning: step {done}: non-finite loss or gradient ({losses}, grad norm {grad_norm.item():.4g}); "
                f"step skipped, weights unchanged{scale}", file=sys.stderr, flush=True)
            if bad_streak >= args.max_bad_steps:
                kept = (f"the last good checkpoint, {out_dir / 'last.pt'} (step {last_saved}), is intact"
                        if last_saved else "no checkpoint had been written yet")
                raise NonFiniteError(
                    f"{bad_streak} steps in a row ({done - bad_streak + 1} to {done}) had a non-finite loss or "
                    f"gradient, so the run stopped; {kept}. Lower the learning rate (--lr; a resume may change "
                    "it), prefer --precision bf16 to fp16, or look for extreme clips or caption embeddings.")

        if done % args.log_every == 0 or done == total_steps or done == 1:
            stacked = torch.stack(list(sums.values()))
            if ddp.world_size > 1:
                dist.all_reduce(stacked)  # the M2D loss is a per-rank mean: log the global one
                stacked /= ddp.world_size
            values = dict(zip(sums, stacked.tolist()))
            now = time.perf_counter()
            clips_per_s = (done - logged_step) * recipe.batch_size / (now - t_log)
            t_log, logged_step = now, done
            loss_value = values.get("loss_m2d", 0.0) + (recipe.clap_weight if stage == "1" else 1.0) * values["loss_clap"]
            record = dict(step=done, epoch=round(done / steps_per_epoch, 3), loss=loss_value, **values, lr=lr,
                          **({"ema_decay": ema_decay} if stage == "1" else {}),
                          logit_scale=model.logit_scale.exp().item(),
                          grad_norm=grad_norm.item(), clips_per_s=round(clips_per_s, 1),
                          elapsed_s=round(now - t_start, 2), skipped_steps=skipped_steps)
            records.append(record)
            if ddp.main:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            eta = (now - t_start) / done * (total_steps - done)
            losses = " | ".join(f"{key.removeprefix('loss_')} {value:.4f}" for key, value in values.items())
            ema = f" | ema {ema_decay:.5f}" if stage == "1" else ""
            log(f"step {done:>6}/{total_steps} | loss {loss_value:.4f} | {losses} | lr {lr:.2e}{ema} | "
                f"{clips_per_s:.0f} clips/s | ETA {format_duration(eta)}", flush=True)
            n_bad = len(bad_clips.names()) if bad_clips is not None else 0
            if n_bad > bad_reported:
                bad_reported = n_bad
                log(f"{n_bad} unreadable clip(s) skipped so far; listed in {bad_clips.path}", flush=True)
        if done % args.save_every == 0 and done < total_steps and not bad_streak:  # keep the pre-trouble one
            checkpoint(done)
            if ddp.main and args.keep > 0:
                keep_periodic(out_dir, done, args.keep)

    if ddp.world_size > 1:
        # The replicas must agree, EMA target included: check before saving.
        gathered = [None] * ddp.world_size
        dist.all_gather_object(gathered, parameter_checksums(model))
        if any(g != gathered[0] for g in gathered):
            raise RuntimeError("the ranks' parameters diverged; this is a bug, please report it")
        log(f"parameters identical on all {ddp.world_size} ranks")
    checkpoint(total_steps)
    if ddp.main:
        log_file.close()
    log(f"done in {format_duration(time.perf_counter() - t_start)}; checkpoint {out_dir / 'last.pt'}")
    if records:
        last = records[-10:]
        log(f"losses, step {records[0]['step']} -> mean of the last {len(last)} logged steps: "
            + ", ".join(f"{key} {records[0][key]:.3f} -> {sum(r[key] for r in last) / len(last):.3f}"
                        for key in records[0] if key.startswith("loss_")))
    if skipped_steps:
        log(f"{skipped_steps} step(s) skipped for a non-finite loss or gradient in this session")
    if bad_clips is not None:
        log(f"{len(bad_clips.names())} unreadable clip(s) skipped; listed in {bad_clips.path}")
    if ddp.world_size > 1:
        dist.barrier()  # let rank 0 finish saving before any rank leaves the group
        del forward, net  # DistributedDataParallel must go before its process group does
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
