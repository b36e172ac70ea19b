"""Bad input stops a run with a message that names the file and the fix; --skip-bad
trains around unreadable clips and lists them; the readers survive random bytes."""

import csv
import multiprocessing
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import train
from conftest import write_corpus

ROOT = Path(__file__).resolve().parent.parent


def run(root: Path, *extra) -> list[str]:
    return ["--stage", "1", "--data", str(root / "captions.csv"), "--batch-size", "2", "--max-steps", "3",
            "--out-dir", str(root / "run"), *extra]


def truncated(path: Path, fmt: str):
    sf.write(path, 0.1 * np.random.default_rng(0).standard_normal(16000), 16000, format=fmt)
    path.write_bytes(path.read_bytes()[:3000])


def nan_samples(path: Path):
    wave = np.zeros(16000, np.float32)
    wave[100] = np.nan
    sf.write(path, wave, 16000, subtype="FLOAT")


# (what is wrong with c3.wav, how to make it so, what the message must say)
BAD_AUDIO = {
    "unreadable": (lambda p: p.write_bytes(b"this is not audio"), r"cannot be decoded as audio.*Re-encode"),
    "truncated wav": (lambda p: truncated(p, "WAV"), r"truncated: its header declares 32000 bytes of audio but "
                                                     r"the file holds 2956.*Copy or download it again"),
    "truncated flac": (lambda p: truncated(p, "FLAC"), r"cannot be decoded as audio.*Re-encode"),
    "zero-length": (lambda p: p.write_bytes(b""), r"cannot be decoded as audio.*Re-encode"),
    "no samples": (lambda p: sf.write(p, np.zeros((0, 1)), 16000), r"has no samples"),
    "NaN samples": (nan_samples, r"contains NaN or inf samples. Re-export"),
    "multichannel": (lambda p: sf.write(p, np.zeros((16000, 2)), 16000),
                     r"16000 Hz with 2 channel\(s\); training reads 16000 Hz mono.*--convert-audio"),
    "unexpected sample rate": (lambda p: sf.write(p, np.zeros(8000), 8000),
                               r"8000 Hz with 1 channel\(s\); training reads 16000 Hz mono.*data.py prepare"),
    "shorter than one patch": (lambda p: sf.write(p, np.zeros(800), 16000),
                               r"only 0.050 s long; clips need at least 16 frames"),
    "missing": (lambda p: p.unlink(), r"captions.csv: 1 of 6 audio file\(s\).*c3.wav.*are not found.*--skip-bad"),
}


@pytest.mark.parametrize("problem", list(BAD_AUDIO))
@pytest.mark.parametrize("workers", [0, 1])
def test_bad_audio_stops_the_run_naming_the_file_and_the_fix(tmp_path, problem, workers):
    write_corpus(tmp_path)
    make_bad, message = BAD_AUDIO[problem]
    make_bad(tmp_path / "c3.wav")
    # Given statistics, the main process reads no clip, so the bad one is first read in a loader worker
    # (a missing file is found up front, when the dataset is made).
    args = run(tmp_path, "--workers", str(workers), *(["--norm-stats", "-7", "4"] if workers else []))
    if workers and problem == "unreadable":  # the same path for every problem read in a worker
        with pytest.raises(data.AudioError, match="Caught AudioError in DataLoader worker process 0"):
            train.train(train.parse_config(args))
    children = set(multiprocessing.active_children())
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert set(multiprocessing.active_children()) <= children  # the loader's worker stopped with the run
    assert "c3.wav" in str(e.value)
    assert re.search(message, str(e.value)), str(e.value)
    if problem != "missing":  # and where the file is listed, with the two ways on
        assert re.search(r"It is listed in .*captions.csv: fix the file or remove its rows there, or pass --skip-bad",
                         str(e.value)), str(e.value)
    assert "Traceback" not in str(e.value)  # a DataLoader worker's error reads like the main process's
    assert not (tmp_path / "run" / "last.pt").exists()


def test_convert_audio_trains_on_stereo_and_other_rates(tmp_path):
    write_corpus(tmp_path)
    sf.write(tmp_path / "c2.wav", 0.1 * np.random.default_rng(2).standard_normal((44100, 2)), 44100)
    sf.write(tmp_path / "c3.wav", 0.1 * np.random.default_rng(3).standard_normal(8000), 8000)
    train.main(run(tmp_path, "--convert-audio"))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("preload", ["--preload", "--no-preload"])
def test_skip_bad_trains_around_unreadable_clips_and_lists_them(tmp_path, capsys, preload):
    write_corpus(tmp_path, n_clips=8)
    (tmp_path / "c1.wav").write_bytes(b"not audio")
    (tmp_path / "c4.wav").unlink()
    sf.write(tmp_path / "c6.wav", np.zeros(100), 16000)
    train.main(run(tmp_path, "--skip-bad", preload, "--max-steps", "8"))
    out = capsys.readouterr().out
    assert f"3 unreadable clip(s) skipped; listed in {tmp_path / 'run' / 'bad_clips.csv'}" in out
    with open(tmp_path / "run" / "bad_clips.csv", newline="") as f:
        report = {row["file_name"]: row["error"] for row in csv.DictReader(f)}
    assert report.keys() == {"c1.wav", "c4.wav", "c6.wav"}
    assert "cannot be decoded" in report["c1.wav"] and "not found" in report["c4.wav"]
    assert "only 0.006 s long" in report["c6.wav"]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 8


