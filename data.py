"""Audio data for M2D-CLAP: waveform -> log-mel front end, audio reading,
datasets of captioned clips, normalisation statistics, and the built-in
synthetic dataset.

Front end (must match the reference numerically): 16 kHz mono, STFT with
n_fft 400, periodic Hann window of 400, hop 160, centred reflect-padded frames,
power spectrum, 80 Slaney mel bands (50-8000 Hz, Slaney area normalisation),
log(mel + float32 eps). 100 frames per second.

Commands:
    python data.py builtin           # generate the built-in dataset's audio cache
    python data.py builtin-captions  # rewrite assets/builtin_*.csv and their embeddings
                                     # (needs the optional sentence-transformers extra)
    python data.py prepare AUDIO_DIR OUT_DIR   # a corpus -> float16 log-mel shards + index
    python data.py stats OUT_DIR               # normalisation statistics of the shards
    python data.py bench-loader OUT_DIR        # loader clips/s: shards vs one .npy per clip
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

import text_embed

SAMPLE_RATE = 16_000
N_FFT = 400
WIN_SAMPLES = 400
HOP_SAMPLES = 160
N_MELS = 80
F_MIN_HZ = 50.0
F_MAX_HZ = 8_000.0
LOG_EPS = float(torch.finfo(torch.float32).eps)  # 1.1920929e-07
MIN_FRAMES = 16  # one patch: anything shorter carries no information


class AudioError(ValueError):
    """An audio file that cannot be used as it is."""


# -----------------------------------------------------------------------------
# Log-mel front end


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(hz >= min_log_hz,
                    min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep,
                    hz / f_sp)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), mel * f_sp)


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   f_min_hz: float = F_MIN_HZ, f_max_hz: float = F_MAX_HZ) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangular Slaney filters with area normalisation.

    Each triangle spans three consecutive mel-spaced edge frequencies and is
    scaled by 2 / (bandwidth in Hz) so that every filter has the same area.
    """
    fft_hz = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)                       # [n_freqs]
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(f_min_hz), hz_to_mel(f_max_hz), n_mels + 2))  # [M+2]
    widths_hz = np.diff(edges_hz)                                                  # [M+1]
    ramps = edges_hz[:, None] - fft_hz[None, :]                                    # [M+2, n_freqs]
    rising = -ramps[:-2] / widths_hz[:-1, None]                                    # [M, n_freqs]
    falling = ramps[2:] / widths_hz[1:, None]                                      # [M, n_freqs]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return torch.from_numpy(weights).float()


