"""Audio data for M2D-CLAP: waveform -> log-mel front end, audio reading,
datasets of captioned clips, normalisation statistics, manifests of labelled
clips (evaluate.py and finetune.py read them), manifests of captioned clips
(caption.py reads them), and corpus shards.
(The built-in synthetic dataset is builtin_data.py.)

Front end (must match the reference numerically): 16 kHz mono, STFT with
n_fft 400, periodic Hann window of 400, hop 160, centred reflect-padded frames,
power spectrum, 80 Slaney mel bands (50-8000 Hz, Slaney area normalisation),
log(mel + float32 eps). 100 frames per second.

Commands:
    python data.py prepare AUDIO_DIR OUT_DIR   # a corpus -> float16 log-mel shards + index
    python data.py stats OUT_DIR               # normalisation statistics of the shards
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import re
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

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


_FRONT_ENDS: dict[torch.device, LogMelSpectrogram] = {}  # one per device, made on first use


def log_mel(wave: torch.Tensor) -> torch.Tensor:
    """Log-mel of 16 kHz waveforms [..., samples] on their own device (see LogMelSpectrogram)."""
    if wave.device not in _FRONT_ENDS:
        _FRONT_ENDS[wave.device] = LogMelSpectrogram().to(wave.device)
    return _FRONT_ENDS[wave.device](wave)


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

    With convert=True (the authors' front end takes 16 kHz mono), multichannel
    audio is averaged to mono and other rates are resampled. With convert=False, a file that is
    not already mono at sample_rate is refused: training reads each file every
    epoch, so a corpus in another format should be converted once, up front.
    Unreadable, truncated, empty or non-finite audio raises AudioError naming
    the file and what is wrong with it; the caller, which knows where the file
    was listed, adds that.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found.")
    try:
        truncated = _truncated_wav(path)
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [samples, channels]
    except Exception as e:  # libsndfile reports format errors in several exception types
        raise AudioError(f"{path}: cannot be decoded as audio ({type(e).__name__}: {e}). Re-encode it as "
                         "WAV or FLAC.") from e
    if truncated:
        raise AudioError(f"{path}: {truncated}. Copy or download it again.")
    if data.shape[0] == 0:
        raise AudioError(f"{path}: has no samples.")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: contains NaN or inf samples. Re-export the file.")
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

    def frames(self, name: str) -> int:
        """Log-mel frames of one file at 16 kHz, from its header (decoded in full where the header fails)."""
        try:
            info = sf.info(str(self.root / name))
        except RuntimeError:  # soundfile's LibsndfileError: let read_log_mel say what is wrong
            return self.log_mel(name).shape[-1]
        return 1 + int(info.frames * SAMPLE_RATE / info.samplerate) // HOP_SAMPLES


def read_log_mel(path: str | Path, convert: bool = True) -> torch.Tensor:
    """Full-length log-mel [n_mels, frames] of an audio file of at least one patch (MIN_FRAMES frames)."""
    wave = load_audio(path, convert=convert)
    min_samples = (MIN_FRAMES - 1) * HOP_SAMPLES  # centred frames: 1 + samples // hop
    if len(wave) < min_samples:
        raise AudioError(f"{path}: only {len(wave) / SAMPLE_RATE:.3f} s long; clips need at least {MIN_FRAMES} "
                         f"frames, one patch ({min_samples / SAMPLE_RATE:.2f} s).")
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


def caption_rows_by_file(table: text_embed.CaptionTable) -> dict[str, list[int]]:
    """The caption rows of each audio file, refusing a file spelled two ways ("a.wav" and "./a.wav")."""
    rows_of, spelled = defaultdict(list), {}
    for row, name in enumerate(table.file_names):
        same = spelled.setdefault(os.path.normpath(name), name)
        if same != name:
            raise AudioError(f"{table.csv_path}, line {row + 2}: {name!r} and {same!r} name the same audio "
                             "file. Spell every file the same way on all of its caption rows.")
        rows_of[name].append(row)
    return rows_of


def listed_in(error: AudioError, csv_path: Path) -> AudioError:
    """error, with where its file is listed and the two ways on: fix or drop the file, or --skip-bad."""
    return AudioError(f"{error} It is listed in {csv_path}: fix the file or remove its rows there, or pass "
                      "--skip-bad to train without the clips that cannot be read.")


def readable_files(rows_of: dict[str, list[int]], source, preload: bool, skip_bad: BadClipReport | None,
                   csv_path: Path) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """The files that can be used, and their log-mels when preloading.

    Missing files (and, when preloading, unreadable ones) stop the run, or
    with a BadClipReport are listed there and left out.
    """
    missing = source.missing(list(rows_of))
    if missing and skip_bad is None:
        raise AudioError(f"{csv_path}: {len(missing)} of {len(rows_of)} audio file(s) listed there, e.g. "
                         f"{missing[:3]}, are not found {source.where()}. Pass --skip-bad to train without them.")
    for name in missing:
        skip_bad.add(name, f"not found {source.where()}")
        del rows_of[name]
    mels = {}
    for name in list(rows_of) if preload else []:
        try:
            mels[name] = source.log_mel(name)
        except AudioError as e:
            if skip_bad is None:
                raise listed_in(e, csv_path) from e
            skip_bad.add(name, str(e))
            del rows_of[name]
    if not rows_of:
        raise AudioError(f"{csv_path}: none of its audio files could be read; see {skip_bad.path}")
    return rows_of, mels


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
        rows_of, mels = readable_files(caption_rows_by_file(table), self.source, preload, skip_bad, table.csv_path)
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
                    raise listed_in(e, self.table.csv_path) from e
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
# Manifests: labelled clips for evaluation (evaluate.py) and fine-tuning (finetune.py)


class ManifestError(ValueError):
    """A manifest that cannot be used as it is."""


LABEL_SEPARATORS = (";", "|")  # several labels of one clip: "dog;bark" or "dog|bark"
SPLITS = ("train", "valid", "test")


@dataclass
class Manifest:
    """Labelled clips, read by read_manifest, whose rules it documents.

    files holds each clip once, in the order of first appearance; labels its
    label strings; split its part ("train", "valid", "test") or fold its fold,
    or neither. captions (with caption_clip, the clip index of each) are for
    retrieval; caption_embeddings, row-aligned with them, where precomputed.
    """

    name: str                            # the CSV's path, for messages
    root: Path                           # the folder the file names are relative to
    files: list[str] = field(default_factory=list)
    labels: list[list[str]] = field(default_factory=list)
    split: list[str] | None = None
    fold: list[str] | None = None
    captions: list[str] = field(default_factory=list)
    caption_clip: list[int] = field(default_factory=list)
    caption_embeddings: np.ndarray | None = None
    lines: list[int] = field(default_factory=list)  # the CSV line of each clip's first row, for messages

    def where(self, i: int) -> str:
        """Where clip i is in the CSV, for messages: 'manifest.csv, line 7 (dog.wav)'."""
        line = f", line {self.lines[i]}" if i < len(self.lines) else ""
        return f"{self.name}{line} ({self.files[i]})"

    def unreadable(self, i: int, error: AudioError) -> AudioError:
        """The AudioError of clip i's file, with where the manifest lists it and the way on."""
        return AudioError(f"{error} It is listed in {self.where(i)}: fix the file or remove its row.")

    @property
    def classes(self) -> list[str]:
        """The sorted label strings of the training clips: split "train", or every clip without a split."""
        train = [ls for ls, s in zip(self.labels, self.split or ["train"] * len(self.labels)) if s == "train"]
        return sorted({c for ls in train for c in ls})

    @property
    def multi_label(self) -> bool:
        return any(len(ls) > 1 for ls in self.labels)

    @property
    def folds(self) -> list[str]:
        """The distinct folds, in natural order ("2" before "10")."""
        return sorted(set(self.fold or []), key=lambda f: (len(f), f))

    def indices(self, part: str, holdout_fold: str | None = None) -> list[int]:
        """Clip indices of a split; with folds, "test" is the held-out fold, "train" the others, "valid" none."""
        if self.split is not None:
            return [i for i, s in enumerate(self.split) if s == part]
        if self.fold is None:
            raise ManifestError(f"{self.name}: has neither a split nor a fold column; add one (train/valid/test "
                                "per clip, or a fold per clip)")
        if holdout_fold is None:
            raise ManifestError(f"{self.name}: has folds, not splits; pass the fold to hold out")
        if part == "valid":
            return []
        return [i for i, f in enumerate(self.fold) if (f == holdout_fold) == (part == "test")]


