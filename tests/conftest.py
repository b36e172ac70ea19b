"""Fixtures the test files share: a temporary cache for the built-in audio, a writer of small
captioned corpora, and one short stage-1 run that the end-to-end tests start from.

The cache and the stage-1 run are shared by the whole test session, also when pytest-xdist runs
the files in several worker processes: the first worker to need the stage-1 run makes it under a
file lock, the others wait for it and read it.
"""

import contextlib
import fcntl
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

# With pytest-xdist (pytest.ini's `-n auto`), the worker processes share the cores: each takes its
# share of threads rather than all of them, so that they do not oversubscribe the machine.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def session_dir(tmp_path_factory) -> Path:
    """The temporary folder of this test session, shared by its xdist workers (each has a subfolder)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@contextlib.contextmanager
def made_once(tmp_path_factory, name: str):
    """Yields (folder, True) to the one process that must make session_dir/name, else (folder, False)."""
    root = session_dir(tmp_path_factory)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = root / f"{name}.done"
        yield root / name, not done.exists()
        done.touch()


@pytest.fixture(scope="session", autouse=True)
def builtin_cache(tmp_path_factory):
    """The built-in dataset's audio renders into a temporary cache, never into the user's ~/.cache.

    Subprocesses started by the tests inherit it through the environment.
    """
    path = session_dir(tmp_path_factory) / "m2d-clap-cache"  # one for all workers: a split renders safely
    with pytest.MonkeyPatch.context() as mp:                    # in several processes at once
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
    """80 steps of the default job (built-in data, tiny preset) at batch 32, logged every 5 steps: its run folder."""
    import train
    with made_once(tmp_path_factory, "stage1") as (out, make):
        if make:
            train.main(["--stage", "1", "--max-steps", "80", "--batch-size", "32", "--log-every", "5",
                        "--out-dir", str(out)])
    return out


def pytest_collection_modifyitems(items):
    """test_train.py (which checks the shared stage-1 run) first, so that one worker makes the run
    while the others take the files that do not need it; the other files that use it come last."""
    needs_stage1 = {item.path for item in items if "stage1_run" in item.fixturenames}

    def rank(item):
        return 0 if item.path.name == "test_train.py" else 2 if item.path in needs_stage1 else 1
    items.sort(key=rank)  # stable: the order within each group is kept
