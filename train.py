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

Outputs in --out-dir (default runs/stage<STAGE>): last.pt (a checkpoint that
loads with torch.load(weights_only=True) and holds all a resume needs),
log.jsonl (one JSON object per logged step) and, with --skip-bad,
bad_clips.csv. Running the same command again resumes the run exactly where
it stopped. This file is the only place that knows about AMP, torch.compile,
data parallelism, schedules, resuming and checkpoints. To write a checkpoint
in the released layout: python evaluate.py export.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import builtin_data
import data
import features
import model as m2d
import text_embed
from losses import ClapLoss, m2d_loss
from runs import CheckpointWriteError, format_duration, keep_periodic, load_checkpoint, save_checkpoint

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
# Schedules: the learning rate and the EMA decay of each step


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up to peak_lr, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def ema_decay_at(step: int, total_steps: int, start: float, end: float) -> float:
    """EMA decay rising linearly from start to end over the whole run (Recipe.ema_decay)."""
    return start + (end - start) * min(step, total_steps) / max(total_steps, 1)


# -----------------------------------------------------------------------------
# The command line: one dataclass, one flag per field


def flag(default, help: str, stages: tuple[str, ...] = STAGES, **argparse_options):
    """A Config field: its default, its --help text, the stages that take it, and how argparse reads it."""
    return field(default=default, metadata={"help": help, "stages": stages, **argparse_options})


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


CUDA = torch.cuda.is_available()


