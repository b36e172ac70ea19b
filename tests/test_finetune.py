"""Tests of finetune.py and model.py's fine-tuning section: position-table stretching, the structured
token drop, the schedule, mixup, losses, AudioSet sampling weights, the reporting rules, model.AudioClassifier,
and one training step against a reference written out here."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import features
import finetune as ft
import metrics
import model as m2d

SMALL = m2d.preset("tiny", embed_dim=32, depth=2, num_heads=2, crop_frames=64, predictor_dim=16,
                   predictor_depth=1, predictor_heads=2, text_dim=16)  # 5 x 4 grid


def small_encoder(seed: int = 0) -> m2d.M2DCLAP:
    torch.manual_seed(seed)
    return m2d.M2DCLAP(SMALL, norm_stats=(-7.2, 4.3))


# --- position table --------------------------------------------------------------------------


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the 4 neighbours at distances 1 + t, t, 1 - t, 2 - t."""
    def w(d):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a if d < 2 else 0.0
    return [w(1 + t), w(t), w(1 - t), w(2 - t)]


def reference_stretch(row: np.ndarray, new_len: int) -> np.ndarray:
    """One frequency row [T_old, D] resized along time, align_corners=False, edge samples repeated."""
    old_len = row.shape[0]
    out = np.zeros((new_len, row.shape[1]))
    for j in range(new_len):
        src = (j + 0.5) * old_len / new_len - 0.5
        base = math.floor(src)
        for k, w in zip(range(base - 1, base + 3), cubic_weights(src - base)):
            out[j] += w * row[min(max(k, 0), old_len - 1)]
    return out


def test_longer_input_stretches_the_stored_table_bicubically_along_time():
    table = m2d.sincos_2d(16, 5, 4)[None]                          # [1, 1 + 20, 16]
    stretched = m2d.stretch_pos_table(table, 5, 4, 7)               # [1, 1 + 35, 16]
    assert stretched.shape == (1, 1 + 35, 16)
    assert torch.equal(stretched[0, 0], table[0, 0])               # CLS row untouched
    grid = table[0, 1:].double().numpy().reshape(5, 4, 16)
    expected = np.stack([reference_stretch(grid[f], 7) for f in range(5)]).reshape(35, 16)
    np.testing.assert_allclose(stretched[0, 1:].numpy(), expected, atol=1e-6)
    # Not a rebuilt sin-cos table of the new size.
    assert not torch.allclose(stretched, m2d.sincos_2d(16, 5, 7)[None], atol=1e-3)


def test_shorter_input_keeps_the_first_columns():
    table = m2d.sincos_2d(16, 5, 6)[None]
    short = m2d.stretch_pos_table(table, 5, 6, 2)
    grid = table[0, 1:].reshape(5, 6, 16)
    assert torch.equal(short[0, 1:].reshape(5, 2, 16), grid[:, :2])
    assert torch.equal(m2d.stretch_pos_table(table, 5, 6, 6), table)


# --- structured token drop -------------------------------------------------------------------


@pytest.mark.parametrize("u,nf,kept", [(0.0, 0, 155), (0.3, 1, 172), (0.6, 2, 168), (0.9, 3, 124)])
def test_structured_token_drop_counts_and_which_tokens_each_mode_keeps(u, nf, kept):
    assert m2d.structured_drop_counts(5, 62, 0.5, u)[0] == nf
    g = torch.Generator().manual_seed(3)
    flags = m2d.structured_drop_flags(4, 5, 62, 0.5, g, u=u)
    assert all(int((~f).sum()) == kept for f in flags)              # same count for every clip
    flat = flags.flatten(1)
    for b, ids in enumerate(m2d.kept_token_ids(flags, keep="unflagged")):
        assert set(ids.tolist()) == set(torch.nonzero(~flat[b]).flatten().tolist())
    for b, ids in enumerate(m2d.kept_token_ids(flags)):              # the authors' behaviour
        flagged = set(torch.nonzero(flat[b]).flatten().tolist())
        ids = set(ids.tolist())
        assert len(ids) == kept
        assert flagged <= ids if len(flagged) <= kept else ids <= flagged


