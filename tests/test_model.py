"""Tests of model.py: masking, position tables, shapes, key names, EMA, gradients."""

import math

import numpy as np
import pytest
import torch

import model as m2d

TINY = m2d.preset("tiny", text_dim=32)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return m2d.M2DCLAP(TINY)


# --- masking ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_patches,ratio", [(60, 0.7), (310, 0.7), (65, 0.5), (16, 0.0)])
def test_masking_splits_every_clip_into_disjoint_visible_and_masked_sets(num_patches, ratio):
    g = torch.Generator().manual_seed(1)
    visible, masked, restore = m2d.random_masking(8, num_patches, ratio, generator=g)
    num_visible = int(num_patches * (1 - ratio))
    assert visible.shape == (8, num_visible)
    assert masked.shape == (8, num_patches - num_visible)
    for v, m in zip(visible.tolist(), masked.tolist()):
        assert not set(v) & set(m)
        assert sorted(v + m) == list(range(num_patches))
        assert v == sorted(v) and m == sorted(m)
    # ids_restore puts cat(visible, masked) back into grid order.
    shuffled = torch.cat([visible, masked], dim=1)
    assert torch.equal(torch.gather(shuffled, 1, restore), torch.arange(num_patches).expand(8, -1))


def test_masks_differ_between_clips():
    visible, _, _ = m2d.random_masking(16, 60, 0.7, generator=torch.Generator().manual_seed(0))
    assert len({tuple(v) for v in visible.tolist()}) == 16


# --- position tables -------------------------------------------------------------------------


def reference_sincos(dim, grid_f, grid_t):
    """The MAE formula written out per element, independently of model.py."""
    table = np.zeros((1 + grid_f * grid_t, dim))
    quarter = dim // 4
    for f in range(grid_f):
        for t in range(grid_t):
            row = 1 + f * grid_t + t
            for i in range(quarter):
                omega = 1.0 / 10000 ** (i / quarter)
                table[row, i] = math.sin(t * omega)
                table[row, quarter + i] = math.cos(t * omega)
                table[row, 2 * quarter + i] = math.sin(f * omega)
                table[row, 3 * quarter + i] = math.cos(f * omega)
    return table


def test_position_table_matches_the_mae_formula_in_frequency_major_order():
    table = m2d.sincos_2d(32, 5, 7).numpy()
    np.testing.assert_allclose(table, reference_sincos(32, 5, 7), atol=1e-6)
    assert not table[0].any()  # CLS position is all zeros


def test_position_table_is_fixed_and_cropped_for_shorter_inputs(tiny_model):
    assert "pos_embed" not in dict(tiny_model.named_parameters())
    grid_f, grid_t = TINY.grid_size
    cropped = m2d.crop_pos_table(tiny_model.pos_embed, grid_f, grid_t, 4)
    full = tiny_model.pos_embed[0, 1:].reshape(grid_f, grid_t, -1)
    assert torch.equal(cropped[0, 1:].reshape(grid_f, 4, -1), full[:, :4])


# --- shapes and names ------------------------------------------------------------------------


def test_forward_shapes(tiny_model):
    x = torch.randn(3, 1, 80, TINY.crop_frames)
    prediction, target, audio, text = tiny_model(x, torch.randn(3, 32))
    n_masked = TINY.num_patches - int(TINY.num_patches * 0.3)
    assert prediction.shape == target.shape == (3, n_masked, TINY.embed_dim)
    assert audio.shape == text.shape == (3, TINY.embed_dim)
    assert tiny_model.encode(x).shape == (3, 1 + TINY.num_patches, TINY.embed_dim)


def test_encode_accepts_shorter_inputs(tiny_model):
    x = torch.randn(2, 1, 80, 100)  # 6 time patches instead of 12
    assert tiny_model.encode(x).shape == (2, 1 + 5 * 6, TINY.embed_dim)