@dataclass
class Config:
    """Everything a run is told. A default of None means "as described", and resolve() decides it."""

    stage: str = flag(MISSING, "training stage", choices=STAGES)
    preset: str | None = flag(None, "model size and recipe: tiny (CPU, built-in data), base (the paper) or large. "
                              "Default: tiny in stage 1; stages 2 and 2.1 take it from --init",
                              choices=sorted(m2d.PRESETS))
    data: Path | None = flag(None, "captions CSV (columns file_name, caption; see text_embed.py). Default: the "
                             "built-in synthetic training set (stage 2.1: its refinement subset)", type=Path)
    embeddings: Path | None = flag(None, "caption embeddings .npy, row-aligned with --data (default: --data with "
                                   ".npy)", type=Path)
    embedding_model: str | None = flag(None, "name or path of the sentence model that made --embeddings, recorded "
                                       "in the checkpoint so that new text (zero-shot prompts) can be embedded the "
                                       "same way (default: all-MiniLM-L6-v2 for the built-in data)")
    audio_root: Path | None = flag(None, "folder the CSV's file_name paths are relative to (default: the CSV's "
                                   "folder)", type=Path)
    shards: Path | None = flag(None, "read log-mels from the shards 'python data.py prepare' wrote, instead of "
                               "decoding audio", type=Path)
    init: Path | None = flag(None, "checkpoint to start from (default: runs/stage1/last.pt for stage 2, "
                             "runs/stage2/last.pt for stage 2.1)", ("2", "2.1"), type=Path)
    text_side: str = flag("encoder", "train a pretrained text encoder on caption text (encoder, needs the "
                          "transformers extra), or a projector on the precomputed sentence embeddings",
                          ("2",), choices=["encoder", "embeddings"])
    text_encoder: str = flag(text_embed.DEFAULT_MODEL, "local Hugging Face folder of the text encoder, e.g. "
                             "bert-base-uncased (default: the bundled all-MiniLM-L6-v2)", ("2",))
    text_pooling: str = flag("auto", "the text encoder's feature: its CLS token (as the paper's BERT) or the mean "
                             "over real tokens; auto takes the pooling a sentence-transformers folder declares "
                             "(mean for all-MiniLM-L6-v2 and GTE-base) and CLS for any other encoder", ("2",),
                             choices=["auto", "cls", "mean"])
    out_dir: Path | None = flag(None, "run folder (default: runs/stage<STAGE>)", type=Path)
    max_steps: int | None = flag(None, "stop after this many optimiser steps; schedules span them (default: the "
                                 "recipe's epochs)", type=positive_int)
    epochs: float | None = flag(None, "epochs over the data (default: the recipe's, below)", type=float)
    batch_size: int | None = flag(None, "total clips per optimiser step (default: the recipe's, below)",
                                  type=positive_int)
    accum_steps: int = flag(1, "split each step's batch into this many micro-batches (gradient accumulation)",
                            type=positive_int)
    lr: float | None = flag(None, "peak learning rate (default: the recipe's base_lr x batch / 256)", type=float)
    clap_weight: float | None = flag(None, "lambda, the weight of the CLAP loss (default: the recipe's, 0.01)",
                                     ("1",), type=float)
    mask_ratio: float | None = flag(None, "share of masked patches (default: the preset's, 0.7)", ("1",),
                                    type=float)
    ema_decay: tuple[float, float] | None = flag(None, "EMA decay of the target, linear from START to END over "
                                                 "training (default: the recipe's)", ("1",), type=float, nargs=2,
                                                 metavar=("START", "END"))
    norm_stats: tuple[float, float] | None = flag(None, "log-mel normalisation statistics (default: measured on "
                                                  "the training clips, or the shards' norm_stats.json)", ("1",),
                                                  type=float, nargs=2, metavar=("MEAN", "STD"))
    device: str = flag("cuda" if CUDA else "cpu", "cpu, cuda, cuda:1, ...")
    precision: str | None = flag(None, "autocast precision (default: bf16 on CUDA, fp32 on CPU); fp16 uses a "
                                 "dynamic loss scale", choices=["fp32", "bf16", "fp16"])
    compile: bool | None = flag(None, "torch.compile the model (default: on for stage 1 on CUDA, off otherwise)",
                                action=argparse.BooleanOptionalAction)
    workers: int | None = flag(None, "DataLoader worker processes (default: 8 on CUDA, 0 on CPU)", type=int)
    preload: bool | None = flag(None, "decode every clip into memory once (default: on for the built-in data)",
                                action=argparse.BooleanOptionalAction)
    grad_checkpointing: bool = flag(False, "recompute block activations in the backward pass, trading time for "
                                    "memory (fits the large preset at batch 64 per 80 GB GPU)", ("1",),
                                    action="store_true")
    seed: int = flag(0, "seed of the masks, crops, caption choice and clip order", type=int)
    log_every: int = flag(10, "steps between progress lines and log records", type=positive_int)
    save_every: int = flag(1000, "steps between checkpoint saves (last.pt is replaced atomically each time)",
                           type=positive_int)
    keep: int = flag(2, "also keep the last K periodic checkpoints as step_<N>.pt (0: only last.pt)", type=int)
    resume: bool | None = flag(None, "continue the run in --out-dir from its last.pt, exactly where it stopped "
                               "(default: resume when last.pt exists; --no-resume starts over and overwrites the "
                               "run)", action=argparse.BooleanOptionalAction)
    skip_bad: bool = flag(False, "skip audio files that cannot be read, listing them in <out-dir>/bad_clips.csv "
                          "(default: the first one stops the run)", action="store_true")
    convert_audio: bool = flag(False, "downmix and resample files that are not 16 kHz mono while loading "
                               "(default: such a file stops the run; 'python data.py prepare' converts a corpus "
                               "once)", action="store_true")
    max_bad_steps: int = flag(10, "stop after this many steps in a row with a non-finite loss or gradient (each "
                              "is skipped with a warning)", type=positive_int)

    def saved(self) -> dict:
        """The settings as plain values, for the checkpoint."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def recipes_table() -> str:
    rows = [f"  {'stage':5s} {'preset':6s} {'batch':>5s} {'base_lr':>8s} {'epochs':>6s} {'warm-up':>7s} "
            f"{'betas':>12s} {'ema_decay':>18s} {'clap_weight':>11s}"]
    for (stage, preset), r in RECIPES.items():  # EMA and lambda are stage 1's alone
        ema, clap = (str(r.ema_decay), f"{r.clap_weight:g}") if stage == "1" else ("-", "-")
        rows.append(f"  {stage:5s} {preset:6s} {r.batch_size:5d} {r.base_lr:8.2e} {r.epochs:6g} {r.warmup_epochs:7g} "
                    f"{str(r.betas):>12s} {ema:>18s} {clap:>11s}")
    return "\n".join(rows)


def parse_config(argv=None) -> Config:
    """The Config of a command line: one flag per field, stage-specific flags checked against --stage."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Recipes (every default of batch, epochs, learning rate, EMA and lambda; "
                                       "AdamW, weight decay 0.05, clipping at 3.0):\n" + recipes_table())
    for f in fields(Config):
        options = {k: v for k, v in f.metadata.items() if k != "stages"}
        if f.default is MISSING:
            options["required"] = True
        else:
            options["default"] = f.default
        if "default" not in options["help"].lower() and f.default not in (MISSING, None, False):
            options["help"] += f" (default: {f.default})"
        if f.metadata["stages"] != STAGES:
            options["help"] = f"stage {' and '.join(f.metadata['stages'])}: {options['help']}"
        p.add_argument("--" + f.name.replace("_", "-"), **options)
    config = Config(**vars(p.parse_args(argv)))
    for f in fields(Config):
        if config.stage not in f.metadata["stages"] and getattr(config, f.name) != f.default:
            p.error(f"--{f.name.replace('_', '-')} is for stage {' and '.join(f.metadata['stages'])} only, "
                    f"not stage {config.stage}")
    if config.data is None and (config.embeddings or config.audio_root):
        p.error("--embeddings and --audio-root describe your own data; pass --data CSV with them")
    return config


# -----------------------------------------------------------------------------
# Checkpoints


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
# Data parallelism and resuming


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
# Where a run starts: a new run of a stage, or its own last.pt


class ResumeError(ValueError):
    """A run folder that cannot be resumed as asked."""


def find_resume(config: Config, out_dir: Path) -> dict | None:
    """The checkpoint to go on from, or None for a new run: --resume, --no-resume, or last.pt if present."""
    path = out_dir / "last.pt"
    if config.resume is False or (config.resume is None and not path.is_file()):
        return None
    if not path.is_file():
        raise ResumeError(f"{path}: not found, so there is nothing to resume. Check --out-dir, or drop "
                          "--resume to start a new run.")
    ckpt = load_checkpoint(path)
    if ckpt.get("stage") != config.stage:
        raise ResumeError(f"{path}: a stage-{ckpt.get('stage')} run, so stage {config.stage} cannot resume it. "
                          "Pass another --out-dir, or --no-resume to start over there (it overwrites that run).")
    if "resume" not in ckpt:
        raise ResumeError(f"{path}: holds no resume state. Pass --no-resume to start over (it overwrites the "
                          "run), or another --out-dir.")
    return ckpt