def test_structured_token_drop_gathers_the_kept_tokens_of_patch_tokens():
    tokens = torch.randn(3, 5 * 62, 8)
    kept, ids = m2d.structured_token_drop(tokens, 5, 62, 0.3, torch.Generator().manual_seed(0))
    assert kept.shape[:2] == ids.shape and ids.shape[0] == 3
    assert torch.equal(kept[1], tokens[1, ids[1]])
    with pytest.raises(ValueError, match="keep"):
        m2d.kept_token_ids(torch.zeros(1, 5, 62, dtype=torch.bool), keep="visible")


# --- schedule ----------------------------------------------------------------------------------


def test_schedule_warms_up_from_zero_and_counts_the_cosine_from_epoch_zero():
    as2m = ft.FINETUNE_RECIPES["as2m"]
    assert ft.lr_of_epoch(0.0, as2m) == 0.0
    assert ft.lr_of_epoch(7.5, as2m) == pytest.approx(1.0)
    assert ft.lr_of_epoch(15.0, as2m) / as2m.lr == pytest.approx(0.891, abs=5e-4)
    assert ft.lr_of_epoch(70.0, as2m) == as2m.lr_min
    # The authors' loop runs step k with the rate of step k - 1's fractional epoch.
    assert ft.lr_of_iteration(0, 10, as2m) == 0.0
    assert ft.lr_of_iteration(1, 10, as2m) == 0.0
    assert ft.lr_of_iteration(12, 10, as2m) == ft.lr_of_epoch(1.1, as2m)


# --- mixup, band masks, losses -----------------------------------------------------------------


def test_mixup_mixes_inputs_and_labels_with_one_lambda_per_clip():
    batch = 6
    x = torch.arange(batch, dtype=torch.float32)[:, None, None].expand(batch, 4, 5).clone()  # clip i is all i
    y = torch.eye(batch)
    g = torch.Generator().manual_seed(0)
    xm, ym = ft.mixup(x, y, 0.5, g)
    g = torch.Generator().manual_seed(0)
    torch.randint(2**62, (1,), generator=g)
    perm = torch.randperm(batch, generator=g)
    lam = ym[torch.arange(batch), torch.arange(batch)]                # own class keeps lam (perm[b] != b)
    for b in range(batch):
        if perm[b] == b:
            assert torch.allclose(xm[b], x[b]) and torch.equal(ym[b], y[b])
            continue
        assert torch.allclose(xm[b], lam[b] * b + (1 - lam[b]) * perm[b].float())
        assert ym[b, perm[b]] == pytest.approx(1 - lam[b].item())
    assert len(set(lam.tolist())) > 1
    assert ft.mixup(x, y, 0.0, g)[0] is x


def test_band_masks_zero_one_band_per_axis_for_the_whole_batch():
    x = torch.ones(4, 1, 80, 100)
    out = ft.band_masks(x, 30, 48, torch.Generator().manual_seed(5))
    zero_rows = (out[0, 0] == 0).all(dim=1).nonzero().flatten()
    zero_cols = (out[0, 0] == 0).all(dim=0).nonzero().flatten()
    assert 0 < len(zero_rows) < 30 and 0 < len(zero_cols) < 48
    assert torch.equal(zero_rows, torch.arange(zero_rows[0], zero_rows[-1] + 1))
    assert all(torch.equal(out[0], out[b]) for b in range(4))


