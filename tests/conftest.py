"""Fixtures the test files share: a temporary cache for the built-in audio, a writer of small
captioned corpora, and one short stage-1 run that the end-to-end tests start from."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


@pytest.fixture(scope="session", autouse=True)
def builtin_cache(tmp_path_factory):
    """The built-in dataset's audio renders into a temporary cache, never into the user's ~/.cache.

    Subprocesses started by the tests inherit it through the environment.
    """
    path = tmp_path_factory.mktemp("m2d-clap-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("M2D_CLAP_CACHE", str(path))
        yield path


def write_corpus(root: Path, n_clips: int = 6, dim: int = 16, seconds: float = 1.0, longer_by_s: float = 0.0,
                 captions_per_clip: int = 1) -> Path:
    """c<i>.wav of noise (clip i lasts seconds + i * longer_by_s), a captions CSV and random embeddings."""
    rows = []
    for i in range(n_clips):
        samples = int(16000 * (seconds + i * longer_by_s))
        sf.write(root / f"c{i}.wav", 0.1 * np.random.default_rng(i).standard_normal(samples), 16000)
        rows += [f"c{i}.wav,caption {j} of clip {i}" for j in range(captions_per_clip)]
    (root / "captions.csv").write_text("file_name,caption\n" + "\n".join(rows) + "\n")
    np.save(root / "captions.npy", np.random.default_rng(0).standard_normal((len(rows), dim)).astype(np.float32))
    return root / "captions.csv"


@pytest.fixture
def corpus():
    """write_corpus, for a test to call on its own folder."""
    return write_corpus


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory, builtin_cache):
    """80 steps of the default job (built-in data, tiny preset), logged every 5 steps: its run folder."""
    import train
    out = tmp_path_factory.mktemp("stage1")
    train.main(["--stage", "1", "--max-steps", "80", "--log-every", "5", "--out-dir", str(out)])
    return out