def resolve(config: Config, start: dict | None, init_path: Path | None = None) -> tuple[Config, Recipe]:
    """The config with its preset decided, and the recipe with the command line's overrides.

    Stages 2 and 2.1 take the preset of the checkpoint they start from (a
    different --preset stops the run); stage 1 defaults to tiny.
    """
    preset = config.preset or "tiny"
    if start is not None:
        preset = start["args"].get("preset") or "tiny"
        if init_path is not None and config.preset not in (None, preset):  # a new run of stage 2 or 2.1
            raise ValueError(f"{init_path}: a stage-{start['stage']} checkpoint of the {preset} preset, but this "
                             f"run asks for --preset {config.preset}. Drop --preset (stages 2 and 2.1 take it "
                             f"from the checkpoint they start from), or pass --init with a {config.preset} "
                             "checkpoint.")
    config = replace(config, preset=preset)
    overrides = dict(batch_size=config.batch_size, clap_weight=config.clap_weight, epochs=config.epochs,
                     ema_decay=tuple(config.ema_decay) if config.ema_decay else None)
    recipe = replace(RECIPES[(config.stage, preset)], **{k: v for k, v in overrides.items() if v is not None})
    return config, recipe


# -----------------------------------------------------------------------------
# The stages: what each one trains, on what text, from where


@dataclass
class Stage:
    """What the training loop needs to know of a stage."""

    model: m2d.M2DCLAP
    tokenizer: object | None          # for a trainable text encoder
    text_side: str                    # "embeddings" (precomputed sentence embeddings) or "encoder"
    text_encoder: str | None          # the text encoder's folder, for the checkpoint
    frozen_encoder: bool              # stages 2 and 2.1: only the CLAP parts train


def stage_text_side(config: Config, start: dict | None) -> tuple[str, str | None]:
    """(text side, text encoder name): stage 1 embeddings, stage 2 as asked, stage 2.1 as its stage 2."""
    if config.stage == "1":
        return "embeddings", None
    if config.stage == "2":
        return config.text_side, config.text_encoder
    return start["text_side"], start["text_encoder"]["name"] if start["text_encoder"] else None


def setup_stage1(config: Config, text_dim: int, norm_stats: tuple[float, float]) -> Stage:
    """Stage 1 from scratch: M2D and CLAP together, with precomputed sentence embeddings as the text."""
    overrides = {"text_dim": text_dim, "grad_checkpointing": config.grad_checkpointing}
    if config.mask_ratio is not None:
        overrides["mask_ratio"] = config.mask_ratio
    model = m2d.M2DCLAP(m2d.preset(config.preset, **overrides), norm_stats)
    return Stage(model, None, "embeddings", None, frozen_encoder=False)


def setup_stage2(config: Config, init: dict) -> Stage:
    """Stage 2: the stage-1 model with the encoder frozen and a new text side.

    With a text encoder, a projector is added only when its width differs from
    the audio width. When the encoder is as wide as stage 1's sentence
    embeddings, stage 1's projector is kept: on the built-in data stage 1's
    embeddings come from the very model stage 2 fine-tunes (mean-pooled
    all-MiniLM-L6-v2), so stage 2 starts from stage 1's alignment.
    """
    model, _ = features.build_model(init)
    if config.text_side == "embeddings":
        model.freeze_encoder()
        return Stage(model, None, "embeddings", config.text_encoder, frozen_encoder=True)
    encoder, tokenizer = text_embed.load_text_encoder(config.text_encoder)
    width = encoder.config.hidden_size
    pooling = (text_embed.default_text_pooling(config.text_encoder) if config.text_pooling == "auto"
               else config.text_pooling)
    model_config = replace(model.config, text_dim=width, text_pooling=pooling,
                           text_proj="none" if width == model.config.embed_dim else "linear")
    keep_proj = (model_config.text_dim, model_config.text_proj) == (model.config.text_dim, model.config.text_proj)
    state = {k: v for k, v in model.state_dict().items() if keep_proj or not k.startswith("text_proj.")}
    model = m2d.M2DCLAP(model_config, tuple(init["norm_stats"]), encoder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("text_encoder.", "text_proj.")) for k in missing)
    print(f"text side: {config.text_encoder} ({width}-d, {pooling} feature), "
          f"{'stage-1 projector kept' if keep_proj else f'new {model_config.text_proj} projector'}")
    model.freeze_encoder()
    return Stage(model, tokenizer, "encoder", config.text_encoder, frozen_encoder=True)


def setup_stage21(config: Config, init: dict) -> Stage:
    """Stage 2.1: stage 2 as it ended (same text side), refined on target-domain captions."""
    model, tokenizer = features.build_model(init)
    model.freeze_encoder()
    text_side, text_encoder = stage_text_side(config, init)
    return Stage(model, tokenizer, text_side, text_encoder, frozen_encoder=True)