def test_random_resized_crop_keeps_the_shape_and_changes_each_clip_differently():
    x = torch.randn(3, 1, 80, 50).expand(3, 1, 80, 50).clone()
    out = ft.random_resized_crop(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert not torch.allclose(out[0], out[1])


def test_loss_is_bce_for_multi_label_and_cross_entropy_over_classes_for_single_label():
    logits = torch.randn(4, 5)
    multi_hot = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 0, 0]]).float()
    p = torch.sigmoid(logits)
    bce = -(multi_hot * p.log() + (1 - multi_hot) * (1 - p).log()).mean()
    assert ft.finetune_loss(logits, multi_hot, "bce") == pytest.approx(bce.item(), rel=1e-5)
    labels = torch.tensor([0, 3, 4, 1])
    one_hot = F.one_hot(labels, 5).float()
    assert ft.finetune_loss(logits, one_hot, "ce") == pytest.approx(F.cross_entropy(logits, labels).item() / 5,
                                                                    rel=1e-5)


# --- sampling weights and metrics --------------------------------------------------------------


def test_audioset_sampling_weights_on_a_small_table():
    targets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]]).float()  # counts 3, 1, 1
    w0, w1 = 1000 / 3.01, 1000 / 1.01
    expected = [w0 ** (1 / 1.5), (w0 + w1) ** (1 / 1.5), w1 ** (1 / 1.5), w0 ** (1 / 1.5)]
    weights = ft.audioset_sampling_weights(targets)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-12)
    weighted = ft.FinetuneRecipe(sampling="weighted", clips_per_epoch=10, batch_size=3)
    batches = ft.epoch_batches(4, weighted, torch.Generator().manual_seed(0), weights)
    assert [len(b) for b in batches] == [3, 1]                      # capped at the split, without replacement
    assert sorted(torch.cat(batches).tolist()) == [0, 1, 2, 3]


def test_the_reported_metric_and_the_spread_over_seeds():
    assert ft.recipe("as20k").metric == "mAP" and ft.recipe("esc50").metric == "accuracy"
    assert metrics.seed_summary([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert metrics.seed_summary([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}


# --- the model and one training step against a reference written out here ----------------------


def test_token_drop_runs_in_training_mode_only_and_stacked_features_stack_rows():
    model = m2d.AudioClassifier.from_encoder(small_encoder(), 3, 64, token_drop_ratio=0.5)
    lengths = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    x = torch.randn(2, 1, 80, 64)
    model.train()(x, torch.Generator().manual_seed(0))
    model.eval()(x)
    assert lengths[0] < 1 + 20 and lengths[1] == 1 + 20
    stacked = m2d.AudioClassifier.from_encoder(small_encoder(), 3, 64, feature="stacked")
    tokens = torch.randn(2, 20, 32)
    expected = torch.cat([tokens.reshape(2, 5, 4, 32)[:, f] for f in range(5)], dim=-1).mean(dim=1)
    assert torch.allclose(stacked.pool(tokens), expected, atol=1e-6)


def reference_logits(p: dict, x: torch.Tensor, norm_stats, pos: torch.Tensor, heads: int) -> tuple:
    """The encoder and head written out by hand (the paper's ViT, the authors' EVAR head).

    Returns the logits and the batch feature statistics."""
    x = (x - norm_stats[0]) / norm_stats[1]
    patches = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=16)  # [B, D, F, T]
    B, D = patches.shape[:2]
    h = torch.cat([(p["cls_token"] + pos[:, :1]).expand(B, 1, D), patches.flatten(2).transpose(1, 2) + pos[:, 1:]], 1)
    for i in range(SMALL.depth):
        def ln(z, name):
            return F.layer_norm(z, (D,), p[f"blocks.{i}.{name}.weight"], p[f"blocks.{i}.{name}.bias"], eps=1e-6)
        qkv = ln(h, "norm1") @ p[f"blocks.{i}.attn.qkv.weight"].T + p[f"blocks.{i}.attn.qkv.bias"]
        q, k, v = qkv.reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)   # [B, H, L, D/H] each
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1)
        o = (attention @ v).transpose(1, 2).reshape(B, -1, D)
        h = h + o @ p[f"blocks.{i}.attn.proj.weight"].T + p[f"blocks.{i}.attn.proj.bias"]
        hidden = F.gelu(ln(h, "norm2") @ p[f"blocks.{i}.mlp.fc1.weight"].T + p[f"blocks.{i}.mlp.fc1.bias"])
        h = h + hidden @ p[f"blocks.{i}.mlp.fc2.weight"].T + p[f"blocks.{i}.mlp.fc2.bias"]
    h = F.layer_norm(h, (D,), p["norm.weight"], p["norm.bias"], eps=1e-6)
    feature = h[:, 1:].mean(dim=1)
    mean, var = feature.mean(dim=0), feature.var(dim=0, unbiased=False)
    normed = (feature - mean) / torch.sqrt(var + 1e-5)
    return normed @ p["head.weight"].T + p["head.bias"], mean, feature.var(dim=0, unbiased=True)


