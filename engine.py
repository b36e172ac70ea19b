"""What one pre-training step of M2D-CLAP is: its recipe, its schedules, and the optimiser step itself.

Like MAE's engine_pretrain.py beside main_pretrain.py: train.py (the program:
command line, setup per stage, data, loop, checkpoints) runs these, and
bench.py times the very same train_step against the authors' step. Nothing
here reads files or the command line, so the step can be pasted into other
training code as it is.

    recipe = RECIPES[("1", "tiny")]
    optimizer = make_optimizer(model, recipe)
    stepper = runs.Stepper.build(model, optimizer, device, "fp32", False, recipe.clip_grad_norm)
    for step in range(total_steps):
        set_lr(optimizer, lr_at(step, total_steps, warmup_steps, recipe.peak_lr))
        train_step(model, stepper, [(log_mel, text)], recipe.clap_weight,
                   ema_decay_at(step, total_steps, *recipe.ema_decay), recipe.token_drop)

The paper is Niizumi et al., "M2D-CLAP: Exploring general-purpose audio-language
representations beyond CLAP", IEEE Access 2025 (stage 1 first at Interspeech
2024); the authors' code is github.com/nttcslab/m2d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import model as m2d
import runs
from losses import m2d_clap_loss

# -----------------------------------------------------------------------------
# Recipes: the training hyperparameters, one named instance per (stage, preset)


@dataclass(frozen=True)
class Recipe:
    """Training hyperparameters. The defaults are the paper's stage 1, as in the authors' clap/train_clap.py.

    ema_decay and clap_weight matter in stage 1 only, token_drop in stages 2
    and 2.1 only.
    """

    batch_size: int = 2048            # total clips per optimiser step (all GPUs, all micro-batches)
    base_lr: float = 3e-4             # the peak learning rate is base_lr * batch_size / 256 ...
    lr: float | None = None           # ... unless given here (--lr)
    epochs: float = 300
    warmup_epochs: float = 20
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad_norm: float = 3.0
    ema_decay: tuple[float, float] = (0.99995, 0.99999)  # linear from start to end over training
    clap_weight: float = 0.01         # lambda in L = L_M2D + lambda * L_CLAP
    token_drop: float = 0.0           # the structured token drop on the frozen encoder's input

    @property
    def peak_lr(self) -> float:
        """The learning rate after warm-up: the linear scaling rule of MAE and the authors, unless lr is set."""
        return self.base_lr * self.batch_size / 256 if self.lr is None else self.lr


# Stages 2 and 2.1 as the authors released them: lr = 3e-6 x batch / 256
# (2.4e-5 at their 2048 = 512 x 4 GPUs), 30 epochs with 5 of warm-up, AdamW
# (0.9, 0.95) with weight decay 0.05, clipping at 3.0. Stage 2 passes the
# frozen encoder's input through the structured token drop at 0.3; stage 2.1
# is stage 2 on a smaller target-domain caption set, without it.
PAPER_STAGE2 = Recipe(batch_size=2048, base_lr=3e-6, epochs=30, warmup_epochs=5, token_drop=0.3)
PAPER_STAGE21 = Recipe(batch_size=2048, base_lr=3e-6, epochs=30, warmup_epochs=5, token_drop=0.0)

RECIPES: dict[tuple[str, str], Recipe] = {
    # A few hundred steps on the built-in data: a larger learning rate and a
    # faster-moving EMA target, since the paper's 0.99995 would leave the target
    # at its random initialisation for a run this short.
    ("1", "tiny"): Recipe(batch_size=64, base_lr=2e-3, epochs=40, warmup_epochs=2, ema_decay=(0.995, 0.999)),
    ("1", "base"): Recipe(),
    ("1", "large"): Recipe(),
    # Stage 2 on the built-in data fine-tunes all-MiniLM-L6-v2 at 1e-4 for 8
    # epochs; stage 2.1 refines on the built-in "refine" subset at 2.5e-5.
    ("2", "tiny"): Recipe(batch_size=64, base_lr=4e-4, epochs=8, warmup_epochs=0.5, betas=(0.9, 0.999),
                          token_drop=0.3),
    ("2", "base"): PAPER_STAGE2,
    ("2", "large"): PAPER_STAGE2,
    ("2.1", "tiny"): Recipe(batch_size=64, base_lr=1e-4, epochs=6, warmup_epochs=0.5, betas=(0.9, 0.999)),
    ("2.1", "base"): PAPER_STAGE21,
    ("2.1", "large"): PAPER_STAGE21,
}


def defaults_by_stage(name: str, stages: tuple[str, ...], fmt: str = "{:g}") -> str:
    """The value of Recipe.<name> in each stage's rows, as text: 'stage 1: tiny 64, base/large 2048; ...'."""
    per_stage = []
    for stage in stages:
        presets_by_value = {}
        for (s, preset), recipe in RECIPES.items():
            value = getattr(recipe, name)
            if s == stage:
                shown = " ".join(map(fmt.format, value)) if isinstance(value, tuple) else fmt.format(value)
                presets_by_value.setdefault(shown, []).append(preset)
        per_preset = [f"{'/'.join(presets)} {shown}" for shown, presets in presets_by_value.items()]
        per_stage.append(f"stage {stage}: {', '.join(per_preset) if len(per_preset) > 1 else [*presets_by_value][0]}")
    return "; ".join(per_stage)


