"""Stage-wise training of M2D-CLAP.

Stage 1 learns general-purpose audio features and CLAP features together:
    L = L_M2D + lambda * L_CLAP
with the online/target M2D networks and frozen precomputed sentence
embeddings on the text side (a trainable text projector maps them to the
audio width).

    python train.py --stage 1                      # tiny preset, built-in data, CPU friendly
    python train.py --stage 1 --preset base --data captions.csv --audio-root /audio
                                                    # the paper's ViT-Base recipe

Outputs in --out-dir (default runs/stage1): last.pt (checkpoint, loadable with
torch.load(weights_only=True)) and log.jsonl (one JSON object per logged step).
This file is the only place that knows about AMP, torch.compile, schedules and
checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import data
import model as m2d
import text_embed
from losses import ClapLoss, m2d_loss


# -----------------------------------------------------------------------------
# Recipes: training hyperparameters, one named instance per preset


@dataclass(frozen=True)
class Recipe:
    """Stage-1 hyperparameters. The defaults are the paper's (SPEC 7)."""

    batch_size: int = 2048            # total clips per optimiser step (all GPUs, all micro-batches)
    base_lr: float = 3e-4             # learning rate = base_lr * batch_size / 256
    epochs: int = 300
    warmup_epochs: float = 20
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad_norm: float = 3.0
    ema_decay: tuple[float, float] = (0.99995, 0.99999)  # linear from start to end over training
    clap_weight: float = 0.01        # lambda