@pytest.mark.parametrize("loss,optimizer", [("ce", "sgd"), ("bce", "adamw")])
def test_one_step_without_augmentation_equals_the_written_out_reference(loss, optimizer):
    recipe = ft.FinetuneRecipe(optimizer=optimizer, lr=0.1, batch_size=4, mixup_alpha=0.0, freq_mask_bins=0,
                               time_mask_frames=0, random_resized_crop=False, token_drop_ratio=0.0,
                               raw_input="log_mel", input_frames=96, loss=loss)
    model = ft.classifier_for(small_encoder(), 3, recipe, torch.Generator().manual_seed(1))  # table 4 -> 6 columns
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
    clips = [torch.randn(80, 96) * 3 - 7 for _ in range(4)]
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0] if loss == "bce" else [0, 1, 0]]).float()
    grads = {}  # the step sets .grad to None after the update: keep each gradient as it is accumulated
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.clone()))

    stepper = ft.make_stepper(model, recipe)
    sums, finite = ft.finetune_step(stepper, clips, targets, recipe, torch.Generator().manual_seed(0), lr=0.1)
    step_loss = float(sums["loss"])
    assert finite

    logits, batch_mean, batch_var = reference_logits(params, torch.stack(clips)[:, None], (-7.2, 4.3),
                                                     model.pos_embed, SMALL.num_heads)
    if loss == "bce":
        prob = torch.sigmoid(logits)
        ref_loss = -(targets * prob.log() + (1 - targets) * (1 - prob).log()).mean()
    else:
        ref_loss = -(targets * torch.log_softmax(logits, dim=-1)).sum() / (4 * 3)
    ref_loss.backward()
    assert step_loss == pytest.approx(ref_loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        if name not in params:
            continue
        g = params[name].grad
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6), name
        w = params[name].detach()
        if optimizer == "sgd":      # first step: the momentum buffer is the gradient
            expected = w - 0.1 * g
        else:  # AdamW first step, amsgrad: m and v bias-corrected to g and g^2; g / |g| needs the step's own g
            expected = w * (1 - 0.1 * 1e-4) - 0.1 * grads[name] / (grads[name].abs() + 1e-8)
        assert torch.allclose(p.detach(), expected, rtol=1e-4, atol=1e-5), name
    assert torch.allclose(model.head_norm.running_mean, 0.1 * batch_mean.detach(), atol=1e-6)
    assert torch.allclose(model.head_norm.running_var, 0.9 + 0.1 * batch_var.detach(), atol=1e-5)


def test_frozen_patch_embedding_and_position_table_do_not_change():
    recipe = ft.recipe("esc50", input_frames=48, batch_size=2, raw_input="log_mel", freq_mask_bins=0,
                       time_mask_frames=0)
    model = ft.classifier_for(small_encoder(), 2, recipe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ft.finetune_step(ft.make_stepper(model, recipe), [torch.randn(80, 60) - 7 for _ in range(2)],
                     torch.eye(2), recipe, torch.Generator().manual_seed(0), lr=0.5)
    after = model.state_dict()
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "norm_stats"):
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert model.pos_embed.shape == (1, 1 + 5 * 3, 32)


# --- the loop --------------------------------------------------------------------------------