def setup_resumed(config: Config, resume: dict) -> Stage:
    """A run's own last.pt: weights, EMA target, normalisation statistics and text side."""
    if resume["model_config"].get("text_proj") == "linear" and "text_proj.bias" not in resume["model"]:
        raise ValueError("the run's last.pt was written by an earlier version whose text projector had no bias, so its "
                         "optimiser state does not fit this one. Train it again with --no-resume, or go on "
                         "from its weights with the next stage (--init).")
    model, tokenizer = features.build_model({**resume, "model_config": {
        **resume["model_config"], "grad_checkpointing": config.grad_checkpointing}})
    frozen = config.stage != "1"
    if frozen:
        model.freeze_encoder()
    text_side, text_encoder = stage_text_side(config, resume)
    return Stage(model, tokenizer, text_side, text_encoder, frozen_encoder=frozen)


def setup_stage(config: Config, resume: dict | None, init: dict | None, table, dataset, source) -> Stage:
    """The Stage of this run: its own last.pt, or a new run of stage 1, 2 or 2.1."""
    if resume is not None:
        stage = setup_resumed(config, resume)
    elif config.stage == "1":
        if config.norm_stats:
            norm_stats = tuple(config.norm_stats)
        elif isinstance(source, data.ShardStore) and source.norm_stats:  # from 'python data.py stats'
            norm_stats = source.norm_stats
        else:
            norm_stats = data.compute_norm_stats(dataset)
        stage = setup_stage1(config, table.dim, norm_stats)
    else:
        stage = (setup_stage2 if config.stage == "2" else setup_stage21)(config, init)
    if stage.text_side == "embeddings":
        text_embed.check_dim(table, stage.model.config.text_dim)
    return stage


# -----------------------------------------------------------------------------
# The data of a run


@dataclass
class RunData:
    name: str                       # for the log and the resume check
    csv_path: Path
    npy_path: Path | None
    table: text_embed.CaptionTable
    source: data.AudioFolder | data.ShardStore
    dataset: data.ClipDataset
    embedding_model: str | None     # the sentence model behind the embeddings, to embed new text later


def load_data(config: Config, start: dict | None, text_side: str, out_dir: Path, ddp: Distributed) -> RunData:
    """Captions (with embeddings for the embeddings text side), audio source and dataset of a run."""
    if config.data is None:
        split = "refine" if config.stage == "2.1" else "train"
        if ddp.main:
            builtin_data.builtin_dataset(split)  # renders the audio cache once, before the other ranks read it
        if ddp.world_size > 1:
            dist.barrier()
        csv_path, audio_root = builtin_data.builtin_dataset(split)
        npy_path, preload, name = None, config.preload is not False, f"built-in {split}"
    else:
        csv_path, npy_path, name = config.data, config.embeddings, str(config.data)
        audio_root, preload = config.audio_root or config.data.parent, bool(config.preload)
    if config.embedding_model or config.data is None:
        embedding_model = config.embedding_model or text_embed.DEFAULT_MODEL
    else:
        embedding_model = start.get("embedding_model") if start else None
    table = (text_embed.load_captions(csv_path) if text_side == "encoder"
             else text_embed.load_caption_embeddings(csv_path, npy_path))
    crop_frames = (m2d.preset(config.preset).crop_frames if config.stage == "1"
                   else start["model_config"]["crop_frames"])
    source = data.ShardStore(config.shards) if config.shards else data.AudioFolder(audio_root, config.convert_audio)
    bad_clips = data.BadClipReport(out_dir / "bad_clips.csv") if config.skip_bad else None
    dataset = data.ClipDataset(table, source, crop_frames, preload=preload, skip_bad=bad_clips)
    return RunData(name, csv_path, npy_path, table, source, dataset, embedding_model)


# -----------------------------------------------------------------------------
# One optimiser step


def step_losses(outputs, logit_scale, clap_loss, clap_weight: float, frozen_encoder: bool = False):
    """The step's loss and its parts: L = L_M2D + lambda * L_CLAP in stage 1, L = L_CLAP in stages 2 and 2.1."""
    if frozen_encoder:
        audio_embed, text_embed_ = outputs
        loss_clap = clap_loss(audio_embed, text_embed_, logit_scale)
        return loss_clap, {"loss": loss_clap, "loss_clap": loss_clap}
    prediction, target, audio_embed, text_embed_ = outputs
    loss_m2d = m2d_loss(prediction, target)
    loss_clap = clap_loss(audio_embed, text_embed_, logit_scale)
    loss = loss_m2d + clap_weight * loss_clap
    return loss, {"loss": loss, "loss_m2d": loss_m2d, "loss_clap": loss_clap}


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


