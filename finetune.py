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
import csv
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import model as m2d
from evaluate import ManifestError, mean_average_precision


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
    """One optimiser step on raw clips and their targets [B, C]; returns the loss."""
    device = targets.device
    x = crop_batch(clips, recipe.crop_length, generator).to(device)                   # (1)
    x, targets = mixup(x, targets, recipe.mixup_alpha, generator)                     # (2)
    x = to_log_mel(model, x, recipe)                                                  # (3) [B, 1, F, T]
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


def fit(model: FinetuneModel, recipe: FinetuneRecipe, train: ClipSet, valid: ClipSet | None, test: ClipSet,
        generator: torch.Generator, log=print) -> dict:
    """Fine-tune for recipe.epochs, evaluating after every epoch; returns the reported score and history.

    Without a validation split, the test split selects the epoch (the best
    test score over epochs, as the authors report AudioSet and ESC-50); with
    one, the best validation epoch's weights are tested once.
    """
    device = train.targets.device
    optimizer = make_optimizer(model, recipe)
    weights = audioset_sampling_weights(train.targets) if recipe.sampling == "weighted" else None
    selector = valid if valid is not None and len(valid) else test
    history, best, step = [], {"score": 0.0, "epoch": None, "state": None}, 0
    for epoch in range(recipe.epochs):
        batches = epoch_batches(len(train), recipe, generator, weights)
        for ids in batches:
            lr = lr_of_iteration(step, len(batches), recipe)
            loss = train_step(model, optimizer, [train.clips[i] for i in ids], train.targets[ids.to(device)],
                              recipe, generator, lr)
            step += 1
        score = selection_score(predict(model, selector.clips, recipe), selector.targets.cpu(), recipe.loss)
        history.append(score)
        log(f"epoch {epoch}: loss {loss:.5f}, lr {lr:.3g}, {'valid' if selector is valid else 'test'} {score:.3f}")
        if score > best["score"]:  # strictly better, from 0, as the authors keep the best
            best = {"score": score, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
    reported = best["score"]
    if selector is valid and best["state"] is not None:
        model.load_state_dict(best["state"])
        reported = selection_score(predict(model, test.clips, recipe), test.targets.cpu(), recipe.loss)
    return {"score": reported, "best_epoch": best["epoch"], "history": history, "state": best["state"]}


# -----------------------------------------------------------------------------
# Metrics and the reporting rules


def roc_auc(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """ROC-AUC per class (ties count one half), averaged; also how many classes were skipped.

    A class whose labels are all 0 or all 1 has no ROC curve: it is skipped.
    """
    aucs = []
    for s, y in zip(scores.double().T.numpy(), targets.T.numpy() > 0.5):
        n_pos = int(y.sum())
        if n_pos in (0, len(y)):
            continue
        ranks = average_ranks(s)
        aucs.append((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(y) - n_pos)))
    return (float(np.mean(aucs)) if aucs else float("nan")), scores.shape[1] - len(aucs)


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


def load_clip_set(manifest: FinetuneManifest, indices: list[int], recipe: FinetuneRecipe,
                  source: data.AudioFolder | data.ShardStore) -> ClipSet:
    """The raw clips of some manifest rows: waveforms from audio files, or log-mels (files or shards)."""
    names = [manifest.files[i] for i in indices]
    missing = source.missing(names)
    if missing:
        raise ManifestError(f"{manifest.name}: {len(missing)} clip(s) such as {missing[0]} not found "
                            f"{source.where()}")
    if recipe.raw_input == "wave":
        if not isinstance(source, data.AudioFolder):
            raise ManifestError(f"{manifest.name}: raw_input='wave' needs audio files, not log-mel shards")
        clips = [data.load_audio(source.root / n) for n in names]
    else:
        clips = [source.log_mel(n) for n in names]
    targets = label_targets([manifest.labels[i] for i in indices], manifest.classes, manifest.name)
    return ClipSet(clips, targets, names)
