"""Tests of losses.py against values computed by hand."""

import math

import pytest
import torch

from losses import ClapLoss, gather_features, m2d_loss


def test_m2d_loss_is_two_minus_two_cosine_of_the_standardised_target():
    prediction = torch.tensor([[[1.0, 0.0, 0.0]]])
    target = torch.tensor([[[2.0, 4.0, 6.0]]])
    # standardised target: (-1, 0, 1) * sqrt(1.5)-ish; cosine with (1, 0, 0) is -1/sqrt(2)
    assert m2d_loss(prediction, target).item() == pytest.approx(2 + 2 / math.sqrt(2), rel=1e-5)
    # without standardisation: cos = 2 / sqrt(56)
    assert m2d_loss(prediction, target, standardize_target=False).item() == pytest.approx(
        2 - 2 * 2 / math.sqrt(56), rel=1e-5)


def test_m2d_loss_averages_over_patches_and_clips_and_ignores_scale():
    torch.manual_seed(0)
    prediction, target = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    centred = target - target.mean(-1, keepdim=True)
    per_patch = [2 - 2 * torch.dot(p, t) / (p.norm() * t.norm())
                 for p, t in zip(prediction.reshape(-1, 8), centred.reshape(-1, 8))]
    expected = torch.stack(per_patch).mean()
    assert m2d_loss(prediction, target).item() == pytest.approx(expected.item(), rel=1e-5)
    assert m2d_loss(prediction * 3, target * 7 + 1).item() == pytest.approx(expected.item(), rel=1e-4)


def test_m2d_loss_is_zero_for_a_perfect_prediction():
    torch.manual_seed(0)
    target = torch.randn(2, 4, 16)
    standardised = (target - target.mean(-1, keepdim=True)) / target.std(-1, unbiased=False, keepdim=True)
    assert m2d_loss(standardised, target).item() == pytest.approx(0.0, abs=1e-5)


def hand_clap_loss(audio, text, scale):
    """Symmetric cross-entropy written out with explicit sums."""
    a = [v / v.norm() for v in audio]
    t = [v / v.norm() for v in text]
    n = len(a)
    sim = [[scale * float(a[i] @ t[j]) for j in range(n)] for i in range(n)]
    a2t = -sum(sim[i][i] - math.log(sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n)) / n
    t2a = -sum(sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n)) / n
    return (a2t + t2a) / 2


def test_clap_loss_matches_the_hand_computed_symmetric_cross_entropy():
    torch.manual_seed(0)
    audio, text = torch.randn(6, 16), torch.randn(6, 16)
    logit_scale = torch.tensor(math.log(1 / 0.07))
    loss = ClapLoss()(audio, text, logit_scale)
    assert loss.item() == pytest.approx(hand_clap_loss(audio, text, 1 / 0.07), rel=1e-5)


def test_clap_loss_uses_the_logit_scale_as_it_is_and_its_gradient_lives_at_the_ceiling():
    # The parameter is clamped after each optimiser step (model.clamp_logit_scale), not in the loss:
    # a clamp in the loss would cut the gradient once the scale reaches log 100.
    torch.manual_seed(0)
    audio, text = torch.randn(4, 8), torch.randn(4, 8)
    assert ClapLoss()(audio, text, torch.tensor(3.0)).item() == pytest.approx(
        hand_clap_loss(audio, text, math.exp(3.0)), rel=1e-5)
    at_ceiling = torch.tensor(math.log(100.0), requires_grad=True)
    ClapLoss()(audio, text, at_ceiling).backward()
    assert at_ceiling.grad.abs().item() > 1e-3


def test_clap_loss_is_low_for_matched_pairs_and_trains_the_scale():
    torch.manual_seed(0)
    text = torch.randn(8, 16)
    logit_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    matched = ClapLoss()(text + 0.01 * torch.randn(8, 16), text, logit_scale)
    shuffled = ClapLoss()(text.roll(1, 0), text, logit_scale)
    assert matched.item() < 0.1 < math.log(8) < shuffled.item()
    matched.backward()
    assert logit_scale.grad.item() < 0  # a sharper softmax would lower the loss further


def test_gather_is_the_identity_in_one_process():
    audio, text = torch.randn(3, 4), torch.randn(3, 4)
    gathered = gather_features(audio, text)
    assert gathered[0] is audio and gathered[1] is text