def train_step(model, net, forward, optimizer, scaler: LossScaler, autocast, clap_loss, micro_batches,
               clap_weight: float, clip_grad_norm: float, ema_decay: float | None):
    """One optimiser step over the micro-batches [(log_mel, text), ...] already on the device.

    net is the model or its DistributedDataParallel wrapper, forward the same
    possibly compiled; gradients are averaged across ranks only on the last
    micro-batch. Stage 1 (ema_decay given) updates the EMA target after the
    step. Nothing here waits for the device: a non-finite loss or gradient
    norm on any rank skips the step on the device itself. The fused AdamW
    takes the flag as found_inf, the EMA decay becomes 1, and the weights,
    optimiser state (its step count included) and EMA target stay exactly as
    they were; with fp16 the loss scale halves. Returns each loss averaged
    over micro-batches, the gradient norm and the step's finite flag, all as
    device tensors, for the caller to read when it logs.
    """
    sums = {}
    frozen_encoder = ema_decay is None
    for k, (mel, text) in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        with contextlib.nullcontext() if last or net is model else net.no_sync():
            with autocast:
                outputs = forward(mel, text, frozen_encoder=frozen_encoder)
                loss, parts = step_losses(outputs, model.logit_scale, clap_loss, clap_weight, frozen_encoder)
            scaler.scaled(loss / len(micro_batches)).backward()
        for key, value in parts.items():
            sums[key] = sums.get(key, 0) + value.detach().float() / len(micro_batches)
    params = [p for p in model.parameters() if p.grad is not None]
    scaler.unscale_([p.grad for p in params])
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm, foreach=True)
    finite = torch.isfinite(torch.stack([grad_norm.float(), *sums.values()])).all()
    if net is not model:  # a loss is per rank: skip on all ranks or none
        finite = finite.int()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        finite = finite.bool()
    found_inf = (~finite).float()
    optimizer.found_inf = found_inf  # the fused AdamW leaves everything as it is where this is 1
    optimizer.step()
    del optimizer.found_inf
    model.clamp_logit_scale()
    if ema_decay is not None:  # every rank holds the same online weights, so the same target
        model.ema_update(torch.where(finite, ema_decay, 1.0))
    scaler.update(found_inf)
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm, finite


# -----------------------------------------------------------------------------
# Training


class NonFiniteError(RuntimeError):
    """Too many steps in a row with a non-finite loss or gradient."""


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


@dataclass
class Run:
    """A run being trained: the stage's model with its optimiser and everything the loop reads."""

    config: Config
    recipe: Recipe
    stage: Stage
    data: RunData
    ddp: Distributed
    device: torch.device
    out_dir: Path
    net: torch.nn.Module              # the model, or its DistributedDataParallel wrapper
    forward: torch.nn.Module          # net, possibly compiled
    loader: DataLoader
    order: data.ClipOrder
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    autocast: contextlib.AbstractContextManager
    total_steps: int
    warmup_steps: int
    peak_lr: float
    precision: str
    compiled: bool
    start_step: int = 0
    last_saved: int | None = None
    records: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)  # moved back by a resumed run's elapsed time
    skipped_steps: int = 0                                     # non-finite steps skipped in this session

    @property
    def model(self) -> m2d.M2DCLAP:
        return self.stage.model

    def log(self, *args, **kwargs):
        if self.ddp.main:
            print(*args, **kwargs)

    def settings(self) -> dict:
        """What makes a run this run: a resume must match it (the peak learning rate may change)."""
        c = self.config
        return dict(stage=c.stage, preset=c.preset, data=self.data.name,
                    embeddings=str(self.data.npy_path) if self.data.npy_path else None,
                    shards=str(c.shards) if c.shards else None, text_side=self.stage.text_side,
                    text_encoder=self.stage.text_encoder, clips=len(self.data.dataset), seed=c.seed,
                    batch_size=self.recipe.batch_size,
                    mask_ratio=self.model.config.mask_ratio if c.mask_ratio is None else c.mask_ratio,
                    total_steps=self.total_steps, warmup_steps=self.warmup_steps, recipe=asdict(self.recipe))


def train(config: Config):
    """Train one stage: set the run up (or resume it), then step until the schedule ends."""
    device = torch.device(config.device)
    ddp = setup_distributed(device.type)
    if device.type == "cuda" and ddp.world_size > 1:
        device = torch.device("cuda", ddp.local_rank)
    out_dir = config.out_dir or Path("runs") / f"stage{config.stage}"
    resume = find_resume(config, out_dir)
    if resume is not None and resume["step"] >= resume["resume"]["run"]["total_steps"]:
        if ddp.main:
            print(f"{out_dir / 'last.pt'}: this run finished at step {resume['step']}; nothing to resume. Pass "
                  "--no-resume to train it again from scratch (overwrites it), or another --out-dir.")
        if ddp.world_size > 1:
            dist.destroy_process_group()
        return
    run = setup_run(config, resume, ddp, device, out_dir)
    try:
        train_loop(run)
    finally:
        stop_workers(run.loader)
    finish(run)


