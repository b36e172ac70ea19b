"""Supervised fine-tuning of the M2D-CLAP encoder: stage 1.1 and the downstream tasks.

    python finetune.py                                   # stage-1 run, built-in event labels
    python finetune.py --init runs/stage1/last.pt --manifest esc50.csv --recipe esc50
    python finetune.py --manifest as2m.csv --shards shards/ --recipe as2m --stage 1.1
    python finetune.py --help                            # every flag, with each recipe's value
    torchrun --nproc_per_node=4 finetune.py ...          # data parallel (the batch is shared out)

A manifest is a CSV: file_name, label (several joined by ';' or '|') and a
split (train / valid / test) or a fold column (data.read_manifest has the
rules). Outputs in --out-dir (default runs/finetune-<recipe>, runs/stage1.1
for --stage 1.1): best.pt (the best run's weights in our checkpoint layout,
with its classifier: features.load_model reads it, 'python features.py tag'
tags audio with it), result.json (the reported score by the task's rule,
with the spread over seeds), per_class.csv, curves.png, log.jsonl, and
resume.pt: running the same command again resumes exactly where a stopped
run left off.

The method is the authors' (their evaluation package EVAR, finetune.py,
driven by nttcslab/m2d's util/ft-*.sh; stage 1.1 is their AudioSet-2M run),
written to give the same forward pass, loss and gradients on the same weights
and batch. A step, in order: (1) a random crop, (2) mixup on the raw input,
(3) log-mel and normalisation, (4) one frequency and one time band zeroed,
(5) a random resized crop, (6) model.AudioClassifier (the encoder with its
structured token drop, pooling, BatchNorm + Linear head), the loss, the
optimiser step. Where the authors' code does something unexpected, it is
kept and said where it happens: the learning rate lags one step
(lr_of_iteration), "lars" is plain SGD (make_optimizer), cross-entropy is
divided by the number of classes (finetune_loss), the token drop keeps the
flagged tokens first (model.kept_token_ids), the random crop never takes the
last start (random_crop). On purpose we take the start of validation clips,
as they do for test clips (they crop validation clips at random).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import builtin_data
import data
import features
import metrics
import model as m2d
import runs


# -----------------------------------------------------------------------------
# Recipes: the values the authors pass per task (their util/ft-*.sh and EVAR's config/*.yaml)


def option(default, help: str, choices: tuple[str, ...] | None = None):
    """A recipe field: its default, its --help text and, for a string, its choices."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class FinetuneRecipe:
    """One fine-tuning task's settings. Every field is a command-line flag (finetune.py --help)."""

    optimizer: str = option("sgd", "sgd (momentum 0.9, no weight decay: the authors' 'lars') or adamw "
                            "(amsgrad, weight decay 1e-4)", ("sgd", "adamw"))
    lr: float = option(0.5, "peak learning rate")
    lr_min: float = option(1e-7, "the cosine's floor")
    batch_size: int = option(128, "clips per optimiser step")
    epochs: int = option(200, "epochs per run")
    warmup_epochs: int = option(5, "linear warm-up from 0, in epochs")
    mixup_alpha: float = option(0.0, "mixup's Beta(alpha, alpha) on the raw input; 0: off")
    freq_mask_bins: int = option(30, "one frequency band of a width drawn in [0, N) zeroed")
    time_mask_frames: int = option(48, "one time band of a width drawn in [0, N) zeroed")
    time_mask_share: float = option(0.0, "if above 0, the time band's N is this share of input_frames instead")
    random_resized_crop: bool = option(True, "BYOL-A's random resized crop of the log-mel")
    token_drop_ratio: float = option(0.5, "structured token drop (the authors' training_mask): share of "
                                     "frequency rows and time columns flagged")
    token_drop_keep: str = option("flagged", "which tokens the drop keeps: the flagged first (the authors' "
                                  "code) or the unflagged", ("flagged", "unflagged"))
    raw_input: str = option("wave", "what the clips are and mixup mixes: waveforms or log-mels [F, T]",
                             ("wave", "log_mel"))
    input_frames: int = option(1001, "crop length in log-mel frames (waveforms: (frames - 1) x hop samples); 0: "
                               "the manifest's longest clip, at most 1001")
    encoder_frames: int = option(0, "zero-padded to this many frames after augmentation; 0: input_frames")
    padding: str = option("counted", "a clip shorter than the input: counted (zeros appended and averaged in with "
                          "the clip, one crop from the start evaluated: the authors') or masked (its own time "
                          "columns only, the rest hidden from attention and pooling; longer clips evaluated "
                          "whole, crop by crop: as the frozen probe reads them)", ("counted", "masked"))
    freeze_patch_embed: bool = option(False, "keep the patch embedding fixed")
    frozen_blocks: int = option(0, "keep the patch embedding and this many of the lowest transformer blocks fixed "
                                "(the depth or more: only the final norm and the head train)")
    feature: str = option("mean", "clip feature: the mean of the kept patch tokens (D), or the frequency rows "
                          "of each time column stacked (F*D)", ("mean", "stacked"))
    head_init: str = option("random", "the head's start: random, N(0, 0.01) as the authors', or probe: a linear "
                            "probe fitted on the frozen encoder's features first, then everything is fine-tuned "
                            "(LP-FT)", ("random", "probe"))
    loss: str = option("ce", "bce (multi-label) or ce (cross-entropy / number of classes)", ("bce", "ce"))
    sampling: str = option("shuffle", "shuffle, or draw clips by AudioSet's class-balancing weights",
                            ("shuffle", "weighted"))
    clips_per_epoch: int = option(200_000, "weighted sampling: clips drawn per epoch, without replacement")
    head_refit: bool = option(False, "fit the head once more, as --head-init probe fits it, on the result's "
                              "encoder (after any WiSE-FT average): on the clean features evaluation reads, not "
                              "the augmented ones it was trained on")
    wise_ft: float = option(1.0, "the result's weights: this share of the way from the start (after the head's "
                            "probe) to the fine-tuned ones (WiSE-FT); 1: the fine-tuned weights as they are")
    report: str = option("best_test", "the reporting rule: the best epoch on the test clips (per run, or the "
                         "fold-mean curve's), the best on validation clips tested once, or the last epoch",
                         ("best_test", "best_test_fold_mean", "best_valid_then_test", "last"))
    seeds: tuple[int, ...] = option((43, 44, 45), "one run per seed (and held-out fold)")

    def __post_init__(self):
        """Refuse settings that would run without telling: a warm-up longer than the run never reaches the
        peak rate (our check, not the authors': their scheduler would run it)."""
        for name, least in (("epochs", 1), ("batch_size", 1), ("input_frames", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least {least}")
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed")
        if self.padding == "masked" and (self.mixup_alpha > 0 or self.random_resized_crop or self.token_drop_ratio > 0):
            raise ValueError("--padding masked keeps each clip in its own time columns, which mixup, the random "
                             "resized crop and the token drop all move or remove: pass --mixup-alpha 0 "
                             "--no-random-resized-crop --token-drop-ratio 0 with it, or --padding counted")
        if self.warmup_epochs >= self.epochs > 0 and self.warmup_epochs > 0:
            raise ValueError(f"--warmup-epochs {self.warmup_epochs} does not fit in --epochs {self.epochs}: the "
                             "learning rate would rise from 0 for the whole run and never reach its peak "
                             f"(--lr {self.lr}). Pass a --warmup-epochs below {self.epochs} as well, e.g. "
                             f"--warmup-epochs {self.epochs // 10}.")

    @property
    def crop_length(self) -> int:
        """Crop length on the raw input: frames, or samples for waveforms."""
        return features.raw_crop_length(self.raw_input, self.input_frames)

    @property
    def padded_frames(self) -> int:
        return self.encoder_frames or self.input_frames

    @property
    def metric(self) -> str:
        """The score that selects epochs and is reported: mAP for multi-label tasks, else accuracy."""
        return "mAP" if self.loss == "bce" else "accuracy"


FINETUNE_RECIPES: dict[str, FinetuneRecipe] = {
    # Stage 1.1: AudioSet-2M from log-mel files, weighted sampling, 70 epochs.
    "as2m": FinetuneRecipe(lr=2.0, batch_size=64, epochs=70, warmup_epochs=15, mixup_alpha=0.5,
                           time_mask_frames=192, random_resized_crop=False, raw_input="log_mel",
                           loss="bce", sampling="weighted"),
    "as20k": FinetuneRecipe(lr=0.5, batch_size=64, mixup_alpha=0.3, time_mask_frames=192, loss="bce"),
    "esc50": FinetuneRecipe(lr=0.5, freq_mask_bins=15, input_frames=501, freeze_patch_embed=True,
                            report="best_test_fold_mean"),
    # 1-s clips: 101 frames, zero-padded after normalisation to whole patches (112).
    "spcv2": FinetuneRecipe(lr=0.5, mixup_alpha=0.3, input_frames=101, encoder_frames=112,
                            report="best_valid_then_test"),
    "vc1": FinetuneRecipe(optimizer="adamw", lr=5e-4, batch_size=64, epochs=50, random_resized_crop=False,
                          token_drop_ratio=0.0, input_frames=821, feature="stacked",
                          report="best_valid_then_test"),
    # Stage 1.1 on the built-in data, AS2M's recipe scaled to the tiny preset on a 2-core CPU: 2-s clips
    # (201 frames) in 13 patches (the stage-1 table has 12: the stretch lengthens it), the time band
    # 192 / 1001 of the input, one epoch = the 1000 training clips drawn by weight, one seed. Measured
    # (docs/PERFORMANCE.md): lr 0.3 for 20 epochs reaches the best test mAP; lr 2.0 (ViT-Base on 2M
    # clips) is unstable on 1000, and mixup of two clips of up to three events each costs the tiny
    # model 6 points of mAP in 20 epochs, so it is off.
    "builtin": FinetuneRecipe(lr=0.3, batch_size=64, epochs=20, warmup_epochs=2, mixup_alpha=0.0,
                              time_mask_frames=40, random_resized_crop=False, raw_input="log_mel",
                              input_frames=208, loss="bce", sampling="weighted", clips_per_epoch=1000,
                              seeds=(43,)),
    # A few hundred clips of any length (ours, not the authors'; docs/TRAINING.md says how it was chosen).
    "small": FinetuneRecipe(lr=0.01, batch_size=32, epochs=30, warmup_epochs=3, freq_mask_bins=15,
                            time_mask_share=0.1, random_resized_crop=False, token_drop_ratio=0.0, input_frames=0,
                            padding="masked", feature="stacked", head_init="probe", head_refit=True, wise_ft=0.5,
                            report="last"),
}


MAX_INPUT_FRAMES = 1001  # the longest input a recipe sizes itself to: 10 s, the authors' AudioSet crop


def sized_to_clips(recipe: FinetuneRecipe, longest_frames: int,
                   encoder_frames: int = MAX_INPUT_FRAMES) -> FinetuneRecipe:
    """The recipe with its lengths settled for clips of at most `longest_frames` frames.

    input_frames 0 becomes the longest clip's (at most MAX_INPUT_FRAMES), so
    every clip is seen whole, and the encoder pads it to whole patches. With
    masked padding it is at most the pre-trained encoder's input length
    (`encoder_frames`): its position table is used as it was trained, never
    stretched, and longer clips are evaluated crop by crop, as the frozen
    probe reads them. A time_mask_share sets the time band relative to that
    length, so a 1-s clip loses no more of itself than a 10-s one.
    """
    changes = {}
    if recipe.input_frames == 0:
        longest_input = min(encoder_frames, MAX_INPUT_FRAMES) if recipe.padding == "masked" else MAX_INPUT_FRAMES
        frames = min(max(longest_frames, data.MIN_FRAMES), longest_input)
        patch = m2d.M2DConfig.patch_size  # 16, in every preset and released file
        changes.update(input_frames=frames, encoder_frames=max(recipe.encoder_frames, -(-frames // patch) * patch))
    frames = changes.get("input_frames", recipe.input_frames)
    if recipe.time_mask_share > 0:
        changes.update(time_mask_frames=round(recipe.time_mask_share * frames), time_mask_share=0.0)
    return replace(recipe, **changes)


def recipe(name: str, **overrides) -> FinetuneRecipe:
    """A named recipe, optionally with some fields changed."""
    if name not in FINETUNE_RECIPES:
        raise ValueError(f"unknown fine-tuning recipe {name!r}; choose one of {sorted(FINETUNE_RECIPES)}")
    return replace(FINETUNE_RECIPES[name], **overrides)


# -----------------------------------------------------------------------------
# Learning-rate schedule, set every iteration


def lr_of_epoch(epoch: float, recipe: FinetuneRecipe) -> float:
    """Linear warm-up from 0, then lr_min + (lr - lr_min)(1 + cos(pi t / E)) / 2 with t from 0.

    Written in the operation order of timm's CosineLRScheduler, so the values
    agree to the last bit.
    """
    if epoch < recipe.warmup_epochs:
        return epoch * (recipe.lr / recipe.warmup_epochs)
    if epoch >= recipe.epochs:
        return recipe.lr_min
    return recipe.lr_min + 0.5 * (recipe.lr - recipe.lr_min) * (1 + math.cos(math.pi * epoch / recipe.epochs))


def lr_of_iteration(iteration: int, iters_per_epoch: int, recipe: FinetuneRecipe) -> float:
    """The rate the authors' loop runs step `iteration` (0-based, over all epochs) with.

    Their scheduler is stepped after each optimiser step with that step's
    fractional epoch, so step k uses the rate of step k - 1; step 0 uses the
    warm-up's start.
    """
    if iteration == 0:
        return lr_of_epoch(0.0, recipe)
    epoch, i = divmod(iteration - 1, iters_per_epoch)
    return lr_of_epoch(epoch + i / iters_per_epoch, recipe)


# -----------------------------------------------------------------------------
# The batch pipeline: crop, mixup, (log-mel and normalisation), band masks, random resized crop


def random_crop(clip: torch.Tensor, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[..., L] -> [..., length]: a random start in [0, L - length) (never the last, as the authors draw it);
    zeros appended when shorter (in the raw input's space, before normalisation)."""
    frames = clip.shape[-1]
    if frames > length:
        start = int(torch.randint(frames - length, (1,), generator=generator))
        return clip[..., start:start + length]
    return F.pad(clip, (0, length - frames))


def mixup(x: torch.Tensor, targets: torch.Tensor, alpha: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x * lam + x[perm] * (1 - lam) for the inputs [B, ...] and the targets [B, C] alike.

    One lam per clip from Beta(alpha, alpha), one permutation per batch.
    torch has no Beta sampler that takes a generator, so numpy draws lam
    from a seed drawn from ours: runs stay reproducible and resumable.
    """
    if alpha <= 0:
        return x, targets
    batch = x.shape[0]
    seed = int(torch.randint(2**62, (1,), generator=generator))
    lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=batch)).float()  # [B]
    perm = torch.randperm(batch, generator=generator)

    def mix(z: torch.Tensor) -> torch.Tensor:
        lam_z = lam.to(z.device).view(batch, *[1] * (z.dim() - 1))  # [B, 1, ...]
        return z * lam_z + z[perm.to(z.device)] * (1.0 - lam_z)
    return mix(x), mix(targets)


def band_mask(x: torch.Tensor, width: int, axis: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one band along `axis` for the whole batch (torchaudio's Frequency/TimeMasking draws).

    The width is floor(u1 * width), so in [0, width); the start is
    floor(u2 * (size - u1 * width)).
    """
    if width < 1:
        return x
    size = x.shape[axis]
    value = torch.rand(1, generator=generator) * width
    start = int((torch.rand(1, generator=generator) * (size - value)).long())
    end = start + int(value.long())
    index = torch.arange(size, device=x.device)
    shape = [1] * x.dim()
    shape[axis] = size
    return x.masked_fill(((index >= start) & (index < end)).view(shape), 0.0)


def band_masks(x: torch.Tensor, freq_width: int, time_width: int, generator: torch.Generator) -> torch.Tensor:
    """[B, 1, F, T]: one frequency band, then one time band, set to 0."""
    return band_mask(band_mask(x, freq_width, -2, generator), time_width, -1, generator)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, canvas_time_scale: float = 1.5,
                        scale: tuple[float, float] = (0.6, 1.5)) -> torch.Tensor:
    """[B, C, F, T] -> [B, C, F, T], per clip (BYOL-A's random resized crop, as EVAR applies it).

    The clip is pasted centred on a zero canvas 1.5 x as long (same height);
    a box of 0.6-1.5 x the height and 0.6-1.5 x the length (clamped to the
    canvas) is cut at a random place and resized back, bicubic with
    align_corners=True.
    """
    B, C, n_freq, n_time = x.shape
    canvas_time = int(n_time * canvas_time_scale)
    left = (canvas_time - n_time) // 2
    out = torch.empty_like(x)
    for b in range(B):
        canvas = x.new_zeros(C, n_freq, canvas_time)
        canvas[:, :, left:left + n_time] = x[b]
        u_f, u_t = scale[0] + (scale[1] - scale[0]) * torch.rand(2, generator=generator, dtype=torch.float64)
        h = min(max(int(u_f * n_freq), 1), n_freq)
        w = min(max(int(u_t * n_time), 1), canvas_time)
        i = int(torch.randint(n_freq - h + 1, (1,), generator=generator))
        j = int(torch.randint(canvas_time - w + 1, (1,), generator=generator))
        box = canvas[None, :, i:i + h, j:j + w]                                       # [1, C, h, w]
        out[b] = F.interpolate(box, size=(n_freq, n_time), mode="bicubic", align_corners=True)[0]
    return out


# -----------------------------------------------------------------------------
# The network, the loss, the optimiser, one training step


def classifier_for(encoder: m2d.AudioEncoder, n_classes: int, recipe: FinetuneRecipe,
                   generator: torch.Generator | None = None, grad_checkpointing: bool = False) -> m2d.AudioClassifier:
    """The AudioClassifier a recipe asks for, on a pre-trained encoder (the head drawn from `generator`)."""
    model = m2d.AudioClassifier.from_encoder(encoder, n_classes, recipe.padded_frames, grad_checkpointing,
                                             token_drop_ratio=recipe.token_drop_ratio,
                                             token_drop_keep=recipe.token_drop_keep, feature=recipe.feature,
                                             generator=generator)
    model.patch_embed.requires_grad_(not (recipe.freeze_patch_embed or recipe.frozen_blocks > 0))
    for block in model.blocks[:recipe.frozen_blocks]:
        block.requires_grad_(False)
    return model


def finetune_loss(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """BCE-with-logits (multi-label), or cross-entropy / n_classes on (soft) targets [B, C]."""
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets)
    if loss == "ce":
        return -(targets * F.log_softmax(logits, dim=-1)).mean()  # mean over B and C
    raise ValueError(f"loss must be 'bce' or 'ce', got {loss!r}")


def make_optimizer(model: torch.nn.Module, recipe: FinetuneRecipe) -> torch.optim.Optimizer:
    """One parameter group; the rate is set every step (lr_of_iteration)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=0.0)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4, amsgrad=True)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {recipe.optimizer!r}")


def make_stepper(model: m2d.AudioClassifier, recipe: FinetuneRecipe, ddp: runs.Distributed | None = None,
                 precision: str = "fp32", use_compile: bool = False) -> runs.Stepper:
    """The optimiser step as train.py takes it (runs.Stepper), without gradient clipping, as the authors'.

    ddp: the torchrun job (its DistributedDataParallel wrapper averages the
    gradients); precision and use_compile: as runs.amp_defaults describes.
    """
    device, net = model.norm_stats.device, model if ddp is None else ddp.wrap(model, model.norm_stats.device)
    return runs.Stepper.build(net, make_optimizer(model, recipe), device, precision, use_compile, clip_grad_norm=None)


def finetune_step(stepper: runs.Stepper, clips: list[torch.Tensor], targets: torch.Tensor, recipe: FinetuneRecipe,
                  generator: torch.Generator, lr: float) -> tuple[dict, torch.Tensor]:
    """One optimiser step on raw clips and their targets [B, C]; returns ({"loss": loss}, the step's finite flag).

    stepper.net is the AudioClassifier or its DistributedDataParallel wrapper
    (which averages the gradients); a step with a non-finite loss is skipped.
    """
    model = getattr(stepper.net, "module", stepper.net)
    x = torch.stack([random_crop(c, recipe.crop_length, generator) for c in clips]).to(targets.device)  # (1)
    own = None if recipe.padding == "counted" else own_frames(clips, recipe).to(targets.device)     # [B]
    x, targets = mixup(x, targets, recipe.mixup_alpha, generator)                     # (2)
    x = features.classifier_input(x, recipe.raw_input, model)                         # (3) [B, 1, F, T]
    x = band_masks(x, recipe.freq_mask_bins, recipe.time_mask_frames, generator)      # (4)
    if recipe.random_resized_crop:
        x = random_resized_crop(x, generator)                                         # (5)
    model.train()
    for group in stepper.optimizer.param_groups:
        group["lr"] = lr
    sums, _, finite = stepper.step([(x, targets)], lambda x, y: {                     # (6)
        "loss": finetune_loss(stepper.forward(x, generator) if own is None else stepper.forward(x, generator, own),
                              y, recipe.loss)})
    return sums, finite


def own_frames(clips: list[torch.Tensor], recipe: FinetuneRecipe) -> torch.Tensor:
    """[B]: the log-mel frames of each clip's crop that are the clip's own (all of them when it fills the crop)."""
    own = [min(c.shape[-1], recipe.crop_length) for c in clips]
    return torch.tensor([n // data.HOP_SAMPLES + 1 if recipe.raw_input == "wave" else n for n in own])


@torch.no_grad()
def probe_head(model: m2d.AudioClassifier, train: data.ClipSet, recipe: FinetuneRecipe, seed: int):
    """The LP of LP-FT (Kumar et al., ICLR 2022): the head fitted on the frozen encoder before fine-tuning.

    The clip features of the training clips (the evaluation crop, no
    augmentation) set head_norm's statistics, and a linear classifier fitted
    on the standardised features (features.fit_linear, as the frozen probe)
    becomes the head. Fine-tuning then starts from a head that already reads
    the features, so the first steps adapt the encoder to the task instead of
    moving it towards a random head.
    """
    x = features.classifier_features(model, train.clips, recipe.raw_input, recipe.input_frames, recipe.batch_size,
                                     recipe.padding)  # [N, D]
    mean, var = x.mean(dim=0), x.var(dim=0, unbiased=False)
    standardised = (x - mean) / torch.sqrt(var + model.head_norm.eps)
    linear = features.fit_linear(standardised, train.targets.cpu(), recipe.loss == "bce", seed=seed)
    model.head_norm.running_mean.copy_(mean)
    model.head_norm.running_var.copy_(var)
    model.head.weight.copy_(linear.weight)
    model.head.bias.copy_(linear.bias)


def predict(model: m2d.AudioClassifier, clips, recipe: FinetuneRecipe) -> torch.Tensor:
    """Logits [N, C] of the evaluation crop (features.classify, which features.tag_audio uses too)."""
    return features.classify(model, clips, recipe.raw_input, recipe.input_frames, recipe.batch_size,
                             recipe.padding)


# -----------------------------------------------------------------------------
# Training: epochs of steps, an evaluation after each, the best epoch kept


@dataclass
class FitState:
    """Where a fit stands after some epochs: what a resumed run needs besides weights and generators."""

    epoch: int = 0                        # epochs done
    step: int = 0                         # optimiser steps done
    history: list[dict] = field(default_factory=list)
    best_score: float = 0.0
    best_epoch: int | None = None         # counted from 1, as the progress lines count
    best_state: dict | None = None        # the best epoch's state dict
    best_scores: torch.Tensor | None = None  # the selecting split's logits [N, C] at the best epoch
    start_state: dict | None = None       # the weights fine-tuning started from (kept for wise_ft < 1)


@dataclass
class Trainer:
    """One fine-tuning job in training: its network, step, generators and progress (one per process)."""

    model: m2d.AudioClassifier
    recipe: FinetuneRecipe
    stepper: runs.Stepper
    order: torch.Generator                # draws the batches: the same on every process
    augment: torch.Generator              # draws the augmentations: one per process
    state: FitState = field(default_factory=FitState)
    guard: runs.NonFiniteGuard = field(default_factory=lambda: runs.NonFiniteGuard(10, Path(RESUME_FILE)))
    rank: int = 0
    world_size: int = 1
    seed: int = 0                         # the head's fits (head_init probe, head_refit)


def audioset_sampling_weights(targets: torch.Tensor) -> torch.Tensor:
    """Per clip (sum of its classes' 1000 / (count_c + 0.01)) ** (1 / 1.5), counts over the given split."""
    multi_hot = (targets > 0.5).double()                 # [N, C]
    class_weight = 1000.0 / (multi_hot.sum(dim=0) + 0.01)  # [C]
    return (multi_hot @ class_weight) ** (1.0 / 1.5)     # [N]


def epoch_batches(n_clips: int, recipe: FinetuneRecipe, generator: torch.Generator,
                  weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One epoch's batches of clip indices: a shuffle, or recipe.clips_per_epoch drawn by weight without
    replacement (capped at the split's size)."""
    if recipe.sampling == "weighted":
        order = torch.multinomial(weights.double(), min(recipe.clips_per_epoch, len(weights)), replacement=False,
                                  generator=generator)
    else:
        order = torch.randperm(n_clips, generator=generator)
    return list(order.split(recipe.batch_size))


def train_epoch(t: Trainer, train: data.ClipSet, weights: torch.Tensor | None) -> tuple[float, float]:
    """One epoch of steps; with several processes each takes its share of every batch. (mean loss, last lr)."""
    batches = epoch_batches(len(train), t.recipe, t.order, weights)
    device, losses = train.targets.device, []
    for ids in batches:
        ids = ids[t.rank::t.world_size]
        lr = lr_of_iteration(t.state.step, len(batches), t.recipe)
        sums, finite = finetune_step(t.stepper, [train.clips[i] for i in ids], train.targets[ids.to(device)],
                                     t.recipe, t.augment, lr)
        t.state.step += 1
        t.guard.record(t.state.step, finite, sums, None)
        losses.append(float(sums["loss"]))
    t.guard.check(None)  # a warning per skipped non-finite step; a stop after too many in a row
    return float(np.mean(losses)), lr


def fit(t: Trainer, train: data.ClipSet, valid: data.ClipSet | None, test: data.ClipSet, on_epoch=None) -> dict:
    """Fine-tune up to recipe.epochs, evaluating after every epoch; returns the reported score and history.

    Without a validation split, the test split selects the epoch (the best
    test score over epochs, as the authors report AudioSet and ESC-50); with
    one, the best validation epoch's weights are tested once. The rule "last"
    selects nothing: the last epoch's weights are the result. Only rank 0
    evaluates, on the whole split. on_epoch(state) runs after every epoch (a
    resume file, the progress line).
    """
    recipe, state = t.recipe, t.state
    if recipe.wise_ft < 1 and state.start_state is None:
        state.start_state = {k: v.clone() for k, v in t.model.state_dict().items()}
    weights = audioset_sampling_weights(train.targets) if recipe.sampling == "weighted" else None
    selector = valid if valid is not None and len(valid) else test
    part = "valid" if selector is valid else "test"
    while state.epoch < recipe.epochs:
        loss, lr = train_epoch(t, train, weights)
        state.epoch += 1  # epochs done: the records count from 1, as the progress lines do
        record = {"epoch": state.epoch, "loss": loss, "lr": lr}
        if t.rank == 0:
            scores = predict(t.model, selector.clips, recipe)
            record[part] = metrics.classification_scores(scores, selector.targets.cpu())
            chosen = (state.epoch == recipe.epochs if recipe.report == "last"  # else strictly better, from 0,
                      else record[part][recipe.metric] > state.best_score)     # as the authors keep the best
            if chosen:
                state.best_score, state.best_epoch, state.best_scores = record[part][recipe.metric], state.epoch, scores
                tuned = {k: v.clone() for k, v in t.model.state_dict().items()}
                state.best_state = tuned
                if recipe.wise_ft < 1 or recipe.head_refit:  # the result; training goes on from its own weights
                    state.best_state, state.best_scores = result_weights(t, train, selector, tuned)
                    t.model.load_state_dict(tuned)
        state.history.append(record)
        if on_epoch is not None:
            on_epoch(state)
    return fit_result(t, test, selector is valid)


def result_weights(t: Trainer, train: data.ClipSet, selector: data.ClipSet, tuned: dict) -> tuple[dict, torch.Tensor]:
    """The weights an epoch reports and their scores on the selecting split: the fine-tuned weights averaged
    with the start (wise_ft < 1), then the head fitted again on that encoder's clean features (head_refit)."""
    if t.recipe.wise_ft < 1:
        t.model.load_state_dict(interpolated(t.state.start_state, tuned, t.recipe.wise_ft))
    if t.recipe.head_refit:
        probe_head(t.model, train, t.recipe, t.seed)
    state = {k: v.clone() for k, v in t.model.state_dict().items()}
    return state, predict(t.model, selector.clips, t.recipe)


def interpolated(start: dict, tuned: dict, share: float) -> dict:
    """WiSE-FT (Wortsman et al., CVPR 2022): start + share x (tuned - start) for every float tensor of a state
    dict; the rest (BatchNorm's step counter) the tuned one's. Averaging the weights before and after
    fine-tuning keeps what pre-training knew that a few hundred clips would otherwise overwrite."""
    return {k: torch.lerp(start[k], v, share) if v.is_floating_point() else v.clone() for k, v in tuned.items()}


def fit_result(t: Trainer, test: data.ClipSet, test_once: bool) -> dict:
    """The reported score, the best epoch, the test logits and metrics at the best epoch, and the last
    epoch's test score beside them (what training to the end would have given, with no selection)."""
    state, scores, metric = t.state, t.state.best_scores, t.recipe.metric
    last = state.history[-1].get("test", {}).get(metric) if state.history else None
    if test_once and state.best_state is not None:  # the main process: the last epoch's weights, then the best's
        last = metrics.classification_scores(predict(t.model, test.clips, t.recipe), test.targets.cpu())[metric]
        t.model.load_state_dict(state.best_state)
        scores = predict(t.model, test.clips, t.recipe)
    scored = metrics.classification_scores(scores, test.targets.cpu()) if scores is not None else {}
    return {"score": scored.get(metric, 0.0), "best_epoch": state.best_epoch, "history": state.history,
            "state": state.best_state, "test_scores": scores, "metrics": scored, "last_score": last}


# -----------------------------------------------------------------------------
# A task: its manifest, its clips, the folds held out in turn


@dataclass
class Task:
    """A fine-tuning task: its manifest, where its clips are, and the folds held out in turn ([None]: splits)."""

    manifest: data.Manifest
    source: data.AudioFolder | data.ShardStore
    holdouts: list[str | None]
    lazy: bool = False                   # read clips when a batch needs them (shards)
    workers: int = 1                     # threads reading the clips otherwise

    @property
    def has_valid(self) -> bool:
        """Whether the manifest itself has validation clips (split 'valid'; folds have none)."""
        return self.manifest.split is not None and bool(self.manifest.indices("valid"))

    def longest_frames(self) -> int:
        """The longest clip of the manifest, in log-mel frames (read from the file headers)."""
        return max(self.source.frames(name) for name in self.manifest.files)

    def splits(self, raw_input: str, holdout: str | None) -> tuple[data.ClipSet, data.ClipSet | None, data.ClipSet]:
        """(train, valid or None, test) of one held-out fold (or of the manifest's splits)."""
        train, valid, test = (data.load_clips(self.manifest, self.manifest.indices(part, holdout), self.source,
                                              raw_input, self.lazy, self.workers)
                              for part in ("train", "valid", "test"))
        return train, (valid if len(valid) else None), test


VALID_SEED = 0  # the held-out validation part (and a --train-per-class subset) is the same for every seed


def per_class_draw(targets: torch.Tensor, count, seed: int) -> list[int]:
    """Clip indices drawn class by class: the clips grouped by their first class, count(n) of each group of n
    drawn at random (seeded), in clip order."""
    first_class = targets.cpu().argmax(dim=1)
    generator, chosen = torch.Generator().manual_seed(seed), []
    for c in first_class.unique().tolist():
        group = (first_class == c).nonzero().flatten()
        chosen += group[torch.randperm(len(group), generator=generator)[:count(len(group))]].tolist()
    return sorted(chosen)


def held_out_valid(train: data.ClipSet, share: float, where: str) -> tuple[data.ClipSet, data.ClipSet]:
    """(the rest, a validation part) of the training clips, for a rule that selects on validation clips.

    Class-balanced and seeded (VALID_SEED): the clips are grouped by their
    first class, and round(share * n) clips of each group of n, at least one
    where n >= 2, are drawn for validation. A group of one clip stays in
    training, so every class keeps a training clip.
    """
    chosen = per_class_draw(train.targets, lambda n: max(1, round(share * n)) if n >= 2 else 0, VALID_SEED)
    if not chosen:
        raise ValueError(f"{where}: no class has 2 training clips, so no validation part can be held out; add "
                         "valid rows to the manifest (split column: valid)")
    rest = sorted(set(range(len(train))) - set(chosen))
    return subset(train, rest), subset(train, chosen)


def labelled_subset(train: data.ClipSet, per_class: int) -> data.ClipSet:
    """At most per_class training clips of each first class, seeded (VALID_SEED): a label-scarce task made of a
    full one, to see what pre-training is worth when labels are few."""
    return subset(train, per_class_draw(train.targets, lambda n: min(n, per_class), VALID_SEED))


def subset(clips: data.ClipSet, indices: list[int]) -> data.ClipSet:
    """Some clips of a ClipSet, in the given order."""
    index = torch.tensor(indices, dtype=torch.long)
    names = [clips.names[i] for i in indices]
    chosen = (data.LazyClips(clips.clips.read, names) if isinstance(clips.clips, data.LazyClips)
              else [clips.clips[i] for i in indices])
    return data.ClipSet(chosen, clips.targets[index.to(clips.targets.device)], names)


def load_task(settings: RunSettings) -> Task:
    """The task of --manifest (audio files under --audio-root, or --shards), or the built-in event labels."""
    if settings.manifest is None:  # several labels per clip (multi-label, like AudioSet); train, then test
        manifest = builtin_data.builtin_eval_set()  # renders the audio on first use
        return Task(manifest, data.AudioFolder(manifest.root), [None], workers=settings.workers)
    manifest = data.read_manifest(settings.manifest, settings.audio_root)
    source = data.ShardStore(settings.shards) if settings.shards else data.AudioFolder(manifest.root)
    return Task(manifest, source, data.holdouts(manifest, settings.folds), lazy=settings.shards is not None,
                workers=settings.workers)


# -----------------------------------------------------------------------------
# What a run writes besides the fine-tuned file (features.finetuned_checkpoint): per-class scores, curves


def recipe_record(recipe: FinetuneRecipe) -> dict:
    return {**asdict(recipe), "seeds": list(recipe.seeds)}


def write_per_class(path: Path, scores: torch.Tensor, targets: torch.Tensor, classes: list[str]):
    """class, AP (%), ROC-AUC and positives in test, one row per class."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "AP", "roc_auc", "positives"])
        for c, name in enumerate(classes):
            truth = targets[:, c] > 0.5
            ap, auc = metrics.average_precision(scores[:, c], truth), metrics.class_roc_auc(scores[:, c], targets[:, c])
            writer.writerow([name, "" if ap is None else f"{ap:.3f}", "" if auc is None else f"{auc:.4f}",
                             int(truth.sum())])


def plot_curves(path: Path, history: list[dict], metric: str, log=print):
    """Train loss and the selecting split's metric per epoch (skipped without matplotlib)."""
    plt = runs.pyplot(log, "curves.png")
    if plt is None:
        return
    part = "valid" if "valid" in history[0] else "test"
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot([r["epoch"] for r in history], [r["loss"] for r in history])
    ax_loss.set(xlabel="epoch", ylabel="train loss")
    ax_metric.plot([r["epoch"] for r in history], [r[part][metric] for r in history])
    ax_metric.set(xlabel="epoch", ylabel=f"{part} {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# The run: seeds x held-out folds, a resume file after every epoch, the outputs


RESUME_FILE, MODEL_FILE = "resume.pt", "best.pt"
RUN_FILES = (RESUME_FILE, RESUME_FILE + ".tmp", MODEL_FILE, "log.jsonl", "result.json", "per_class.csv", "curves.png")


def setting(default, help: str, **argparse_options):
    """A RunSettings field: its default, its --help text and how argparse reads it (flag: another flag name)."""
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass
class RunSettings:
    """What a fine-tuning run is told besides its recipe: one flag per field, every default settled by parse_args."""

    init: Path = setting(Path("runs/stage1/last.pt"), "checkpoint to fine-tune, ours or a released file", type=Path)
    recipe_name: str = setting("builtin", "task recipe (default: builtin without --manifest; required with it)",
                               flag="--recipe", choices=tuple(FINETUNE_RECIPES))
    manifest: Path | None = setting(None, "CSV: file_name, label (several joined by ';' or '|'), and split "
                                    "(train/valid/test) or fold. Default: the built-in data's event labels", type=Path)
    audio_root: Path | None = setting(None, "folder the file names are relative to (default: the manifest's; "
                                      "none with --shards)", type=Path)
    shards: Path | None = setting(None, "log-mel shards (python data.py prepare) holding the manifest's files "
                                  "(default: read the audio files)", type=Path)
    folds: list[str] | None = setting(None, "folds to hold out in turn (default: every fold of the manifest)",
                                      nargs="+")
    random_init: bool = setting(False, "a randomly initialised encoder of the same shape: the baseline "
                                "pre-training must beat", action="store_true")
    stage: str = setting("finetune", "'1.1' marks the file a stage-1.1 checkpoint and writes it as last.pt too",
                         choices=("finetune", "1.1"))
    device: str = setting("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, cuda:1, ...")
    precision: str = setting("fp32", "autocast precision on a GPU (fp32 as the authors); fp16 uses a dynamic "
                             "loss scale", choices=("fp32", "bf16", "fp16"))
    compile: bool = setting(False, "torch.compile the training forward", action="store_true")
    grad_checkpointing: bool = setting(False, "recompute block activations in the backward pass, trading time "
                                       "for memory", action="store_true")
    workers: int = setting(1, "threads reading the clips", type=int)
    threads: int | None = setting(None, "CPU threads torch computes with (default: torch's choice, one per core). "
                                  "On a machine shared with other jobs, fewer threads than cores can be several "
                                  "times faster", type=int)
    out_dir: Path = setting(Path("runs/finetune-builtin"), "run folder (default: runs/finetune-<recipe>; "
                            "runs/stage1.1 for --stage 1.1)", type=Path)
    resume: bool = setting(False, "go on from the run folder's resume.pt (default: when it exists; --no-resume "
                           "starts over)", action=argparse.BooleanOptionalAction)
    epochs_limit: int | None = setting(None, "stop after this many epochs; the same command resumes (default: no "
                                       "limit)", type=int)
    max_bad_steps: int = setting(10, "stop after this many steps in a row with a non-finite loss (each is "
                                 "skipped with a warning)", type=int)
    probe: bool = setting(True, "also fit a linear probe on the frozen encoder's clip features of the same "
                          "training and test clips, the baseline fine-tuning has to beat (not with --shards)",
                          action=argparse.BooleanOptionalAction)
    train_per_class: int | None = setting(None, "train on at most this many clips of each class (by a clip's "
                                          "first class, seeded): a label-scarce task made of a full one "
                                          "(default: every training clip)", type=int)
    valid_share: float = setting(0.1, "where the recipe selects its epoch on validation clips and the manifest has "
                                 "none: the share of the training clips held out for it, per class, seeded "
                                 "(0: stop and ask for valid rows instead)", type=float)

    def identity(self, recipe: FinetuneRecipe, world_size: int) -> dict:
        """What must stay the same for a run to resume."""
        return {"init": str(self.init), "recipe_name": self.recipe_name, "recipe": recipe_record(recipe),
                "manifest": str(self.manifest), "audio_root": str(self.audio_root), "shards": str(self.shards),
                "folds": self.folds, "random_init": self.random_init, "stage": self.stage, "world_size": world_size,
                "valid_share": self.valid_share, "train_per_class": self.train_per_class}

    def saved(self) -> dict:
        return {k: str(v) for k, v in vars(self).items()}


@dataclass
class FinetuneRun:
    """A fine-tuning run in progress: its settings, task, folder and log (one per process)."""

    settings: RunSettings
    recipe: FinetuneRecipe
    task: Task
    ddp: runs.Distributed
    device: torch.device
    log: runs.RunLog
    identity: dict
    jobs: list[tuple[int, str | None]]   # (seed, held-out fold) in the order they run
    results: list[dict] = field(default_factory=list)  # one summary per job done
    epochs_run: int = 0                  # in this invocation
    probes: dict = field(default_factory=dict)  # held-out fold -> the frozen encoder's probe (pre-trained runs)


def finetune(settings: RunSettings, recipe: FinetuneRecipe) -> Path:
    """Run every (seed, held-out fold) of a task, resuming where a stopped run left off; returns best.pt's path."""
    runs.set_threads(settings.threads)
    ddp, device = runs.setup_distributed(torch.device(settings.device))
    if not settings.init.is_file():
        raise FileNotFoundError(f"{settings.init}: the checkpoint to fine-tune was not found; pass --init CKPT "
                                "(python train.py --stage 1 writes runs/stage1/last.pt)")
    task = load_task(settings)
    if recipe.input_frames == 0:  # the longest clip, within the pre-trained encoder's input for masked padding
        encoder_frames = features.load_model(settings.init).model.config.crop_frames
        recipe = sized_to_clips(recipe, task.longest_frames(), encoder_frames)
    else:
        recipe = sized_to_clips(recipe, 0)
    identity = settings.identity(recipe, ddp.world_size)
    resume = runs.find_resume(settings.out_dir / RESUME_FILE, settings.resume, "finetune")
    if resume is not None:
        runs.check_same_run(settings.out_dir / RESUME_FILE, resume["resume"]["run"], identity)
    check_selection(settings, recipe, task)
    runs.prepare_out_dir(settings.out_dir, resume is None, ddp, also_stale=RUN_FILES)
    jobs = [(seed, holdout) for seed in recipe.seeds for holdout in task.holdouts]
    run = FinetuneRun(settings, recipe, task, ddp, device, runs.RunLog(settings.out_dir / "log.jsonl",
                                                                       len(jobs) * recipe.epochs, ddp.main),
                      identity, jobs, list(resume["results"]) if resume else [])
    start_job = resume["job"] if resume else 0
    done_epochs = start_job * recipe.epochs + resume["fit"]["epoch"] if resume else 0  # one log record each
    run.log.start(done_epochs, resume["resume"]["elapsed_s"] if resume else 0.0, keep_records=done_epochs)
    run.log.print(f"fine-tuning {settings.init} ({'random init' if settings.random_init else 'pre-trained'}) on "
                  f"{task.manifest.name}: {len(task.manifest.classes)} classes, recipe {settings.recipe_name}, "
                  f"{len(jobs)} run(s) of {recipe.epochs} epochs at {recipe.input_frames} frames, {device} "
                  f"{settings.precision}, writing "
                  f"{settings.out_dir}" + (f"; resuming at run {start_job + 1}, epoch {resume['fit']['epoch']}"
                                           if resume else ""))
    for j in range(start_job, len(jobs)):
        run.results.append(run_job(run, j, resume if j == start_job else None))
    if ddp.main:
        write_result(run)
    ddp.leave()
    return settings.out_dir / ("last.pt" if settings.stage == "1.1" else MODEL_FILE)


def frozen_probe(encoder: m2d.M2DCLAP, train: data.ClipSet, test: data.ClipSet, raw_input: str,
                 device: torch.device) -> dict:
    """The baseline a fine-tuning result is read against: features.linear_probe on the frozen encoder's clip
    features of the same training and test clips, as evaluate.py probes (accuracy; mAP when multi-label)."""
    with torch.random.fork_rng(devices=[]):  # the run's own random numbers stay as they were
        frozen = copy.deepcopy(encoder).to(device).eval()

        def clip_features(clips) -> torch.Tensor:
            return features.clip_features(frozen, [data.log_mel(c) if raw_input == "wave" else c for c in clips])
        result, _ = features.linear_probe(clip_features(train.clips), train.targets.cpu(),
                                          clip_features(test.clips), test.targets.cpu())
    return result


def check_selection(settings: RunSettings, recipe: FinetuneRecipe, task: Task):
    """A rule that selects on validation clips gets them: the manifest's, or a held-out share, never the test."""
    if not 0 <= settings.valid_share < 1:
        raise ValueError(f"--valid-share {settings.valid_share:g}: must be in [0, 1)")
    if recipe.report == "best_valid_then_test" and not task.has_valid and settings.valid_share == 0:
        raise ValueError(f"{task.manifest.name}: the recipe selects its epoch on validation clips (rule "
                         "best_valid_then_test) and the manifest has none, and --valid-share 0 holds none out. Add "
                         "rows with split 'valid', or pass --valid-share 0.1 to hold out 10 % of each class's "
                         "training clips.")


def run_job(run: FinetuneRun, j: int, resume: dict | None) -> dict:
    """Fine-tune one seed on one held-out fold (or the splits); resumes from `resume` when it is this job's."""
    seed, holdout = run.jobs[j]
    settings, recipe = run.settings, run.recipe
    train, valid, test = run.task.splits(recipe.raw_input, holdout)
    if valid is None and recipe.report == "best_valid_then_test":  # never select on the test clips
        train, valid = held_out_valid(train, settings.valid_share, run.task.manifest.name)
    if settings.train_per_class:
        train = labelled_subset(train, settings.train_per_class)
    for split in (train, valid, test):
        if split is not None:
            split.targets = split.targets.to(run.device)
    init = features.load_model(settings.init).model
    encoder = features.random_init_copy(init, seed) if settings.random_init else init
    model = classifier_for(encoder, train.targets.shape[1], recipe, torch.Generator().manual_seed(seed),
                           settings.grad_checkpointing).to(run.device)
    t = Trainer(model, recipe, make_stepper(model, recipe, run.ddp, settings.precision, settings.compile),
                order=torch.Generator().manual_seed(seed),
                augment=torch.Generator().manual_seed(1_000_003 * (run.ddp.rank + 1) + seed),
                guard=runs.NonFiniteGuard(settings.max_bad_steps, settings.out_dir / RESUME_FILE, run.log.print),
                rank=run.ddp.rank, world_size=run.ddp.world_size, seed=seed)
    if resume is None and recipe.head_init == "probe":
        probe_head(model, train, recipe, seed)
    if resume is not None:
        model.load_state_dict(resume["model"])
        runs.restore_training(resume, settings.out_dir / RESUME_FILE, run.identity, recipe.lr, t.stepper.optimizer,
                              t.stepper.scaler, run.log.print)
        t.state = FitState(**resume["fit"])
        t.order.set_state(resume["resume"]["rng"][0]["order"])
        t.augment.set_state(resume["resume"]["rng"][run.ddp.rank]["augment"])
    result = fit(t, train, valid, test, on_epoch=lambda state: end_epoch(run, j, t))
    probe = None
    if run.ddp.main and settings.probe and not run.task.lazy:  # the same for every seed of a pre-trained encoder
        key = (seed if settings.random_init else None, holdout)
        probe = run.probes.get(key) or frozen_probe(encoder, train, test, recipe.raw_input, run.device)
        run.probes[key] = probe
    summary = {"seed": seed, "fold": holdout, "score": result["score"], "best_epoch": result["best_epoch"],
               "last_score": result["last_score"], "frozen_probe": probe, "steps": t.state.step,
               "train_clips": len(train),
               "valid_clips": len(valid) if valid is not None else 0,
               "metrics": result["metrics"]}  # best_epoch None: no epoch scored above 0, no weights kept
    if run.ddp.main and result["state"] is not None and result["score"] > max([r["score"] for r in run.results] + [-1]):
        write_model(run, encoder, model, result, test)
    return summary


def end_epoch(run: FinetuneRun, j: int, t: Trainer):
    """After each epoch: resume.pt, log.jsonl's record and the progress line; stops at --epochs-limit."""
    rng = run.ddp.gather({"order": t.order.get_state(), "augment": t.augment.get_state()})
    if run.ddp.main:
        runs.save_checkpoint(run.settings.out_dir / RESUME_FILE, stage="finetune", step=t.state.step, job=j,
                             results=run.results, model=t.model.state_dict(), fit=vars(t.state),
                             optimizer=t.stepper.optimizer.state_dict(), scaler=t.stepper.scaler.state_dict(),
                             resume=runs.resume_state(run.identity, run.recipe.lr, rng, run.log.elapsed_s()))
    seed, holdout = run.jobs[j]
    record = {"step": t.state.step, "seed": seed, "fold": holdout, **t.state.history[-1]}  # this run's optimiser steps
    run.log.write(record)
    part, metric = "valid" if "valid" in record else "test", run.recipe.metric
    score = record.get(part, {}).get(metric, float("nan"))  # nan on the ranks that do not evaluate
    fold = f" fold {holdout}" if holdout is not None else ""
    run.log.progress(j * run.recipe.epochs + t.state.epoch, {"loss": record["loss"]},  # epochs done of all runs
                     [f"lr {record['lr']:.3g}", f"{part} {metric} {score:.2f}"],
                     where=f"seed {seed}{fold} | epoch {t.state.epoch}/{run.recipe.epochs}")
    run.epochs_run += 1
    if run.settings.epochs_limit and run.epochs_run >= run.settings.epochs_limit:
        raise runs.EpochLimit(f"stopped after {run.epochs_run} epoch(s) (--epochs-limit); "
                              "run the same command to resume")


def write_model(run: FinetuneRun, init: m2d.M2DCLAP, model: m2d.AudioClassifier, result: dict, test: data.ClipSet):
    """best.pt (and, for stage 1.1, last.pt: the same file) and per_class.csv of the best job so far."""
    model.load_state_dict(result["state"])
    manifest = run.task.manifest
    ckpt = features.finetuned_checkpoint(init, model, manifest.classes, manifest.multi_label,
                                         recipe_record(run.recipe), run.settings.saved(), run.settings.stage)
    runs.save_checkpoint(run.settings.out_dir / MODEL_FILE, **ckpt)
    if run.settings.stage == "1.1":
        (run.settings.out_dir / "last.pt").unlink(missing_ok=True)
        os.link(run.settings.out_dir / MODEL_FILE, run.settings.out_dir / "last.pt")
    write_per_class(run.settings.out_dir / "per_class.csv", result["test_scores"], test.targets.cpu(), manifest.classes)


def write_result(run: FinetuneRun):
    """result.json: the reported score by the task's rule (per seed: the mean over held-out folds), its spread
    over seeds and folds, the last epoch's score beside it, how epochs were selected; and curves.png."""
    recipe, results = run.recipe, run.results
    per_seed = {str(seed): float(np.mean([r["score"] for r in results if r["seed"] == seed])) for seed in recipe.seeds}
    best = max(range(len(results)), key=lambda k: results[k]["score"])  # the run whose weights best.pt holds
    written = results[best]["best_epoch"] is not None  # else no epoch of any run scored above 0
    model_path = run.settings.out_dir / MODEL_FILE
    spread = metrics.seed_summary(list(per_seed.values()))
    folds = list(dict.fromkeys(r["fold"] for r in results))
    over_folds = metrics.seed_summary([np.mean([r["score"] for r in results if r["fold"] == f]) for f in folds])
    lasts = [r.get("last_score") for r in results]
    last = metrics.seed_summary(lasts) if None not in lasts else None
    probes = [(r.get("frozen_probe") or {}).get(recipe.metric) for r in results]
    probe = metrics.seed_summary(probes) if probes and None not in probes else None
    report = {"task": run.task.manifest.name, "recipe_name": run.settings.recipe_name, "rule": recipe.report,
              "selection": selection(run), "metric": recipe.metric, "score": spread["mean"], "spread": spread,
              "over_folds": over_folds if folds != [None] else None, "last_epoch": last, "frozen_probe": probe,
              "per_seed": per_seed,
              "runs": results, "best_run": best, "best_epoch": results[best]["best_epoch"],
              "model": str(model_path) if written else None,
              "metrics_at_best": results[best]["metrics"], "classes": run.task.manifest.classes,
              "recipe": recipe_record(recipe), "settings": run.settings.saved()}
    (run.settings.out_dir / "result.json").write_text(json.dumps(report, indent=1) + "\n")
    seed, holdout = run.jobs[best]
    plot_curves(run.settings.out_dir / "curves.png", [r for r in run.log.records if r["seed"] == seed
                                             and r["fold"] == holdout], recipe.metric, run.log.print)
    fold_spread = f"; std {over_folds['std']:.2f} over {over_folds['n']} folds" if folds != [None] else ""
    last_name = "last epoch" if recipe.wise_ft == 1 else "last epoch without WiSE-FT"
    score = (f"{recipe.metric} {spread['mean']:.2f} (std {spread['std']:.2f} over {spread['n']} seed(s){fold_spread})"
             + (f"; {last_name} {last['mean']:.2f}" if last else "")
             + (f"; frozen encoder's linear probe on the same clips {probe['mean']:.2f}" if probe else ""))
    run.log.print(f"{score}\nselected: {report['selection']}")
    if not written:
        run.log.print(f"no epoch of any run scored above 0, so no model was written (no {MODEL_FILE}, "
                      "no per_class.csv). The classifier learned nothing: check that the labels match the audio, "
                      "or train longer (--epochs) or at another --lr.")
        return
    fold = f", fold {holdout}" if holdout is not None else ""
    run.log.print(f"wrote {model_path}: seed {seed}{fold}, epoch {report['best_epoch']} (runs[{best}] in "
                  "result.json), the run with the highest selected score")


def selection(run: FinetuneRun) -> str:
    """How each run's epoch was selected, in words, for the summary and result.json."""
    made = ([f"averaged with the weights it started from (WiSE-FT, {run.recipe.wise_ft:g} of the way to the "
             "fine-tuned ones)"] if run.recipe.wise_ft < 1 else []) + (
        ["its head fitted again on that encoder's features of the training clips"] if run.recipe.head_refit else [])
    wise = ", " + ", then ".join(made) if made else ""
    if run.recipe.report == "last":
        return f"none: each run's last epoch{wise}, the recipe's rule (last); the best epoch is never looked for"
    if run.recipe.report != "best_valid_then_test":
        return (f"each run's best epoch on the test clips{wise}: the recipe's rule ({run.recipe.report}), as the "
                "authors report this task; the last epoch's score is beside it")
    held = [r for r in run.results if r["valid_clips"]]
    if run.task.has_valid:
        return "the best epoch on the manifest's valid clips, then tested once"
    return (f"the best epoch on {held[0]['valid_clips'] if held else 0} validation clips held out of the training "
            f"clips ({run.settings.valid_share:.0%} of each class's, seed {VALID_SEED}), then tested once")


# -----------------------------------------------------------------------------
# The command line: the run's flags, then one flag per recipe field


def parse_args(argv=None) -> tuple[RunSettings, FinetuneRecipe]:
    """RunSettings with every default settled, and the recipe with the command line's overrides."""
    p = runs.command_line(__doc__, RunSettings, FinetuneRecipe, FINETUNE_RECIPES)
    args = vars(p.parse_args(argv))
    overrides = {f.name: args[f.name] for f in fields(FinetuneRecipe) if args[f.name] is not None}
    given = {f.name: args[f.name] for f in fields(RunSettings) if args[f.name] is not None}
    if "manifest" in given and "recipe_name" not in given:
        p.error(f"--manifest needs --recipe, one of {sorted(FINETUNE_RECIPES)}")
    settings = RunSettings(**given)
    default_dir = "stage1.1" if settings.stage == "1.1" else f"finetune-{settings.recipe_name}"
    out_dir = given.get("out_dir", Path("runs") / default_dir)
    audio_root = settings.audio_root or (settings.manifest.parent if settings.manifest and not settings.shards
                                         else None)
    resume = given.get("resume", (out_dir / RESUME_FILE).is_file())
    if "seeds" in overrides:
        overrides["seeds"] = tuple(overrides["seeds"])
    try:
        task_recipe = recipe(settings.recipe_name, **overrides)
    except ValueError as e:
        sys.exit(f"error: recipe {settings.recipe_name}: {e}")
    return replace(settings, out_dir=out_dir, audio_root=audio_root, resume=resume), task_recipe


def main(argv=None):
    settings, task_recipe = parse_args(argv)
    try:
        finetune(settings, task_recipe)
    except runs.EpochLimit as stop:
        print(stop)
    except (ValueError, FileNotFoundError, runs.CheckpointWriteError, runs.NonFiniteError) as e:  # ResumeError too
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