def test_fit_on_waveforms_selects_the_best_validation_epoch_and_tests_it_once():
    recipe = ft.recipe("spcv2", input_frames=33, encoder_frames=48, batch_size=4, epochs=2, warmup_epochs=1,
                       freq_mask_bins=10, time_mask_frames=8)
    model = ft.classifier_for(small_encoder(), 2, recipe, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    waves = [0.1 * torch.randn(5000, generator=g) for _ in range(8)]   # longer than 33 frames: cropped
    split = data.ClipSet(waves, torch.eye(2).repeat(4, 1))
    epochs = []
    trainer = ft.Trainer(model, recipe, ft.make_stepper(model, recipe), order=g, augment=g)
    result = ft.fit(trainer, split, split, split, on_epoch=lambda state: epochs.append(state.epoch))
    assert epochs == [1, 2] and trainer.state.step == 4                # 8 clips in batches of 4, twice
    nan = data.ClipSet([w * float("nan") for w in waves], split.targets)
    trainer.state.epoch, weights = 1, {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.guard = ft.runs.NonFiniteGuard(2, "resume.pt", print_fn=lambda *a, **k: None)
    with pytest.raises(ft.runs.NonFiniteError, match="2 steps in a row"):
        ft.fit(trainer, nan, None, split)                               # skipped with a warning, then stopped
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())  # the steps changed no weight
    assert len(result["history"]) == 2 and result["best_epoch"] in (1, 2)  # counted from 1, as the progress lines
    assert result["state"]["pos_embed"].shape == (1, 1 + 5 * 3, 32)
    with pytest.raises(ValueError, match="raw_input='wave'"):
        ft.predict(model, [torch.randn(80, 33)], recipe)


# --- the small-data recipe -------------------------------------------------------------------


def test_a_recipe_of_input_frames_0_sizes_itself_to_the_longest_clip_and_its_time_band_to_that():
    small = ft.recipe("small")
    assert small.input_frames == 0 and small.time_mask_share == 0.1
    words = ft.sized_to_clips(small, 402)                  # a 4-s clip: every clip seen whole
    assert (words.input_frames, words.encoder_frames, words.time_mask_frames) == (402, 416, 40)
    assert words.time_mask_share == 0.0                    # settled: the record says the band used
    assert ft.sized_to_clips(small, 101).time_mask_frames == 10     # a 1-s set loses 10 % of a clip, not half
    assert ft.sized_to_clips(small, 60_000).input_frames == ft.MAX_INPUT_FRAMES
    esc50 = ft.recipe("esc50")
    assert ft.sized_to_clips(esc50, 60_000) == esc50       # the authors' recipes keep their lengths
    with pytest.raises(ValueError, match="--input-frames -1: must be at least 0"):
        ft.recipe("small", input_frames=-1)


def test_the_probe_head_is_the_linear_probe_of_the_classifiers_own_features():
    # LP-FT's first step: after probe_head the classifier (eval mode) predicts what a linear classifier fitted
    # on its frozen, standardised clip features predicts, and fits separable clips before any fine-tuning
    recipe = ft.recipe("small", input_frames=48, encoder_frames=48, batch_size=4)
    g = torch.Generator().manual_seed(0)
    model = ft.classifier_for(small_encoder(), 2, recipe, g)
    t = torch.arange(7520) / 16000
    waves = [torch.sin(2 * torch.pi * (300 if i % 2 else 2000) * t) * 0.3 + 0.01 * torch.randn(7520, generator=g)
             for i in range(10)]
    train = data.ClipSet(waves, torch.eye(2).repeat(5, 1)[[1, 0] * 5])
    encoder_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head")}
    ft.probe_head(model, train, recipe, seed=43)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in encoder_before.items())  # the encoder is frozen
    x = torch.stack([features.start_crop(w, recipe.crop_length) for w in waves])
    with torch.no_grad():
        feats = model.clip_feature(features.classifier_input(x, "wave", model))
    mean, var = feats.mean(0), feats.var(0, unbiased=False)
    linear = features.fit_linear((feats - mean) / torch.sqrt(var + 1e-5), train.targets, False, seed=43)
    logits = ft.predict(model, waves, recipe)
    assert torch.allclose(logits, linear((feats - mean) / torch.sqrt(var + 1e-5)), atol=1e-4)
    assert torch.equal(logits.argmax(1), train.targets.argmax(1))


