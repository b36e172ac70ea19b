"""Supervised fine-tuning of the M2D-CLAP encoder: stage 1.1 and the downstream tasks.

The authors fine-tune with their evaluation package EVAR (its finetune.py,
driven by the m2d repository's util/ft-*.sh); stage 1.1 is their AudioSet-2M
run. This file is that method, written to give the same forward pass, loss
and gradients on the same weights and batch. It reads in the order of the
method:

    recipes (one per task)  ->  learning-rate schedule  ->  the batch pipeline:
    (1) crop or pad, (2) mixup on the raw input, (3) log-mel and normalisation,
    (4) one frequency band and one time band zeroed, (5) random resized crop,
    (6) the encoder with its structured token drop, pooling, BatchNorm + Linear
    head  ->  loss and optimiser  ->  one training step, the loop  ->  metrics
    and the reporting rules  ->  data (manifests, AudioSet sampling weights).

Facts taken from the authors' code, and where we differ on purpose:
- The learning rate is set after every optimiser step from the fractional
  epoch of the step just taken (timm's CosineLRScheduler stepped with
  epoch + iter / iters_per_epoch), so step k runs with the rate of step k - 1;
  lr_of_iteration reproduces that lag. The cosine counts t from 0, not from
  the end of warm-up, so AS2M (70 epochs, 15 of warm-up) falls to 0.891 x its
  peak at epoch 15.
- Their "lars" optimiser without weight decay never computes a trust ratio:
  it is plain SGD with momentum 0.9, which is what we use.
- The single-label loss is -mean(y * log_softmax(logits)) over the batch AND
  the classes: cross-entropy divided by the number of classes (with soft
  mixup targets).
- The structured token drop keeps the FLAGGED rows and columns first (their
  descending sort); model.kept_token_ids(keep="unflagged") is the apparent
  intent. Their sort is not stable; ours keeps grid order among ties.
- Mixup draws one lambda per clip from Beta(alpha, alpha) and one permutation
  per batch; it mixes the raw input: waveforms (EVAR's tasks) or
  un-normalised log-mels (AudioSet-2M, from log-mel files).
- The random training crop starts in [0, frames - length): their draw never
  takes the last possible start. Their validation split is cropped at random
  too (only the test split takes the start); we take the start for both.
- ROC-AUC skips classes whose test labels are all 0 or all 1 (theirs stops
  with an error), and mAP skips classes without a positive (evaluate.py's).
- Classes: the sorted label strings of the training split, for every split.

Usage (the command line comes later): build a FinetuneModel from an M2DCLAP,
then fit(model, RECIPES["esc50"], train_set, valid_set, test_set, generator).
"""

from __future__ import annotations

import copy
import argparse
import csv
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import builtin_data
import data
import features
import model as m2d
import runs
from evaluate import ManifestError, builtin_eval_set, mean_average_precision


# -----------------------------------------------------------------------------
# Recipes: the values the authors pass per task (SPEC section 10)


@dataclass(frozen=True)
class FinetuneRecipe:
    """One fine-tuning task's settings. Every field can be overridden by name."""

    optimizer: str = "sgd"           # "sgd" (momentum 0.9, no weight decay) or "adamw"
    lr: float = 0.5                  # peak learning rate
    lr_min: float = 1e-7             # the cosine's floor
    batch_size: int = 128
    epochs: int = 200
    warmup_epochs: int = 5
    mixup_alpha: float = 0.0         # 0: no mixup
    freq_mask_bins: int = 30         # band widths are drawn in [0, width)
    time_mask_frames: int = 48
    random_resized_crop: bool = True
    token_drop_ratio: float = 0.5    # the authors' training_mask
    token_drop_keep: str = "flagged"  # "flagged" (the authors' behaviour) or "unflagged"
    raw_input: str = "wave"          # what mixup sees: "wave" [samples] or "log_mel" [F, T]
    input_frames: int = 1001         # crop length in log-mel frames (waveforms: (frames - 1) * hop samples)
    encoder_frames: int = 0          # zero-padded to this after augmentation; 0: input_frames
    freeze_patch_embed: bool = False
    feature: str = "mean"            # "mean" of kept patch tokens (D) or "stacked" columns (F*D)
    loss: str = "ce"                 # "bce" (multi-label) or "ce" (cross-entropy / n_classes)
    sampling: str = "shuffle"        # "shuffle" or "weighted" (AudioSet-2M)
    clips_per_epoch: int = 200_000   # weighted sampling: clips drawn per epoch, without replacement
    report: str = "best_test"        # "best_test", "best_test_fold_mean" or "best_valid_then_test"
    seeds: tuple[int, ...] = (43, 44, 45)

    @property
    def crop_length(self) -> int:
        """Crop length on the raw input: frames, or samples for waveforms."""
        return self.input_frames if self.raw_input == "log_mel" else (self.input_frames - 1) * data.HOP_SAMPLES

    @property
    def padded_frames(self) -> int:
        return self.encoder_frames or self.input_frames


RECIPES: dict[str, FinetuneRecipe] = {
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
}


def recipe(name: str, **overrides) -> FinetuneRecipe:
    """A named recipe, optionally with some fields changed."""
    if name not in RECIPES:
        raise ValueError(f"unknown fine-tuning recipe {name!r}; choose one of {sorted(RECIPES)}")
    return replace(RECIPES[name], **overrides)


# -----------------------------------------------------------------------------
# Learning-rate schedule, set every iteration


def lr_at(epoch: float, recipe: FinetuneRecipe) -> float:
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
        return lr_at(0.0, recipe)
    epoch, i = divmod(iteration - 1, iters_per_epoch)
    return lr_at(epoch + i / iters_per_epoch, recipe)


# -----------------------------------------------------------------------------
# The batch pipeline: crop, mixup, log-mel, normalise, band masks, random resized crop


