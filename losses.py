"""The two losses of M2D-CLAP stage 1, and captioning's. Imports torch only.

- m2d_loss: 2 - 2 cos(prediction, standardised target), over masked patches.
- ClapLoss: symmetric InfoNCE between audio and text embeddings with a learned
  temperature. How the loss is defined is separate from how features are
  gathered across data-parallel ranks (gather_features).
- m2d_clap_loss: the training loss of a step and its parts, from the model's
  training forward: L = L_M2D + lambda * L_CLAP in stage 1, L_CLAP alone on a
  frozen encoder (stages 2 and 2.1).
- caption_loss: teacher-forced cross-entropy of a captioner (caption.py),
  padding left out.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def standardize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each vector over its last dimension to mean 0, variance 1."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def m2d_loss(prediction: torch.Tensor, target: torch.Tensor, standardize_target: bool = True) -> torch.Tensor:
    """M2D loss, [B, Nm, D] each -> scalar.

    2 - 2 cos is the squared distance of the L2-normalised vectors, averaged
    over masked patches and clips. The target is standardised per vector first
    (on by default); only its centring matters, since cosine ignores scale.
    """
    target = target.float()
    if standardize_target:
        target = standardize(target)
    cos = F.cosine_similarity(prediction.float(), target, dim=-1, eps=1e-8)  # [B, Nm]
    return (2 - 2 * cos).mean()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def gather_features(audio: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate [B, E] features from every data-parallel rank -> [W*B, E].

    all_gather returns tensors without gradient, so the local rank's own slot is
    replaced by its local tensors: gradients then flow to this rank's features,
    and the other ranks' features act as extra negatives. Every rank computes
    the loss of the whole gathered batch but back-propagates only into its own
    features, and DistributedDataParallel then averages the W ranks' gradients;
    so the local features' gradient is scaled by W, and the averaged gradient
    equals that of the global-batch loss in one process. Without an
    initialised process group (one process) this is the identity.
    """
    if world_size() == 1:
        return audio, text
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered = []
    for local in (audio, text):
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.detach().contiguous())
        parts[rank] = _ScaleGrad.apply(local, float(world))
        gathered.append(torch.cat(parts, dim=0))
    return gathered[0], gathered[1]


class ClapLoss(nn.Module):
    """Symmetric contrastive loss with the audio-text pairs on the diagonal.

    logits = exp(s) * a @ t^T with L2-normalised a and t, s the model's learned
    logit_scale (the training loop clamps the parameter to [0, 4.6052] after
    each optimiser step, so the loss uses it as it is); the loss is the mean
    of the audio->text and text->audio cross-entropies, over the batch
    gathered from all data-parallel ranks (see gather_features).
    """

    def __init__(self, gather=gather_features):
        super().__init__()
        self.gather = gather

    def forward(self, audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        audio = F.normalize(audio.float(), dim=-1)  # [B, E]
        text = F.normalize(text.float(), dim=-1)    # [B, E]
        audio, text = self.gather(audio, text)      # [W*B, E]
        scale = logit_scale.float().exp()
        logits = scale * audio @ text.T             # [W*B, W*B], rows audio, columns text
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def m2d_clap_loss(outputs: tuple[torch.Tensor, ...], logit_scale: torch.Tensor, clap_weight: float,
                  clap_loss: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The loss of a training step and its parts, from M2DCLAP.forward's outputs.

    Stage 1, outputs (prediction, target, audio, text): L = L_M2D + lambda * L_CLAP,
    lambda = clap_weight. On a frozen encoder, outputs (audio, text): L = L_CLAP.
    Returns {"loss": L, "loss_m2d": L_M2D (stage 1 only), "loss_clap": L_CLAP}.
    """
    clap_loss = ClapLoss() if clap_loss is None else clap_loss
    if len(outputs) == 2:
        loss_clap = clap_loss(*outputs, logit_scale)
        return {"loss": loss_clap, "loss_clap": loss_clap}
    prediction, target, audio, text = outputs
    loss_m2d = m2d_loss(prediction, target)
    loss_clap = clap_loss(audio, text, logit_scale)
    return {"loss": loss_m2d + clap_weight * loss_clap, "loss_m2d": loss_m2d, "loss_clap": loss_clap}


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Teacher-forced cross-entropy of a captioner: logits [B, L, V], targets [B, L] -> the mean over real tokens.

    Padding (pad_id) is not a token of any caption and counts for nothing;
    every other position, the end token included, counts once.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad_id)