def test_patch_order_is_frequency_major(tiny_model):
    """Token f * T + t must come from frequency row f, time column t."""
    x = torch.zeros(1, 1, 80, TINY.crop_frames)
    x[..., 32:48, 80:96] = 1.0  # frequency row 2, time column 5
    tokens = tiny_model.patch_embed(x)[0]
    bias = tiny_model.patch_embed.proj.bias
    changed = [i for i in range(tokens.shape[0]) if not torch.allclose(tokens[i], bias)]
    assert changed == [2 * TINY.grid_size[1] + 5]


def test_state_dict_uses_the_released_key_names():
    keys = set(m2d.M2DCLAP(m2d.preset("tiny", depth=1, predictor_depth=1)).state_dict())
    for key in ["cls_token", "pos_embed", "norm_stats", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
                "blocks.0.attn.proj.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
                "blocks.0.mlp.fc2.bias", "norm.weight", "target_blocks.0.attn.qkv.weight",
                "target_norm.weight", "decoder_embed.weight", "mask_token", "decoder_pos_embed",
                "decoder_blocks.0.mlp.fc1.weight", "decoder_norm.weight", "decoder_pred.weight",
                "logit_scale", "audio_proj.sem_token", "audio_proj.sem_blocks.0.attn.qkv.weight",
                "audio_proj.norm.weight", "text_proj.weight"]:
        assert key in keys, key
    assert "text_proj.bias" in keys  # the released Linear text projector has a bias
    mlp = set(m2d.M2DCLAP(m2d.preset("tiny", depth=1, audio_proj="mlp", text_proj="mlp")).state_dict())
    assert {"audio_proj.0.weight", "audio_proj.2.bias", "text_proj.0.weight", "text_proj.2.weight"} <= mlp


def test_base_preset_is_the_papers_vit_base():
    config = m2d.preset("base")
    assert (config.embed_dim, config.depth, config.num_heads) == (768, 12, 12)
    assert config.grid_size == (5, 62)
    with torch.device("meta"):
        model = m2d.M2DCLAP(config)
    encoder = sum(p.numel() for n, p in model.named_parameters()
                  if n.startswith(("blocks.", "norm.", "patch_embed.", "cls_token")))
    assert 85.0e6 < encoder < 86.5e6  # ViT-B/16 without a head


def test_initialisation_follows_the_mae_recipe(tiny_model):
    qkv = tiny_model.blocks[0].attn.qkv
    bound = math.sqrt(6 / (qkv.in_features + qkv.out_features))
    assert qkv.weight.abs().max() <= bound and not qkv.bias.any()
    assert torch.equal(tiny_model.blocks[0].norm1.weight, torch.ones(TINY.embed_dim))
    assert 0.01 < tiny_model.cls_token.std() < 0.03
    assert not tiny_model.audio_proj.sem_token.any()
    assert tiny_model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    # Target blocks are initialised independently, not copied.
    assert not torch.equal(tiny_model.blocks[0].attn.qkv.weight, tiny_model.target_blocks[0].attn.qkv.weight)


# --- target network and EMA ------------------------------------------------------------------


def test_no_gradient_reaches_the_target_network():
    torch.manual_seed(0)
    model = m2d.M2DCLAP(TINY)
    prediction, target, audio, text = model(torch.randn(2, 1, 80, TINY.crop_frames), torch.randn(2, 32))
    assert not target.requires_grad
    ((prediction - target) ** 2).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target_parameters())
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.requires_grad for p in model.online_parameters())


def test_ema_update_arithmetic():
    torch.manual_seed(0)
    model = m2d.M2DCLAP(m2d.preset("tiny", depth=2, text_dim=8))
    online = [p.clone() for p in model.online_parameters()]
    target = [p.clone() for p in model.target_parameters()]
    model.ema_update(0.9)
    for o, t, new in zip(online, target, model.target_parameters()):
        torch.testing.assert_close(new, 0.9 * t + 0.1 * o)
    for o, p in zip(online, model.online_parameters()):
        assert torch.equal(o, p)


