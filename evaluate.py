"""Evaluation of M2D-CLAP checkpoints: features for downstream use, the
protocols used to judge them (linear probe, zero-shot classification,
audio-text retrieval, RankMe), and corpus embedding.

Feature API on raw waveforms (audio: float tensor [n_sounds, n_samples], mono,
16 kHz, in [-1, 1]); the functions follow HEAR's convention, so this module
can be handed to HEAR's evaluation kit as it is:
    model = load_model("runs/stage2.1/last.pt")          # ours, or a released .pth
    scene = get_scene_embeddings(audio, model)            # [n, 3840] (ViT-Base)
    frames, ms = get_timestamp_embeddings(audio, model)   # [n, T, 3840], [n, T]
    flat = get_scene_embeddings(audio, model, flat=True)  # [n, 768]
    a = encode_clap_audio(audio, model)                   # [n, D]
    t = encode_clap_text(["a dog barks"], model)          # [m, D]; cosine: normalise both

Command line:
    python evaluate.py                                   # newest run, built-in held-out clips
    python evaluate.py --checkpoint runs/stage1/last.pt --json results.json
    python evaluate.py embed --checkpoint CKPT --audio DIR_OR_CSV --out FEATURES/
    python evaluate.py export runs/stage2/last.pt OUT.pth   # ours in the released layout
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

import builtin_data
import data
import features
import model as m2d
import runs
import text_embed


# -----------------------------------------------------------------------------
# A loaded model, as feature extractors use it


@dataclass
class TextSide:
    """How new text becomes a CLAP text embedding for a loaded model.

    kind "encoder": tokens through the model's text encoder (tokenizer needed);
    "sentence": a sentence model's embedding (sentence_model, a name or local
    folder, loaded on first use), then the text projector; "none": new text
    cannot be encoded, for the reason in `unavailable`.
    """

    kind: str
    tokenizer: object = None
    sentence_model: str | None = None
    append_eos: bool = False          # NV-Embed-v2, as the authors' runtime calls it
    trust_remote_code: bool = False
    unavailable: str | None = None


class Embedder(torch.nn.Module):
    """An M2D-CLAP model with what feature extraction needs: HEAR's model object.

    sample_rate is 16000; scene_embedding_size and timestamp_embedding_size
    are F * D (3840 for ViT-Base: the 5 frequency rows of a time column
    stacked), flat_embedding_size is D. `model` is the M2DCLAP, `info` what is
    known of the checkpoint (stage, norm_stats, missing_parts, ...).
    """

    sample_rate = data.SAMPLE_RATE

    def __init__(self, model: m2d.M2DCLAP, info: dict, text: TextSide):
        super().__init__()
        self.model = model.eval()
        self.frontend = data.LogMelSpectrogram()
        self.info = info
        self.text = text
        self.sentence_encoder = None  # loaded on first use of a "sentence" text side
        config = model.config
        self.flat_embedding_size = config.embed_dim
        self.scene_embedding_size = self.timestamp_embedding_size = (
            config.n_mels // config.patch_size * config.embed_dim)

    @property
    def device(self) -> torch.device:
        return self.model.norm_stats.device

    @property
    def has_clap(self) -> bool:
        return "audio_proj" not in self.info.get("missing_parts", [])


def load_model(path: str | Path, device: str = "cpu", text_encoder: str | None = None) -> Embedder:
    """Load our checkpoint or a released M2D / M2D-CLAP file, in eval mode on `device`.

    text_encoder: a local Hugging Face folder for the text side, where the
    file does not hold it all: the tokenizer and config of a released
    stage-2 file's BERT (bert-base-uncased), the GTE-base or NV-Embed-v2 of
    a released file without text-encoder weights, or a replacement for the
    tokenizer / sentence model one of our checkpoints names. Without it the
    audio side works and encode_clap_text says which folder is needed.
    """
    ckpt = runs.load_checkpoint(path)
    if isinstance(ckpt, dict) and "model_config" in ckpt:
        embedder = load_ours(ckpt, text_encoder)
    else:
        embedder = load_released(Path(path), ckpt, text_encoder)
    embedder.info["path"] = str(path)
    return embedder.to(device).eval()


def load_ours(ckpt: dict, text_encoder: str | None = None) -> Embedder:
    """An Embedder of a checkpoint written by train.py."""
    model, _ = features.build_model(ckpt, with_tokenizer=False)
    info = {k: ckpt.get(k) for k in ("stage", "norm_stats", "text_side", "text_encoder", "embedding_model")}
    info["missing_parts"] = []
    if ckpt.get("text_side") == "encoder":
        folder = text_encoder or ckpt["text_encoder"]["name"]
        try:
            text = TextSide("encoder", tokenizer=text_embed.load_tokenizer(folder))
        except (OSError, ImportError) as e:  # the audio side works without it
            text = TextSide("none", unavailable=f"{e} (pass text_encoder=FOLDER, --text-encoder, with the "
                                                f"tokenizer of {ckpt['text_encoder']['name']})")
    elif text_encoder or ckpt.get("embedding_model"):
        text = TextSide("sentence", sentence_model=text_encoder or ckpt["embedding_model"])
    else:
        text = TextSide("none", unavailable="this checkpoint does not record which sentence model made its "
                        "caption embeddings: pass text_encoder=FOLDER (--text-encoder) of that model")
    return Embedder(model, info, text)


def newest_run(root: Path = Path("runs")) -> Path:
    """The checkpoint of the latest stage that has one: stage 2.1, then 2, then 1."""
    for stage in ("2.1", "2", "1"):
        path = root / f"stage{stage}" / "last.pt"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no checkpoint under {root}/stage{{1,2,2.1}}; run 'python train.py --stage 1' "
                            "first or pass --checkpoint PATH")


# -----------------------------------------------------------------------------
# Released M2D / M2D-CLAP files (SPEC 9)
#
# A released file keeps a state dict under 'model' (often beside an
# argparse.Namespace under 'args'), with our key names behind an optional
# wrapper prefix; the folder name tells the input size and the text side.

RELEASED_PREFIXES = ("module.ar.runtime.backbone.", "backbone.", "module.")
# Keys of released files that our model has no place for, and why they can go.
RELEASED_IGNORED = {
    "text_encoder.pooler.": "BERT's pooler: the text feature is the CLS token or a token mean, never the pooler",
    "text_encoder.embeddings.position_ids": "a constant buffer that older transformers versions saved",
}
ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.0.attn.qkv.weight",
                "blocks.0.mlp.fc1.weight", "norm.weight", "norm.bias")
# The text-side letter of a folder name (the authors' runtime assumes A when there is none):
# the text model, and how its feature is taken.
TEXT_KINDS = {"A": ("thenlper/gte-base", "mean"), "B": ("bert-base-uncased", "cls"),
              "N": ("nvidia/NV-Embed-v2", "sentence")}
FOLDER_NAME = re.compile(r"(\d+)x(\d+)p(\d+)x(\d+)(?:p(\d+)k)?(?:p([A-Z]))?(?:p(TI))?")


def strip_released_keys(state: dict) -> dict:
    """Drop the wrapper prefixes, one of the two text_encoder. prefixes, and the keys in RELEASED_IGNORED."""
    out = {}
    for key, value in state.items():
        for prefix in RELEASED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.startswith("text_encoder.text_encoder."):  # the 2025 files' module inside a module
            key = key[len("text_encoder."):]
        if not key.startswith(tuple(RELEASED_IGNORED)):
            out[key] = value
    return out


def parse_folder_name(name: str) -> dict:
    """Setup facts from a released folder name, e.g. m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025."""
    match = FOLDER_NAME.search(name)
    if not match:
        return {}
    n_mels, frames, patch_f, patch_t, sr_khz, text_kind, _ = match.groups()
    facts = {"n_mels": int(n_mels), "crop_frames": int(frames), "patch_size": (int(patch_f), int(patch_t))}
    if sr_khz:
        facts["sample_rate"] = int(sr_khz) * 1000
    if text_kind:
        facts["text_kind"] = text_kind
    return facts


def released_facts(path: Path, args) -> dict:
    """Input size, rate, text letter and head count, from the file's 'args' where present, else its folder."""
    facts = parse_folder_name(path.parent.name)
    if getattr(args, "input_size", None):
        size = args.input_size
        size = size.split("x") if isinstance(size, str) else size
        facts["n_mels"], facts["crop_frames"] = (int(v) for v in size)
    if getattr(args, "sr", None):
        facts["sample_rate"] = int(str(args.sr).rstrip("k")) * 1000
    size = re.search(r"vit_(tiny|small|base|large|huge)", str(getattr(args, "model", "") or path.parent.name))
    facts["num_heads"] = getattr(args, "num_heads", None) or (m2d.VIT_HEADS[size.group(1)] if size else None)
    if facts.get("sample_rate", data.SAMPLE_RATE) != data.SAMPLE_RATE:
        raise ValueError(f"{path}: a {facts['sample_rate']} Hz model; this front end is 16 kHz only")
    return facts