def stop_workers(loader: DataLoader):
    """Stop the loader's worker processes now, error or not.

    After an error they would wait for the garbage collector (the traceback
    keeps the loader in a reference cycle), which kills each one only after a
    5-s timeout: a pause in notebooks and test suites that call train().
    """
    iterator = getattr(loader, "_iterator", None)  # the persistent workers' iterator
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def setup_run(config: Config, resume: dict | None, ddp: Distributed, device: torch.device, out_dir: Path) -> Run:
    """Everything before the first step, in an order that keeps runs reproducible."""
    # Every rank draws its own masks; the weights start equal because
    # DistributedDataParallel copies rank 0's to the others. A resumed run
    # restores each rank's states just before its first step.
    random.seed(config.seed + ddp.rank)
    np.random.seed(config.seed + ddp.rank)
    torch.manual_seed(config.seed + ddp.rank)
    init_path = init = None
    if config.stage != "1" and resume is None:
        init_path = config.init or Path("runs") / f"stage{PREVIOUS_STAGE[config.stage]}" / "last.pt"
        init = load_previous_stage(config.stage, init_path)
    start = resume or init  # what stages 2 and 2.1 take their preset, text side and crop length from
    config, recipe = resolve(config, start, init_path)
    if recipe.batch_size % (config.accum_steps * ddp.world_size):
        raise ValueError(f"--batch-size {recipe.batch_size} is not divisible by {config.accum_steps} accumulation "
                         f"steps x {ddp.world_size} processes")
    prepare_out_dir(out_dir, resume is None, ddp)
    run_data = load_data(config, start, stage_text_side(config, start)[0], out_dir, ddp)
    order = data.ClipOrder(len(run_data.dataset), recipe.batch_size, config.seed, ddp.rank, ddp.world_size,
                           config.accum_steps)  # depends on the seed and the global batch only
    if order.batches_per_epoch == 0:
        raise ValueError(f"{run_data.csv_path} has {len(run_data.dataset)} usable clips, fewer than one batch of "
                         f"{recipe.batch_size}; lower --batch-size")
    stage = setup_stage(config, resume, init, run_data.table, run_data.dataset, run_data.source)
    model = stage.model.to(device)
    if stage.frozen_encoder:
        model.train_clap()  # the frozen encoder stays in eval mode
    else:
        model.train()
    cuda = device.type == "cuda"
    net = DistributedDataParallel(model, device_ids=[ddp.local_rank] if cuda else None) if ddp.world_size > 1 \
        else model
    # Compiled by default for the stage-1 step on CUDA; a text encoder's varying token counts would recompile.
    use_compile = (cuda and config.stage == "1") if config.compile is None else config.compile
    workers = config.workers if config.workers is not None else (8 if cuda else 0)
    # The loader gets a generator of its own: starting an epoch must not draw
    # from the global RNG that the masks come from.
    loader = DataLoader(run_data.dataset, batch_size=recipe.batch_size // (config.accum_steps * ddp.world_size),
                        sampler=order, num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0,
                        generator=torch.Generator())
    total_steps = config.max_steps or max(1, round(recipe.epochs * order.batches_per_epoch))
    peak_lr = config.lr or recipe.base_lr * recipe.batch_size / 256
    precision = config.precision or ("bf16" if cuda else "fp32")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else contextlib.nullcontext())
    run = Run(config, recipe, stage, run_data, ddp, device, out_dir, net, compiled(net) if use_compile else net,
              loader, order, torch.optim.AdamW(model.param_groups(recipe.weight_decay), lr=peak_lr,
                                               betas=recipe.betas, fused=True),
              LossScaler(device, precision == "fp16"), autocast, total_steps,
              max(1, round(total_steps * recipe.warmup_epochs / recipe.epochs)), peak_lr, precision, use_compile)
    if resume is not None:
        restore(run, resume)
    open_log(run)
    if resume is not None:  # last, so that nothing above draws from them
        restore_rng(run, resume)
    return run


def prepare_out_dir(out_dir: Path, new_run: bool, ddp: Distributed):
    """Create the run folder; a new run first clears what an earlier run there left."""
    if ddp.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if new_run:  # nothing of an earlier run in this folder may mix in
            for stale in [*out_dir.glob("step_*.pt"), out_dir / "last.pt", out_dir / "last.pt.tmp",
                          out_dir / "bad_clips.csv"]:
                stale.unlink(missing_ok=True)
    if ddp.world_size > 1:
        dist.barrier()


def restore(run: Run, resume: dict):
    """Optimiser, scaler, step, elapsed time and log of a resumed run, after checking it is the same run."""
    check_same_run(run.out_dir / "last.pt", resume["resume"]["run"], run.settings())
    if resume["resume"]["peak_lr"] != run.peak_lr:
        run.log(f"peak lr changed on resume: {resume['resume']['peak_lr']:.2e} -> {run.peak_lr:.2e}")
    run.optimizer.load_state_dict(resume["optimizer"])
    run.scaler.load_state_dict(resume["scaler"])
    run.start_step = run.last_saved = resume["step"]
    run.started -= resume["resume"]["elapsed_s"]
    run.records = read_log(run.out_dir / "log.jsonl", run.start_step)


def restore_rng(run: Run, resume: dict):
    states = resume["resume"]["rng"]
    if len(states) == run.ddp.world_size:
        set_rng_state(states[run.ddp.rank], run.device)
    else:
        run.log(f"the run had {len(states)} processes and now has {run.ddp.world_size}: masks come from new seeds, "
                "so it is no longer bit-identical to an uninterrupted run")
        torch.manual_seed(run.config.seed + run.ddp.rank + 1_000_003 * run.start_step)