def test_a_file_spelled_two_ways_is_refused(tmp_path):
    write_corpus(tmp_path)
    with open(tmp_path / "captions.csv", "a") as f:
        f.write("./c2.wav,another caption for clip 2\n")
    np.save(tmp_path / "captions.npy", np.zeros((7, 16), np.float32))
    with pytest.raises(SystemExit, match=r"captions.csv, line 8: './c2.wav' and 'c2.wav' name the same audio file"):
        train.main(run(tmp_path))


def test_a_shard_index_naming_a_file_twice_is_refused(tmp_path):
    (tmp_path / "index.csv").write_text("file_name,shard,offset,frames\na.wav,0,0,100\nb.wav,0,8000,100\n"
                                        "a.wav,0,16000,100\n")
    with pytest.raises(ValueError, match=r"index.csv, line 4: a.wav is in the index twice.*prepare the corpus again"):
        data.ShardStore(tmp_path)


@pytest.mark.parametrize("embeddings,message", [
    (np.zeros((5, 16), np.float32), r"captions.npy: 5 embedding rows but .*captions.csv has 6 caption rows"),
    (np.zeros((6, 16, 1), np.float32), r"captions.npy: expected a 2-D float array"),
    (np.where(np.arange(6)[:, None] == 4, np.nan, np.zeros((6, 16))).astype(np.float32),
     r"captions.npy: 1 row\(s\) hold NaN or inf, first at row 4 \(CSV line 6\)"),
])
def test_bad_caption_embeddings_stop_the_run_naming_the_file(tmp_path, embeddings, message):
    write_corpus(tmp_path)
    np.save(tmp_path / "captions.npy", embeddings)
    with pytest.raises(SystemExit, match=message):
        train.main(run(tmp_path))


@pytest.fixture(scope="module")
def stage1_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    write_corpus(root)
    train.main(run(root))
    return root


def test_embeddings_of_another_width_than_the_model_stop_stage2(stage1_tiny, tmp_path):
    write_corpus(tmp_path, dim=8)  # the stage-1 model takes 16-d embeddings
    with pytest.raises(SystemExit, match=r"captions.npy: embeddings are 8-d but the model expects 16-d"):
        train.main(["--stage", "2", "--text-side", "embeddings", "--init", str(stage1_tiny / "run" / "last.pt"),
                    "--data", str(tmp_path / "captions.csv"), "--batch-size", "2", "--max-steps", "1",
                    "--out-dir", str(tmp_path / "run")])


def test_stage2_from_a_checkpoint_of_another_preset_names_it_and_the_fix(stage1_tiny, tmp_path):
    init = stage1_tiny / "run" / "last.pt"
    with pytest.raises(SystemExit, match=rf"{init}: a stage-1 checkpoint of the tiny preset, but this run asks "
                                         r"for --preset base. Drop --preset"):
        train.main(["--stage", "2", "--preset", "base", "--text-side", "embeddings", "--init", str(init),
                    "--data", str(stage1_tiny / "captions.csv"), "--out-dir", str(tmp_path / "run")])


# --- fuzzing the readers ---------------------------------------------------------------------------

FUZZ = """
import sys
import numpy as np
sys.path.insert(0, {root!r})
import data, text_embed
from pathlib import Path
tmp, rng = Path({tmp!r}), np.random.default_rng(0)
seeds = [p.read_bytes() for p in sorted(tmp.glob("seed*"))]
loaded = refused = 0
for k in range({n}):
    seed = seeds[k % len(seeds)]
    kind = k % 4
    if kind == 0:    # random bytes
        blob = rng.bytes(int(rng.integers(0, 4096)))
    elif kind == 1:  # a valid file cut short
        blob = seed[:int(rng.integers(0, len(seed)))]
    elif kind == 2:  # a valid file with some bytes flipped
        blob = bytearray(seed)
        for i in rng.integers(0, len(blob), int(rng.integers(1, 20))):
            blob[i] = int(rng.integers(0, 256))
        blob = bytes(blob)
    else:            # a valid header before random bytes
        blob = seed[:int(rng.integers(4, 128))] + rng.bytes(int(rng.integers(0, 4096)))
    audio, npy = tmp / "fuzz.wav", tmp / "captions.npy"
    if seed.startswith(b"\\x93NUMPY"):
        npy.write_bytes(blob)
        try:
            text_embed.load_caption_embeddings(tmp / "captions.csv", npy)
            loaded += 1
        except text_embed.CaptionFileError:
            refused += 1
    else:
        audio.write_bytes(blob)
        try:
            data.AudioFolder(tmp).log_mel("fuzz.wav")
            loaded += 1
        except data.AudioError:
            refused += 1
print(loaded, refused)
"""


def test_fuzzed_audio_and_embedding_files_load_or_raise_the_project_errors(tmp_path):
    wave = 0.1 * np.random.default_rng(0).standard_normal(4000)
    for fmt in ("WAV", "FLAC", "OGG"):
        sf.write(tmp_path / f"seed.{fmt.lower()}", wave, 16000, format=fmt)
    sf.write(tmp_path / "seed.float.wav", wave, 16000, subtype="FLOAT")
    (tmp_path / "captions.csv").write_text("file_name,caption\n" + "".join(f"c{i}.wav,caption {i}\n" for i in range(4)))
    np.save(tmp_path / "seed.npy", np.zeros((4, 8), np.float32))
    n = 1200
    script = FUZZ.format(root=str(ROOT), tmp=str(tmp_path), n=n)
    # A separate process: a crash in a decoder would show as a return code, not take pytest down. The test
    # waits for it to exit; the bound only ends a decoder that hangs for good (the run takes seconds on an
    # idle machine, minutes on a crowded one).
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded, refused = map(int, result.stdout.split())
    assert loaded + refused == n and loaded > 0 and refused > 0