def crop_or_pad(clip: torch.Tensor, length: int, generator: torch.Generator | None = None,
                train: bool = True) -> torch.Tensor:
    """[..., L] -> [..., length]: a random start in [0, L - length) when training, the start otherwise;
    zeros appended when shorter (in the raw input's space, before normalisation)."""
    frames = clip.shape[-1]
    if frames > length:
        start = int(torch.randint(frames - length, (1,), generator=generator)) if train else 0
        return clip[..., start:start + length]
    return F.pad(clip, (0, length - frames))


def crop_batch(clips: list[torch.Tensor], length: int, generator: torch.Generator | None = None,
               train: bool = True) -> torch.Tensor:
    """Clips of any length -> [B, ..., length]."""
    return torch.stack([crop_or_pad(c, length, generator, train) for c in clips])


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
# The model: the pre-trained encoder, the structured token drop, pooling, head


class FinetuneModel(nn.Module):
    """The encoder of an M2DCLAP with a classification head; fp32, no dropout.

    Takes the encoder's checkpoint-named parts (patch_embed, cls_token,
    blocks, norm, norm_stats) and leaves the predictor, target and CLAP heads
    behind. The position table is stretched (or cropped) to the task's input
    and kept as a frozen buffer saved with the weights. While training, the
    structured token drop keeps K of the F*T patch tokens. The clip feature
    is the mean of the kept patch tokens (D), or with feature="stacked" the
    F rows of each time column stacked (F*D) and averaged over time. The
    head is BatchNorm1d(feature, affine=False) then Linear (weight normal
    std 0.01, bias 0). State-dict keys: the encoder's, head_norm.*, head.*.
    """

    def __init__(self, encoder: m2d.M2DCLAP, n_classes: int, encoder_frames: int,
                 token_drop_ratio: float = 0.0, token_drop_keep: str = "flagged", feature: str = "mean",
                 freeze_patch_embed: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        if feature not in ("mean", "stacked"):
            raise ValueError(f"feature must be 'mean' or 'stacked', got {feature!r}")
        if feature == "stacked" and token_drop_ratio > 0:
            raise ValueError("stacked column features need every token: set token_drop_ratio to 0 "
                             "(the authors switch to mean features whenever the drop is on)")
        config = encoder.config
        self.grid_f = config.n_mels // config.patch_size
        self.grid_t = encoder_frames // config.patch_size
        self.encoder_frames = encoder_frames
        self.token_drop_ratio, self.token_drop_keep, self.feature = token_drop_ratio, token_drop_keep, feature

        self.register_buffer("norm_stats", encoder.norm_stats.detach().clone())
        self.patch_embed, self.cls_token, self.blocks, self.norm = (
            encoder.patch_embed, encoder.cls_token, encoder.blocks, encoder.norm)
        grid_t_checkpoint = (encoder.pos_embed.shape[1] - 1) // self.grid_f
        self.register_buffer("pos_embed", m2d.stretch_pos_table(
            encoder.pos_embed.detach(), self.grid_f, grid_t_checkpoint, self.grid_t).clone())  # [1, 1+F*T, D]
        self.patch_embed.requires_grad_(not freeze_patch_embed)

        dim = config.embed_dim * (self.grid_f if feature == "stacked" else 1)
        self.head_norm = nn.BatchNorm1d(dim, affine=False)
        self.head = nn.Linear(dim, n_classes)
        nn.init.normal_(self.head.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.head.bias)
        self.front_end = data.LogMelSpectrogram()  # for waveform input; its buffers are not saved

    def normalize(self, log_mel: torch.Tensor) -> torch.Tensor:
        return (log_mel - self.norm_stats[0]) / self.norm_stats[1]

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised (and augmented) log-mel [B, 1, F_bins, T_frames] -> logits [B, n_classes]."""
        if x.shape[-1] > self.encoder_frames:
            raise ValueError(f"input of {x.shape[-1]} frames; this model takes at most {self.encoder_frames}")
        x = F.pad(x, (0, self.encoder_frames - x.shape[-1]))      # zeros after normalisation (SPCV2)
        patches = self.patch_embed(x) + self.pos_embed[:, 1:]     # [B, F*T, D]
        if self.training and self.token_drop_ratio > 0:
            patches, _ = m2d.structured_token_drop(patches, self.grid_f, self.grid_t, self.token_drop_ratio,
                                                   generator, self.token_drop_keep)  # [B, K, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1)                      # [B, 1+K, D]
        for block in self.blocks:
            x = block(x)
        tokens = self.norm(x)[:, 1:]                              # [B, K, D], CLS dropped
        return self.head(self.head_norm(self.pool(tokens)))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, K, D] -> [B, D] (mean), or [B, F*T, D] -> [B, F*D] (stacked columns, mean over time)."""
        if self.feature == "mean":
            return tokens.mean(dim=1)
        B, N, D = tokens.shape
        columns = tokens.reshape(B, self.grid_f, N // self.grid_f, D).permute(0, 2, 1, 3)  # [B, T, F, D]
        return columns.reshape(B, N // self.grid_f, self.grid_f * D).mean(dim=1)         # [B, F*D]


def build_model(encoder: m2d.M2DCLAP, n_classes: int, recipe: FinetuneRecipe,
                generator: torch.Generator | None = None) -> FinetuneModel:
    """The FinetuneModel a recipe asks for."""
    return FinetuneModel(encoder, n_classes, recipe.padded_frames, recipe.token_drop_ratio,
                         recipe.token_drop_keep, recipe.feature, recipe.freeze_patch_embed, generator)


# -----------------------------------------------------------------------------
# Loss and optimiser


def finetune_loss(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """BCE-with-logits (multi-label), or cross-entropy / n_classes on (soft) targets [B, C]."""
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets)
    if loss == "ce":
        return -(targets * F.log_softmax(logits, dim=-1)).mean()  # mean over B and C
    raise ValueError(f"loss must be 'bce' or 'ce', got {loss!r}")


def make_optimizer(model: nn.Module, recipe: FinetuneRecipe) -> torch.optim.Optimizer:
    """One parameter group; the rate is set every step (lr_of_iteration)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=0.0)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4, amsgrad=True)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {recipe.optimizer!r}")


# -----------------------------------------------------------------------------
# One training step, evaluation, the loop


def to_log_mel(model: FinetuneModel, x: torch.Tensor, recipe: FinetuneRecipe) -> torch.Tensor:
    """Raw input [B, samples] or [B, F, T] -> normalised log-mel [B, 1, F, T]."""
    expected = 2 if recipe.raw_input == "wave" else 3
    if x.dim() != expected:
        raise ValueError(f"raw_input={recipe.raw_input!r} expects clips of {expected - 1} dimension(s), "
                         f"got a batch of shape {tuple(x.shape)}")
    log_mel = model.front_end(x) if recipe.raw_input == "wave" else x
    return model.normalize(log_mel.unsqueeze(1))


def train_step(model: FinetuneModel, optimizer: torch.optim.Optimizer, clips: list[torch.Tensor],
               targets: torch.Tensor, recipe: FinetuneRecipe, generator: torch.Generator, lr: float) -> float:
    """One optimiser step on raw clips and their targets [B, C]; returns the loss.

    model may be wrapped in DistributedDataParallel (it averages the gradients).
    """
    device = targets.device
    x = crop_batch(clips, recipe.crop_length, generator).to(device)                   # (1)
    x, targets = mixup(x, targets, recipe.mixup_alpha, generator)                     # (2)
    x = to_log_mel(getattr(model, "module", model), x, recipe)                        # (3) [B, 1, F, T]
    x = band_masks(x, recipe.freq_mask_bins, recipe.time_mask_frames, generator)      # (4)
    if recipe.random_resized_crop:
        x = random_resized_crop(x, generator)                                         # (5)
    model.train()
    loss = finetune_loss(model(x, generator), targets, recipe.loss)                   # (6)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def predict(model: FinetuneModel, clips: list[torch.Tensor], recipe: FinetuneRecipe,
            batch_size: int | None = None) -> torch.Tensor:
    """Logits [N, C] from one crop at the start of each clip; no token drop, BatchNorm in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    batch_size = batch_size or recipe.batch_size
    logits = []
    for i in range(0, len(clips), batch_size):
        x = crop_batch(clips[i:i + batch_size], recipe.crop_length, train=False).to(device)
        logits.append(model(to_log_mel(model, x, recipe)).cpu())
    return torch.cat(logits)


@dataclass
class ClipSet:
    """One split in memory: raw clips (waveforms [samples] or log-mels [F, T]) and targets [N, C].

    Targets are multi-hot, one-hot for single-label tasks (as the authors
    keep them), so mixup can mix them.
    """

    clips: list[torch.Tensor]
    targets: torch.Tensor
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.clips)


def epoch_batches(n_clips: int, recipe: FinetuneRecipe, generator: torch.Generator,
                  weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One epoch's batches of clip indices: a shuffle, or a weighted draw without replacement."""
    if recipe.sampling == "weighted":
        order = weighted_epoch(weights, recipe.clips_per_epoch, generator)
    else:
        order = torch.randperm(n_clips, generator=generator)
    return list(order.split(recipe.batch_size))


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


def train_epoch(net: nn.Module, optimizer: torch.optim.Optimizer, train: ClipSet, recipe: FinetuneRecipe,
                order: torch.Generator, augment: torch.Generator, state: FitState, weights=None,
                rank: int = 0, world_size: int = 1) -> tuple[float, float]:
    """One epoch of steps; with several processes each takes its share of every batch. (mean loss, last lr)."""
    batches = epoch_batches(len(train), recipe, order, weights)
    device, losses = train.targets.device, []
    for ids in batches:
        ids = ids[rank::world_size]
        lr = lr_of_iteration(state.step, len(batches), recipe)
        losses.append(train_step(net, optimizer, [train.clips[i] for i in ids], train.targets[ids.to(device)],
                                 recipe, augment, lr))
        state.step += 1
    return float(np.mean(losses)), lr


def fit(model: FinetuneModel, recipe: FinetuneRecipe, train: ClipSet, valid: ClipSet | None, test: ClipSet,
        generator: torch.Generator, log=print, optimizer: torch.optim.Optimizer | None = None,
        state: FitState | None = None, on_epoch=None, net: nn.Module | None = None,
        augment: torch.Generator | None = None, rank: int = 0, world_size: int = 1) -> dict:
    """Fine-tune for recipe.epochs, evaluating after every epoch; returns the reported score and history.

    Without a validation split, the test split selects the epoch (the best
    test score over epochs, as the authors report AudioSet and ESC-50); with
    one, the best validation epoch's weights are tested once. A run that
    resumes passes its optimizer and FitState; on_epoch(state) is called after
    every epoch (to save a checkpoint). `generator` orders the batches, and
    draws the augmentations too unless `augment` is given (one per process).
    Only rank 0 evaluates, on the whole split.
    """
    optimizer = optimizer or make_optimizer(model, recipe)
    state = state or FitState()
    weights = audioset_sampling_weights(train.targets) if recipe.sampling == "weighted" else None
    selector = valid if valid is not None and len(valid) else test
    part = "valid" if selector is valid else "test"
    while state.epoch < recipe.epochs:
        loss, lr = train_epoch(net or model, optimizer, train, recipe, generator, augment or generator, state,
                               weights, rank, world_size)
        state.epoch += 1  # epochs done: the records count from 1, as the progress lines do
        record = {"epoch": state.epoch, "loss": loss, "lr": lr}
        if rank == 0:
            scores = predict(model, selector.clips, recipe)
            record[part] = finetune_metrics(scores, selector.targets.cpu())
            score = selection_score(scores, selector.targets.cpu(), recipe.loss)
            if score > state.best_score:  # strictly better, from 0, as the authors keep the best
                state.best_score, state.best_epoch, state.best_scores = score, state.epoch, scores
                state.best_state = copy.deepcopy(model.state_dict())
            log(f"epoch {state.epoch}: loss {loss:.5f}, lr {lr:.3g}, {part} {score:.3f}")
        state.history.append(record)
        if on_epoch is not None:
            on_epoch(state)
    return fit_result(model, recipe, test, state, selector is valid)


def fit_result(model: FinetuneModel, recipe: FinetuneRecipe, test: ClipSet, state: FitState,
               test_once: bool) -> dict:
    """The reported score, the best epoch, and the test logits and metrics at the best epoch."""
    scores = state.best_scores
    if test_once and state.best_state is not None:
        model.load_state_dict(state.best_state)
        scores = predict(model, test.clips, recipe)
    metrics = finetune_metrics(scores, test.targets.cpu()) if scores is not None else {}
    reported = selection_score(scores, test.targets.cpu(), recipe.loss) if scores is not None else 0.0
    return {"score": reported, "best_epoch": state.best_epoch, "history": state.history,
            "state": state.best_state, "test_scores": scores, "metrics": metrics}


# -----------------------------------------------------------------------------
# Metrics and the reporting rules


def roc_auc(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """ROC-AUC per class (ties count one half), averaged; also how many classes were skipped.

    A class whose labels are all 0 or all 1 has no ROC curve: it is skipped.
    """
    aucs = [a for a in (class_roc_auc(s, y) for s, y in zip(scores.T, targets.T)) if a is not None]
    return (float(np.mean(aucs)) if aucs else float("nan")), scores.shape[1] - len(aucs)


def class_roc_auc(scores: torch.Tensor, targets: torch.Tensor) -> float | None:
    """One class's ROC-AUC from its scores [N] and 0/1 targets [N]; None when it has no ROC curve."""
    s, y = scores.double().numpy(), targets.numpy() > 0.5
    n_pos = int(y.sum())
    if n_pos in (0, len(y)):
        return None
    ranks = average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(y) - n_pos)))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts + 1) / 2)[inverse]


def accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of clips whose highest score is their (first) class, in %."""
    return 100 * float((scores.argmax(dim=1) == targets.argmax(dim=1)).float().mean())


def finetune_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict:
    """mAP (%), ROC-AUC and accuracy (%) of logits [N, C] against multi-hot targets [N, C]."""
    labels = [set(torch.nonzero(row > 0.5).flatten().tolist()) for row in targets]
    auc, skipped = roc_auc(scores, targets)
    return {"mAP": mean_average_precision(scores, labels), "roc_auc": auc, "roc_auc_skipped_classes": skipped,
            "accuracy": accuracy(scores, targets)}


def selection_score(scores: torch.Tensor, targets: torch.Tensor, loss: str) -> float:
    """The score that picks epochs and is reported: mAP for multi-label tasks, else accuracy."""
    return finetune_metrics(scores, targets)["mAP" if loss == "bce" else "accuracy"]


def seed_summary(scores: list[float]) -> dict:
    """The authors' report over seeds (43, 44, 45): the mean, with the spread (sample std) beside it."""
    values = np.asarray(scores, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


# -----------------------------------------------------------------------------
# Data: manifests, AudioSet sampling weights


def audioset_sampling_weights(targets: torch.Tensor) -> torch.Tensor:
    """Per clip (sum of its classes' 1000 / (count_c + 0.01)) ** (1 / 1.5), counts over the given split."""
    multi_hot = (targets > 0.5).double()                 # [N, C]
    class_weight = 1000.0 / (multi_hot.sum(dim=0) + 0.01)  # [C]
    return (multi_hot @ class_weight) ** (1.0 / 1.5)     # [N]


def weighted_epoch(weights: torch.Tensor, n_clips: int, generator: torch.Generator) -> torch.Tensor:
    """n_clips indices drawn by weight without replacement (capped at the split's size)."""
    return torch.multinomial(weights.double(), min(n_clips, len(weights)), replacement=False,
                             generator=generator)


LABEL_SEPARATORS = (";", "|")


@dataclass
class FinetuneManifest:
    """A fine-tuning manifest: clips, their labels, and a split (train/valid/test) or a fold per clip."""

    name: str
    files: list[str]
    labels: list[list[str]]
    split: list[str] | None = None
    fold: list[str] | None = None

    @property
    def classes(self) -> list[str]:
        """Sorted label strings of the training clips (all clips when folds are used)."""
        train = [ls for ls, s in zip(self.labels, self.split or ["train"] * len(self.labels)) if s == "train"]
        return sorted({c for ls in train for c in ls})

    @property
    def multi_label(self) -> bool:
        return any(len(ls) > 1 for ls in self.labels)

    def indices(self, part: str, holdout_fold: str | None = None) -> list[int]:
        """Clip indices of a split; with folds, 'test' is the holdout fold and 'train' the others."""
        if self.split is not None:
            return [i for i, s in enumerate(self.split) if s == part]
        if holdout_fold is None:
            raise ManifestError(f"{self.name}: has folds, not splits; pass the fold to hold out")
        if part == "valid":
            return []
        return [i for i, f in enumerate(self.fold) if (f == holdout_fold) == (part == "test")]


def read_finetune_manifest(csv_path: str | Path) -> FinetuneManifest:
    """Read a CSV with file_name, label (several separated by ';' or '|') and split or fold."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns, rows = reader.fieldnames or [], list(reader)
    except (FileNotFoundError, UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(f"{csv_path}: cannot read the manifest ({e})") from e
    part_column = "split" if "split" in columns else "fold" if "fold" in columns else None
    if "file_name" not in columns or "label" not in columns or part_column is None:
        raise ManifestError(f"{csv_path}: the header has {columns}; a fine-tuning manifest needs file_name, "
                            "label and either split (train/valid/test) or fold")
    manifest = FinetuneManifest(str(csv_path), [], [], [] if part_column == "split" else None,
                                [] if part_column == "fold" else None)
    for line, row in enumerate(rows, start=2):
        text = row["label"] or ""
        for sep in LABEL_SEPARATORS[1:]:
            text = text.replace(sep, LABEL_SEPARATORS[0])
        labels = [c.strip() for c in text.split(LABEL_SEPARATORS[0]) if c.strip()]
        if not row["file_name"] or not labels:
            raise ManifestError(f"{csv_path}, line {line}: empty file_name or label")
        part = (row[part_column] or "").strip()
        if part_column == "split" and part not in ("train", "valid", "test"):
            raise ManifestError(f"{csv_path}, line {line}: split must be train, valid or test, got {part!r}")
        manifest.files.append(row["file_name"])
        manifest.labels.append(labels)
        (manifest.split if part_column == "split" else manifest.fold).append(part)
    return manifest


def label_targets(labels: list[list[str]], classes: list[str], where: str = "") -> torch.Tensor:
    """Label strings per clip -> multi-hot float targets [N, C] in the given class order."""
    index = {c: k for k, c in enumerate(classes)}
    targets = torch.zeros(len(labels), len(classes))
    for i, clip_labels in enumerate(labels):
        unknown = [c for c in clip_labels if c not in index]
        if unknown:
            raise ManifestError(f"{where}: clip {i} has label(s) {unknown} that no training clip has; "
                                "a classifier cannot learn them. Fix the label or the split.")
        targets[i, [index[c] for c in clip_labels]] = 1.0
    return targets


class LazyClips:
    """Clips read on demand (AudioSet-scale shards): indexed like a list, nothing kept in memory."""

    def __init__(self, read, names: list[str]):
        self.read, self.names = read, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.read(n) for n in self.names[index]]
        return self.read(self.names[index])


def load_clip_set(manifest: FinetuneManifest, indices: list[int], recipe: FinetuneRecipe,
                  source: data.AudioFolder | data.ShardStore, lazy: bool = False, workers: int = 1) -> ClipSet:
    """The raw clips of some manifest rows: waveforms from audio files, or log-mels (files or shards).

    lazy: read each clip when a batch needs it (shards); else read them all now, with `workers` threads.
    """
    names = [manifest.files[i] for i in indices]
    missing = source.missing(names)
    if missing:
        raise ManifestError(f"{manifest.name}: {len(missing)} clip(s) such as {missing[0]} not found "
                            f"{source.where()}")
    if recipe.raw_input == "wave":
        if not isinstance(source, data.AudioFolder):
            raise ManifestError(f"{manifest.name}: raw_input='wave' needs audio files, not log-mel shards")
        read = lambda name: data.load_audio(source.root / name)  # noqa: E731
    else:
        read = source.log_mel
    targets = label_targets([manifest.labels[i] for i in indices], manifest.classes, manifest.name)
    if lazy:
        return ClipSet(LazyClips(read, names), targets, names)
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        return ClipSet(list(pool.map(read, names)), targets, names)


# -----------------------------------------------------------------------------
# A task to run: its clips, the folds held out in turn, the built-in task


@dataclass
class Task:
    """A fine-tuning task: its manifest, where its clips are, and the folds held out in turn ([None]: splits)."""

    manifest: FinetuneManifest
    source: data.AudioFolder | data.ShardStore
    holdouts: list[str | None]
    lazy: bool = False
    workers: int = 1

    def splits(self, recipe: FinetuneRecipe, holdout: str | None) -> tuple[ClipSet, ClipSet | None, ClipSet]:
        """(train, valid or None, test) of one held-out fold (or of the manifest's splits)."""
        train, valid, test = (load_clip_set(self.manifest, self.manifest.indices(part, holdout), recipe,
                                            self.source, self.lazy, self.workers)
                              for part in ("train", "valid", "test"))
        return train, (valid if len(valid) else None), test


def load_task(manifest_path: Path, audio_root: Path | None = None, shards: Path | None = None,
              folds: list[str] | None = None, workers: int = 1) -> Task:
    """The task of a manifest: audio files under audio_root (default: the manifest's folder), or shards."""
    manifest = read_finetune_manifest(manifest_path)
    source = data.ShardStore(shards) if shards else data.AudioFolder(audio_root or Path(manifest_path).parent)
    if manifest.fold is None:
        if folds:
            raise ManifestError(f"{manifest_path}: --folds needs a manifest with a fold column; this one has splits")
        holdouts = [None]
        for part in ("train", "test"):
            if not manifest.indices(part):
                raise ManifestError(f"{manifest_path}: no clip in the {part} split; a run needs train and test clips")
    else:
        present = sorted(set(manifest.fold), key=lambda f: (len(f), f))
        if len(present) < 2:
            raise ManifestError(f"{manifest_path}: every clip is in fold {present[0]!r}; holding folds out in turn "
                                "needs at least 2 folds (or use a split column: train/valid/test)")
        unknown = sorted(set(folds or []) - set(present))
        if unknown:
            raise ManifestError(f"{manifest_path}: --folds {unknown} not in the manifest, whose folds are {present}")
        holdouts = list(folds or present)
    return Task(manifest, source, holdouts, lazy=shards is not None, workers=workers)


def builtin_task(workers: int = 1) -> Task:
    """The built-in data's event labels: several per clip (multi-label, like AudioSet); train, then test."""
    clips = builtin_eval_set()  # renders the audio on first use
    manifest = FinetuneManifest("built-in data", clips.files, clips.labels, clips.split)
    return Task(manifest, data.AudioFolder(builtin_data.builtin_cache_dir()), [None], workers=workers)


def init_encoder(init: Path, seed: int, random_init: bool) -> m2d.M2DCLAP:
    """The M2DCLAP of a checkpoint (ours or released); random_init: a fresh one of the same shape and statistics."""
    encoder = features.load_model(init).model
    if random_init:
        torch.manual_seed(seed)
        encoder = m2d.M2DCLAP(encoder.config, tuple(encoder.norm_stats.tolist()))
    return encoder


# -----------------------------------------------------------------------------
# The fine-tuned file: a full M2DCLAP checkpoint plus the head


def finetuned_checkpoint(init: m2d.M2DCLAP, model: FinetuneModel, classes: list[str], multi_label: bool,
                         recipe: FinetuneRecipe, settings: dict, stage: str = "finetune") -> dict:
    """Our checkpoint layout, so that features.load_model reads it and stage 2 can start from it.

    model_config is the init's with crop_frames = the task's input; the
    encoder (with the stretched position table) is the fine-tuned one; the
    target, predictor and CLAP heads come from the init (decoder_pos_embed
    rebuilt for the new grid); a text encoder is left out. "head" holds
    head_norm.* and head.*.
    """
    config = replace(init.config, crop_frames=recipe.padded_frames)
    full = m2d.M2DCLAP(config, tuple(init.norm_stats.tolist())).state_dict()  # the new grid's tables
    for key, value in init.state_dict().items():
        if key in full and value.shape == full[key].shape:
            full[key] = value
    tuned = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    full.update({k: v for k, v in tuned.items() if k in full})
    return {"stage": stage, "model_config": asdict(config), "norm_stats": init.norm_stats.tolist(), "model": full,
            "head": {k: v for k, v in tuned.items() if k.startswith("head")}, "classes": classes,
            "multi_label": multi_label, "recipe": recipe_record(recipe), "args": settings}


def recipe_record(recipe: FinetuneRecipe) -> dict:
    return {**asdict(recipe), "seeds": list(recipe.seeds)}


def write_per_class(path: Path, scores: torch.Tensor, targets: torch.Tensor, classes: list[str]):
    """class, AP (%), ROC-AUC and positives in test, one row per class."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "AP", "roc_auc", "positives"])
        for c, name in enumerate(classes):
            y = targets[:, c] > 0.5
            ap = mean_average_precision(scores[:, c:c + 1], [{0} if hit else set() for hit in y]) if y.any() else None
            auc = class_roc_auc(scores[:, c], targets[:, c])
            writer.writerow([name, "" if ap is None else f"{ap:.3f}", "" if auc is None else f"{auc:.4f}",
                             int(y.sum())])


def plot_curves(path: Path, history: list[dict], metric: str, log=print):
    """Train loss and the selecting split's metric per epoch (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: curves.png skipped")
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


class EpochLimit(Exception):
    """Raised after --epochs-limit epochs: the run stops cleanly and the same command resumes it."""


@dataclass
class RunSettings:
    """What a fine-tuning run is told besides its recipe."""

    init: Path = Path("runs/stage1/last.pt")
    out_dir: Path | None = None          # default runs/finetune-<recipe>
    recipe_name: str = "builtin"
    manifest: Path | None = None         # None: the built-in task
    audio_root: Path | None = None
    shards: Path | None = None
    folds: list[str] | None = None
    random_init: bool = False
    stage: str = "finetune"              # "1.1": the file is a stage-1.1 checkpoint, also written as last.pt
    device: str = "cpu"
    workers: int = 1
    resume: bool | None = None           # None: resume when the run's resume.pt exists
    epochs_limit: int | None = None      # stop after this many epochs (this invocation)

    def identity(self, recipe: FinetuneRecipe, world_size: int) -> dict:
        """What must stay the same for a run to resume."""
        return {"init": str(self.init), "recipe_name": self.recipe_name, "recipe": recipe_record(recipe),
                "manifest": str(self.manifest), "audio_root": str(self.audio_root), "shards": str(self.shards),
                "folds": self.folds, "random_init": self.random_init, "stage": self.stage, "world_size": world_size}


@dataclass
class Run:
    """A run in progress: its settings, task, files and log (one per process)."""

    settings: RunSettings
    recipe: FinetuneRecipe
    task: Task
    out_dir: Path
    ddp: runs.Distributed
    device: torch.device
    log: runs.RunLog
    identity: dict
    jobs: list[tuple[int, str | None]]   # (seed, held-out fold) in the order they run
    epochs_run: int = 0                  # in this invocation
    started: float = field(default_factory=time.perf_counter)

    def print(self, *args):
        self.log.print(*args, flush=True)


def open_resume(run_dir: Path, settings: RunSettings, identity: dict) -> dict | None:
    """The resume file to go on from, checked to be the same run, or None for a new run."""
    path = run_dir / RESUME_FILE
    if settings.resume is False or (settings.resume is None and not path.is_file()):
        return None
    if not path.is_file():
        raise runs.ResumeError(f"{path}: not found, so there is nothing to resume; drop --resume to start a new run")
    ckpt = runs.load_checkpoint(path)
    runs.check_same_run(path, ckpt["identity"], identity)
    return ckpt


def gather_generator_states(ddp: runs.Distributed, generator: torch.Generator) -> list[torch.Tensor]:
    """Every rank's augmentation generator state, in rank order (every rank must call this)."""
    if ddp.world_size == 1:
        return [generator.get_state()]
    states = [None] * ddp.world_size
    torch.distributed.all_gather_object(states, generator.get_state())
    return states


def run_job(run: Run, j: int, results: list[dict], ckpt: dict | None) -> dict:
    """Fine-tune one seed on one held-out fold (or the splits); resumes from ckpt when it is this job's."""
    seed, holdout = run.jobs[j]
    recipe = run.recipe
    train, valid, test = run.task.splits(recipe, holdout)
    for split in (train, valid, test):
        if split is not None:
            split.targets = split.targets.to(run.device)
    init = init_encoder(run.settings.init, seed, run.settings.random_init)
    model = build_model(copy.deepcopy(init), train.targets.shape[1], recipe,
                        torch.Generator().manual_seed(seed)).to(run.device)
    optimizer, state = make_optimizer(model, recipe), FitState()
    order = torch.Generator().manual_seed(seed)
    augment = torch.Generator().manual_seed(1_000_003 * (run.ddp.rank + 1) + seed)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = FitState(**ckpt["fit"])
        order.set_state(ckpt["order_rng"])
        augment.set_state(ckpt["augment_rng"][run.ddp.rank])

    def on_epoch(state: FitState):
        augment_states = gather_generator_states(run.ddp, augment)
        if run.ddp.main:
            runs.save_checkpoint(run.out_dir / RESUME_FILE, stage="finetune", identity=run.identity, job=j,
                                 results=results, model=model.state_dict(), optimizer=optimizer.state_dict(),
                                 fit=vars(state), order_rng=order.get_state(), augment_rng=augment_states,
                                 elapsed_s=run.log.elapsed_s())
        log_epoch(run, j, state)

    result = fit(model, recipe, train, valid, test, order, log=lambda line: None, optimizer=optimizer,
                 state=state, on_epoch=on_epoch, net=run.ddp.wrap(model, run.device), augment=augment,
                 rank=run.ddp.rank, world_size=run.ddp.world_size)
    summary = {"seed": seed, "fold": holdout, "score": result["score"], "best_epoch": result["best_epoch"],
               "metrics": result["metrics"]}
    if run.ddp.main and result["state"] is not None and result["score"] > max([r["score"] for r in results] + [-1]):
        write_model(run, init, model, result, test)
    return summary


def log_epoch(run: Run, j: int, state: FitState):
    """log.jsonl's record and the progress line of the epoch just done; stops at --epochs-limit."""
    seed, holdout = run.jobs[j]
    record = {"step": j * run.recipe.epochs + state.epoch, "seed": seed, "fold": holdout, **state.history[-1]}
    run.log.write(record)
    part = "valid" if "valid" in record else "test"
    metric = "mAP" if run.recipe.loss == "bce" else "accuracy"
    run.epochs_run += 1
    remaining = len(run.jobs) * run.recipe.epochs - record["step"]
    eta_s = (time.perf_counter() - run.started) / run.epochs_run * remaining
    fold = f" fold {holdout}" if holdout is not None else ""
    run.print(f"seed {seed}{fold} | epoch {state.epoch}/{run.recipe.epochs} | loss {record['loss']:.4f} | "
              f"lr {record['lr']:.3g} | {part} {metric} {record.get(part, {}).get(metric, float('nan')):.2f} | "
              f"ETA {runs.format_duration(eta_s)}")
    if run.settings.epochs_limit and run.epochs_run >= run.settings.epochs_limit:
        raise EpochLimit(f"stopped after {run.epochs_run} epoch(s) (--epochs-limit); run the same command to resume")


def write_model(run: Run, init: m2d.M2DCLAP, model: FinetuneModel, result: dict, test: ClipSet):
    """best.pt (and, for stage 1.1, last.pt: the same file) and per_class.csv of the best job so far."""
    model.load_state_dict(result["state"])
    manifest = run.task.manifest
    ckpt = finetuned_checkpoint(init, model, manifest.classes, manifest.multi_label, run.recipe,
                                {k: str(v) for k, v in vars(run.settings).items()}, run.settings.stage)
    runs.save_checkpoint(run.out_dir / MODEL_FILE, **ckpt)
    if run.settings.stage == "1.1":
        (run.out_dir / "last.pt").unlink(missing_ok=True)
        os.link(run.out_dir / MODEL_FILE, run.out_dir / "last.pt")
    write_per_class(run.out_dir / "per_class.csv", result["test_scores"], test.targets.cpu(), manifest.classes)


def finetune(settings: RunSettings, recipe: FinetuneRecipe) -> Path:
    """Run every (seed, held-out fold) of a task, resuming where a stopped run left off; returns best.pt's path."""
    ddp, device = runs.setup_distributed(torch.device(settings.device))
    default_dir = "stage1.1" if settings.stage == "1.1" else f"finetune-{settings.recipe_name}"
    out_dir = Path(settings.out_dir or Path("runs") / default_dir)
    task = (load_task(settings.manifest, settings.audio_root, settings.shards, settings.folds, settings.workers)
            if settings.manifest else builtin_task(settings.workers))
    if not Path(settings.init).is_file():
        raise FileNotFoundError(f"{settings.init}: the checkpoint to fine-tune was not found; pass --init CKPT "
                                "(python train.py --stage 1 writes runs/stage1/last.pt)")
    identity = settings.identity(recipe, ddp.world_size)
    ckpt = open_resume(out_dir, settings, identity)
    if ddp.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is None:  # nothing of an earlier run in this folder may mix in
            for name in RUN_FILES + (("last.pt",) if settings.stage == "1.1" else ()):
                (out_dir / name).unlink(missing_ok=True)
    ddp.barrier()
    jobs = [(seed, holdout) for seed in recipe.seeds for holdout in task.holdouts]
    run = Run(settings, recipe, task, out_dir, ddp, device, runs.RunLog(out_dir / "log.jsonl", 0, ddp.main),
              identity, jobs)
    start_job, results = (ckpt["job"], list(ckpt["results"])) if ckpt else (0, [])
    run.log.start(start_job * recipe.epochs + ckpt["fit"]["epoch"] if ckpt else 0, ckpt["elapsed_s"] if ckpt else 0)
    run.print(f"fine-tuning {settings.init} ({'random init' if settings.random_init else 'pre-trained'}) on "
              f"{task.manifest.name}: {len(task.manifest.classes)} classes, recipe {settings.recipe_name}, "
              f"{len(jobs)} run(s) of {recipe.epochs} epochs, writing {out_dir}"
              + (f"; resuming at run {start_job + 1}, epoch {ckpt['fit']['epoch']}" if ckpt else ""))
    for j in range(start_job, len(jobs)):
        results.append(run_job(run, j, results, ckpt if j == start_job else None))
    if ddp.main:
        write_result(run, results)
    ddp.leave()
    return out_dir / ("last.pt" if settings.stage == "1.1" else MODEL_FILE)


def write_result(run: Run, results: list[dict]):
    """result.json: the reported score by the task's rule (per seed: the mean over held-out folds), and curves.png."""
    recipe = run.recipe
    per_seed = {str(seed): float(np.mean([r["score"] for r in results if r["seed"] == seed])) for seed in recipe.seeds}
    best = max(range(len(results)), key=lambda k: results[k]["score"])
    metric = "mAP" if recipe.loss == "bce" else "accuracy"
    report = {"task": run.task.manifest.name, "recipe_name": run.settings.recipe_name, "rule": recipe.report,
              "metric": metric, "score": seed_summary(list(per_seed.values()))["mean"],
              "spread": seed_summary(list(per_seed.values())), "per_seed": per_seed, "runs": results,
              "best_run": best, "best_epoch": results[best]["best_epoch"], "metrics_at_best": results[best]["metrics"],
              "classes": run.task.manifest.classes, "recipe": recipe_record(recipe),
              "settings": {k: str(v) for k, v in vars(run.settings).items()}}
    (run.out_dir / "result.json").write_text(json.dumps(report, indent=1) + "\n")
    seed, holdout = run.jobs[best]
    plot_curves(run.out_dir / "curves.png", [r for r in run.log.records if r["seed"] == seed
                                             and r["fold"] == holdout], metric, run.print)
    spread = report["spread"]
    run.print(f"{metric} {spread['mean']:.2f} (std {spread['std']:.2f} over {spread['n']} seed(s)); "
              f"best run {best + 1}, epoch {report['best_epoch']}; wrote {run.out_dir / MODEL_FILE}")


def run_stage11(init_path: Path, out_dir: Path, resume: bool | None = None, device: str = "cpu",
                **overrides) -> Path:
    """Stage 1.1 on the built-in data from a stage-1 checkpoint: returns out_dir/last.pt, the stage-1.1 model.

    out_dir/resume.pt is the run's resume state; out_dir/last.pt (= best.pt)
    the best epoch's weights in our checkpoint layout, stage "1.1".
    """
    settings = RunSettings(init=Path(init_path), out_dir=Path(out_dir), stage="1.1", resume=resume, device=device)
    return finetune(settings, recipe("builtin", **overrides))


# -----------------------------------------------------------------------------
# The command line


FLAG_CHOICES = {"optimizer": ("sgd", "adamw"), "token_drop_keep": ("flagged", "unflagged"),
                "raw_input": ("wave", "log_mel"), "feature": ("mean", "stacked"), "loss": ("bce", "ce"),
                "sampling": ("shuffle", "weighted"),
                "report": ("best_test", "best_test_fold_mean", "best_valid_then_test")}


def parse_args(argv=None) -> tuple[RunSettings, FinetuneRecipe]:
    """RunSettings and the recipe of a command line: one flag per FinetuneRecipe field (default: the recipe's)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", type=Path, default=RunSettings.init, help="checkpoint to fine-tune, ours or a "
                   "released file (default: runs/stage1/last.pt)")
    p.add_argument("--manifest", type=Path, help="CSV: file_name, label (several joined by ';' or '|'), and split "
                   "(train/valid/test) or fold. Default: the built-in data's event labels")
    p.add_argument("--audio-root", type=Path, help="folder the file names are relative to (default: the manifest's)")
    p.add_argument("--shards", type=Path, help="log-mel shards (python data.py prepare) holding the manifest's files")
    p.add_argument("--recipe", dest="recipe_name", choices=sorted(RECIPES),
                   help="task recipe (default: builtin without --manifest; required with it)")
    p.add_argument("--folds", nargs="+", help="folds to hold out in turn (default: every fold of the manifest)")
    p.add_argument("--random-init", action="store_true", help="a randomly initialised encoder of the same shape: "
                   "the baseline pre-training must beat")
    p.add_argument("--stage", choices=("finetune", "1.1"), default="finetune", help="'1.1' marks the file a "
                   "stage-1.1 checkpoint and writes it as last.pt too")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=1, help="threads reading the clips")
    p.add_argument("--out-dir", type=Path, help="run folder (default: runs/finetune-<recipe>; runs/stage1.1 for "
                   "--stage 1.1)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="go on from the run folder's resume.pt (default: when it exists)")
    p.add_argument("--epochs-limit", type=int, help="stop after this many epochs; the same command resumes")
    group = p.add_argument_group("recipe fields (default: the recipe's value)")
    for f in fields(FinetuneRecipe):
        kind = type(getattr(FinetuneRecipe(), f.name))
        options = ({"action": argparse.BooleanOptionalAction} if kind is bool else
                   {"nargs": "+", "type": int} if kind is tuple else {"type": kind})
        group.add_argument("--" + f.name.replace("_", "-"), default=None, choices=FLAG_CHOICES.get(f.name), **options)
    args = vars(p.parse_args(argv))
    overrides = {f.name: args.pop(f.name) for f in fields(FinetuneRecipe) if args[f.name] is not None}
    if args["recipe_name"] is None:
        if args["manifest"] is not None:
            p.error(f"--manifest needs --recipe, one of {sorted(RECIPES)}")
        args["recipe_name"] = "builtin"
    args = {k: v for k, v in args.items() if k in {f.name for f in fields(RunSettings)}}
    return RunSettings(**args), recipe(args["recipe_name"], **{k: tuple(v) if k == "seeds" else v
                                                               for k, v in overrides.items()})


def main(argv=None):
    settings, task_recipe = parse_args(argv)
    try:
        finetune(settings, task_recipe)
    except EpochLimit as stop:
        print(stop)
    except (ValueError, FileNotFoundError, runs.CheckpointWriteError) as e:  # ManifestError, ResumeError too
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