def open_log(run: Run):
    """Start log.jsonl (a resumed run keeps its records up to its checkpoint) and print the run's setup."""
    if run.ddp.main:
        with open(run.out_dir / "log.jsonl", "w") as log_file:
            log_file.writelines(json.dumps(r) + "\n" for r in run.records)
    c, r, model = run.config, run.recipe, run.model
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    norm_stats = model.norm_stats.tolist()
    run.log(f"stage {c.stage} | preset {c.preset} ({n_params / 1e6:.1f}M trainable parameters) | "
            f"{len(run.data.dataset)} clips from {run.data.csv_path} | norm stats {norm_stats[0]:.4f} "
            f"{norm_stats[1]:.4f}")
    run.log(f"{run.total_steps} steps ({run.order.batches_per_epoch} per epoch) | global batch {r.batch_size} = "
            f"{run.ddp.world_size} processes x {c.accum_steps} accumulation steps x "
            f"{r.batch_size // (c.accum_steps * run.ddp.world_size)} clips | peak lr {run.peak_lr:.2e} = "
            f"{r.base_lr:.2e} x {r.batch_size} / 256{'' if c.lr is None else ' (overridden by --lr)'} | "
            f"{run.device} {run.precision}{' compiled' if run.compiled else ''} | writing {run.out_dir}")
    if run.start_step:
        epoch, batch = divmod(run.start_step, run.order.batches_per_epoch)
        run.log(f"resuming {run.out_dir / 'last.pt'} at step {run.start_step} of {run.total_steps} (epoch {epoch}, "
                f"batch {batch} of {run.order.batches_per_epoch}): weights, EMA target, optimiser, scaler, "
                "schedules, data order and RNG states")


def batches(run: Run):
    """Micro-batches from the run's position on: each epoch a new shuffle, the first one mid-epoch on resume."""
    first_epoch, batch = divmod(run.start_step, run.order.batches_per_epoch)
    for epoch in itertools.count(first_epoch):
        run.order.set_position(epoch, batch if epoch == first_epoch else 0)
        yield from run.loader


def train_loop(run: Run):
    """The steps: schedules, one train_step, then logging, non-finite handling and periodic checkpoints."""
    c, recipe, model = run.config, run.recipe, run.model
    clap_loss, batch_iter = ClapLoss(), batches(run)
    health = Health(run)
    for step in range(run.start_step, run.total_steps):
        lr = lr_at(step, run.total_steps, run.warmup_steps, run.peak_lr)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        ema_decay = None if run.stage.frozen_encoder else ema_decay_at(step, run.total_steps, *recipe.ema_decay)
        micro_batches = []
        for _ in range(c.accum_steps):
            mel, text = next(batch_iter)
            if run.stage.tokenizer is not None:
                text = text_embed.tokenize(run.stage.tokenizer, text)
            micro_batches.append((to_device(mel, run.device), to_device(text, run.device)))
        sums, grad_norm, finite = train_step(model, run.net, run.forward, run.optimizer, run.scaler, run.autocast,
                                             clap_loss, micro_batches, recipe.clap_weight, recipe.clip_grad_norm,
                                             ema_decay)
        done = step + 1
        health.record(done, finite, sums, grad_norm)
        log_now = done % c.log_every == 0 or done == run.total_steps or done == 1
        save_now = done % c.save_every == 0 and done < run.total_steps
        if log_now or save_now or done % c.max_bad_steps == 0:
            health.check()  # these steps' one wait for the device
        if log_now:
            log_step(run, done, sums, grad_norm, lr, ema_decay, health)
        if save_now and not health.bad_streak:  # keep the pre-trouble one
            save_run(run, done)
            if run.ddp.main and c.keep > 0:
                keep_periodic(run.out_dir, done, c.keep)


class Health:
    """Skipped non-finite steps and unreadable clips (warnings, counts, the stop after too many in a row),
    and the pace between log lines.

    The steps' finite flags stay on the device in `pending` until check()
    reads them all at once: at log lines, checkpoints and every
    --max-bad-steps steps, so that the device never waits for the host.
    """

    def __init__(self, run: Run):
        self.run = run
        self.bad_streak = 0
        self.pending = []  # (step, finite flag, losses, grad norm) of the steps not yet checked
        self.bad_clips = run.data.dataset.skip_bad
        self.bad_reported = len(self.bad_clips.names()) if self.bad_clips else 0
        self.logged_step, self.logged_at = run.start_step, time.perf_counter()  # for clips/s between log lines

    def record(self, done: int, finite: torch.Tensor, sums: dict, grad_norm: torch.Tensor):
        """Keep a step's device flag (and what its warning would print) for the next check()."""
        self.pending.append((done, finite, sums, grad_norm))

    def check(self):
        """Read the pending flags back in one transfer; warn for each skipped step, stop after too many in a row."""
        pending, self.pending = self.pending, []
        flags = torch.stack([finite for _, finite, _, _ in pending]).tolist() if pending else []
        for (done, _, sums, grad_norm), finite in zip(pending, flags):
            if finite:
                self.bad_streak = 0
                continue
            self.bad_streak += 1
            run = self.run
            run.skipped_steps += 1
            losses = ", ".join(f"{key.removeprefix('loss_')} {value.item():.4g}" for key, value in sums.items())
            scale = f"; fp16 loss scale now {run.scaler.scale.item():g}" if run.scaler.enabled else ""
            run.log(f"warning: step {done}: non-finite loss or gradient ({losses}, grad norm {grad_norm.item():.4g}); "
                    f"step skipped, weights unchanged{scale}", file=sys.stderr, flush=True)
            if self.bad_streak >= run.config.max_bad_steps:
                kept = (f"the last good checkpoint, {run.out_dir / 'last.pt'} (step {run.last_saved}), is intact"
                        if run.last_saved else "no checkpoint had been written yet")
                raise NonFiniteError(
                    f"{self.bad_streak} steps in a row ({done - self.bad_streak + 1} to {done}) had a non-finite loss "
                    f"or gradient, so the run stopped; {kept}. Lower the learning rate (--lr; a resume may change "
                    "it), prefer --precision bf16 to fp16, or look for extreme clips or caption embeddings.")

    def report_bad_clips(self):
        n_bad = len(self.bad_clips.names()) if self.bad_clips is not None else 0
        if n_bad > self.bad_reported:
            self.bad_reported = n_bad
            self.run.log(f"{n_bad} unreadable clip(s) skipped so far; listed in {self.bad_clips.path}", flush=True)