def test_masked_padding_reads_every_clip_as_the_frozen_probe_reads_it():
    # short clips (padded), one that fills the input, and long ones (evaluated crop by crop): the head's input is
    # the frozen encoder's clip feature of features.clip_features, so LP-FT starts exactly at the frozen probe
    encoder = small_encoder().eval()
    recipe = ft.sized_to_clips(ft.recipe("small"), 200, encoder_frames=SMALL.crop_frames)
    assert (recipe.padding, recipe.input_frames, recipe.encoder_frames) == ("masked", 64, 64)  # the table unstretched
    model = ft.classifier_for(encoder, 3, recipe, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    waves = [0.1 * torch.randn(n, generator=g) for n in (2400, 5000, 63 * 160, 12000, 31000)]
    frozen = features.clip_features(encoder, [data.log_mel(w) for w in waves])
    mine = features.classifier_features(model, waves, "wave", recipe.input_frames, 2, "masked")
    assert torch.allclose(mine, frozen, atol=1e-5)
    counted = features.classifier_features(model, waves, "wave", recipe.input_frames, 2, "counted")
    assert not torch.allclose(counted[0], frozen[0], atol=1e-2)   # the authors' way counts a short clip's padding
    logits = ft.predict(model, waves, recipe)
    assert torch.allclose(logits, model.head(model.head_norm(frozen)), atol=1e-4)


def test_masked_padding_hides_what_lies_past_a_clips_end_in_training_too():
    model = ft.classifier_for(small_encoder(), 2, ft.recipe("small", input_frames=64, encoder_frames=64),
                              torch.Generator().manual_seed(0)).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 80, 64, generator=g)
    noisy = x.clone()
    frames = torch.tensor([20, 64, 33])
    noisy[0, ..., 20:] = 5.0                                # whatever the padding holds: silence, noise, another clip
    noisy[2, ..., 33:] = -3.0
    a, b = model.clip_feature(x, frames=frames), model.clip_feature(noisy, frames=frames)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(model.clip_feature(x), model.clip_feature(noisy), atol=1e-3)  # counted: it leaks in
    a[0].sum().backward()                                   # and the clip's gradient flows through its own tokens
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert ft.own_frames([torch.zeros(3199), torch.zeros(50000)], ft.recipe("small", input_frames=64)).tolist() == [20, 64]
    with pytest.raises(ValueError, match="--padding masked"):
        ft.recipe("small", mixup_alpha=0.3)
    with pytest.raises(ValueError, match="token drop needs every token"):
        m2d.AudioClassifier(SMALL, 2, token_drop_ratio=0.5).train().clip_feature(x, frames=frames)


def test_the_rule_last_keeps_the_last_epoch_even_when_an_earlier_one_scored_higher(monkeypatch):
    recipe = ft.recipe("small", input_frames=33, encoder_frames=48, batch_size=4, epochs=3, warmup_epochs=1,
                       head_init="random", head_refit=False, wise_ft=1.0)
    model = ft.classifier_for(small_encoder(), 2, recipe, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    split = data.ClipSet([0.1 * torch.randn(5000, generator=g) for _ in range(8)], torch.eye(2).repeat(4, 1))
    accuracies = iter([90.0, 60.0, 40.0])  # epoch 1 the best on the test clips: the rule never looks
    monkeypatch.setattr(ft.metrics, "classification_scores", lambda scores, targets: {"accuracy": next(accuracies, 0.0)})
    trainer = ft.Trainer(model, recipe, ft.make_stepper(model, recipe), order=g, augment=g)
    result = ft.fit(trainer, split, None, split)
    assert result["best_epoch"] == 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in result["state"].items())