def load_released(path: Path, raw: dict, text_encoder: str | None = None) -> Embedder:
    """An Embedder of a released file: every layout of SPEC 9 loads, or the error says why not.

    Parts a file does not have (the target and predictor of an inference
    file, the CLAP heads of an encoder-only one) keep their initialisation
    and are listed in info["missing_parts"]; every encoder tensor must be
    present, and no key may be left over.
    """
    args = raw.get("args") if isinstance(raw, dict) else None
    state = raw["model"] if isinstance(raw, dict) and "model" in raw else raw
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a dict of tensors, possibly under 'model')")
    state = strip_released_keys(state)
    missing = [k for k in ENCODER_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: not an M2D audio encoder: tensors {missing} are missing (keys seen: "
                         f"{sorted(state)[:5]} ...)")
    facts = released_facts(path, args)
    text_state = {k[len("text_encoder."):]: state.pop(k) for k in list(state) if k.startswith("text_encoder.")}
    norm_stats = tuple(state.pop("norm_stats").tolist()) if "norm_stats" in state else m2d.DEFAULT_NORM_STATS
    try:
        config = m2d.config_from_state_dict(state, facts.get("n_mels", 80), facts.get("crop_frames"),
                                            facts["num_heads"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    has_clap = any(k.startswith("audio_proj.") for k in state)
    encoder, text = released_text_side(path, facts.get("text_kind", "A"), text_state, has_clap, text_encoder)
    pooling = TEXT_KINDS[facts.get("text_kind", "A")][1]
    config = replace(config, text_pooling="mean" if pooling == "mean" else "cls")
    if encoder is not None and config.text_proj == "none" and encoder.config.hidden_size != config.embed_dim:
        raise ValueError(f"{path}: the text encoder is {encoder.config.hidden_size} wide, the audio side "
                         f"{config.embed_dim}, and the file has no text projector between them")
    model = m2d.M2DCLAP(config, norm_stats, encoder)
    if config.text_proj == "linear" and "text_proj.bias" not in state:  # a projector saved without its bias
        state["text_proj.bias"] = torch.zeros(config.embed_dim)
    own = {k for k in model.state_dict() if not k.startswith("text_encoder.")}
    unexpected = sorted(set(state) - own)
    if unexpected:
        raise ValueError(f"{path}: keys our model has no place for: {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state, strict=False)
    absent = own - set(state) - {"norm_stats", "pos_embed", "decoder_pos_embed"}
    parts = {"target": "target_", "predictor": ("decoder_", "mask_token"), "audio_proj": "audio_proj.",
             "logit_scale": "logit_scale"}
    info = {"stage": "released", "norm_stats": list(norm_stats), "model_config": asdict(config),
            "missing_parts": [p for p, prefix in parts.items() if any(k.startswith(prefix) for k in absent)],
            "text_kind": facts.get("text_kind")}
    return Embedder(model, info, text)


def released_text_side(path: Path, letter: str, text_state: dict, has_clap: bool, folder: str | None):
    """(text encoder module or None, TextSide) of a released file, as the authors' runtime builds them."""
    name, pooling = TEXT_KINDS[letter]
    if not has_clap:
        return None, TextSide("none", unavailable=f"{path} is an encoder-only file (no CLAP projectors)")
    if not folder:
        what = f"holds a {name} text encoder's weights but not its config and tokenizer" if text_state else \
            f"encodes text with {name}, which it does not hold"
        return None, TextSide("none", unavailable=f"{path} {what}: pass text_encoder=FOLDER (--text-encoder), "
                              f"a local copy of the Hugging Face folder {name}")
    if pooling == "sentence":  # NV-Embed-v2 runs its own code, through sentence-transformers
        return None, TextSide("sentence", sentence_model=folder, append_eos=True, trust_remote_code=True)
    if not text_state:
        encoder, tokenizer = text_embed.load_text_encoder(folder)
        return encoder, TextSide("encoder", tokenizer=tokenizer)
    encoder, tokenizer = text_embed.text_encoder_from_folder_config(folder)
    try:
        missing, unexpected = encoder.load_state_dict(text_state, strict=False)
    except RuntimeError as e:  # shapes that differ
        raise ValueError(f"{path}: its text encoder does not fit the architecture of {folder}/config.json "
                         f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}). "
                         f"Pass the folder of {name}.") from e
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{path}: its text encoder does not fit the architecture of {folder}/config.json: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}. Pass the folder of {name}.")
    return encoder, TextSide("encoder", tokenizer=tokenizer)


def export_released(ckpt_path: Path, out_path: Path, training_parts: bool = False) -> tuple[dict, m2d.M2DConfig]:
    """Write one of our checkpoints as a released-layout file {'model': state dict}: (the state, its config).

    The state dict has the released key names and norm_stats: the encoder and
    the CLAP heads, the text encoder under text_encoder.text_encoder.* as in
    the 2025 release, plus the target network and predictor with
    training_parts=True.
    """
    ckpt = runs.load_checkpoint(ckpt_path)
    if "model_config" not in ckpt:
        raise ValueError(f"{ckpt_path}: not a checkpoint written by train.py")
    model_config, state = runs.upgraded(ckpt)
    training = ("target_", "decoder_", "mask_token")
    state = {("text_encoder." + k if k.startswith("text_encoder.") else k): v
             for k, v in state.items() if training_parts or not k.startswith(training)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    runs.save_checkpoint(out_path, model=state)
    return state, m2d.M2DConfig(**model_config)


def conventional_folder_name(config: m2d.M2DConfig, text_encoder: bool) -> str:
    """The released folder naming, e.g. m2d_clap_vit_base-80x1001p16x16p16kpBpTI, so tools infer the setup.

    With a text encoder, its letter says how its feature is taken: B (BERT, CLS
    token) or A (GTE-style, mean over tokens); TI says its weights are included.
    """
    size = {768: "base", 1024: "large"}.get(config.embed_dim, f"d{config.embed_dim}")
    p = config.patch_size
    text = f"p{'B' if config.text_pooling == 'cls' else 'A'}pTI" if text_encoder else ""
    return f"m2d_clap_vit_{size}-{config.n_mels}x{config.crop_frames}p{p}x{p}p16k{text}"


def export_main(argv):
    p = argparse.ArgumentParser(prog="evaluate.py export",
                                description="Write a checkpoint of ours in the released M2D-CLAP layout.")
    p.add_argument("checkpoint", type=Path, help="a last.pt written by train.py")
    p.add_argument("out", type=Path, help="output .pth")
    p.add_argument("--training-parts", action="store_true", help="also write the target network and predictor")
    args = p.parse_args(argv)
    try:
        state, config = export_released(args.checkpoint, args.out, args.training_parts)
    except (ValueError, FileNotFoundError, runs.CheckpointWriteError) as e:
        sys.exit(f"error: {e}")
    has_text_encoder = any(k.startswith("text_encoder.") for k in state)
    print(f"wrote {args.out}: {len(state)} tensors with the released key names. Tools that read the setup "
          f"from the folder name expect it in a folder named like "
          f"{conventional_folder_name(config, has_text_encoder)}/")


# -----------------------------------------------------------------------------
# Features of clips of any length, as the authors' runtime cuts them (SPEC 2)


def feature_crops(normalized: torch.Tensor, crop_frames: int, patch_size: int) -> list[torch.Tensor]:
    """[F, frames] normalised log-mel -> consecutive crops of at most crop_frames frames.

    The normalised log-mel is zero-padded at the end so that the last crop
    fills whole patches; the number of crops is counted before that padding.
    A crop is never longer than crop_frames, so it never has more time
    patches than the position table.
    """
    frames = normalized.shape[-1]
    n_crops = -(-frames // crop_frames)
    pad = (patch_size - frames % crop_frames % patch_size) % patch_size
    padded = F.pad(normalized, (0, pad))
    return [padded[:, i * crop_frames:(i + 1) * crop_frames] for i in range(n_crops)]


@torch.no_grad()
def iter_patch_features(model: m2d.M2DCLAP, log_mels: Iterable[torch.Tensor],
                        batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Patch features [F, T_cols, D] (CLS dropped) of each log-mel [F, frames], yielded in input order.

    Each clip is normalised and cut by feature_crops; each crop is encoded
    alone. Crops of equal length from consecutive clips are encoded together,
    batch_size at a time, so any number of clips of any length streams
    through with a bounded number of crops waiting. Features stay on the
    model's device.
    """
    config = model.config
    grid_f = config.n_mels // config.patch_size
    device = model.norm_stats.device
    waiting: dict[int, list] = {}                 # crop length -> [(clip, crop number, crop)]
    parts: dict[int, list] = {}                   # clip -> its crops' features, None until encoded
    next_clip = 0

    def encode(length: int):
        group = waiting.pop(length)
        x = torch.stack([crop for _, _, crop in group])[:, None]            # [B, 1, F, length]
        tokens = model.encode_normalized(x)[:, 1:].float()                   # [B, F*T', D]
        tokens = tokens.reshape(len(group), grid_f, -1, tokens.shape[-1])    # [B, F, T', D]
        for (clip, k, _), t in zip(group, tokens):
            parts[clip][k] = t

    def finished():
        nonlocal next_clip
        while next_clip in parts and all(t is not None for t in parts[next_clip]):
            yield torch.cat(parts.pop(next_clip), dim=1)                      # [F, T_cols, D]
            next_clip += 1

    for clip, mel in enumerate(log_mels):
        crops = feature_crops(model.normalize(mel.to(device).float()), config.crop_frames, config.patch_size)
        parts[clip] = [None] * len(crops)
        for k, crop in enumerate(crops):
            waiting.setdefault(crop.shape[-1], []).append((clip, k, crop))
            if len(waiting[crop.shape[-1]]) == batch_size:
                encode(crop.shape[-1])
        if len(parts) > batch_size:  # many clips wait for a short last crop: encode what is there
            for length in list(waiting):
                encode(length)
        yield from finished()
    for length in list(waiting):
        encode(length)
    yield from finished()


def frames_of(patches: torch.Tensor, flat: bool = False) -> torch.Tensor:
    """[F, T, D] patch features -> per 160 ms time column: the F rows stacked [T, F*D], or averaged [T, D]."""
    if flat:
        return patches.mean(dim=0)
    return patches.permute(1, 0, 2).reshape(patches.shape[1], -1)


def column_times_ms(n_columns: int, config: m2d.M2DConfig) -> torch.Tensor:
    """Centre of each time column in ms: column j of crop k spans frames k*crop + 16j ... + 16 (10 ms each)."""
    per_crop = config.crop_frames // config.patch_size
    j = torch.arange(n_columns)
    frame = (j // per_crop) * config.crop_frames + (j % per_crop) * config.patch_size + config.patch_size / 2
    return frame * 1000.0 / (data.SAMPLE_RATE / data.HOP_SAMPLES)


def clap_audio_of(model: m2d.M2DCLAP, patches: torch.Tensor) -> torch.Tensor:
    """CLAP audio embedding [D] (not normalised): the audio projector over all patches of all crops."""
    return model.audio_proj(patches.reshape(1, -1, patches.shape[-1]))[0].float()


# Lower-level functions on log-mels, for the protocols below and for your own front end.


def patch_features(model, log_mels: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
    """Patch features [F, T_cols, D] of each full-length log-mel [F, frames], on the CPU."""
    return [p.cpu() for p in iter_patch_features(model, log_mels, batch_size)]


def frame_features(model, log_mels: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
    """Frame-level features: per 160 ms time column, the F frequency rows stacked -> [T_cols, F * D]."""
    return [frames_of(p).cpu() for p in iter_patch_features(model, log_mels, batch_size)]


def clip_features(model, log_mels: list[torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Clip-level features: the mean of the frame-level features over time -> [N, F * D]."""
    return torch.stack([frames_of(p).mean(dim=0).cpu() for p in iter_patch_features(model, log_mels, batch_size)])


@torch.no_grad()
def clap_audio_embeddings(model, log_mels: list[torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """CLAP audio embeddings [N, D], unit length, of full-length log-mels."""
    out = [clap_audio_of(model, p) for p in iter_patch_features(model, log_mels, batch_size)]
    return F.normalize(torch.stack(out), dim=-1).cpu()


# -----------------------------------------------------------------------------
# The feature API on raw waveforms (HEAR's convention)


def _log_mels(audio: torch.Tensor, model: Embedder) -> Iterator[torch.Tensor]:
    """Log-mel [F, frames] of each waveform of audio [n_sounds, n_samples], one at a time."""
    audio = torch.as_tensor(audio)
    if audio.ndim != 2 or 0 in audio.shape:
        raise ValueError(f"audio must be [n_sounds, n_samples], both at least 1, mono at 16 kHz; got shape "
                         f"{tuple(audio.shape)}. Average channels and resample first (data.resample).")
    for wave in audio:
        yield model.frontend(wave.to(model.device).float())


@torch.no_grad()
def normalized_log_mel(audio: torch.Tensor, model: Embedder) -> torch.Tensor:
    """The model's input: log-mel normalised with its norm_stats, [n, 1, n_mels, frames] (uncut)."""
    return torch.stack([model.model.normalize(mel) for mel in _log_mels(audio, model)])[:, None]


@torch.no_grad()
def get_scene_embeddings(audio: torch.Tensor, model: Embedder, flat: bool = False,
                         batch_size: int = 64) -> torch.Tensor:
    """Clip embeddings [n, F*D] (3840 for ViT-Base): frame features averaged over time.

    flat=True: [n, D], the mean of all patch features of the clip.
    """
    out = [frames_of(p, flat).mean(dim=0) for p in
           iter_patch_features(model.model, _log_mels(audio, model), batch_size)]
    return torch.stack(out)


@torch.no_grad()
def get_timestamp_embeddings(audio: torch.Tensor, model: Embedder, flat: bool = False,
                             batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame embeddings [n, T, F*D] per 160 ms time column, and their centre times [n, T] in ms.

    flat=True: [n, T, D], each column's F patch features averaged.
    """
    frames = torch.stack([frames_of(p, flat) for p in
                          iter_patch_features(model.model, _log_mels(audio, model), batch_size)])
    times = column_times_ms(frames.shape[1], model.model.config).to(frames.device)
    return frames, times.expand(frames.shape[0], -1).contiguous()


@torch.no_grad()
def encode_clap_audio(audio: torch.Tensor, model: Embedder, batch_size: int = 64) -> torch.Tensor:
    """CLAP audio embeddings [n, D], not L2-normalised (as the authors' runtime returns them)."""
    if not model.has_clap:
        raise ValueError(f"{model.info.get('path')}: has no CLAP audio projector (an encoder-only file)")
    return torch.stack([clap_audio_of(model.model, p) for p in
                        iter_patch_features(model.model, _log_mels(audio, model), batch_size)])


@torch.no_grad()
def encode_clap_text(texts: list[str], model: Embedder, batch_size: int = 64) -> torch.Tensor:
    """CLAP text embeddings [m, D], not L2-normalised: the text feature, then the text projector.

    Encoders give their CLS token (BERT) or the mean over real tokens (GTE,
    sentence-transformers models), up to 512 tokens; sentence models
    (NV-Embed-v2, our stage-1 embedding models) their own embedding.
    """
    side = model.text
    if side.kind == "none" or not model.has_clap:
        raise ValueError(f"cannot encode text: {side.unavailable or 'the model has no CLAP audio projector'}")
    if side.kind == "encoder" and side.tokenizer is None:
        raise ValueError("cannot encode text: the model's text encoder needs its tokenizer; pass "
                         "text_encoder=FOLDER (--text-encoder) with the encoder's Hugging Face folder")
    if side.kind == "sentence" and model.sentence_encoder is None:
        model.sentence_encoder = text_embed.load_sentence_model(side.sentence_model, str(model.device),
                                                                side.trust_remote_code)
        if side.append_eos:  # as the authors' runtime sets up NV-Embed-v2
            model.sentence_encoder.max_seq_length = 32768
            model.sentence_encoder.tokenizer.padding_side = "right"
    out = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start:start + batch_size])
        if side.kind == "encoder":
            text = {k: v.to(model.device) for k, v in text_embed.tokenize(side.tokenizer, batch).items()}
        else:
            emb = text_embed.embed_texts(batch, model.sentence_encoder, batch_size, progress=False,
                                         append_eos=side.append_eos)
            text = torch.from_numpy(emb).to(model.device)
        out.append(model.model.text_features(text).float())
    return torch.cat(out)


def clap_text_embeddings(model: Embedder, texts: list[str], sentence_embeddings: np.ndarray | None = None,
                         batch_size: int = 64) -> torch.Tensor:
    """CLAP text embeddings [m, D], unit length; with precomputed sentence embeddings where given."""
    if sentence_embeddings is not None and model.model.text_encoder is None:
        with torch.no_grad():
            emb = torch.as_tensor(sentence_embeddings, dtype=torch.float32, device=model.device)
            out = model.model.text_features(emb).float()
    else:
        out = encode_clap_text(texts, model, batch_size)
    return F.normalize(out, dim=-1).cpu()


# -----------------------------------------------------------------------------
# Protocols
#
# Ties are resolved against the model: an item that scores the same as the
# correct one ranks above it, so a collapsed model scores chance, never 100.


def pessimistic_order(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per row, item indices by descending score, wrong items first among equal scores."""
    return np.stack([np.lexsort((r, -s)) for s, r in zip(scores, relevant)])


def retrieval_metrics(similarity: torch.Tensor, caption_clip: torch.Tensor) -> dict:
    """Audio->text and text->audio R@1/5/10 and mAP@10, in %.

    similarity [N_clips, M_captions]; caption_clip [M] is the clip index of
    each caption, so a clip may have several correct captions. Audio->text
    counts a hit at k when any correct caption ranks within k; its mAP@10
    averages precision at the correct captions within the top 10, divided by
    min(number correct, 10). Text->audio has one correct clip per caption.
    """
    sim = similarity.double().numpy()
    clip_of = caption_clip.numpy()
    relevant = clip_of[None, :] == np.arange(sim.shape[0])[:, None]         # [N, M]
    results = {}
    for name, scores, rel in (("audio_to_text", sim, relevant), ("text_to_audio", sim.T, relevant.T)):
        hits = np.take_along_axis(rel, pessimistic_order(scores, rel), axis=1).astype(float)  # ranked
        first_hit = hits.argmax(axis=1)                                      # 0-based rank of the first hit
        top10 = hits[:, :10]
        precision = top10.cumsum(axis=1) / np.arange(1, top10.shape[1] + 1)
        ap10 = (precision * top10).sum(axis=1) / np.minimum(rel.sum(axis=1), 10)
        results[name] = {f"R@{k}": 100 * float(np.mean(first_hit < k)) for k in (1, 5, 10)}
        results[name]["mAP@10"] = 100 * float(ap10.mean())
    return results


def top1_hits(scores: torch.Tensor, labels: list[set[int]]) -> np.ndarray:
    """Per clip: does a true class score strictly above every other class?"""
    scores = scores.double().numpy()
    hits = []
    for row, truth in zip(scores, labels):
        wrong = np.delete(row, list(truth))
        hits.append(row[list(truth)].max() > (wrong.max() if wrong.size else -np.inf))
    return np.array(hits)


def zero_shot_accuracy(audio: torch.Tensor, class_text: torch.Tensor, labels: list[set[int]]) -> float:
    """Top-1 accuracy in %: the class whose prompt is most similar must be one of the clip's labels."""
    return 100 * float(top1_hits(audio @ class_text.T, labels).mean())


def mean_average_precision(scores: torch.Tensor, labels: list[set[int]]) -> float:
    """Multi-label mAP in %: average precision per class (over classes with a positive), then the mean."""
    scores = scores.double().numpy()
    truth = np.zeros_like(scores, dtype=bool)
    for i, classes in enumerate(labels):
        truth[i, list(classes)] = True
    aps = []
    for c in range(scores.shape[1]):
        if not truth[:, c].any():
            continue
        order = np.lexsort((truth[:, c], -scores[:, c]))  # ties: negatives first
        hits = truth[order, c]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(precision[hits].mean())
    return 100 * float(np.mean(aps))


def effective_rank(features: torch.Tensor) -> float:
    """RankMe: exp of the entropy of the normalised singular values; near 1 means collapse."""
    sigma = torch.linalg.svdvals(features.double())
    p = sigma / sigma.sum() + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


def linear_probe(train_x: torch.Tensor, train_labels: list[set[int]], test_x: torch.Tensor,
                 test_labels: list[set[int]], n_classes: int, steps: int = 500, lr: float = 1e-3,
                 weight_decay: float = 1e-4, seed: int = 0) -> dict:
    """A linear classifier on frozen, standardised features; accuracy (and mAP if multi-label) in %.

    Features are standardised with the training set's mean and std; the
    classifier trains full-batch with Adam, cross-entropy for single-label data
    and binary cross-entropy when some clip has several labels.
    """
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    multilabel = any(len(s) > 1 for s in train_labels + test_labels)
    generator = torch.Generator().manual_seed(seed)
    classifier = torch.nn.Linear(train_x.shape[1], n_classes)
    torch.nn.init.normal_(classifier.weight, std=0.01, generator=generator)
    torch.nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    if multilabel:
        target = torch.zeros(len(train_labels), n_classes)
        for i, classes in enumerate(train_labels):
            target[i, list(classes)] = 1.0
        loss_fn = torch.nn.BCEWithLogitsLoss()
    else:
        target = torch.tensor([next(iter(s)) for s in train_labels])
        loss_fn = torch.nn.CrossEntropyLoss()
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss_fn(classifier(train_x), target).backward()
            optimizer.step()
    with torch.no_grad():
        scores = classifier(test_x)
    result = {"accuracy": 100 * float(top1_hits(scores, test_labels).mean())}
    if multilabel:
        result["mAP"] = mean_average_precision(scores, test_labels)
    return result, scores


# -----------------------------------------------------------------------------
# Evaluation data: a manifest CSV, or the built-in held-out split


class ManifestError(ValueError):
    """An evaluation manifest that cannot be used as it is."""


@dataclass
class EvalSet:
    """Clips with labels, an optional train/test split or folds, and optional captions."""

    name: str
    audio_root: Path
    files: list[str]
    labels: list[list[str]]              # per clip, one or more class names
    split: list[str] | None = None       # "train" / "test" per clip
    fold: list[str] | None = None        # fold name per clip
    captions: list[str] = field(default_factory=list)
    caption_clip: list[int] = field(default_factory=list)
    caption_embeddings: np.ndarray | None = None  # row-aligned with captions, if precomputed

    @property
    def classes(self) -> list[str]:
        return sorted({c for labels in self.labels for c in labels})


def read_manifest(csv_path: Path, audio_root: Path | None = None) -> EvalSet:
    """Read and check an evaluation manifest CSV.

    Columns: file_name (relative to the audio root, default the CSV's folder),
    label (one or more classes separated by ';'), optional caption (several
    rows per file give several captions), optional split (train / test) or fold.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError as e:
        raise ManifestError(f"{csv_path}: manifest not found") from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(f"{csv_path}: not a readable UTF-8 CSV ({e})") from e
    for needed in ("file_name", "label"):
        if needed not in columns:
            raise ManifestError(f"{csv_path}: no '{needed}' column; the header has {columns}. An evaluation "
                                "manifest needs file_name and label, and may have caption and split or fold.")
    if not rows:
        raise ManifestError(f"{csv_path}: no rows")
    audio_root = Path(audio_root) if audio_root else Path(csv_path).parent
    index: dict[str, int] = {}
    eval_set = EvalSet(str(csv_path), audio_root, [], [],
                       [] if "split" in columns else None, [] if "fold" in columns else None)
    for line, row in enumerate(rows, start=2):
        name, labels = row["file_name"], [c.strip() for c in (row["label"] or "").split(";") if c.strip()]
        if not name or not labels:
            raise ManifestError(f"{csv_path}, line {line}: empty file_name or label")
        if name not in index:
            if not (audio_root / name).is_file():
                raise ManifestError(f"{csv_path}, line {line}: audio file {audio_root / name} not found. Fix "
                                    "file_name or pass the right --audio-root.")
            index[name] = len(eval_set.files)
            eval_set.files.append(name)
            eval_set.labels.append(labels)
            if eval_set.split is not None:
                if row["split"] not in ("train", "test"):
                    raise ManifestError(f"{csv_path}, line {line}: split must be 'train' or 'test', "
                                        f"got {row['split']!r}")
                eval_set.split.append(row["split"])
            if eval_set.fold is not None:
                eval_set.fold.append(row["fold"])
        elif eval_set.labels[index[name]] != labels:
            raise ManifestError(f"{csv_path}, line {line}: {name} has labels {labels} here but "
                                f"{eval_set.labels[index[name]]} on an earlier row; give every row of a file "
                                "the same labels")
        if row.get("caption"):
            eval_set.captions.append(row["caption"])
            eval_set.caption_clip.append(index[name])
    check_splits(eval_set)
    return eval_set


def check_splits(eval_set: EvalSet):
    """Every split or fold must be non-empty, and test labels must occur in training."""
    if eval_set.split is not None:
        for part in ("train", "test"):
            if part not in eval_set.split:
                raise ManifestError(f"{eval_set.name}: the {part} split is empty; the linear probe needs "
                                    "clips in both train and test (or use a fold column)")
        seen = {c for labels, s in zip(eval_set.labels, eval_set.split) if s == "train" for c in labels}
        for name, labels, s in zip(eval_set.files, eval_set.labels, eval_set.split):
            unknown = [c for c in labels if c not in seen]
            if s == "test" and unknown:
                raise ManifestError(f"{eval_set.name}: test clip {name} has label(s) {unknown} that no training "
                                    "clip has; a classifier cannot predict them. Fix the label or the split.")
    if eval_set.fold is not None and len(set(eval_set.fold)) < 2:
        raise ManifestError(f"{eval_set.name}: cross-validation needs at least two folds, got "
                            f"{sorted(set(eval_set.fold))}")


def builtin_eval_set() -> EvalSet:
    """The built-in data: probe trained on the train split, everything tested on the held-out split."""
    eval_set = EvalSet("built-in held-out split", builtin_data.builtin_cache_dir(), [], [], [])
    for part in ("train", "test"):
        builtin_data.builtin_dataset(part)  # renders the audio on first use
        for row in builtin_data.builtin_rows(part):
            if row["file_name"] not in eval_set.files[-1:]:  # a clip's caption rows are consecutive
                eval_set.files.append(row["file_name"])
                eval_set.labels.append(row["label"].split(";"))
                eval_set.split.append(part)
    test = text_embed.load_caption_embeddings(builtin_data.builtin_csv("test"))
    clip_of = {name: k for k, name in enumerate(eval_set.files)}
    eval_set.captions = test.captions
    eval_set.caption_clip = [clip_of[n] for n in test.file_names]
    eval_set.caption_embeddings = test.embeddings
    return eval_set


def log_mels_from_files(paths: list[Path]) -> list[torch.Tensor]:
    """Full-length log-mels [n_mels, frames] of audio files (any format, rate, channel count and length)."""
    return [data.log_mel(data.load_audio(p)) for p in paths]  # feature extraction pads any length


def log_mels_from_waves(waves: list, sample_rate: int) -> list[torch.Tensor]:
    """Full-length log-mels of mono waveforms [samples] at sample_rate."""
    return [data.log_mel(data.resample(torch.as_tensor(w, dtype=torch.float32), sample_rate, data.SAMPLE_RATE))
            for w in waves]


# -----------------------------------------------------------------------------
# Running the protocols


TASKS = ("linear_probe", "zero_shot", "retrieval", "rankme")
DEFAULT_PROMPT = "{label} can be heard"  # the authors' zero-shot prompt (EVAR)


def random_init_copy(model, seed: int = 0):
    """The same model with its audio encoder replaced by an untrained one of the same shape."""
    torch.manual_seed(seed)
    fresh = type(model)(model.config, tuple(model.norm_stats.tolist()))
    baseline = copy.deepcopy(model)
    state = {k: v for k, v in fresh.state_dict().items()
             if k.startswith(m2d.ENCODER_PREFIXES) and k not in ("pos_embed", "norm_stats")}
    baseline.load_state_dict(state, strict=False)
    return baseline.to(model.norm_stats.device).eval()


def text_side_embeddings(embedder: Embedder, texts, precomputed=None):
    """CLAP text embeddings, or the reason they cannot be had (returned as a string)."""
    try:
        return clap_text_embeddings(embedder, texts, precomputed)
    except (ImportError, ValueError, OSError) as e:  # OSError: a sentence model that is not on this machine
        return f"no text side for new text: {e}"


def class_prompts(classes: list[str], prompt: str) -> list[str]:
    """One zero-shot prompt per class, underscores in labels read as spaces (the authors' convention)."""
    return [prompt.format(label=c.replace("_", " ")) for c in classes]


def evaluate_model(embedder: Embedder, eval_set: EvalSet, mels, tasks, prompt: str) -> tuple[dict, dict]:
    """Results of the tasks, and the arrays the plots need."""
    model = embedder.model
    results, skipped, arrays = {}, {}, {}
    classes = eval_set.classes
    label_ids = [{classes.index(c) for c in labels} for labels in eval_set.labels]
    test = [i for i in range(len(eval_set.files)) if eval_set.split is None or eval_set.split[i] == "test"]

    features = clip_features(model, mels) if {"linear_probe", "rankme"} & set(tasks) else None
    if "linear_probe" in tasks:
        if eval_set.split is not None:
            train_ids = [i for i in range(len(eval_set.files)) if eval_set.split[i] == "train"]
            groups = [(train_ids, test)]
        elif eval_set.fold is not None:
            groups = [([i for i, f in enumerate(eval_set.fold) if f != fold],
                       [i for i, f in enumerate(eval_set.fold) if f == fold]) for fold in sorted(set(eval_set.fold))]
        else:
            groups = []
            skipped["linear_probe"] = "the manifest has neither a split nor a fold column"
        fold_results = []
        for train_ids, test_ids in groups:
            result, scores = linear_probe(features[train_ids], [label_ids[i] for i in train_ids],
                                          features[test_ids], [label_ids[i] for i in test_ids], len(classes))
            fold_results.append(result)
            arrays["probe"] = (scores, [label_ids[i] for i in test_ids])
        if fold_results:
            results["linear_probe"] = {k: float(np.mean([r[k] for r in fold_results])) for k in fold_results[0]}
    if "rankme" in tasks:
        results["rankme"] = {"clip_features": effective_rank(features[test])}

    if not embedder.has_clap:
        for task in {"zero_shot", "retrieval"} & set(tasks):
            skipped[task] = "the checkpoint has no CLAP audio projector (an encoder-only file)"
        tasks = [t for t in tasks if t not in skipped]
    need_audio = {"zero_shot", "retrieval"} & set(tasks)
    audio = clap_audio_embeddings(model, [mels[i] for i in test]) if need_audio else None
    if "zero_shot" in tasks:
        class_text = text_side_embeddings(embedder, class_prompts(classes, prompt))
        if isinstance(class_text, str):
            skipped["zero_shot"] = class_text
        else:
            test_labels = [label_ids[i] for i in test]
            results["zero_shot"] = {"accuracy": zero_shot_accuracy(audio, class_text, test_labels),
                                    "chance": 100 * float(np.mean([len(s) for s in test_labels])) / len(classes)}
            arrays["zero_shot"] = (audio @ class_text.T, test_labels)
    if "retrieval" in tasks:
        position = {clip: k for k, clip in enumerate(test)}
        rows = [j for j, clip in enumerate(eval_set.caption_clip) if clip in position]
        if not rows:
            skipped["retrieval"] = "the manifest has no captions for the evaluated clips"
        else:
            pre = eval_set.caption_embeddings[rows] if eval_set.caption_embeddings is not None else None
            text = text_side_embeddings(embedder, [eval_set.captions[j] for j in rows], pre)
            if isinstance(text, str):
                skipped["retrieval"] = text
            else:
                clip_index = torch.tensor([position[eval_set.caption_clip[j]] for j in rows])
                results["retrieval"] = retrieval_metrics(audio @ text.T, clip_index)
                arrays["similarity"] = (audio @ text.T, clip_index, [eval_set.captions[j] for j in rows])
    if skipped:
        results["skipped"] = skipped
    return results, arrays


def flatten(results: dict, prefix: str = "") -> dict[str, float]:
    """{"retrieval": {"audio_to_text": {"R@1": x}}} -> {"retrieval.audio_to_text.R@1": x}."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif key != "skipped":
            flat[prefix + key] = value
    return flat


def print_table(checkpoint: dict, random_init: dict | None):
    baseline = flatten(random_init) if random_init else {}
    print(f"{'metric':36s} {'checkpoint':>10s} {'random_init':>12s}")
    for key, value in flatten({k: v for k, v in checkpoint.items() if k != "skipped"}).items():
        base = f"{baseline[key]:12.1f}" if key in baseline else ""
        print(f"{key:36s} {value:10.1f} {base}")
    for task, reason in checkpoint.get("skipped", {}).items():
        print(f"{task}: skipped, {reason}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint to evaluate (default: the newest of runs/stage2.1, stage2, stage1)")
    p.add_argument("--data", type=Path, default=None,
                   help="evaluation manifest CSV: file_name, label (';'-separated), optional caption, split "
                        "(train/test) or fold. Default: the built-in data (held-out split)")
    p.add_argument("--audio-root", type=Path, default=None, help="folder of the manifest's files (default: its folder)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="protocols to run (default: all)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="zero-shot prompt template; underscores in labels become spaces (default: %(default)r, "
                        "the authors' evaluation)")
    add_text_encoder_flag(p)
    p.add_argument("--no-baseline", action="store_true", help="skip the random-init encoder baseline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--plot", type=Path, default=None,
                   help="write PNG figures here (similarity matrix, confusion matrix, training curves); "
                        "needs matplotlib")
    return p.parse_args(argv)


def add_text_encoder_flag(p: argparse.ArgumentParser):
    p.add_argument("--text-encoder", "--tokenizer", dest="text_encoder", default=None, metavar="FOLDER",
                   help="local Hugging Face folder for the text side where the checkpoint does not hold it all: "
                        "the tokenizer and config of a released stage-2 file's BERT (bert-base-uncased), or "
                        "the GTE-base / NV-Embed-v2 of a released stage-1 file")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["embed"]:
        return embed_main(argv[1:])
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    args = parse_args(argv)
    try:
        path = args.checkpoint or newest_run()
        embedder = load_model(path, args.device, args.text_encoder)
        eval_set = builtin_eval_set() if args.data is None else read_manifest(args.data, args.audio_root)
        mels = log_mels_from_files([eval_set.audio_root / f for f in eval_set.files])
    except (ValueError, FileNotFoundError) as e:  # ManifestError and AudioError included
        sys.exit(f"error: {e}")
    stage = embedder.info["stage"]
    parts = (f"{eval_set.split.count('train')} train / {eval_set.split.count('test')} test clips"
             if eval_set.split else f"{len(eval_set.files)} clips")
    print(f"{path} (stage {stage}) on {eval_set.name}: {parts}, {len(eval_set.classes)} classes, "
          f"{len(eval_set.captions)} captions")
    results = {"checkpoint_path": str(path), "stage": stage, "data": eval_set.name}
    results["checkpoint"], arrays = evaluate_model(embedder, eval_set, mels, args.tasks, args.prompt)
    if not args.no_baseline:
        baseline = Embedder(random_init_copy(embedder.model), embedder.info, embedder.text)
        results["random_init"], _ = evaluate_model(baseline, eval_set, mels, args.tasks, args.prompt)
    print_table(results["checkpoint"], results.get("random_init"))
    # The flat keys of the results: linear_probe.accuracy, zero_shot.accuracy, retrieval.*.R@1, ...
    out = {**results["checkpoint"], **{k: v for k, v in results.items() if k != "checkpoint"}}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        write_plots(args.plot, arrays, eval_set, Path(path).parent / "log.jsonl")


# -----------------------------------------------------------------------------
# Embedding a corpus: python evaluate.py embed


def audio_files(source: Path, audio_root: Path | None = None) -> tuple[Path, list[str], list[str]]:
    """(root, audio file names relative to it, names skipped as not audio) of a folder or a manifest CSV.

    A folder is searched recursively for every format soundfile reads; a CSV
    names its files in a file_name column, relative to audio_root (default:
    the CSV's folder).
    """
    if source.is_dir():
        suffixes = {"." + f.lower() for f in sf.available_formats()} | {".aif", ".oga", ".opus"}
        files = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
        return source, [f for f in files if Path(f).suffix.lower() in suffixes], \
            [f for f in files if Path(f).suffix.lower() not in suffixes]
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such folder or manifest CSV")
    with open(source, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "file_name" not in (reader.fieldnames or []):
            raise ManifestError(f"{source}: no 'file_name' column; the header has {reader.fieldnames}")
        names = list(dict.fromkeys(row["file_name"] for row in reader))  # each file once, in order
    return Path(audio_root) if audio_root else source.parent, names, []


class AudioFiles(torch.utils.data.Dataset):
    """(name, seconds, log-mel [F, frames] or None, error or None) of each file, decoded in loader workers."""

    def __init__(self, root: Path, names: list[str]):
        self.root, self.names = root, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        name = self.names[i]
        try:
            wave = data.load_audio(self.root / name)  # any rate and channel count: downmixed, resampled
        except data.AudioError as e:
            return name, 0.0, None, str(e)
        return name, len(wave) / data.SAMPLE_RATE, data.log_mel(wave), None


def save_npy(path: Path, array: np.ndarray):
    """Write atomically: an interrupted run never leaves a half-written feature file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    tmp.replace(path)


INDEX_COLUMNS = ("file_name", "seconds", "columns", "clip", "frames", "clap")


def embed_corpus(embedder: Embedder, root: Path, names: list[str], out: Path, frames: bool = False,
                 flat: bool = False, batch_size: int = 64, workers: int = 0) -> dict:
    """Write features of every readable file under out/, resuming where out/index.csv stops.

    Per file: <name>.clip.npy (clip features), with frames=True <name>.frames.npy
    ([T, F*D] per 160 ms column; flat=True: D-wide), and <name>.clap.npy (the
    CLAP audio embedding, not normalised) where the model has one. index.csv
    lists each written file; unreadable.csv the files that could not be read,
    with the reason (they are tried again on the next run).
    """
    index_path, report_path = out / "index.csv", out / "unreadable.csv"
    done = set()
    if index_path.is_file():
        with open(index_path, newline="", encoding="utf-8") as f:
            done = {row["file_name"] for row in csv.DictReader(f)}
    todo = [n for n in names if n not in done]
    out.mkdir(parents=True, exist_ok=True)
    new_index = not index_path.is_file()
    index_file = open(index_path, "a", newline="", encoding="utf-8")
    index = csv.writer(index_file)
    if new_index:
        index.writerow(INDEX_COLUMNS)
    report_file = open(report_path, "w", newline="", encoding="utf-8")
    report = csv.writer(report_file)
    report.writerow(("file_name", "error"))
    loader = torch.utils.data.DataLoader(AudioFiles(root, todo), batch_size=None, num_workers=workers)
    readable, counts = [], {"written": 0, "unreadable": 0, "already_done": len(names) - len(todo)}

    def log_mels():
        for name, seconds, mel, error in loader:
            if error:
                report.writerow((name, error))
                report_file.flush()
                counts["unreadable"] += 1
                continue
            readable.append((name, seconds))
            yield mel

    progress = Progress(len(todo))
    model = embedder.model
    for k, patches in enumerate(iter_patch_features(model, log_mels(), batch_size)):
        name, seconds = readable[k]
        stem = out / "features" / name
        row = {"file_name": name, "seconds": f"{seconds:.3f}", "columns": patches.shape[1], "frames": "", "clap": ""}
        save_npy(stem.with_name(stem.name + ".clip.npy"), frames_of(patches, flat).mean(dim=0).cpu().numpy())
        row["clip"] = f"features/{name}.clip.npy"
        if frames:
            save_npy(stem.with_name(stem.name + ".frames.npy"), frames_of(patches, flat).cpu().numpy())
            row["frames"] = f"features/{name}.frames.npy"
        if embedder.has_clap:
            with torch.no_grad():
                save_npy(stem.with_name(stem.name + ".clap.npy"), clap_audio_of(model, patches).cpu().numpy())
            row["clap"] = f"features/{name}.clap.npy"
        index.writerow([row[c] for c in INDEX_COLUMNS])
        index_file.flush()  # a file counts as done only once its features are all on disk
        counts["written"] += 1
        progress.update(k + 1 + counts["unreadable"], counts["unreadable"])
    progress.update(len(todo), counts["unreadable"], final=True)
    index_file.close()
    report_file.close()
    return counts


class Progress:
    """A one-line progress bar on stderr: files done, rate and time left."""

    def __init__(self, total: int):
        self.total, self.start, self.shown = total, time.perf_counter(), 0.0

    def update(self, done: int, unreadable: int, final: bool = False):
        now = time.perf_counter()
        if not final and now - self.shown < 0.5:
            return
        self.shown = now
        rate = done / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else 0.0
        width = 30
        bar = "#" * int(width * done / max(self.total, 1))
        print(f"\r[{bar:<{width}}] {done}/{self.total} files | {rate:.1f} files/s | {unreadable} unreadable | "
              f"{runs.format_duration(left)} left", end="\n" if final else "", file=sys.stderr, flush=True)


def embed_main(argv=None):
    p = argparse.ArgumentParser(prog="evaluate.py embed", description=embed_corpus.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="our checkpoint or a released .pth")
    p.add_argument("--audio", type=Path, required=True,
                   help="a folder (searched recursively, any format soundfile reads, any rate and channel count) "
                        "or a manifest CSV with a file_name column")
    p.add_argument("--audio-root", type=Path, default=None, help="folder of a manifest's files (default: its folder)")
    p.add_argument("--out", type=Path, required=True, help="output folder; a rerun resumes where it stopped")
    p.add_argument("--frames", action="store_true", help="also write frame features [T, F*D] per 160 ms column")
    p.add_argument("--flat", action="store_true", help="D-wide features (the F patches of a column averaged)")
    p.add_argument("--batch-size", type=int, default=64, help="10 s crops encoded together")
    p.add_argument("--workers", type=int, default=2 if torch.cuda.is_available() else 0,
                   help="processes decoding audio alongside the encoder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        embedder = load_model(args.checkpoint, args.device)
        root, names, skipped = audio_files(args.audio, args.audio_root)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if skipped:
        print(f"not audio by name, left out: {len(skipped)} file(s): {', '.join(skipped[:5])}"
              f"{' ...' if len(skipped) > 5 else ''}")
    counts = embed_corpus(embedder, root, names, args.out, args.frames, args.flat, args.batch_size, args.workers)
    print(f"{counts['written']} file(s) written, {counts['already_done']} done before, {counts['unreadable']} "
          f"unreadable (listed in {args.out / 'unreadable.csv'}); index: {args.out / 'index.csv'}")


# -----------------------------------------------------------------------------
# Figures (optional matplotlib)


def write_plots(folder: Path, arrays: dict, eval_set: EvalSet, log_path: Path, n_clips: int = 12):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: --plot needs matplotlib: pip install matplotlib")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if "similarity" in arrays:
        similarity, clip_index, captions = arrays["similarity"]
        clips = sorted(set(clip_index.tolist()))[:n_clips]
        cols = [int((clip_index == c).nonzero()[0, 0]) for c in clips]  # first caption of each clip
        fig, ax = plt.subplots(figsize=(9, 8))
        im = ax.imshow(similarity[clips][:, cols].numpy(), cmap="viridis")
        ax.set_xticks(range(len(cols)), [captions[j][:45] for j in cols], rotation=90, fontsize=7)
        ax.set_yticks(range(len(clips)), [f"clip {c}" for c in clips], fontsize=7)
        ax.set_xlabel("first caption of each clip (the diagonal is the matching pair)")
        ax.set_title("Audio-text cosine similarity, held-out clips")
        fig.colorbar(im)
        written.append(folder / "similarity.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    source = "probe" if "probe" in arrays else "zero_shot" if "zero_shot" in arrays else None
    if source:
        scores, labels = arrays[source]
        classes = eval_set.classes
        confusion = np.zeros((len(classes), len(classes)), dtype=int)
        for row, truth in zip(scores.argmax(dim=1).tolist(), labels):
            if len(truth) == 1:  # a confusion matrix is defined for single-label clips
                confusion[next(iter(truth)), row] += 1
        fig, ax = plt.subplots(figsize=(8, 7))
        ax.imshow(confusion, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=90)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true (single-label clips)")
        ax.set_title(f"Confusion matrix ({'linear probe' if source == 'probe' else 'zero-shot'})")
        written.append(folder / "confusion.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if log_path.is_file():
        records = [json.loads(line) for line in log_path.read_text().splitlines()]
        keys = [k for k in records[0] if k.startswith("loss_")]
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
        for ax, key in zip(axes[0], keys):
            ax.plot([r["step"] for r in records], [r[key] for r in records])
            ax.set_xlabel("step")
            ax.set_title(key)
        written.append(folder / "training_curves.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