class LogMelSpectrogram(nn.Module):
    """[..., samples] 16 kHz waveform -> [..., n_mels, 1 + samples // hop] log-mel.

    The STFT is one strided convolution with the windowed DFT basis (cos and
    -sin rows for the 201 frequencies), as the authors' nnAudio front end
    computes it: in float32 its rounding then follows theirs (the log of
    near-silent bins magnifies rounding, to about 1e-4 between an FFT and this).
    """

    def __init__(self):
        super().__init__()
        n_freqs = N_FFT // 2 + 1
        k = torch.arange(n_freqs, dtype=torch.float64)[:, None]
        t = torch.arange(N_FFT, dtype=torch.float64)[None, :]
        window = torch.hann_window(WIN_SAMPLES, periodic=True, dtype=torch.float64)
        window = F.pad(window, ((N_FFT - WIN_SAMPLES) // 2, (N_FFT - WIN_SAMPLES + 1) // 2))
        angle = 2 * math.pi * k * t / N_FFT
        basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window  # [2 * n_freqs, n_fft]
        self.register_buffer("dft_basis", basis.float()[:, None], persistent=False)
        self.register_buffer("mel_fb", mel_filterbank(), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        shape = wave.shape
        x = reflect_pad(wave.reshape(-1, 1, shape[-1]).float(), N_FFT // 2)  # centred frames
        spec = F.conv1d(x, self.dft_basis, stride=HOP_SAMPLES)              # [B, 2 * n_freqs, frames]
        real, imag = spec.chunk(2, dim=1)
        power = real.square() + imag.square()                                 # [B, n_freqs, frames]
        mel = self.mel_fb @ power                                             # [B, n_mels, frames]
        return torch.log(mel + LOG_EPS).reshape(*shape[:-1], N_MELS, -1)


def reflect_pad(wave: torch.Tensor, pad: int) -> torch.Tensor:
    """[..., n] -> [..., pad + n + pad], mirrored about the end samples as 'reflect' padding is.

    Unlike torch's, it accepts n <= pad by reflecting again (as numpy's
    'reflect' does), so a clip of a few milliseconds still has a centred frame;
    for n > pad the result is the same.
    """
    n = wave.shape[-1]
    idx = torch.arange(-pad, n + pad, device=wave.device)
    if n == 1:
        idx = torch.zeros_like(idx)
    else:
        period = 2 * (n - 1)
        idx = idx.remainder(period)
        idx = torch.where(idx >= n, period - idx, idx)
    return wave[..., idx]


_LOG_MEL = LogMelSpectrogram()


def log_mel(wave: torch.Tensor) -> torch.Tensor:
    """Log-mel of a 16 kHz waveform on the CPU front end (see LogMelSpectrogram)."""
    return _LOG_MEL(wave)


# -----------------------------------------------------------------------------
# Resampling: band-limited (windowed-sinc) polyphase interpolation


def _kaiser(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Kaiser window at positions x in [-1, 1]."""
    return torch.special.i0(beta * torch.sqrt((1 - x.square()).clamp(min=0))) / torch.special.i0(
        torch.tensor(beta, dtype=x.dtype))


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int, zero_crossings: int = 24,
             rolloff: float = 0.945, beta: float = 14.769656459379492) -> torch.Tensor:
    """[..., samples] at orig_sr -> [..., ceil(samples * new_sr / orig_sr)] at new_sr.

    The ratio is reduced to new/orig = L/M. For each of the L output phases a
    Kaiser-windowed sinc low-pass kernel (cut-off rolloff * min(orig_sr, new_sr)/2,
    so downsampling removes what would alias) is evaluated at that phase's
    fractional input positions; one strided conv1d then produces all phases,
    which are interleaved into the output.
    """
    if orig_sr == new_sr:
        return wave
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    cutoff = min(orig, new) * rolloff                        # in units of the common rate
    half_width = math.ceil(zero_crossings * orig / cutoff)   # kernel half-length in input samples
    idx = torch.arange(-half_width, half_width + orig, dtype=torch.float64)[None] / orig  # [1, K]
    phase = -torch.arange(new, dtype=torch.float64)[:, None] / new                      # [L, 1]
    t = ((phase + idx) * cutoff).clamp(-zero_crossings, zero_crossings)                # [L, K]
    window = _kaiser(t / zero_crossings, beta)
    kernels = torch.sinc(t) * window * (cutoff / orig)       # torch.sinc(t) = sin(pi t) / (pi t)

    shape = wave.shape
    x = wave.reshape(-1, 1, shape[-1]).float()
    x = F.pad(x, (half_width, half_width + orig))
    y = F.conv1d(x, kernels.float()[:, None], stride=orig)   # [B, L, frames]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)            # [B, frames * L], phases interleaved
    out_len = math.ceil(new * shape[-1] / orig)
    return y[:, :out_len].reshape(*shape[:-1], out_len)


# -----------------------------------------------------------------------------
# Reading audio


def _truncated_wav(path: Path) -> str | None:
    """Why a RIFF/WAVE file is truncated (its data chunk runs past the end of the file), or None.

    libsndfile quietly returns the samples a truncated WAV still holds; a file
    cut short by a failed copy or download should be found, not trained on.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            chunk_id, chunk_size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if chunk_id == b"data":
                if chunk_size in (0, 0xFFFFFFFF):  # streaming writers leave the size unknown
                    return None
                held = size - f.tell()
                return (f"truncated: its header declares {chunk_size} bytes of audio but the file holds "
                        f"{held}" if held < chunk_size else None)
            f.seek(chunk_size + chunk_size % 2, os.SEEK_CUR)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, convert: bool = True) -> torch.Tensor:
    """Read an audio file as a mono float32 waveform [samples] at sample_rate.

    With convert=True (the front end of SPEC), multichannel audio is averaged
    to mono and other rates are resampled. With convert=False, a file that is
    not already mono at sample_rate is refused: training reads each file every
    epoch, so a corpus in another format should be converted once, up front.
    Unreadable, truncated, empty or non-finite audio raises AudioError naming
    the file.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found. Check the file_name column and --audio-root.")
    try:
        truncated = _truncated_wav(path)
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [samples, channels]
    except Exception as e:  # libsndfile reports format errors in several exception types
        raise AudioError(f"{path}: cannot be decoded as audio ({type(e).__name__}: {e}). Re-encode it as "
                         "WAV or FLAC, or leave it out of your caption CSV or file list.") from e
    if truncated:
        raise AudioError(f"{path}: {truncated}. Copy or download it again, or leave it out of your caption CSV "
                         "or file list.")
    if data.shape[0] == 0:
        raise AudioError(f"{path}: has no samples. Leave it out of your caption CSV or file list.")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: contains NaN or inf samples. Re-export the file, or remove it "
                         "from your caption CSV or file list.")
    if not convert and (sr != sample_rate or data.shape[1] != 1):
        raise AudioError(f"{path}: {sr} Hz with {data.shape[1]} channel(s); training reads {sample_rate} Hz mono. "
                         "Convert the corpus once with 'python data.py prepare AUDIO_DIR SHARDS' and train "
                         "with --shards SHARDS, or pass --convert-audio to downmix and resample while loading.")
    wave = torch.from_numpy(data.mean(axis=1))
    return resample(wave, sr, sample_rate)


# -----------------------------------------------------------------------------
# Captioned clip dataset


def crop_or_pad(mel: torch.Tensor, crop_frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[F, T] log-mel -> [F, crop_frames]: a random crop when longer, zeros appended when shorter."""
    frames = mel.shape[-1]
    if frames > crop_frames:
        start = int(torch.randint(frames - crop_frames + 1, (1,), generator=generator))
        return mel[:, start:start + crop_frames]
    return F.pad(mel, (0, crop_frames - frames))


class AudioFolder:
    """Log-mels decoded on demand from the audio files under a root folder.

    convert: downmix and resample files that are not 16 kHz mono (see load_audio).
    """

    def __init__(self, root: str | Path, convert: bool = True):
        self.root = Path(root)
        self.convert = convert

    def missing(self, names: list[str]) -> list[str]:
        return [n for n in names if not (self.root / n).is_file()]

    def where(self) -> str:
        return f"under {self.root}; fix the file_name column or pass the right --audio-root"

    def log_mel(self, name: str) -> torch.Tensor:
        """Full-length log-mel [n_mels, frames] of one file."""
        return read_log_mel(self.root / name, self.convert)


def read_log_mel(path: str | Path, convert: bool = True, min_frames: int = MIN_FRAMES) -> torch.Tensor:
    """Full-length log-mel [n_mels, frames] of an audio file of at least min_frames frames.

    Training asks for one patch (MIN_FRAMES); feature extraction takes any
    length, padding the normalised log-mel as SPEC 2 says.
    """
    wave = load_audio(path, convert=convert)
    min_samples = (min_frames - 1) * HOP_SAMPLES  # centred frames: 1 + samples // hop
    if len(wave) < min_samples:
        raise AudioError(f"{path}: only {len(wave) / SAMPLE_RATE:.3f} s long; clips need at least {min_frames} "
                         f"frames, one patch ({min_samples / SAMPLE_RATE:.2f} s). Remove it from the caption CSV.")
    return log_mel(wave)


class BadClipReport:
    """A CSV (file_name, error) of the clips a --skip-bad run could not read.

    Any process may add to it, DataLoader workers included: each row is one
    small append to the file. A file is written once per process; names()
    reads back the distinct names.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._written: set[str] = set()

    def add(self, name: str, error: str):
        if name in self._written:
            return
        self._written.add(name)
        new = not self.path.is_file()
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["file_name", "error"])
            writer.writerow([name, error])

    def names(self) -> set[str]:
        if not self.path.is_file():
            return set()
        with open(self.path, newline="", encoding="utf-8") as f:
            return {row["file_name"] for row in csv.DictReader(f)}


class ClipDataset(Dataset):
    """Clips of a captions CSV, each with one of its captions drawn at random.

    Items are (log_mel [1, n_mels, crop_frames], caption): the raw log-mel (the
    model normalises it with its stored statistics) and the caption's sentence
    embedding [dim], or its text when the table holds no embeddings (for a
    trainable text encoder). A clip with several caption rows gets one of them
    at random on every access. Log-mels come from an audio folder (decoded on
    demand; a path means AudioFolder(path)) or from the shards of
    'python data.py prepare' (source=ShardStore). With preload=True every clip
    is read once, up front (small corpora).

    An item is dataset[i], drawing its crop and caption from the global torch
    RNG, or dataset[(i, seed)] (what ClipOrder yields), drawing them from its
    own seed: the same item whichever worker process reads it, and again after
    a resume.

    A clip that cannot be read (missing, undecodable, too short, ...) raises
    AudioError naming the file. With a BadClipReport it is written there
    instead: dropped when found up front (missing files; every file when
    preloading), replaced by the next readable clip when found while training.
    """

    def __init__(self, table: text_embed.CaptionTable, source: str | Path | AudioFolder | ShardStore,
                 crop_frames: int, preload: bool = False, skip_bad: BadClipReport | None = None):
        self.table = table
        self.source = source if isinstance(source, (AudioFolder, ShardStore)) else AudioFolder(source)
        self.crop_frames = crop_frames
        self.skip_bad = skip_bad
        rows_of = defaultdict(list)
        spelled = {}
        for row, name in enumerate(table.file_names):
            same = spelled.setdefault(os.path.normpath(name), name)
            if same != name:
                raise AudioError(f"{table.csv_path}, line {row + 2}: {name!r} and {same!r} name the same audio "
                                 "file. Spell every file the same way on all of its caption rows.")
            rows_of[name].append(row)
        missing = self.source.missing(list(rows_of))
        if missing and skip_bad is None:
            raise AudioError(f"{table.csv_path}: {len(missing)} of {len(rows_of)} audio file(s) listed "
                             f"there, e.g. {missing[:3]}, are not found {self.source.where()}. "
                             "Pass --skip-bad to train without them.")
        for name in missing:
            skip_bad.add(name, f"not found {self.source.where()}")
            del rows_of[name]
        mels = {}
        if preload:
            for name in list(rows_of):
                try:
                    mels[name] = self.source.log_mel(name)
                except AudioError as e:
                    if skip_bad is None:
                        raise
                    skip_bad.add(name, str(e))
                    del rows_of[name]
        if not rows_of:
            raise AudioError(f"{table.csv_path}: none of its audio files could be read; see {skip_bad.path}")
        self.files = list(rows_of)
        self.caption_rows = [torch.tensor(rows_of[name]) for name in self.files]
        self.embeddings = torch.from_numpy(table.embeddings) if table.embeddings is not None else None
        self._mels = [mels[name] for name in self.files] if preload else None
        self._bad: set[int] = set()  # found unreadable by this process while training

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, index: int) -> torch.Tensor:
        return self._mels[index] if self._mels is not None else self.source.log_mel(self.files[index])

    def full_log_mel(self, index: int) -> torch.Tensor:
        """Full-length log-mel [n_mels, frames] of clip `index` (with skip_bad, maybe a stand-in), uncropped."""
        return self._readable_log_mel(index)[1]

    def _readable_log_mel(self, index: int) -> tuple[int, torch.Tensor]:
        """(index, log-mel) of clip `index` or, with skip_bad, of the next readable clip after it."""
        for k in range(len(self)):
            i = (index + k) % len(self)
            if i in self._bad:
                continue
            try:
                return i, self._read(i)
            except AudioError as e:
                if self.skip_bad is None:
                    raise
                self._bad.add(i)
                self.skip_bad.add(self.files[i], str(e))
        raise AudioError(f"{self.table.csv_path}: none of its audio files could be read; see {self.skip_bad.path}")

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        index, mel = self._readable_log_mel(index)
        mel = crop_or_pad(mel, self.crop_frames, generator)[None]  # [1, F, crop_frames]
        rows = self.caption_rows[index]
        row = rows[torch.randint(len(rows), (1,), generator=generator)].item()
        return mel, self.table.captions[row] if self.embeddings is None else self.embeddings[row]


class ClipOrder(Sampler):
    """The clip order of a run: shuffled per epoch, the same for any number of processes, resumable.

    Epoch e is a permutation of the clips drawn from (seed, e) alone, and
    global batch b (one optimiser step) is its positions [b*B, (b+1)*B). Of
    that batch, process `rank` of `world_size` takes micro-batch k of its
    accum_steps at positions (k*world_size + rank)*mb ... + mb, mb being
    B / (world_size * accum_steps). Every position also gets a seed for the
    clip's own randomness (crop, caption). Keys are (clip index, seed) for
    ClipDataset. set_position(epoch, batch) starts the next pass mid-epoch, so
    a resumed run reads exactly what the interrupted one would have.
    """

    def __init__(self, n_clips: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 accum_steps: int = 1):
        if batch_size % (world_size * accum_steps):
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes x "
                             f"{accum_steps} accumulation steps")
        self.n_clips, self.batch_size, self.seed = n_clips, batch_size, seed
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.micro_batch = batch_size // (world_size * accum_steps)
        self.batches_per_epoch = n_clips // batch_size
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch: int = 0):
        self.epoch, self.start_batch = epoch, batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.accum_steps * self.micro_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n_clips, generator=g).tolist()
        seeds = torch.randint(2**62, (self.n_clips,), generator=g).tolist()
        for b in range(self.start_batch, self.batches_per_epoch):
            for k in range(self.accum_steps):
                start = b * self.batch_size + (k * self.world_size + self.rank) * self.micro_batch
                for pos in range(start, start + self.micro_batch):
                    yield order[pos], seeds[pos]


def log_mel_stats(read, n_clips: int, max_clips: int) -> tuple[float, float]:
    """Mean and standard deviation of the values of up to max_clips full log-mels.

    read(i) gives clip i's full-length, unpadded log-mel, so padding never
    biases the statistics; clips are taken at evenly spaced indices
    (deterministic) and summed in float64.
    """
    indices = np.linspace(0, n_clips - 1, min(n_clips, max_clips)).round().astype(int)
    total, total_sq, count = 0.0, 0.0, 0
    for i in indices:
        mel = read(int(i)).double()
        total += mel.sum().item()
        total_sq += mel.square().sum().item()
        count += mel.numel()
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean**2, 0.0))


def compute_norm_stats(dataset: ClipDataset, max_clips: int = 1000) -> tuple[float, float]:
    """Normalisation statistics of up to max_clips clips of a dataset."""
    return log_mel_stats(dataset.full_log_mel, len(dataset), max_clips)


# -----------------------------------------------------------------------------
# Corpus shards: log-mels of millions of clips in a few large float16 files
#
# OUT_DIR/shard_00000.f16 ...  raw little-endian float16; each clip a C-order
#                              [n_mels, frames] block, one after another
# OUT_DIR/index.csv            file_name, shard, offset (in values), frames
# OUT_DIR/report.csv           file_name, error: every file that could not be read
# OUT_DIR/norm_stats.json      {"mean": ..., "std": ...} from 'python data.py stats'

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
SHARD_DTYPE = np.dtype("<f2")


class ShardStore:
    """Read-only access to the shards that 'python data.py prepare' wrote."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "index.csv"
        if not index.is_file():
            raise FileNotFoundError(f"{index}: no shard index. Run 'python data.py prepare AUDIO_DIR {self.folder}'.")
        self.entries = {}
        with open(index, newline="", encoding="utf-8") as f:
            for line, r in enumerate(csv.DictReader(f), start=2):
                if r["file_name"] in self.entries:
                    raise ValueError(f"{index}, line {line}: {r['file_name']} is in the index twice. The index "
                                     "is damaged: prepare the corpus again into an empty folder.")
                self.entries[r["file_name"]] = (int(r["shard"]), int(r["offset"]), int(r["frames"]))
        stats = self.folder / "norm_stats.json"
        self.norm_stats = tuple(json.loads(stats.read_text()).values()) if stats.is_file() else None
        self._maps: dict[int, np.memmap] = {}

    def missing(self, names: list[str]) -> list[str]:
        return [n for n in names if n not in self.entries]

    def where(self) -> str:
        return f"in the shard index {self.folder / 'index.csv'}; prepare those files or fix the file names"

    def log_mel(self, name: str) -> torch.Tensor:
        shard, offset, frames = self.entries[name]
        if shard not in self._maps:  # opened lazily, so each DataLoader worker maps its own
            self._maps[shard] = np.memmap(self.folder / f"shard_{shard:05d}.f16", dtype=SHARD_DTYPE, mode="r")
        block = self._maps[shard][offset:offset + N_MELS * frames]
        return torch.from_numpy(block.astype(np.float32).reshape(N_MELS, frames))


def _prepare_one(job: tuple[Path, str]) -> tuple[str, np.ndarray | str]:
    """Worker: (root, name) -> (name, float16 log-mel [n_mels, frames] or the error message)."""
    root, name = job
    try:
        return name, AudioFolder(root).log_mel(name).numpy().astype(SHARD_DTYPE)
    except Exception as e:  # every failure is reported, none is fatal for the corpus
        return name, f"{type(e).__name__}: {e}"


class ShardWriter:
    """Appends clips to the shards and index of a folder, resuming where they end.

    Each clip's bytes are written and flushed before its index row, so the
    index never points at bytes that were not written.
    """

    def __init__(self, out_dir: Path, shard_mb: int = 1024):
        self.out_dir, self.shard_bytes = Path(out_dir), shard_mb * 2**20
        self.out_dir.mkdir(parents=True, exist_ok=True)
        index_path = self.out_dir / "index.csv"
        new_index = not index_path.is_file()
        self.index = open(index_path, "a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.index)
        if new_index:
            self.writer.writerow(["file_name", "shard", "offset", "frames"])
        shards = sorted(self.out_dir.glob("shard_*.f16"))
        self.shard = int(shards[-1].stem.split("_")[1]) if shards else 0
        self.file = open(self.out_dir / f"shard_{self.shard:05d}.f16", "ab")

    def add(self, name: str, mel: np.ndarray):
        """Append one float16 log-mel [n_mels, frames]."""
        if self.file.tell() + mel.nbytes > self.shard_bytes and self.file.tell() > 0:
            self.file.close()
            self.shard += 1
            self.file = open(self.out_dir / f"shard_{self.shard:05d}.f16", "ab")
        offset = self.file.tell() // SHARD_DTYPE.itemsize
        self.file.write(np.ascontiguousarray(mel, dtype=SHARD_DTYPE).tobytes())
        self.file.flush()
        self.writer.writerow([name, self.shard, offset, mel.shape[1]])
        self.index.flush()

    def close(self):
        self.file.close()
        self.index.close()


def prepare(audio_dir: Path, out_dir: Path, workers: int = os.cpu_count() or 1,
            shard_mb: int = 1024) -> tuple[int, int]:
    """Convert every wav/flac/ogg under audio_dir into shards; returns (clips written, files failed).

    Resumable: files already in the index are skipped, and a killed run goes on
    where it stopped. Each clip is appended to its shard before its index row,
    so the index never points at bytes that were not written.
    """
    audio_dir, out_dir = Path(audio_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(p.relative_to(audio_dir).as_posix() for p in audio_dir.rglob("*")
                   if p.suffix.lower() in AUDIO_SUFFIXES)
    done = set(ShardStore(out_dir).entries) if (out_dir / "index.csv").is_file() else set()
    todo = [n for n in names if n not in done]
    shards = ShardWriter(out_dir, shard_mb)
    failures = []
    print(f"{len(names)} audio files under {audio_dir}: {len(done)} already prepared, {len(todo)} to go "
          f"({workers} workers)", flush=True)
    t0 = t_print = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for k, (name, result) in enumerate(pool.imap_unordered(_prepare_one, [(audio_dir, n) for n in todo],
                                                                chunksize=16), start=1):
            if isinstance(result, str):
                failures.append((name, result))
            else:
                shards.add(name, result)
            now = time.perf_counter()
            if now - t_print > 1 or k == len(todo):
                t_print = now
                print(f"\r{k}/{len(todo)} files, {k / (now - t0):.0f} files/s, {len(failures)} unreadable",
                      end="", flush=True)
    shards.close()
    print(flush=True)
    with open(out_dir / "report.csv", "w", newline="", encoding="utf-8") as f:
        report = csv.writer(f)
        report.writerow(["file_name", "error"])
        report.writerows(sorted(failures))
    if failures:
        print(f"{len(failures)} file(s) could not be read and are not in the shards; see {out_dir / 'report.csv'}")
    return len(todo) - len(failures), len(failures)


def shard_stats(out_dir: Path, max_clips: int = 10000) -> tuple[float, float]:
    """Normalisation statistics of up to max_clips prepared clips; also written to norm_stats.json."""
    store = ShardStore(out_dir)
    names = list(store.entries)
    if not names:
        raise ValueError(f"{out_dir}: the shard index is empty")
    mean, std = log_mel_stats(lambda i: store.log_mel(names[i]), len(names), max_clips)
    (Path(out_dir) / "norm_stats.json").write_text(json.dumps({"mean": mean, "std": std}))
    return mean, std


class _CropDataset(Dataset):
    """Random crops of a list of clips from one source (for the loader benchmark)."""

    def __init__(self, read, names, crop_frames):
        self.read, self.names, self.crop_frames = read, names, crop_frames

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        return crop_or_pad(self.read(self.names[i]), self.crop_frames)[None]


def _read_npy(path: str) -> torch.Tensor:
    return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))


def write_synthetic_shards(out_dir: Path, n_clips: int, frames: int, seed: int = 0):
    """Random log-mels of AudioSet's size (10 s = 1001 frames) for timing the loader."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(out_dir)
    for k in range(n_clips):
        writer.add(f"synthetic/{k:07d}", (rng.standard_normal((N_MELS, frames)) * 4 - 7).astype(SHARD_DTYPE))
    writer.close()


def bench_loader(shard_dir: Path, crop_frames: int = 1001, batch_size: int = 64, workers: int = 4,
                 seconds: float = 15.0) -> dict:
    """Clips/s of a DataLoader (workers, pinned memory) from shards and from one .npy per clip."""
    store = ShardStore(shard_dir)
    names = list(store.entries)
    npy_dir = Path(shard_dir) / "bench_npy"
    npy_dir.mkdir(exist_ok=True)
    npy_paths = []
    for k, name in enumerate(names):  # the same clips as per-file float16 .npy, written once
        path = npy_dir / f"{k:07d}.npy"
        if not path.exists():
            np.save(path, store.log_mel(name).numpy().astype(np.float16))
        npy_paths.append(str(path))
    results = {}
    for label, dataset in (("shards", _CropDataset(store.log_mel, names, crop_frames)),
                           ("npy_files", _CropDataset(_read_npy, npy_paths, crop_frames))):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                            pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=workers > 0)
        clips, t0 = 0, None
        while t0 is None or time.perf_counter() - t0 < seconds:
            for batch in loader:
                if t0 is None:  # start timing after the workers are up
                    t0 = time.perf_counter()
                    continue
                clips += batch.shape[0]
                if time.perf_counter() - t0 >= seconds:
                    break
        results[label] = clips / (time.perf_counter() - t0)
    return results


# -----------------------------------------------------------------------------
# Built-in synthetic dataset: captioned sound events
#
# A deterministic generator of captioned sound events stands in for AudioSet so
# that everything runs out of the box. Each 2 s clip holds one to three events
# from EVENT_CLASSES, each with an attribute ("high-pitched", "fast", "long",
# ...) that is audible and visible on the log-mel spectrogram; every class has
# its own spectro-temporal shape, and pitch, rate, duration, level and timing
# vary within a class so that the task is not trivial.
#
# Determinism: a clip depends only on (seed, index). The plan and the captions
# come from random.Random(f"{seed}-{index}") and use nothing but
# Random.random(), whose sequence Python keeps across versions, so the committed
# caption embeddings (assets/builtin_*.npy) stay valid. The audio comes from
# numpy's default_rng seeded with an integer derived from (seed, index).

CLIP_SECONDS = 2.0
CLIP_SAMPLES = int(SAMPLE_RATE * CLIP_SECONDS)

EVENT_CLASSES: tuple[str, ...] = (
    "tone",                   # stationary sine: one horizontal line
    "rising chirp",           # exponential sine sweep up: rising line
    "falling chirp",          # exponential sine sweep down: falling line
    "warbling tone",          # sine with vibrato: wiggling line
    "pulsing tone",           # sine with deep tremolo: dashed line
    "bright harmonic note",   # sawtooth-like: all harmonics, dense stack
    "hollow harmonic note",   # square-like: odd harmonics only, gapped stack
    "bell",                   # inharmonic partials with exponential decay
    "white noise burst",      # flat broadband noise
    "pink noise burst",       # broadband noise tilted to low frequencies
    "hiss",                   # noise only above a few kHz
    "low rumble",             # brown noise below ~250 Hz
    "whoosh",                 # noise band whose centre sweeps up or down
    "click train",            # regular broadband vertical lines
    "knock",                  # few damped low resonances with a sharp attack
)

# The attribute words each class can carry; every word maps to a parameter
# range that is visibly different on the spectrogram (pitch, rate, length,
# envelope shape, sweep direction, number of hits).
EVENT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "tone": ("low-pitched", "mid-pitched", "high-pitched"),
    "rising chirp": ("slow", "fast"),
    "falling chirp": ("slow", "fast"),
    "warbling tone": ("slow", "fast"),
    "pulsing tone": ("slow", "fast"),
    "bright harmonic note": ("low-pitched", "mid-pitched", "high-pitched"),
    "hollow harmonic note": ("low-pitched", "mid-pitched", "high-pitched"),
    "bell": ("low-pitched", "high-pitched"),
    "white noise burst": ("short", "long"),
    "pink noise burst": ("swelling", "fading"),
    "hiss": ("short", "long"),
    "low rumble": ("short", "long"),
    "whoosh": ("upward", "downward"),
    "click train": ("slow", "fast"),
    "knock": ("single", "double", "triple"),
}


@dataclass(frozen=True)
class Event:
    """One planned sound event; all numbers come from the plan RNG.

    Fields a class does not use keep their zero default.
    """

    kind: str                        # one of EVENT_CLASSES
    attribute: str                   # one of EVENT_ATTRIBUTES[kind]
    start_s: float                   # onset within the clip
    duration_s: float                # length, at least 0.3 s
    freq_hz: float = 0.0             # pitch, start of a sweep, resonance, or noise band edge
    freq_end_hz: float = 0.0         # end frequency of a chirp or whoosh
    rate_hz: float = 0.0             # vibrato, tremolo or click rate
    vibrato_semitones: float = 0.0   # peak pitch deviation of a warbling tone
    decay_s: float = 0.0             # exponential decay time constant of bells and knocks
    hits: int = 0                    # number of knocks
    gain_db: float = 0.0             # level relative to the other events in the clip


# --- Planning (Python random, Random.random() only) ---

# Events stay this far from the clip edges so their fades are never cut.
_EDGE_MARGIN_S = 0.05
_USABLE_S = CLIP_SECONDS - 2 * _EDGE_MARGIN_S
_MAX_EVENTS = 3
# Chance that an event starts slightly before the previous one ends, and by how much.
_OVERLAP_PROBABILITY = 0.2
_OVERLAP_RANGE_S = (0.02, 0.08)

# Duration ranges (s). Every lower bound is at most 0.6 s, so three events
# always fit into the 1.9 s usable span; the budgeted allocation relies on it.
_DEFAULT_DURATION_S = (0.35, 0.8)
_SHORT_DURATION_S = (0.3, 0.4)
_LONG_DURATION_S = (0.6, 1.1)
# Modulated classes need a few modulation periods to show their shape.
_MODULATED_DURATION_S = (0.55, 0.95)
_SWEEP_DURATION_S = (0.4, 0.8)
_DECAYING_DURATION_S = (0.45, 0.9)
_KNOCK_DURATION_S = {"single": (0.3, 0.35), "double": (0.35, 0.55), "triple": (0.5, 0.7)}
_KNOCK_HITS = {"single": 1, "double": 2, "triple": 3}
# Ring-out time kept after the last knock.
_KNOCK_TAIL_S = 0.2

# Pitch ranges per attribute, with gaps between them so the words are learnable.
_TONE_PITCH_HZ = {"low-pitched": (150.0, 300.0), "mid-pitched": (450.0, 1000.0),
                  "high-pitched": (1800.0, 4500.0)}
_NOTE_PITCH_HZ = {"low-pitched": (100.0, 160.0), "mid-pitched": (200.0, 350.0),
                  "high-pitched": (450.0, 800.0)}
_BELL_PITCH_HZ = {"low-pitched": (250.0, 450.0), "high-pitched": (800.0, 1400.0)}
# Sweep slope in octaves per second; all sweeps stay inside this band.
_CHIRP_SLOPE_OCT_PER_S = {"slow": (1.5, 2.5), "fast": (4.5, 7.0)}
_CHIRP_BAND_HZ = (120.0, 6500.0)
_VIBRATO_RATE_HZ = {"slow": (3.0, 4.5), "fast": (7.0, 10.0)}
_TREMOLO_RATE_HZ = {"slow": (3.5, 5.0), "fast": (9.0, 14.0)}
_CLICK_RATE_HZ = {"slow": (5.0, 8.0), "fast": (16.0, 25.0)}
_EVENT_GAIN_DB = (-6.0, 0.0)


def _uniform(rng: random.Random, low: float, high: float) -> float:
    return low + (high - low) * rng.random()


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    """Uniform on a log scale, matching how pitch is perceived and mel-spaced."""
    return math.exp(_uniform(rng, math.log(low), math.log(high)))


def _randbelow(rng: random.Random, n: int) -> int:
    # min() guards against the (theoretical) float rounding up to n.
    return min(int(rng.random() * n), n - 1)


def _choice(rng: random.Random, items):
    return items[_randbelow(rng, len(items))]


def _sample_distinct(rng: random.Random, items, k: int) -> list:
    """k distinct items in random order (partial Fisher-Yates on a copy)."""
    pool = list(items)
    for i in range(k):
        j = i + _randbelow(rng, len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


def _duration_range_s(kind: str, attribute: str) -> tuple[float, float]:
    if attribute == "short":
        return _SHORT_DURATION_S
    if attribute == "long":
        return _LONG_DURATION_S
    if kind == "knock":
        return _KNOCK_DURATION_S[attribute]
    if kind in ("warbling tone", "pulsing tone", "click train"):
        return _MODULATED_DURATION_S
    if kind in ("rising chirp", "falling chirp"):
        return _SWEEP_DURATION_S
    if kind in ("bell", "pink noise burst", "whoosh"):
        return _DECAYING_DURATION_S
    return _DEFAULT_DURATION_S


def _allocate_durations_s(ranges: list[tuple[float, float]], rng: random.Random) -> list[float]:
    """Draw one duration per range so that their sum fits into the usable span.

    Each draw is capped so that the events still to be drawn can get their
    minimum; visiting the events in random order spreads the cap's effect.
    Durations are floored to whole milliseconds, which keeps them >= the
    (millisecond-valued) lower bounds.
    """
    durations_s = [0.0] * len(ranges)
    pending = set(range(len(ranges)))
    used_s = 0.0
    for i in _sample_distinct(rng, range(len(ranges)), len(ranges)):
        pending.discard(i)
        low_s, high_s = ranges[i]
        reserved_s = sum(ranges[j][0] for j in pending)
        cap_s = min(high_s, _USABLE_S - used_s - reserved_s)
        durations_s[i] = math.floor(_uniform(rng, low_s, cap_s) * 1000.0) / 1000.0
        used_s += durations_s[i]
    return durations_s


def _plan_parameters(kind: str, attribute: str, duration_s: float, rng: random.Random) -> dict:
    """The class-specific numeric parameters of one event."""
    if kind == "tone":
        return {"freq_hz": _log_uniform(rng, *_TONE_PITCH_HZ[attribute])}
    if kind in ("rising chirp", "falling chirp"):
        span_oct = _uniform(rng, *_CHIRP_SLOPE_OCT_PER_S[attribute]) * duration_s
        low_hz = _log_uniform(rng, _CHIRP_BAND_HZ[0], _CHIRP_BAND_HZ[1] / 2.0 ** span_oct)
        high_hz = low_hz * 2.0 ** span_oct
        if kind == "rising chirp":
            return {"freq_hz": low_hz, "freq_end_hz": high_hz}
        return {"freq_hz": high_hz, "freq_end_hz": low_hz}
    if kind == "warbling tone":
        return {"freq_hz": _log_uniform(rng, 350.0, 2500.0),
                "rate_hz": _uniform(rng, *_VIBRATO_RATE_HZ[attribute]),
                "vibrato_semitones": _uniform(rng, 1.5, 3.0)}
    if kind == "pulsing tone":
        return {"freq_hz": _log_uniform(rng, 300.0, 3000.0),
                "rate_hz": _uniform(rng, *_TREMOLO_RATE_HZ[attribute])}
    if kind in ("bright harmonic note", "hollow harmonic note"):
        return {"freq_hz": _log_uniform(rng, *_NOTE_PITCH_HZ[attribute])}
    if kind == "bell":
        return {"freq_hz": _log_uniform(rng, *_BELL_PITCH_HZ[attribute]),
                "decay_s": _uniform(rng, 0.15, 0.35)}
    if kind == "hiss":
        # Lower edge of the noise band.
        return {"freq_hz": _uniform(rng, 3000.0, 4500.0)}
    if kind == "low rumble":
        # Upper edge of the noise band.
        return {"freq_hz": _uniform(rng, 150.0, 300.0)}
    if kind == "whoosh":
        low_hz = _log_uniform(rng, 250.0, 600.0)
        high_hz = _log_uniform(rng, 2500.0, 5000.0)
        if attribute == "upward":
            return {"freq_hz": low_hz, "freq_end_hz": high_hz}
        return {"freq_hz": high_hz, "freq_end_hz": low_hz}
    if kind == "click train":
        return {"rate_hz": _uniform(rng, *_CLICK_RATE_HZ[attribute])}
    if kind == "knock":
        return {"freq_hz": _log_uniform(rng, 150.0, 600.0),
                "decay_s": _uniform(rng, 0.015, 0.035),
                "hits": _KNOCK_HITS[attribute]}
    # White and pink noise bursts need no numbers beyond duration and envelope.
    return {}


def plan_clip(rng: random.Random) -> list[Event]:
    """Plan 1 to 3 events of distinct classes, in time order, inside the clip.

    Events do not overlap, except that a later one may start up to 80 ms
    before the previous one ends. Every event lasts at least 0.3 s.
    """
    n_events = 1 + _randbelow(rng, _MAX_EVENTS)
    # Distinct classes per clip keep the order in the captions unambiguous
    # and the class counts balanced.
    kinds = _sample_distinct(rng, EVENT_CLASSES, n_events)
    attributes = [_choice(rng, EVENT_ATTRIBUTES[kind]) for kind in kinds]
    durations_s = _allocate_durations_s(
        [_duration_range_s(k, a) for k, a in zip(kinds, attributes)], rng)

    # Share the spare time randomly between the lead-in, the gaps and the tail.
    slack_s = _USABLE_S - sum(durations_s)
    weights = [rng.random() for _ in range(n_events + 1)]
    weight_total = sum(weights) or 1.0
    shares_s = [slack_s * w / weight_total for w in weights]

    events = []
    cursor_s = _EDGE_MARGIN_S + shares_s[0]
    for i, (kind, attribute, duration_s) in enumerate(zip(kinds, attributes, durations_s)):
        if i > 0:
            if rng.random() < _OVERLAP_PROBABILITY:
                # Overlap instead of a gap; the unused share lengthens the tail.
                cursor_s -= _uniform(rng, *_OVERLAP_RANGE_S)
            else:
                cursor_s += shares_s[i]
        start_s = round(cursor_s, 3)
        params = _plan_parameters(kind, attribute, duration_s, rng)
        events.append(Event(kind=kind, attribute=attribute, start_s=start_s,
                            duration_s=duration_s,
                            gain_db=_uniform(rng, *_EVENT_GAIN_DB), **params))
        cursor_s = start_s + duration_s
    return events


# --- Captions (Python random, Random.random() only) ---

# Several phrasings per event count, imitating different caption writers.
# {a}, {b}, {c} are the events in time order; {A} etc. are capitalised.
_CAPTION_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: (
        "{A}.",
        "One sound: {a}.",
        "There is {a}.",
        "{A} is heard.",
        "We hear {a}.",
        "The clip contains {a}.",
        "Just {a}.",
    ),
    2: (
        "{A}, then {b}.",
        "{B} follows {a}.",
        "Two sounds: {a} and then {b}.",
        "First {a}, then {b}.",
        "{A} followed by {b}.",
        "{B} comes after {a}.",
        "There are two sounds, {a} and {b}, in that order.",
        "{A} is heard before {b}.",
    ),
    3: (
        "{A}, then {b}, then {c}.",
        "First {a}, then {b}, and finally {c}.",
        "Three sounds: {a}, {b} and {c}, in that order.",
        "{A} followed by {b} and then {c}.",
        "There are three sounds: first {a}, then {b}, and last {c}.",
        "{A}, {b}, and {c}, one after another.",
        "{A} starts the clip, {b} follows, and {c} ends it.",
    ),
}


def _event_phrase(event: Event) -> str:
    """E.g. "a high-pitched tone", "an upward whoosh"."""
    words = f"{event.attribute} {event.kind}"
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words}"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def caption_clip(events: list[Event], rng: random.Random, n_captions: int = 2) -> list[str]:
    """n_captions different captions naming the events, attributes and order.

    Each caption uses a different template, so the captions are distinct.
    Raises ValueError if more captions are asked for than templates exist.
    """
    templates = _CAPTION_TEMPLATES.get(len(events))
    if templates is None:
        raise ValueError(f"captions need 1 to {_MAX_EVENTS} events, got {len(events)}")
    if not 1 <= n_captions <= len(templates):
        raise ValueError(f"n_captions must be in 1..{len(templates)} for "
                         f"{len(events)} event(s), got {n_captions}")
    phrases = [_event_phrase(e) for e in events]
    fields = {}
    for name, phrase in zip("abc", phrases):
        fields[name] = phrase
        fields[name.upper()] = _capitalise(phrase)
    return [_capitalise(template.format(**fields))
            for template in _sample_distinct(rng, templates, n_captions)]


# --- Rendering (numpy) ---

# Harmonics of notes stop here, safely below the 8 kHz Nyquist frequency.
_MAX_PARTIAL_HZ = 7500.0
_BELL_PARTIAL_RATIOS = (1.0, 2.76, 5.40, 8.93)  # free bar / glockenspiel-like
_BELL_PARTIAL_AMPS = (1.0, 0.6, 0.4, 0.25)
_KNOCK_MODE_RATIOS = (1.0, 2.32)
_KNOCK_MODE_AMPS = (1.0, 0.5)
_KNOCK_HIT_AMPS = (1.0, 0.8, 0.65)
_KNOCK_TRANSIENT_AMP = 0.3
_CLICK_LENGTH_S = 0.003
_WAVETABLE_SIZE = 4096
_FADE_IN_S = 0.01
_FADE_OUT_S = 0.02
_NOTE_ATTACK_S = 0.015
_BELL_ATTACK_S = 0.003
_SUSTAINED_RMS = 0.25      # level of sustained events before mixing
_IMPULSIVE_PEAK = 0.9      # level of percussive events before mixing
_IMPULSIVE_KINDS = ("bell", "click train", "knock")
_NOISE_FLOOR_RMS = 1e-3    # -60 dBFS, so log-mel never sees log(0)
_MIX_PEAK_RANGE = (0.5, 0.9)
_SWELL_RANGE_DB = 30.0
_WHOOSH_FRAME = 512        # 32 ms frames for the time-varying noise band
_WHOOSH_BANDWIDTH_OCT = 0.25


def _time_s(n_samples: int) -> np.ndarray:
    return np.arange(n_samples) / SAMPLE_RATE


def _fade_envelope(n_samples: int, fade_in_s: float, fade_out_s: float) -> np.ndarray:
    """Raised-cosine ramps at both ends, so segments start and end at zero."""
    envelope = np.ones(n_samples)
    for n_ramp, at_start in ((int(fade_in_s * SAMPLE_RATE), True),
                             (int(fade_out_s * SAMPLE_RATE), False)):
        n_ramp = min(n_ramp, n_samples // 2)
        if n_ramp == 0:
            continue
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(n_ramp) / n_ramp)
        if at_start:
            envelope[:n_ramp] *= ramp
        else:
            envelope[-n_ramp:] *= ramp[::-1]
    return envelope


def _sine_from_freq_track(freq_hz: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sine whose instantaneous frequency follows freq_hz, random start phase."""
    phase_rad = 2.0 * np.pi * np.cumsum(freq_hz) / SAMPLE_RATE
    return np.sin(phase_rad + rng.uniform(0.0, 2.0 * np.pi))


def _spectrally_shaped_noise(n_samples: int, gain_fn, rng: np.random.Generator) -> np.ndarray:
    """White noise filtered in the frequency domain by gain_fn(freq_hz) -> amplitude gain."""
    spectrum = np.fft.rfft(rng.standard_normal(n_samples))
    freqs_hz = np.fft.rfftfreq(n_samples, 1.0 / SAMPLE_RATE)
    return np.fft.irfft(spectrum * gain_fn(freqs_hz), n_samples)


def _smooth_step(x: np.ndarray, edge0: float, edge1: float) -> np.ndarray:
    """0 below edge0, 1 above edge1, smooth in between (soft filter edges)."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _harmonic_note(event: Event, n_samples: int, odd_only: bool,
                   rng: np.random.Generator) -> np.ndarray:
    """Band-limited sawtooth (all harmonics) or square (odd harmonics) note.

    One period is summed into a wavetable and read with linear interpolation,
    which is much cheaper than one sine per harmonic per sample; only
    harmonics below _MAX_PARTIAL_HZ enter the table, so nothing aliases.
    """
    n_harmonics = int(_MAX_PARTIAL_HZ // event.freq_hz)
    orders = np.arange(1, n_harmonics + 1)
    if odd_only:
        orders = orders[orders % 2 == 1]
    table_phase = np.arange(_WAVETABLE_SIZE + 1) / _WAVETABLE_SIZE
    table = (np.sin(2.0 * np.pi * np.outer(table_phase, orders)) / orders).sum(axis=1)
    cycles = event.freq_hz * _time_s(n_samples) + rng.uniform()
    wave = np.interp((cycles % 1.0) * _WAVETABLE_SIZE, np.arange(_WAVETABLE_SIZE + 1), table)
    return wave * _fade_envelope(n_samples, _NOTE_ATTACK_S, 0.0)


def _bell(event: Event, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Inharmonic partials struck at once; higher partials die away faster."""
    t_s = _time_s(n_samples)
    wave = np.zeros(n_samples)
    for i, (ratio, amp) in enumerate(zip(_BELL_PARTIAL_RATIOS, _BELL_PARTIAL_AMPS)):
        partial_hz = event.freq_hz * ratio
        if partial_hz >= _MAX_PARTIAL_HZ:
            break
        decay_s = event.decay_s / (1.0 + 0.8 * i)
        wave += amp * np.exp(-t_s / decay_s) * np.sin(
            2.0 * np.pi * partial_hz * t_s + rng.uniform(0.0, 2.0 * np.pi))
    # A 3 ms attack avoids the broadband onset click that random start phases
    # would cause; that vertical line is reserved for knocks and click trains.
    return wave * _fade_envelope(n_samples, _BELL_ATTACK_S, 0.0)


def _whoosh(event: Event, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Noise band, Gaussian on a log-frequency axis, whose centre glides log-linearly.

    Built by overlap-adding independent noise frames, each filtered around the
    centre frequency at its time; square-root Hann windows at 50 % overlap
    keep the noise power constant across frame joins.
    """
    hop = _WHOOSH_FRAME // 2
    n_frames = n_samples // hop + 2
    # Frame i is centred on output sample i * hop (the first hop is cut off below).
    frame_times_s = np.arange(n_frames) * hop / SAMPLE_RATE
    progress = np.clip(frame_times_s / event.duration_s, 0.0, 1.0)
    centre_hz = event.freq_hz * (event.freq_end_hz / event.freq_hz) ** progress
    freqs_hz = np.fft.rfftfreq(_WHOOSH_FRAME, 1.0 / SAMPLE_RATE)
    log_distance = np.log2(np.maximum(freqs_hz, 1.0)[None, :] / centre_hz[:, None])
    band_gain = np.exp(-0.5 * (log_distance / _WHOOSH_BANDWIDTH_OCT) ** 2)
    spectra = (rng.standard_normal(band_gain.shape)
               + 1j * rng.standard_normal(band_gain.shape)) * band_gain
    window = np.sqrt(0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(_WHOOSH_FRAME) / _WHOOSH_FRAME))
    frames = np.fft.irfft(spectra, _WHOOSH_FRAME, axis=1) * window
    out = np.zeros((n_frames + 1) * hop)
    for i in range(n_frames):
        out[i * hop:i * hop + _WHOOSH_FRAME] += frames[i]
    # A whoosh swells and fades as it passes by.
    return out[hop:hop + n_samples] * np.sin(np.pi * np.arange(n_samples) / n_samples)


def _click_train(event: Event, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Short decaying broadband clicks at a regular rate, the first at onset."""
    n_click = int(_CLICK_LENGTH_S * SAMPLE_RATE)
    wave = np.zeros(n_samples)
    n_clicks = int((n_samples - n_click) / SAMPLE_RATE * event.rate_hz) + 1
    for k in range(n_clicks):
        # Floor, not round, so the last click always fits.
        start = int(k * SAMPLE_RATE / event.rate_hz)
        click = rng.standard_normal(n_click) * np.exp(-np.arange(n_click) / (n_click / 3))
        wave[start:start + n_click] += click
    return wave


def _knock(event: Event, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Evenly spaced hits, each two damped low modes plus a faint broadband tick."""
    t_s = _time_s(n_samples)
    spacing_s = ((event.duration_s - _KNOCK_TAIL_S) / (event.hits - 1)
                 if event.hits > 1 else 0.0)
    n_tick = int(0.003 * SAMPLE_RATE)
    wave = np.zeros(n_samples)
    for k in range(event.hits):
        start = int(round(k * spacing_s * SAMPLE_RATE))
        local_s = t_s[:n_samples - start]
        hit = np.zeros(local_s.size)
        for ratio, amp in zip(_KNOCK_MODE_RATIOS, _KNOCK_MODE_AMPS):
            hit += amp * np.sin(2.0 * np.pi * event.freq_hz * ratio * local_s)
        hit *= np.exp(-local_s / event.decay_s)
        hit[:n_tick] += (_KNOCK_TRANSIENT_AMP * rng.standard_normal(n_tick)
                         * np.exp(-np.arange(n_tick) / (n_tick / 4)))
        wave[start:] += _KNOCK_HIT_AMPS[k] * hit
    return wave


def _synthesise(event: Event, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """The raw (unscaled, unfaded) waveform of one event."""
    kind = event.kind
    t_s = _time_s(n_samples)
    if kind == "tone":
        return _sine_from_freq_track(np.full(n_samples, event.freq_hz), rng)
    if kind in ("rising chirp", "falling chirp"):
        # Exponential sweep: a straight line on the (roughly log) mel axis.
        track_hz = event.freq_hz * (event.freq_end_hz / event.freq_hz) ** (t_s / event.duration_s)
        return _sine_from_freq_track(track_hz, rng)
    if kind == "warbling tone":
        deviation = event.vibrato_semitones / 12.0 * np.sin(2.0 * np.pi * event.rate_hz * t_s)
        return _sine_from_freq_track(event.freq_hz * 2.0 ** deviation, rng)
    if kind == "pulsing tone":
        # Squared raised cosine: deep silent gaps between pulses, starting from zero.
        tremolo = (0.5 - 0.5 * np.cos(2.0 * np.pi * event.rate_hz * t_s)) ** 2
        return tremolo * _sine_from_freq_track(np.full(n_samples, event.freq_hz), rng)
    if kind == "bright harmonic note":
        return _harmonic_note(event, n_samples, odd_only=False, rng=rng)
    if kind == "hollow harmonic note":
        return _harmonic_note(event, n_samples, odd_only=True, rng=rng)
    if kind == "bell":
        return _bell(event, n_samples, rng)
    if kind == "white noise burst":
        return rng.standard_normal(n_samples)
    if kind == "pink noise burst":
        # Amplitude ~ f^-1/2 (power ~ 1/f), flattened below 50 Hz.
        noise = _spectrally_shaped_noise(
            n_samples, lambda f: 1.0 / np.sqrt(np.maximum(f, 50.0)), rng)
        ramp_db = _SWELL_RANGE_DB * (t_s / event.duration_s - 1.0)
        if event.attribute == "fading":
            ramp_db = ramp_db[::-1]
        return noise * 10.0 ** (ramp_db / 20.0)
    if kind == "hiss":
        edge_hz = event.freq_hz
        return _spectrally_shaped_noise(
            n_samples, lambda f: _smooth_step(f, edge_hz - 500.0, edge_hz), rng)
    if kind == "low rumble":
        # Brown noise (amplitude ~ 1/f) cut off softly above the band edge, and
        # below 50 Hz too: the log-mel front end starts there, so energy below
        # it would be invisible yet still count in the level normalisation.
        edge_hz = event.freq_hz
        return _spectrally_shaped_noise(
            n_samples,
            lambda f: (_smooth_step(f, 30.0, 50.0) / np.maximum(f, 30.0)
                       * (1.0 - _smooth_step(f, edge_hz, 1.5 * edge_hz))),
            rng)
    if kind == "whoosh":
        return _whoosh(event, n_samples, rng)
    if kind == "click train":
        return _click_train(event, n_samples, rng)
    if kind == "knock":
        return _knock(event, n_samples, rng)
    raise ValueError(f"unknown event kind {kind!r}")


def _render_event(event: Event, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Synthesise, normalise, fade and apply the event gain."""
    wave = _synthesise(event, n_samples, rng)
    if event.kind in _IMPULSIVE_KINDS:
        # RMS would be dominated by silence between hits; match peaks instead.
        wave *= _IMPULSIVE_PEAK / max(np.max(np.abs(wave)), 1e-12)
        # Percussive attacks are intentional, so only the end is faded.
        wave *= _fade_envelope(n_samples, 0.0, _FADE_OUT_S)
    else:
        wave *= _SUSTAINED_RMS / max(np.sqrt(np.mean(wave ** 2)), 1e-12)
        wave *= _fade_envelope(n_samples, _FADE_IN_S, _FADE_OUT_S)
    return wave * 10.0 ** (event.gain_db / 20.0)


def render_clip(events: list[Event], seed: int) -> np.ndarray:
    """Render planned events into a float32 clip of CLIP_SAMPLES samples.

    The events are mixed at their planned positions and gains, the mix is
    scaled to a random peak in [0.5, 0.9], and a -60 dBFS white noise floor
    is added so that no log-mel bin is ever log(0).
    """
    rng = np.random.default_rng(seed)
    mix = np.zeros(CLIP_SAMPLES)
    for event in events:
        start = int(round(event.start_s * SAMPLE_RATE))
        n_samples = min(int(round(event.duration_s * SAMPLE_RATE)), CLIP_SAMPLES - start)
        mix[start:start + n_samples] += _render_event(event, n_samples, rng)
    peak = np.max(np.abs(mix))
    if peak > 0.0:
        mix *= rng.uniform(*_MIX_PEAK_RANGE) / peak
    mix += _NOISE_FLOOR_RMS * rng.standard_normal(CLIP_SAMPLES)
    return np.clip(mix, -1.0, 1.0).astype(np.float32)


# --- Public entry points ---

def describe_clip(index: int, seed: int = 0) -> tuple[list[Event], list[str]]:
    """The events and captions of clip `index`, without rendering audio.

    Plan and captions come from one random.Random(f"{seed}-{index}") (captions
    drawn after planning), so captions never depend on numpy.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got {index}, {seed}")
    rng = random.Random(f"{seed}-{index}")
    events = plan_clip(rng)
    return events, caption_clip(events, rng)


def make_clip(index: int, seed: int = 0) -> tuple[np.ndarray, list[Event], list[str]]:
    """Clip number `index` of the dataset with the given seed: (audio, events, captions).

    The audio seed seed * 1_000_003 + index is unique per clip for index < 1_000_003.
    """
    events, captions = describe_clip(index, seed)
    return render_clip(events, seed=seed * 1_000_003 + index), events, captions


def class_labels(events: list[Event]) -> list[str]:
    """The event classes present in the clip, in time order."""
    return [event.kind for event in events]


# --- The built-in dataset on disk ---

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN_VERSION = "v1"
BUILTIN_SEED = 0
# Clip indices of each split; the held-out split never shares a clip with train.
BUILTIN_SPLITS = {"train": range(0, 1000), "test": range(1000, 1250)}
# Stage 2.1 refines on a smaller "target domain" of the training clips: the
# first 300 clips with two or three events (longer, ordered captions).
BUILTIN_REFINE_CLIPS = 300


def builtin_cache_dir() -> Path:
    """Where the rendered audio lives: $M2D_CLAP_CACHE or ~/.cache/m2d-clap."""
    root = Path(os.environ.get("M2D_CLAP_CACHE", Path.home() / ".cache" / "m2d-clap"))
    return root / f"builtin-{BUILTIN_VERSION}"


def builtin_clip_indices(split: str) -> list[int]:
    """Clip indices of "train", "test" or "refine" (a subset of train)."""
    if split == "refine":
        multi = [i for i in BUILTIN_SPLITS["train"] if len(describe_clip(i, BUILTIN_SEED)[0]) >= 2]
        return multi[:BUILTIN_REFINE_CLIPS]
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"unknown built-in split {split!r}; choose train, test or refine")
    return list(BUILTIN_SPLITS[split])


def builtin_rows(split: str) -> list[dict]:
    """Caption rows (file_name, caption, label) of a built-in split, from the generator."""
    rows = []
    audio_split = "train" if split == "refine" else split
    for index in builtin_clip_indices(split):
        events, captions = describe_clip(index, BUILTIN_SEED)
        label = ";".join(class_labels(events))
        rows += [{"file_name": f"{audio_split}/{index:05d}.flac", "caption": c, "label": label}
                 for c in captions]
    return rows


def builtin_csv(split: str) -> Path:
    return ASSETS_DIR / f"builtin_{split}.csv"


def builtin_dataset(split: str = "train") -> tuple[Path, Path]:
    """(captions CSV, audio root) of a built-in split, rendering its audio on first use.

    The CSV and its sentence embeddings are committed; the audio is rendered
    once into the cache (about 1 s per 100 clips) and reused.
    """
    csv_path = builtin_csv(split)
    committed, _ = text_embed.read_captions_csv(csv_path)
    expected = [row["file_name"] for row in builtin_rows(split)]
    if committed != expected:
        raise RuntimeError(f"{csv_path} does not match the built-in generator; rewrite it and its "
                           "embeddings with 'python data.py builtin-captions'.")
    root = builtin_cache_dir()
    audio_split = "train" if split == "refine" else split
    done = root / f".{audio_split}-complete"
    if not done.exists():
        render_builtin_split(audio_split, root)
        done.touch()
    return csv_path, root


def render_builtin_split(split: str, root: Path):
    """Render every clip of a split as 16-bit FLAC under root/split/."""
    tmp = root / f"{split}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    indices = BUILTIN_SPLITS[split]
    print(f"rendering the built-in {split} split ({len(indices)} clips) into {root / split}", flush=True)
    for index in indices:
        audio, _, _ = make_clip(index, BUILTIN_SEED)
        sf.write(tmp / f"{index:05d}.flac", audio, SAMPLE_RATE, subtype="PCM_16")
    shutil.rmtree(root / split, ignore_errors=True)
    tmp.rename(root / split)  # appears whole or not at all


def write_builtin_captions(model_name: str = text_embed.DEFAULT_MODEL):
    """Rewrite assets/builtin_{split}.csv and their sentence embeddings (.npy)."""
    ASSETS_DIR.mkdir(exist_ok=True)
    for split in (*BUILTIN_SPLITS, "refine"):
        csv_path = builtin_csv(split)
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "caption", "label"])
            writer.writeheader()
            writer.writerows(builtin_rows(split))
        text_embed.embed_captions_csv(csv_path, model_name=model_name, device="cpu")
        print(f"wrote {csv_path} and {csv_path.with_suffix('.npy')}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Data preparation commands.")
    commands = p.add_subparsers(dest="command", required=True)
    commands.add_parser("builtin", help="render the built-in dataset's audio into the cache")
    captions = commands.add_parser("builtin-captions",
                                   help="rewrite assets/builtin_*.csv and their caption embeddings")
    captions.add_argument("--model", default=text_embed.DEFAULT_MODEL, help="sentence model name or path")
    prep = commands.add_parser("prepare", help="convert a folder of audio into log-mel shards (resumable)")
    prep.add_argument("audio_dir", type=Path)
    prep.add_argument("out_dir", type=Path)
    prep.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    prep.add_argument("--shard-mb", type=int, default=1024, help="size of one shard file in MiB")
    stats = commands.add_parser("stats", help="normalisation statistics of prepared shards")
    stats.add_argument("out_dir", type=Path)
    stats.add_argument("--max-clips", type=int, default=10000)
    bench = commands.add_parser("bench-loader", help="DataLoader clips/s from shards and from per-file .npy")
    bench.add_argument("out_dir", type=Path)
    bench.add_argument("--crop-frames", type=int, default=1001)
    bench.add_argument("--batch-size", type=int, default=64)
    bench.add_argument("--workers", type=int, default=4)
    bench.add_argument("--seconds", type=float, default=15.0, help="timed seconds per source")
    bench.add_argument("--synthetic-clips", type=int, default=0,
                       help="first fill an empty OUT_DIR with this many random 10 s (1001-frame) clips")
    args = p.parse_args(argv)
    if args.command == "builtin":
        for split in BUILTIN_SPLITS:
            csv_path, root = builtin_dataset(split)
            print(f"{split}: {csv_path} with audio under {root}")
    elif args.command == "builtin-captions":
        write_builtin_captions(args.model)
    elif args.command == "prepare":
        written, failed = prepare(args.audio_dir, args.out_dir, args.workers, args.shard_mb)
        print(f"prepared {written} clips into {args.out_dir}; {failed} unreadable")
    elif args.command == "stats":
        mean, std = shard_stats(args.out_dir, args.max_clips)
        print(f"norm stats: mean {mean:.4f} std {std:.4f} (written to {args.out_dir / 'norm_stats.json'}; "
              f"train.py --shards reads them)")
    else:
        if args.synthetic_clips and not (args.out_dir / "index.csv").exists():
            write_synthetic_shards(args.out_dir, args.synthetic_clips, 1001)
        rates = bench_loader(args.out_dir, args.crop_frames, args.batch_size, args.workers, args.seconds)
        print(f"DataLoader, batch {args.batch_size}, {args.workers} workers, {args.crop_frames}-frame crops: "
              + ", ".join(f"{k} {v:.0f} clips/s" for k, v in rates.items()))


if __name__ == "__main__":
    main()