def test_wise_ft_reports_the_average_of_the_start_and_the_fine_tuned_weights_and_trains_on_its_own():
    recipe = ft.recipe("small", input_frames=33, encoder_frames=48, batch_size=4, epochs=2, warmup_epochs=1,
                       head_init="random", head_refit=False, lr=0.05)
    assert recipe.wise_ft == 0.5
    model = ft.classifier_for(small_encoder(), 2, recipe, torch.Generator().manual_seed(0))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    split = data.ClipSet([0.1 * torch.randn(5000, generator=g) for _ in range(8)], torch.eye(2).repeat(4, 1))
    trainer = ft.Trainer(model, recipe, ft.make_stepper(model, recipe), order=g, augment=g)
    result = ft.fit(trainer, split, None, split)
    tuned = model.state_dict()                                   # the model goes on with its own weights
    for k, v in result["state"].items():
        if v.is_floating_point():
            assert torch.allclose(v, (start[k] + tuned[k]) / 2, atol=1e-6), k
    assert not torch.equal(result["state"]["blocks.0.attn.qkv.weight"], tuned["blocks.0.attn.qkv.weight"])
    model.load_state_dict(result["state"])
    assert torch.equal(result["test_scores"], ft.predict(model, split.clips, recipe))  # the score is the average's
    assert result["last_score"] == result["history"][-1]["test"]["accuracy"]          # the tuned weights' beside it


def test_head_refit_fits_the_head_again_on_the_averaged_encoder_and_reports_that():
    recipe = ft.recipe("small", input_frames=33, encoder_frames=48, batch_size=4, epochs=2, warmup_epochs=1, lr=0.05)
    assert recipe.head_refit and recipe.head_init == "probe"
    model = ft.classifier_for(small_encoder(), 2, recipe, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = torch.arange(5000) / 16000
    split = data.ClipSet([torch.sin(2 * torch.pi * (300 if i % 2 else 2000) * t) + 0.1 * torch.randn(5000, generator=g)
                          for i in range(8)], torch.eye(2).repeat(4, 1))
    ft.probe_head(model, split, recipe, seed=7)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = ft.Trainer(model, recipe, ft.make_stepper(model, recipe), order=g, augment=g, seed=7)
    result = ft.fit(trainer, split, None, split)
    tuned = model.state_dict()                                   # training went on with its own weights
    expected = ft.classifier_for(small_encoder(), 2, recipe, torch.Generator().manual_seed(0))
    expected.load_state_dict(ft.interpolated(start, tuned, 0.5))  # the WiSE-FT average ...
    ft.probe_head(expected, split, recipe, seed=7)                # ... with its head fitted again on its features
    for k, v in expected.state_dict().items():
        assert torch.equal(result["state"][k], v), k
    assert not torch.allclose(result["state"]["head.weight"], (start["head.weight"] + tuned["head.weight"]) / 2)
    assert torch.equal(result["test_scores"], ft.predict(expected, split.clips, recipe))


def test_frozen_blocks_keep_the_patch_embedding_and_the_lowest_blocks_fixed():
    recipe = ft.recipe("small", input_frames=33, encoder_frames=48, batch_size=4, frozen_blocks=1, head_init="random")
    model = ft.classifier_for(small_encoder(), 2, recipe, torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    stepper = ft.make_stepper(model, recipe)
    t = torch.arange(5000) / 16000
    tones = [torch.sin(2 * torch.pi * pitch * t) for pitch in (300, 2000, 500, 3000)]
    ft.finetune_step(stepper, tones, torch.eye(2).repeat(2, 1), recipe, g, lr=0.1)
    after = model.state_dict()
    for k in before:
        if k.startswith(("patch_embed.", "blocks.0.")):
            assert torch.equal(before[k], after[k]), k
        if k in ("blocks.1.attn.qkv.weight", "head.weight"):
            assert not torch.equal(before[k], after[k]), k