def recipes_table() -> str:
    """RECIPES as a text table (train.py's --help ends with it)."""
    rows = [f"  {'stage':5s} {'preset':6s} {'batch':>5s} {'base_lr':>8s} {'epochs':>6s} {'warm-up':>7s} "
            f"{'betas':>12s} {'ema_decay':>18s} {'clap_weight':>11s} {'token_drop':>10s}"]
    for (stage, preset), r in RECIPES.items():  # EMA and lambda are stage 1's alone, the token drop 2 and 2.1's
        ema, clap = (str(r.ema_decay), f"{r.clap_weight:g}") if stage == "1" else ("-", "-")
        drop = f"{r.token_drop:g}" if stage != "1" else "-"
        rows.append(f"  {stage:5s} {preset:6s} {r.batch_size:5d} {r.base_lr:8.2e} {r.epochs:6g} {r.warmup_epochs:7g} "
                    f"{str(r.betas):>12s} {ema:>18s} {clap:>11s} {drop:>10s}")
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# Schedules: the learning rate and the EMA decay of each step


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up from 0 to peak_lr, then cosine decay to 0 at total_steps.

    As the authors' steps run it (MAE's util/lr_sched.py, called with the
    fractional epoch before each step): step s of the warm-up runs at
    peak * s / warmup_steps, so the first step has rate 0 and moves only
    AdamW's moments.
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def ema_decay_at(step: int, total_steps: int, start: float, end: float) -> float:
    """EMA decay rising linearly from start to end over the whole run (Recipe.ema_decay)."""
    return start + (end - start) * min(step, total_steps) / max(total_steps, 1)


def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


# -----------------------------------------------------------------------------
# One optimiser step


def make_optimizer(model: m2d.M2DCLAP, recipe: Recipe) -> torch.optim.AdamW:
    """Fused AdamW with the recipe's betas, weight decay on 2-D weights only, at the recipe's peak lr."""
    return torch.optim.AdamW(model.param_groups(recipe.weight_decay), lr=recipe.peak_lr, betas=recipe.betas,
                             fused=True)


def train_step(model: m2d.M2DCLAP, stepper: runs.Stepper, micro_batches: list, clap_weight: float,
               ema_decay: float | None, token_drop: float = 0.0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One optimiser step of M2D-CLAP over the micro-batches [(log_mel, text), ...] already on the device.

    The losses of losses.m2d_clap_loss drive runs.Stepper.step (accumulation,
    autocast, loss scaling, clipping, fused AdamW, a non-finite step skipped
    on the device). ema_decay None means stages 2 and 2.1: the encoder is
    frozen and its input passes through the token drop. After the step the
    logit scale is clamped and, in stage 1, the EMA target follows the online
    encoder; on a skipped step the decay becomes 1, so the target stays
    exactly as it was. Returns each loss averaged over micro-batches, the
    gradient norm and the step's finite flag, all as device tensors.
    """
    frozen_encoder = ema_decay is None

    def losses(mel, text):
        outputs = stepper.forward(mel, text, frozen_encoder=frozen_encoder, token_drop=token_drop)
        return m2d_clap_loss(outputs, model.logit_scale, clap_weight)

    sums, grad_norm, finite = stepper.step(micro_batches, losses)
    model.clamp_logit_scale()
    if not frozen_encoder:  # every rank holds the same online weights, so the same target
        model.ema_update(torch.where(finite, ema_decay, 1.0))
    return sums, grad_norm, finite