RECIPES: dict[str, Recipe] = {
    # A few hundred steps on the built-in data: a larger learning rate and a
    # faster-moving EMA target, since the paper's 0.99995 would leave the target
    # at its random initialisation for a run this short.
    "tiny": Recipe(batch_size=64, base_lr=2e-3, epochs=40, warmup_epochs=2,
                   ema_decay=(0.995, 0.999)),
    "base": Recipe(),
    "large": Recipe(),
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


def save_checkpoint(path: Path, **state):
    """Write atomically: a crash mid-save never leaves a truncated file at `path`."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint of ours without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return torch.load(path, map_location="cpu", weights_only=True)


def build_model_from_checkpoint(ckpt: dict) -> m2d.M2DCLAP:
    config = m2d.M2DConfig(**ckpt["model_config"])
    model = m2d.M2DCLAP(config)
    model.load_state_dict(ckpt["model"])
    return model


# -----------------------------------------------------------------------------
# Command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=["1"], help="training stage")
    p.add_argument("--preset", default="tiny", choices=sorted(m2d.PRESETS),
                   help="model size and its recipe: tiny (CPU, built-in data), base (the paper), large")
    p.add_argument("--data", type=Path, default=None,
                   help="captions CSV (columns file_name, caption; see text_embed.py). "
                        "Default: the built-in synthetic training set")
    p.add_argument("--embeddings", type=Path, default=None,
                   help="caption embeddings .npy, row-aligned with --data (default: --data with .npy)")
    p.add_argument("--audio-root", type=Path, default=None,
                   help="folder the CSV's file_name paths are relative to (default: the CSV's folder)")
    p.add_argument("--out-dir", type=Path, default=None, help="run folder (default: runs/stage<STAGE>)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimiser steps; schedules span them (default: the recipe's epochs)")
    p.add_argument("--epochs", type=float, default=None, help="epochs over the data (default: the recipe's)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="total clips per optimiser step")
    p.add_argument("--accum-steps", type=positive_int, default=1,
                   help="split each step's batch into this many micro-batches (gradient accumulation)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: base_lr * batch / 256)")
    p.add_argument("--clap-weight", type=float, default=None, help="lambda, the weight of the CLAP loss")
    p.add_argument("--mask-ratio", type=float, default=None, help="share of masked patches (default 0.7)")
    p.add_argument("--ema-decay", type=float, nargs=2, default=None, metavar=("START", "END"),
                   help="EMA decay of the target, linear from START to END over training")
    p.add_argument("--norm-stats", type=float, nargs=2, default=None, metavar=("MEAN", "STD"),
                   help="log-mel normalisation statistics (default: measured on the training clips)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="autocast precision (default: bf16 on CUDA, fp32 on CPU); fp16 uses a GradScaler")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off for CPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes (default: 8 on CUDA, 0 on CPU)")
    p.add_argument("--preload", action=argparse.BooleanOptionalAction, default=None,
                   help="decode every clip into memory once (default: on for the built-in data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between progress lines and log records")
    p.add_argument("--save-every", type=positive_int, default=1000, help="steps between checkpoint saves")
    args = p.parse_args(argv)
    if args.data is None and (args.embeddings or args.audio_root):
        p.error("--embeddings and --audio-root describe your own data; pass --data CSV with them")
    return args


# -----------------------------------------------------------------------------
# Training


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError) as e:  # AudioError and CaptionFileError included
        sys.exit(f"error: {e}")


def train(args: argparse.Namespace):
    recipe = RECIPES[args.preset]
    recipe = replace(recipe, **{k: v for k, v in dict(
        batch_size=args.batch_size, clap_weight=args.clap_weight, epochs=args.epochs,
        ema_decay=tuple(args.ema_decay) if args.ema_decay else None).items() if v is not None})
    out_dir = args.out_dir or Path("runs") / f"stage{args.stage}"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    precision = args.precision or ("bf16" if cuda else "fp32")
    use_compile = cuda if args.compile is None else args.compile
    workers = args.workers if args.workers is not None else (8 if cuda else 0)
    if recipe.batch_size % args.accum_steps:
        raise ValueError(f"--batch-size {recipe.batch_size} is not divisible by --accum-steps {args.accum_steps}")
    micro_batch = recipe.batch_size // args.accum_steps

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # --- data ------------------------------------------------------------------
    if args.data is None:
        csv_path, audio_root = data.builtin_dataset("train")
        npy_path, preload = None, True if args.preload is None else args.preload
    else:
        csv_path, npy_path = args.data, args.embeddings
        audio_root = args.audio_root or args.data.parent
        preload = bool(args.preload)
    table = text_embed.load_caption_embeddings(csv_path, npy_path)
    overrides = {"text_dim": table.dim}
    if args.mask_ratio is not None:
        overrides["mask_ratio"] = args.mask_ratio
    config = m2d.preset(args.preset, **overrides)
    dataset = data.ClipDataset(table, audio_root, config.crop_frames, preload=preload)
    norm_stats = tuple(args.norm_stats) if args.norm_stats else data.compute_norm_stats(dataset)
    if len(dataset) < micro_batch:
        raise ValueError(f"{csv_path} has {len(dataset)} clips, fewer than one batch of {micro_batch}; "
                         "lower --batch-size")
    loader = DataLoader(dataset, batch_size=micro_batch, shuffle=True, drop_last=True,
                        num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))
    steps_per_epoch = len(loader) // args.accum_steps
    total_steps = args.max_steps or max(1, round(recipe.epochs * steps_per_epoch))
    warmup_steps = max(1, round(total_steps * recipe.warmup_epochs / recipe.epochs))
    peak_lr = args.lr or recipe.base_lr * recipe.batch_size / 256

    # --- model -----------------------------------------------------------------
    model = m2d.M2DCLAP(config, norm_stats=norm_stats).to(device)
    clap_loss = ClapLoss()
    optimizer = torch.optim.AdamW(model.param_groups(recipe.weight_decay), lr=peak_lr,
                                  betas=recipe.betas, fused=True)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    forward = torch.compile(model) if use_compile else model

    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "log.jsonl", "w")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"stage {args.stage} | preset {args.preset} ({n_params / 1e6:.1f}M trainable parameters) | "
          f"{len(dataset)} clips from {csv_path} | norm stats {norm_stats[0]:.4f} {norm_stats[1]:.4f}")
    print(f"{total_steps} steps ({steps_per_epoch} per epoch) | batch {recipe.batch_size} "
          f"({args.accum_steps} x {micro_batch}) | peak lr {peak_lr:.2e} | {device} {precision}"
          f"{' compiled' if use_compile else ''} | writing {out_dir}")

    def checkpoint(step: int):
        save_checkpoint(out_dir / "last.pt", stage=args.stage, step=step, model=model.state_dict(),
                        model_config=asdict(config), recipe=asdict(recipe), norm_stats=list(norm_stats),
                        optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})

    def batches():
        while True:
            yield from loader

    batch_iter = batches()
    model.train()
    t_start = t_log = time.perf_counter()
    logged_step, records = 0, []
    for step in range(total_steps):
        lr = lr_at(step, total_steps, warmup_steps, peak_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ema_decay = m2d.ema_decay_at(step, total_steps, *recipe.ema_decay)

        step_losses = torch.zeros(2, device=device)  # M2D, CLAP: summed over micro-batches, no sync
        for _ in range(args.accum_steps):
            mel, text = next(batch_iter)
            mel = mel.to(device, non_blocking=True)
            text = text.to(device, non_blocking=True)
            with autocast:
                prediction, target, audio_emb, text_emb = forward(mel, text)
                loss_m2d = m2d_loss(prediction, target)
                loss_clap = clap_loss(audio_emb, text_emb, model.logit_scale)
                loss = loss_m2d + recipe.clap_weight * loss_clap
            scaler.scale(loss / args.accum_steps).backward()
            step_losses += torch.stack([loss_m2d, loss_clap]).detach() / args.accum_steps

        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        model.ema_update(ema_decay)

        done = step + 1
        if done % args.log_every == 0 or done == total_steps or done == 1:
            now = time.perf_counter()
            clips_per_s = (done - logged_step) * recipe.batch_size / (now - t_log)
            t_log, logged_step = now, done
            m2d_value, clap_value = step_losses.tolist()
            record = dict(step=done, epoch=round(done / steps_per_epoch, 3),
                          loss=m2d_value + recipe.clap_weight * clap_value, loss_m2d=m2d_value,
                          loss_clap=clap_value, lr=lr, ema_decay=ema_decay,
                          logit_scale=model.logit_scale.clamp(0, ClapLoss.max_logit_scale).exp().item(),
                          grad_norm=grad_norm.item(), clips_per_s=round(clips_per_s, 1),
                          elapsed_s=round(now - t_start, 2))
            records.append(record)
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            eta = (now - t_start) / done * (total_steps - done)
            print(f"step {done:>6}/{total_steps} | loss {record['loss']:.4f} | m2d {record['loss_m2d']:.4f} | "
                  f"clap {record['loss_clap']:.4f} | lr {lr:.2e} | ema {ema_decay:.5f} | "
                  f"{clips_per_s:.0f} clips/s | ETA {format_duration(eta)}", flush=True)
        if done % args.save_every == 0 and done < total_steps:
            checkpoint(done)

    checkpoint(total_steps)
    log_file.close()
    print(f"done in {format_duration(time.perf_counter() - t_start)}; checkpoint {out_dir / 'last.pt'}")
    last = records[-10:]
    print(f"losses, step 1 -> mean of the last {len(last)} logged steps: "
          + ", ".join(f"{key} {records[0][key]:.3f} -> {sum(r[key] for r in last) / len(last):.3f}"
                      for key in ("loss_m2d", "loss_clap")))


if __name__ == "__main__":
    main()