def test_weight_decay_groups_follow_the_authors_rule(tiny_model):
    # timm's param_groups_weight_decay, which the authors' programs build their AdamW groups with: no decay for
    # tensors of one dimension or fewer and for biases, decay for everything else, tokens of shape [1, 1, D] too.
    decay, no_decay = tiny_model.param_groups(0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    timm_rule = {n for n, p in tiny_model.named_parameters()
                 if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))}
    assert skipped == timm_rule
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "cls_token", "mask_token",
            "audio_proj.sem_token"} <= decayed
    assert {"logit_scale", "blocks.0.attn.qkv.bias", "norm.weight"} <= skipped
    assert not any(n.startswith("target_") for n in decayed | skipped)


def test_the_logit_scale_ceiling_is_the_authors_literal():
    assert m2d.MAX_LOGIT_SCALE == 4.6052  # their clip_logit_scale's value, not log(100) = 4.6051702...


def test_predictor_output_follows_the_masked_order(tiny_model):
    """Moving one masked patch's content changes the prediction at that patch's slot."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 80, TINY.crop_frames)
    patches = tiny_model.embed_patches(tiny_model.normalize(x))
    visible, masked, restore = m2d.random_masking(1, TINY.num_patches, 0.7, generator=torch.Generator().manual_seed(3))
    online = tiny_model.forward_online(patches, visible)
    pred = tiny_model.forward_predictor(online, restore, masked)
    # Recompute by hand: grid-ordered sequence, predictor, then pick masked positions.
    d = tiny_model.decoder_embed(online)
    grid = torch.empty(1, TINY.num_patches, d.shape[-1])
    grid[0, visible[0]] = d[0, 1:]
    grid[0, masked[0]] = tiny_model.mask_token[0, 0]
    seq = torch.cat([d[:, :1], grid], dim=1) + tiny_model.decoder_pos_embed
    for block in tiny_model.decoder_blocks:
        seq = block(seq)
    expected = tiny_model.decoder_pred(tiny_model.decoder_norm(seq))[0, 1:][masked[0]]
    torch.testing.assert_close(pred[0], expected, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = m2d.M2DCLAP(TINY)
    checkpointed = m2d.M2DCLAP(m2d.preset("tiny", text_dim=32, grad_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 1, 80, TINY.crop_frames), torch.randn(2, 32)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(5)
        prediction, target, audio, text = model(x, t)
        ((prediction - target) ** 2).mean().add(audio.sum() * 0).backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_clamp_logit_scale_keeps_the_parameter_in_0_to_the_authors_4_6052():
    model = m2d.M2DCLAP(m2d.preset("tiny", depth=1, predictor_depth=1))
    for value, expected in [(10.0, torch.tensor(4.6052).item()), (-2.0, 0.0), (2.5, 2.5)]:
        with torch.no_grad():
            model.logit_scale.fill_(value)
        model.clamp_logit_scale()
        assert model.logit_scale.item() == pytest.approx(expected)
        assert model.logit_scale.requires_grad


def test_the_projectors_keep_pytorchs_default_init_and_the_semantic_one_its_own():
    # The authors make the CLAP projectors after the MAE initialisation (m2d/models_m2d.py).
    torch.manual_seed(0)
    model = m2d.M2DCLAP(m2d.preset("tiny", depth=1, predictor_depth=1, audio_proj="mlp"))
    assert model.text_proj.bias.any() and model.audio_proj[0].bias.any()  # default Linear init: random biases
    semantic = m2d.M2DCLAP(m2d.preset("tiny", depth=1, predictor_depth=1)).audio_proj
    assert not semantic.sem_token.any() and not semantic.sem_blocks[0].attn.qkv.bias.any()


def test_text_feature_is_the_cls_token_or_the_mean_over_real_tokens():
    class Tokens(torch.nn.Module):  # a stand-in text encoder: its token features are given
        def forward(self, input_ids, attention_mask):
            return (input_ids[..., None].float().expand(-1, -1, 8),)
    text = {"input_ids": torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    for pooling, expected in [("cls", [1.0, 4.0]), ("mean", [2.0, 4.5])]:
        model = m2d.M2DCLAP(m2d.preset("tiny", depth=1, predictor_depth=1, text_dim=8, text_proj="mlp",
                                       text_pooling=pooling), text_encoder=Tokens())
        model.text_proj = torch.nn.Identity()
        assert model.text_features(text)[:, 0].tolist() == expected


def test_stage2_token_drop_feeds_the_projector_a_structured_subset_while_training_only():
    """forward_clap with token_drop: in training the projector sees the patches of a structured subset of
    the grid, encoded alone; in eval mode (and at ratio 0) it sees the whole grid."""
    torch.manual_seed(0)
    model = m2d.M2DCLAP(TINY).eval()
    x, text = torch.randn(3, 1, 80, TINY.crop_frames), torch.randn(3, TINY.text_dim)
    whole = model.audio_proj(model.encode(x)[:, 1:])
    model.freeze_encoder()
    model.train_clap()
    assert torch.equal(model.forward_clap(x, text, token_drop=0.0)[0], whole)
    torch.manual_seed(5)
    dropped = model.forward_clap(x, text, token_drop=0.3)[0]
    assert not torch.allclose(dropped, whole, atol=1e-4)
    # The same draw, written out: the kept patches go through the encoder alone.
    torch.manual_seed(5)
    patches = model.embed_patches(model.normalize(x))
    grid_f, grid_t = TINY.grid_size
    kept, ids = m2d.structured_token_drop(patches, grid_f, grid_t, 0.3)
    assert ids.shape[1] < grid_f * grid_t
    assert torch.allclose(dropped, model.audio_proj(model.encode_tokens(kept)[:, 1:]), atol=1e-6)
    model.eval()
    assert torch.equal(model.forward_clap(x, text, token_drop=0.3)[0], whole)


def test_the_classifier_runs_the_encoder_path_of_m2d_clap_and_pools_its_patch_features(tiny_model):
    x = torch.randn(2, 1, 80, TINY.crop_frames)
    classifier = m2d.AudioClassifier.from_encoder(tiny_model, 4, TINY.crop_frames).eval()
    for key, value in tiny_model.state_dict().items():
        if key.startswith(m2d.ENCODER_PREFIXES):
            assert torch.equal(classifier.state_dict()[key], value), key
    assert not any(k.startswith(("target_", "decoder_", "audio_proj", "text_proj")) for k in classifier.state_dict())
    with torch.no_grad():
        feature = tiny_model.encode_normalized(x)[:, 1:].mean(dim=1)          # [B, D]
        expected = classifier.head(classifier.head_norm(feature))
        torch.testing.assert_close(classifier(x), expected)
    shorter = classifier(x[..., :100])                                        # zero-padded to the crop
    assert shorter.shape == (2, 4)
    with pytest.raises(ValueError, match="at most"):
        classifier(torch.randn(1, 1, 80, TINY.crop_frames + 16))


def test_a_longer_classifier_input_stretches_the_position_table(tiny_model):
    grid_f, grid_t = TINY.grid_size
    classifier = m2d.AudioClassifier.from_encoder(tiny_model, 2, TINY.crop_frames + 32)
    assert classifier.pos_embed.shape == (1, 1 + grid_f * (grid_t + 2), TINY.embed_dim)
    expected = m2d.stretch_pos_table(tiny_model.pos_embed, grid_f, grid_t, grid_t + 2)
    assert torch.equal(classifier.pos_embed, expected)
    assert "pos_embed" not in dict(classifier.named_parameters())             # a buffer: never trained