def log_step(run: Run, done: int, sums: dict, grad_norm: torch.Tensor, lr: float, ema_decay: float | None,
             health: Health):
    """One record in log.jsonl and one progress line; the losses are averaged over ranks."""
    stacked = torch.stack(list(sums.values()))
    if run.ddp.world_size > 1:
        dist.all_reduce(stacked)  # the M2D loss is a per-rank mean: log the global one
        stacked /= run.ddp.world_size
    values = dict(zip(sums, stacked.tolist()))
    now = time.perf_counter()
    elapsed = now - run.started
    clips_per_s = (done - health.logged_step) * run.recipe.batch_size / (now - health.logged_at)
    health.logged_step, health.logged_at = done, now
    record = dict(step=done, epoch=round(done / run.order.batches_per_epoch, 3), **values, lr=lr,
                  **({"ema_decay": ema_decay} if ema_decay is not None else {}),
                  logit_scale=run.model.logit_scale.exp().item(), grad_norm=grad_norm.item(),
                  clips_per_s=round(clips_per_s, 1), elapsed_s=round(elapsed, 2), skipped_steps=run.skipped_steps)
    run.records.append(record)
    if run.ddp.main:
        with open(run.out_dir / "log.jsonl", "a") as log_file:
            log_file.write(json.dumps(record) + "\n")
    eta = elapsed / done * (run.total_steps - done)
    losses = " | ".join(f"{key.removeprefix('loss_')} {value:.4f}" for key, value in values.items() if key != "loss")
    ema = f" | ema {ema_decay:.5f}" if ema_decay is not None else ""
    run.log(f"step {done:>6}/{run.total_steps} | loss {values['loss']:.4f} | {losses} | lr {lr:.2e}{ema} | "
            f"{clips_per_s:.0f} clips/s | ETA {format_duration(eta)}", flush=True)
    health.report_bad_clips()


def save_run(run: Run, step: int):
    """last.pt: the model, optimiser, scaler, settings and every rank's RNG states (every rank must call this)."""
    rng = gather_rng_states(run.ddp, run.device)
    if not run.ddp.main:
        return
    model = run.model
    text_encoder = None
    if model.text_encoder is not None:
        text_encoder = {"name": run.stage.text_encoder, "config": model.text_encoder.config.to_dict()}
    save_checkpoint(run.out_dir / "last.pt", stage=run.config.stage, step=step, model=model.state_dict(),
                    model_config=asdict(model.config), norm_stats=model.norm_stats.tolist(),
                    text_side=run.stage.text_side, text_encoder=text_encoder, embedding_model=run.data.embedding_model,
                    recipe=asdict(run.recipe), optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(),
                    args=run.config.saved(), resume=dict(run=run.settings(), peak_lr=run.peak_lr, rng=rng,
                                                         elapsed_s=time.perf_counter() - run.started))
    run.last_saved = step


def finish(run: Run):
    """The final checkpoint (after checking the replicas agree), a summary, and leaving the process group."""
    ddp = run.ddp
    if ddp.world_size > 1:
        gathered = [None] * ddp.world_size
        dist.all_gather_object(gathered, parameter_checksums(run.model))
        if any(g != gathered[0] for g in gathered):
            raise RuntimeError("the ranks' parameters diverged; this is a bug, please report it")
        run.log(f"parameters identical on all {ddp.world_size} ranks")
    save_run(run, run.total_steps)
    run.log(f"done in {format_duration(time.perf_counter() - run.started)}; checkpoint {run.out_dir / 'last.pt'}")
    if run.records:
        last = run.records[-10:]
        run.log(f"losses, step {run.records[0]['step']} -> mean of the last {len(last)} logged steps: "
                + ", ".join(f"{key} {run.records[0][key]:.3f} -> {sum(r[key] for r in last) / len(last):.3f}"
                            for key in run.records[0] if key.startswith("loss_")))
    if run.skipped_steps:
        run.log(f"{run.skipped_steps} step(s) skipped for a non-finite loss or gradient in this session")
    bad_clips = run.data.dataset.skip_bad
    if bad_clips is not None:
        run.log(f"{len(bad_clips.names())} unreadable clip(s) skipped; listed in {bad_clips.path}")
    if ddp.world_size > 1:
        dist.barrier()  # let rank 0 finish saving before any rank leaves the group
        run.net = run.forward = None  # DistributedDataParallel must go before its process group does
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Command line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        raise SystemExit("'python train.py export' is now 'python evaluate.py export' (writing released files "
                         "is a downstream concern)")
    config = parse_config(argv)
    try:
        train(config)
    except (ValueError, FileNotFoundError, ImportError, CheckpointWriteError, NonFiniteError) as e:
        # AudioError and CaptionFileError are ValueErrors too
        message = str(e)
        if message.startswith("Caught ") and "Original Traceback" in message:  # raised in a DataLoader worker
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        sys.exit(f"error: {message}")


if __name__ == "__main__":
    main()