def read_csv(csv_path: Path, what: str) -> tuple[list[str], list[dict]]:
    """A CSV's header and rows (dicts), or a ManifestError naming the file: `what` not found, or not UTF-8 CSV."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return reader.fieldnames or [], list(reader)
    except FileNotFoundError as e:
        raise ManifestError(f"{csv_path}: {what} not found") from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(f"{csv_path}: not a readable UTF-8 CSV ({e})") from e


def read_manifest(csv_path: str | Path, audio_root: str | Path | None = None) -> Manifest:
    """Read a manifest CSV. Its rules, for evaluate.py and finetune.py alike:

    - columns: file_name (relative to audio_root, default the CSV's folder)
      and label, both required; caption, split and fold optional (split or
      fold, not both);
    - label: one or more class names joined by ';' or '|';
    - split: train, valid or test; fold: any name, each held out in turn;
    - a file may have several rows (one per caption); each repeats its labels;
    - the classes are the sorted label strings of the training clips (see
      Manifest.classes); check_labels refuses a test label none of them has.
    Whether the audio files exist is checked by the program against its
    source (audio folder or shards), not here.
    """
    columns, rows = read_csv(csv_path, "manifest")
    if "file_name" not in columns or "label" not in columns:
        raise ManifestError(f"{csv_path}: the header has {columns}; a manifest needs file_name, label and "
                            "optionally caption and split (train/valid/test) or fold")
    if "split" in columns and "fold" in columns:
        raise ManifestError(f"{csv_path}: has both a split and a fold column; keep one")
    if not rows:
        raise ManifestError(f"{csv_path}: no rows")
    manifest = Manifest(str(csv_path), Path(audio_root) if audio_root else Path(csv_path).parent,
                        split=[] if "split" in columns else None, fold=[] if "fold" in columns else None)
    index: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        add_manifest_row(manifest, index, row, f"{csv_path}, line {line}", line)
    return manifest


def add_manifest_row(manifest: Manifest, index: dict[str, int], row: dict, where: str, line: int | None = None):
    """One CSV row: a new clip, or another caption of a clip already read (whose labels it must repeat)."""
    name, text = row["file_name"], row["label"] or ""
    for sep in LABEL_SEPARATORS[1:]:
        text = text.replace(sep, LABEL_SEPARATORS[0])
    labels = [c.strip() for c in text.split(LABEL_SEPARATORS[0]) if c.strip()]
    if not name or not labels:
        raise ManifestError(f"{where}: empty file_name or label")
    column = "split" if manifest.split is not None else "fold" if manifest.fold is not None else None
    part = (row[column] or "").strip() if column else None
    if column == "split" and part not in SPLITS:
        raise ManifestError(f"{where}: split must be train, valid or test, got {part!r}")
    if name in index:
        k = index[name]
        if manifest.labels[k] != labels:
            raise ManifestError(f"{where}: {name} has labels {labels} here but {manifest.labels[k]} on an earlier "
                                "row; give every row of a file the same labels")
        if column and getattr(manifest, column)[k] != part:
            raise ManifestError(f"{where}: {name} is in {column} {part!r} here but {getattr(manifest, column)[k]!r} "
                                f"on an earlier row; a file belongs to one {column}")
    else:
        index[name] = len(manifest.files)
        manifest.files.append(name)
        manifest.labels.append(labels)
        if line is not None:
            manifest.lines.append(line)
        if column:
            getattr(manifest, column).append(part)
    if (row.get("caption") or "").strip():  # a blank cell: the clip has no caption on this row
        manifest.captions.append(row["caption"])
        manifest.caption_clip.append(index[name])


def check_labels(manifest: Manifest, holdout_fold: str | None = None):
    """Every label of the test (and valid) clips must be a class of the training clips: a classifier cannot
    learn a class no training clip has. With folds, for the held-out fold against the others."""
    if manifest.split is None and manifest.fold is None:
        return
    train = {c for i in manifest.indices("train", holdout_fold) for c in manifest.labels[i]}
    for part in ("valid", "test"):
        for i in manifest.indices(part, holdout_fold):
            unknown = sorted(set(manifest.labels[i]) - train)
            if unknown:
                held = f" (fold {holdout_fold} held out)" if holdout_fold is not None else ""
                raise ManifestError(f"{manifest.where(i)}: a {part} clip with label(s) {unknown} that no training "
                                    f"clip has{held}; a classifier cannot learn them. Fix the label, or move a clip "
                                    f"of {unknown[0]!r} into the training {'folds' if held else 'split'}.")


def holdouts(manifest: Manifest, folds: list[str] | None = None) -> list[str | None]:
    """What a classifier trained on the manifest holds out in turn, checked: [None] for a split manifest (with
    train and test clips), else its folds (at least 2; `folds` picks some). Labels are checked (check_labels)."""
    if manifest.fold is None:
        if folds:
            raise ManifestError(f"{manifest.name}: --folds needs a manifest with a fold column; this one has "
                                f"{'splits' if manifest.split is not None else 'neither splits nor folds'}")
        for part in ("train", "test"):
            if not manifest.indices(part):
                raise ManifestError(f"{manifest.name}: no clip in the {part} split; training a classifier needs "
                                    "train and test clips (or use a fold column)")
        chosen = [None]
    else:
        if len(manifest.folds) < 2:
            raise ManifestError(f"{manifest.name}: every clip is in fold {manifest.folds[0]!r}; holding folds out "
                                "in turn needs at least 2 folds (or use a split column: train/valid/test)")
        unknown = sorted(set(folds or []) - set(manifest.folds))
        if unknown:
            raise ManifestError(f"{manifest.name}: --folds {unknown} not in the manifest, whose folds are "
                                f"{manifest.folds}")
        chosen = list(folds or manifest.folds)
    for holdout in chosen:
        check_labels(manifest, holdout)
    return chosen


def label_targets(labels: list[list[str]], classes: list[str], where: str = "") -> torch.Tensor:
    """Label strings per clip -> multi-hot float targets [N, C] in the given class order.

    A label outside `classes` is refused; check_labels, run first, names its line.
    """
    index = {c: k for k, c in enumerate(classes)}
    targets = torch.zeros(len(labels), len(classes))
    for i, clip_labels in enumerate(labels):
        unknown = [c for c in clip_labels if c not in index]
        if unknown:
            raise ManifestError(f"{where}: clip {i} has label(s) {unknown} that no training clip has; "
                                "a classifier cannot learn them. Fix the label or the split.")
        targets[i, [index[c] for c in clip_labels]] = 1.0
    return targets


@dataclass
class ClipSet:
    """Labelled clips of a manifest: raw clips (waveforms [samples] or log-mels [F, T]) and targets [N, C].

    Targets are multi-hot (one-hot for single-label tasks) floats, so that
    mixup can mix them. clips is a list, or LazyClips for AudioSet-scale data.
    """

    clips: list[torch.Tensor]
    targets: torch.Tensor
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.clips)


class LazyClips:
    """Clips read on demand (shards of millions of clips): indexed like a list, nothing kept in memory."""

    def __init__(self, read, names: list[str]):
        self.read, self.names = read, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.read(n) for n in self.names[index]]
        return self.read(self.names[index])


def load_clips(manifest: Manifest, indices: list[int], source: AudioFolder | ShardStore, raw_input: str,
               lazy: bool = False, workers: int = 1) -> ClipSet:
    """Some manifest rows as a ClipSet: waveforms (raw_input "wave") or full-length log-mels ("log_mel").

    Waveforms need audio files; log-mels come from audio files or shards.
    lazy: read each clip when it is indexed; else read them all now, with
    `workers` threads. Targets follow manifest.classes.
    """
    names = [manifest.files[i] for i in indices]
    missing = source.missing(names)
    if missing:
        raise ManifestError(f"{manifest.name}: {len(missing)} clip(s) such as {missing[0]} not found {source.where()}")
    if raw_input == "wave" and not isinstance(source, AudioFolder):
        raise ManifestError(f"{manifest.name}: raw_input='wave' needs audio files, not log-mel shards")
    raw = (lambda name: load_audio(source.root / name)) if raw_input == "wave" else source.log_mel
    index = {manifest.files[i]: i for i in indices}

    def read(name: str) -> torch.Tensor:
        try:
            return raw(name)
        except AudioError as e:
            raise manifest.unreadable(index[name], e) from e

    targets = label_targets([manifest.labels[i] for i in indices], manifest.classes, manifest.name)
    if lazy:
        return ClipSet(LazyClips(read, names), targets, names)
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        return ClipSet(list(pool.map(read, names)), targets, names)


# -----------------------------------------------------------------------------
# Caption manifests: clips and their reference captions, for captioning (caption.py)


@dataclass
class CaptionManifest:
    """Captioned clips, read by read_caption_manifest, whose rules it documents.

    files holds each clip once, in the order of first appearance; split its
    part; captions its reference captions. caption_embeddings, where they are
    precomputed (the built-in data), holds a sentence embedding per caption,
    clip after clip in file order.
    """

    name: str                            # the CSV's path, for messages
    root: Path                           # the folder the file names are relative to
    files: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # the CSV line of each clip's first row, for messages
    caption_embeddings: np.ndarray | None = None

    def where(self, i: int) -> str:
        line = f", line {self.lines[i]}" if i < len(self.lines) else ""
        return f"{self.name}{line} ({self.files[i]})"

    def indices(self, part: str) -> list[int]:
        return [i for i, s in enumerate(self.split) if s == part]

    def unreadable(self, i: int, error: AudioError) -> AudioError:
        return AudioError(f"{error} It is listed in {self.where(i)}: fix the file or remove its rows.")


CAPTION_COLUMN = re.compile(r"caption_\d+")  # Clotho's caption_1 ... caption_5


def read_caption_manifest(csv_path: str | Path, audio_root: str | Path | None = None) -> CaptionManifest:
    """Read a captioning manifest CSV. Its rules:

    - columns: file_name (relative to audio_root, default the CSV's folder),
      split (train, valid or test) and the captions, in one of two layouts:
      `caption`, one per row, a clip on as many rows as it has captions (the
      captions CSV of text_embed.py, with a split column); or caption_1,
      caption_2, ... on one row (Clotho's layout; blank cells are skipped).
      Other columns (label, ...) are ignored;
    - every row names a file, its split, and at least one caption; a file
      belongs to one split;
    - there are train and test clips (valid ones are optional).
    """
    columns, rows = read_csv(csv_path, "caption manifest")
    caption_columns = caption_columns_of(csv_path, columns)
    if not rows:
        raise ManifestError(f"{csv_path}: no rows")
    manifest = CaptionManifest(str(csv_path), Path(audio_root) if audio_root else Path(csv_path).parent)
    index: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        add_caption_row(manifest, index, row, caption_columns, f"{csv_path}, line {line}", line)
    for part in ("train", "test"):
        if not manifest.indices(part):
            raise ManifestError(f"{csv_path}: no clip in the {part} split; captioning trains on split train and "
                                "scores on split test. Mark some rows train and some test.")
    return manifest


def caption_columns_of(csv_path: str | Path, columns: list[str]) -> list[str]:
    """The caption columns of a manifest's header: ["caption"], or caption_1, caption_2, ... in number order."""
    numbered = sorted((c for c in columns if CAPTION_COLUMN.fullmatch(c)), key=lambda c: int(c.split("_")[1]))
    missing = [c for c in ("file_name", "split") if c not in columns]
    if missing or ("caption" in columns) == bool(numbered):
        problem = (f"no {' or '.join(missing)} column" if missing else
                   "both a caption column and caption_1, caption_2, ..." if numbered else "no caption column")
        raise ManifestError(f"{csv_path}: the header has {columns}: {problem}. A caption manifest needs "
                            "file_name, split (train/valid/test) and either caption (one per row) or caption_1, "
                            "caption_2, ... (several per row, as Clotho's CSVs).")
    return ["caption"] if "caption" in columns else numbered


def add_caption_row(manifest: CaptionManifest, index: dict[str, int], row: dict, caption_columns: list[str],
                    where: str, line: int):
    """One CSV row: a new clip, or more captions of a clip already read (in the same split)."""
    name, part = (row["file_name"] or "").strip(), (row["split"] or "").strip()
    captions = [row[c].strip() for c in caption_columns if (row[c] or "").strip()]
    if not name:
        raise ManifestError(f"{where}: empty file_name")
    if part not in SPLITS:
        raise ManifestError(f"{where}: split must be train, valid or test, got {part!r}")
    if not captions:
        raise ManifestError(f"{where}: {name} has no caption on this row (the {', '.join(caption_columns)} "
                            "cell(s) are empty); write its caption, or remove the row")
    if name not in index:
        index[name] = len(manifest.files)
        manifest.files.append(name)
        manifest.split.append(part)
        manifest.captions.append([])
        manifest.lines.append(line)
    k = index[name]
    if manifest.split[k] != part:
        raise ManifestError(f"{where}: {name} is in split {part!r} here but {manifest.split[k]!r} on line "
                            f"{manifest.lines[k]}; a file belongs to one split")
    manifest.captions[k] += captions


# -----------------------------------------------------------------------------
# Corpus shards: log-mels of millions of clips in a few large float16 files
#
# OUT_DIR/shard_00000.f16 ...  raw little-endian float16; each clip a C-order
#                              [n_mels, frames] block, one after another
# OUT_DIR/index.csv            file_name, shard, offset (in values), frames
# OUT_DIR/report.csv           file_name, error: every file that could not be read
# OUT_DIR/norm_stats.json      {"mean": ..., "std": ...} from 'python data.py stats'

# Every format soundfile reads, by file-name suffix (plus the other names of AIFF, Ogg and Opus files).
AUDIO_SUFFIXES = frozenset({"." + f.lower() for f in sf.available_formats()} | {".aif", ".oga", ".opus"})
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

    def frames(self, name: str) -> int:
        return self.entries[name][2]

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
    """Convert every audio file under audio_dir into shards; returns (clips written, files failed).

    Resumable: files already in the index are skipped, and a killed run goes on
    where it stopped. Each clip is appended to its shard before its index row,
    so the index never points at bytes that were not written.
    """
    audio_dir, out_dir = Path(audio_dir), Path(out_dir)
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"{audio_dir}: no such folder; pass the folder that holds the audio files")
    names = sorted(p.relative_to(audio_dir).as_posix() for p in audio_dir.rglob("*")
                   if p.suffix.lower() in AUDIO_SUFFIXES)
    if not names:
        raise FileNotFoundError(f"{audio_dir}: no audio files in it or its subfolders (by name: "
                                f"{', '.join(sorted(AUDIO_SUFFIXES)[:6])}, ...)")
    out_dir.mkdir(parents=True, exist_ok=True)
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Data preparation commands.")
    commands = p.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="convert a folder of audio into log-mel shards (resumable)")
    prep.add_argument("audio_dir", type=Path, help="folder searched recursively for audio files (any format "
                      "soundfile reads, any rate and channel count: downmixed and resampled to 16 kHz mono)")
    prep.add_argument("out_dir", type=Path, help="folder for the shards, index.csv and report.csv; a rerun resumes")
    prep.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="decoding processes (default: one per core)")
    prep.add_argument("--shard-mb", type=int, default=1024, help="size of one shard file in MiB (default: 1024)")
    stats = commands.add_parser("stats", help="normalisation statistics of prepared shards")
    stats.add_argument("out_dir", type=Path, help="shards written by 'python data.py prepare'; "
                       "norm_stats.json is written there")
    stats.add_argument("--max-clips", type=int, default=10000,
                       help="clips, evenly spaced through the index, that the mean and std are estimated "
                            "from (default: 10000)")
    args = p.parse_args(argv)
    try:
        if args.command == "prepare":
            written, failed = prepare(args.audio_dir, args.out_dir, args.workers, args.shard_mb)
        else:
            mean, std = shard_stats(args.out_dir, args.max_clips)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.command == "prepare":
        print(f"prepared {written} clips into {args.out_dir}; {failed} unreadable")
    else:
        print(f"norm stats: mean {mean:.4f} std {std:.4f} (written to {args.out_dir / 'norm_stats.json'}; "
              f"train.py --shards reads them)")


if __name__ == "__main__":
    main()
