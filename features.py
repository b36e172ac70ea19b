"""The inference API: what a user of an M2D-CLAP checkpoint imports.

Loads our checkpoints and every released M2D / M2D-CLAP layout, cuts clips of
any length as the authors' runtime does, and gives features and CLAP
embeddings of raw waveforms. The functions follow HEAR's convention, so this
module can be handed to HEAR's evaluation kit as it is, from the checkout:
    PYTHONPATH=. hear-validator features --model runs/stage1/last.pt
(without --model, load_model() takes the most recently written runs/stage*/last.pt).

Audio is a float tensor [n_clips, n_samples]: mono, 16 kHz, in [-1, 1].
    model = load_model("runs/stage2.1/last.pt")          # ours, or a released .pth
    scene = get_scene_embeddings(audio, model)            # [n, 3840] (ViT-Base)
    frames, ms = get_timestamp_embeddings(audio, model)   # [n, T, 3840], [n, T]
    flat = get_scene_embeddings(audio, model, flat=True)  # [n, 768]
    a = encode_clap_audio(audio, model)                   # [n, D]
    t = encode_clap_text(["a dog barks"], model)          # [m, D]; cosine: normalise both

Command line:
    python features.py embed --checkpoint CKPT --audio DIR_OR_CSV --out FEATURES/
    python features.py export runs/stage2/last.pt OUT.pth   # ours in the released layout
    python features.py tag --checkpoint best.pt a.wav ...   # a fine-tuned file's top classes
    captions = caption_audio(audio, load_model("runs/caption/best.pt"))  # caption.py's file: one per clip
    python features.py --help                               # the commands; COMMAND --help for each
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import inspect
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

import data
import metrics
import model as m2d
import runs
import text_embed


def upgraded(ckpt: dict) -> tuple[dict, dict]:
    """(model config, state dict) of a checkpoint of ours, written by this version or an earlier one.

    Earlier versions saved a Linear text projector without a bias (a zero bias
    is the same function), mean-pooled every stage-2 text encoder, and left
    out the text encoder's pooler (with_text_pooler).
    """
    model_config = dict(ckpt["model_config"])
    if ckpt.get("text_encoder") and "text_pooling" not in model_config:
        model_config["text_pooling"] = "mean"
    state = with_text_proj_bias(ckpt["model"], model_config.get("text_proj"))
    if ckpt.get("text_encoder") and not any(k.startswith("text_encoder.pooler.") for k in state):
        state = with_text_pooler(state, ckpt["text_encoder"]["config"])
    return model_config, state


def with_text_proj_bias(state: dict, text_proj: str | None) -> dict:
    """The state dict, with a zero bias for a Linear text projector saved without one (the same function)."""
    state = dict(state)
    if text_proj == "linear" and "text_proj.bias" not in state:
        state["text_proj.bias"] = torch.zeros(state["text_proj.weight"].shape[0])
    return state


def with_text_pooler(state: dict, text_encoder_config: dict) -> dict:
    """The state dict of a checkpoint written before the text encoder kept its pooler, with one.

    The pooler is that of a fresh encoder of the saved architecture (always
    the same values: text_embed builds it seeded apart). No text feature reads
    it, so the model computes what it did; it is there for the authors'
    runtime, which loads a text encoder strictly, pooler included. An
    architecture without a pooler gets nothing.
    """
    fresh = text_embed.text_encoder_from_config(text_encoder_config).state_dict()
    return {**state, **{"text_encoder." + k: v for k, v in fresh.items() if k.startswith("pooler.")}}


def random_init_copy(model: m2d.M2DCLAP, seed: int = 0) -> m2d.M2DCLAP:
    """The baseline pre-training must beat: the same model with its audio encoder re-initialised.

    The encoder's weights are those of a fresh model of the same shape made
    after torch.manual_seed(seed); its position table and normalisation
    statistics, and every other part (target, predictor, CLAP heads), are kept.
    """
    torch.manual_seed(seed)
    fresh = m2d.M2DCLAP(model.config, tuple(model.norm_stats.tolist()))
    baseline = copy.deepcopy(model)
    state = {k: v for k, v in fresh.state_dict().items()
             if k.startswith(m2d.ENCODER_PREFIXES) and k not in ("pos_embed", "norm_stats")}
    baseline.load_state_dict(state, strict=False)
    return baseline.to(model.norm_stats.device).eval()


def model_from_checkpoint(ckpt: dict, with_tokenizer: bool = True) -> tuple[m2d.M2DCLAP, object | None]:
    """The model of a checkpoint of ours and, if it has a text encoder (and with_tokenizer), its tokenizer.

    A checkpoint is self-contained: model weights (text encoder included),
    shapes, normalisation statistics, and the text encoder's architecture with
    a reference to its tokenizer.
    """
    model_config, state = upgraded(ckpt)
    text_encoder = tokenizer = None
    if ckpt.get("text_encoder"):
        text_encoder = text_embed.text_encoder_from_config(ckpt["text_encoder"]["config"])
        if with_tokenizer:
            tokenizer = text_embed.load_tokenizer(ckpt["text_encoder"]["name"])
    model = m2d.M2DCLAP(m2d.M2DConfig(**model_config), tuple(ckpt["norm_stats"]), text_encoder)
    model.load_state_dict(state)
    return model, tokenizer


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


def load_model(model_file_path: str | Path = "", device: str = "cpu", text_encoder: str | None = None) -> Embedder:
    """Load our checkpoint or a released M2D / M2D-CLAP file, in eval mode on `device`.

    HEAR's entry point. Without a path (HEAR's default ""), the most recently
    written runs/stage*/last.pt of this folder (newest_run).

    text_encoder: a local Hugging Face folder for the text side, where the
    file does not hold it all: the tokenizer and config of a released
    stage-2 file's BERT (bert-base-uncased), the GTE-base or NV-Embed-v2 of
    a released file without text-encoder weights, or a replacement for the
    tokenizer / sentence model one of our checkpoints names. Without it the
    audio side works and encode_clap_text says which folder is needed.
    """
    path = Path(model_file_path) if str(model_file_path) else newest_run()
    ckpt = runs.load_checkpoint(path)
    if isinstance(ckpt, dict) and "model_config" in ckpt:
        embedder = load_ours(ckpt, text_encoder)
    else:
        embedder = load_released(path, ckpt, text_encoder)
    embedder.info["path"] = str(path)
    return embedder.to(device).eval()


def load_ours(ckpt: dict, text_encoder: str | None = None) -> Embedder:
    """An Embedder of a checkpoint written by train.py."""
    model, _ = model_from_checkpoint(ckpt, with_tokenizer=False)
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
    embedder = Embedder(model, info, text)
    if "head" in ckpt:  # a fine-tuned file (finetune.py): its classifier too
        attach_classifier(embedder, ckpt)
    if "captioner" in ckpt:  # a captioning file (caption.py): its decoder too
        attach_captioner(embedder, ckpt)
    return embedder


def newest_run(root: Path = Path("runs")) -> Path:
    """The most recently written runs/stage{1,1.1,2,2.1}/last.pt: the run a user has just trained.

    By the file's modification time, not by stage: a fresh stage 1 wins over a
    stage 2 left from an earlier experiment.
    """
    found = [root / f"stage{stage}" / "last.pt" for stage in RUN_STAGES]
    found = [path for path in found if path.is_file()]
    if not found:
        raise FileNotFoundError(f"no checkpoint under {root}/stage{{{','.join(RUN_STAGES)}}}/last.pt; run 'python "
                                "train.py --stage 1' first, or name the file: load_model(PATH) in Python, "
                                "--checkpoint PATH on the command line, hear-validator features --model PATH")
    return max(found, key=lambda path: path.stat().st_mtime)


RUN_STAGES = ("1", "1.1", "2", "2.1")


# -----------------------------------------------------------------------------
# Released M2D / M2D-CLAP files: every file the authors' programs write (nttcslab/m2d, and
# their evaluation package EVAR, nttcslab/eval-audio-repr)
#
# - A released file keeps a state dict under 'model' (often beside an argparse.Namespace under
#   'args'), with our key names behind an optional wrapper prefix; the folder name tells the
#   input size and the text side.
# - A training checkpoint (checkpoint-N.pth, MAE's util/misc.save_model) adds 'optimizer',
#   'scaler' and 'epoch', which are ignored. The stage-1 programs write the M2D model's keys as
#   they are. The stage-2 program (clap/clap_only.py) saves its runtime: the encoder and audio
#   projector under 'backbone.', the BERT under 'text_encoder.text_encoder.', the trained logit
#   scale as 'logit_scale', and the log-mel front end's fixed buffers under 'to_spec.'.
# - An EVAR fine-tuning result (weights_ep<E>it<I>-<score>_loss<L>.pth, the authors' stage 1.1)
#   is the bare state dict of a DataParallel-wrapped task network: the runtime under
#   'module.ar.runtime.' (the encoder under its 'backbone.', the front end under its 'to_spec.'),
#   the classifier under 'module.head.' (EVAR_HEAD).

RELEASED_PREFIXES = ("module.ar.runtime.backbone.", "module.ar.runtime.", "backbone.", "module.")
# Keys of released files that our model has no place for, and why they can go.
RELEASED_IGNORED = {
    "to_spec.": "the runtime's log-mel front end (nnAudio's MelSpectrogram: the buffers mel_basis, stft.wsin, "
                "stft.wcos, stft.window_mask), fixed numbers that data.LogMelSpectrogram computes itself",
    "text_encoder.embeddings.position_ids": "a constant buffer that older transformers versions saved",
}
ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "norm.weight", "norm.bias")
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
    if "text_kind" not in facts and getattr(args, "text_encoder", None) in TEXT_KINDS:  # the stage-2 program's
        facts["text_kind"] = args.text_encoder
    size = re.search(r"vit_(tiny|small|base|large|huge)", str(getattr(args, "model", "") or path.parent.name))
    facts["num_heads"] = getattr(args, "num_heads", None) or (m2d.VIT_HEADS[size.group(1)] if size else None)
    if facts.get("sample_rate", data.SAMPLE_RATE) != data.SAMPLE_RATE:
        raise ValueError(f"{path}: a {facts['sample_rate']} Hz model; this front end is 16 kHz only")
    return facts


def load_released(path: Path, raw: dict, text_encoder: str | None = None) -> Embedder:
    """An Embedder of a released file: every released layout loads, or the error says why not.

    Parts a file does not have (the target and predictor of an inference
    file, the CLAP heads of an encoder-only one) keep their initialisation
    and are listed in info["missing_parts"]; every encoder tensor must be
    present, and no key may be left over. The classification head of an
    EVAR fine-tuning result becomes the Embedder's classifier where it maps
    onto ours (attach_evar_head).
    """
    args = raw.get("args") if isinstance(raw, dict) else None
    state = raw["model"] if isinstance(raw, dict) and "model" in raw else raw
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a dict of tensors, possibly under 'model')")
    state = strip_released_keys(state)
    head = {k: state.pop(k) for k in list(state) if k.startswith(("head.norm.", "head.mlp."))}  # EVAR's classifier
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
    state = with_text_proj_bias(state, config.text_proj)
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
    embedder = Embedder(model, info, text)
    if head:
        attach_evar_head(embedder, head)
    return embedder


# EVAR's classifier (its finetune.py TaskHead: BatchNorm1d without affine parameters, then an MLP
# whose one layer, when no hidden sizes are asked for, is mlp.mlp.0) under AudioClassifier's names.
EVAR_HEAD = {"head.norm.running_mean": "head_norm.running_mean", "head.norm.running_var": "head_norm.running_var",
             "head.norm.num_batches_tracked": "head_norm.num_batches_tracked",
             "head.mlp.mlp.0.weight": "head.weight", "head.mlp.mlp.0.bias": "head.bias"}


def attach_evar_head(embedder: Embedder, head: dict):
    """Give an Embedder of an EVAR fine-tuning result its classifier, where EVAR's head maps onto ours.

    A head of one Linear on the mean of the patch tokens (D wide) or on the
    stacked time columns (F * D) is AudioClassifier's head_norm and head.
    The file holds neither the class names (EVAR numbers the classes in the
    sorted order of the task's label strings) nor whether the task is
    multi-label: the classes are named by their numbers and scored as
    multi-label (sigmoids), as AudioSet's stage 1.1 is. A head with hidden
    layers has no place in ours and is left out. info["head"] says which.
    """
    config = embedder.model.config
    widths = {config.embed_dim: "mean", config.grid_size[0] * config.embed_dim: "stacked"}
    required = set(EVAR_HEAD) - {"head.norm.num_batches_tracked"}
    if not required <= set(head) <= set(EVAR_HEAD) or head["head.mlp.mlp.0.weight"].shape[1] not in widths:
        embedder.info["head"] = (f"left out: an EVAR classification head that AudioClassifier has no place for "
                                 f"(tensors {sorted(head)[:6]})")
        return
    n_classes, width = head["head.mlp.mlp.0.weight"].shape
    state = {"head_norm.num_batches_tracked": torch.tensor(0), **{EVAR_HEAD[k]: v for k, v in head.items()}}
    attach_classifier(embedder, {"classes": [f"class {i}" for i in range(n_classes)], "head": state,
                                 "multi_label": True, "recipe": {"feature": widths[width], "raw_input": "wave",
                                                                 "input_frames": config.crop_frames}})
    embedder.info["head"] = (f"EVAR's classifier: {n_classes} classes on the {widths[width]} feature, named by their "
                             "numbers (EVAR's order: the sorted label strings), scored as multi-label")


def released_init(path: Path, raw: dict) -> dict:
    """A released or EVAR file as the checkpoint stage 2 starts from: our layout, stage "released".

    The authors' stage 2 starts from their stage 1.1, an EVAR fine-tuning
    result; any file load_model reads will do, read the same way. Stage 2
    keeps its encoder and norm_stats; parts the file lacks keep their
    initialisation, and a text encoder or classifier in it is left out
    (stage 2 brings its own text side). args.preset, whose recipe stage 2
    trains with, is the preset of the encoder's width and depth.
    """
    model = load_released(path, raw).model
    config = model.config
    presets = [name for name, p in m2d.PRESETS.items() if (p.embed_dim, p.depth) == (config.embed_dim, config.depth)]
    if not presets:
        raise ValueError(f"{path}: a ViT {config.embed_dim} wide and {config.depth} blocks deep, the shape of none of "
                         f"the presets ({', '.join(f'{n} {p.embed_dim}/{p.depth}' for n, p in m2d.PRESETS.items())}) "
                         "whose recipes stage 2 trains with")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("text_encoder.")}
    return {"stage": "released", "model_config": asdict(config), "norm_stats": model.norm_stats.tolist(),
            "model": state, "args": {"preset": presets[0]}, "text_side": None, "text_encoder": None,
            "embedding_model": None}


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
    # A BERT saved without its pooler (our exports before it was kept) keeps the pooler of the
    # folder's architecture, seeded: no text feature reads it.
    missing = [k for k in missing if not k.endswith("position_ids") and not k.startswith("pooler.")]
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
    if out_path.is_dir():
        raise ValueError(f"{out_path}: is a folder; name the file to write, e.g. {out_path / 'weights.pth'}")
    ckpt = runs.load_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt:
        raise ValueError(f"{ckpt_path}: not a checkpoint written by train.py")
    model_config, state = upgraded(ckpt)
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
    """Write a checkpoint of ours in the released M2D-CLAP layout.

    The file holds {'model': state dict} with the released key names and
    norm_stats: the encoder, the CLAP heads and the text encoder. The command
    prints the conventional folder name from which load_model and the
    authors' runtime read the setup.

    python features.py export runs/stage2/last.pt m2d_clap_vit_base-80x1001p16x16p16kpBpTI/weights.pth
    """
    p = command_parser("export", export_main)
    p.add_argument("checkpoint", type=Path, help="a checkpoint written by train.py, e.g. runs/stage2/last.pt")
    p.add_argument("out", type=Path, help="the .pth file to write (its folders are made)")
    p.add_argument("--training-parts", action="store_true",
                   help="also write the target network and predictor (default: off, the encoder and CLAP heads only)")
    args = p.parse_args(argv)
    try:
        state, config = export_released(args.checkpoint, args.out, args.training_parts)
    except (ValueError, OSError, runs.CheckpointWriteError) as e:  # OSError: an output folder that cannot be made
        sys.exit(f"error: {e}")
    has_text_encoder = any(k.startswith("text_encoder.") for k in state)
    print(f"wrote {args.out}: {len(state)} tensors with the released key names. Tools that read the setup "
          f"from the folder name expect it in a folder named like "
          f"{conventional_folder_name(config, has_text_encoder)}/")


# -----------------------------------------------------------------------------
# Features of clips of any length, as the authors' runtime cuts them (m2d/runtime_audio.py)


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


def clip_feature(patches: torch.Tensor, flat: bool = False) -> torch.Tensor:
    """Clip-level feature of [F, T, D] patch features: the frame features averaged over time, [F*D] (flat: [D])."""
    return frames_of(patches, flat).mean(dim=0)


def clap_audio_of(model: m2d.M2DCLAP, patches: torch.Tensor) -> torch.Tensor:
    """CLAP audio embedding [D] (not normalised): the audio projector over all patches of all crops."""
    return model.audio_proj(patches.reshape(1, -1, patches.shape[-1]))[0].float()


def timestamps_ms(n_columns: int, config: m2d.M2DConfig) -> torch.Tensor:
    """Regularly spaced timestamps [n_columns] in ms of the time columns of a clip's frame features.

    A crop of crop_frames frames (10 ms each) holds crop_frames // patch_size
    columns of patch_size frames; the frames left over (9 of a 1001-frame
    crop) belong to no column, so the true column starts are not evenly
    spaced: 160 ms apart, with a 250 ms step at each crop boundary. The
    timestamps spread each crop's columns evenly over the crop instead: column
    i is stamped i * step + patch_ms / 2 with step = crop_ms / columns per crop
    (10010 / 62 = 161.45 ms for the 2025 models, exactly 160 ms when the crop
    is whole patches, as for 80 x 608 models). Column j of a crop is then
    stamped (step - patch_ms) * j after its true centre: never early, at most
    88.5 ms late for the 2025 models, and the error does not grow with the
    clip's length. The features themselves are the authors' runtime's. The
    timestamps are float64: float32 keeps 7 digits, so its steps would
    already differ by 2e-3 ms at 25 s, beyond HEAR's 1e-3 ms regularity check.
    """
    per_crop = config.crop_frames // config.patch_size
    ms_per_frame = 1000.0 * data.HOP_SAMPLES / data.SAMPLE_RATE
    step_ms = config.crop_frames * ms_per_frame / per_crop
    i = torch.arange(n_columns, dtype=torch.float64)
    return i * step_ms + config.patch_size * ms_per_frame / 2


# Lower-level functions on log-mels [F, frames], for the protocols of evaluate.py and for your own front end.


def patch_features(model, log_mels: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
    """Patch features [F, T_cols, D] of each full-length log-mel [F, frames], on the CPU."""
    return [p.cpu() for p in iter_patch_features(model, log_mels, batch_size)]


def frame_features(model, log_mels: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
    """Frame-level features: per 160 ms time column, the F frequency rows stacked -> [T_cols, F * D]."""
    return [frames_of(p).cpu() for p in iter_patch_features(model, log_mels, batch_size)]


def clip_features(model, log_mels: list[torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Clip-level features [N, F * D]: the mean of the frame-level features over time."""
    return torch.stack([clip_feature(p).cpu() for p in iter_patch_features(model, log_mels, batch_size)])


@torch.no_grad()
def clap_audio(model, log_mels: Iterable[torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """CLAP audio embeddings [N, D], not L2-normalised, of full-length log-mels (on the model's device)."""
    return torch.stack([clap_audio_of(model, p) for p in iter_patch_features(model, log_mels, batch_size)])


# -----------------------------------------------------------------------------
# The linear probe: a classifier trained on frozen features, the baseline of every encoder


def fit_linear(x: torch.Tensor, targets: torch.Tensor, multilabel: bool, steps: int = 500, lr: float = 1e-3,
               weight_decay: float = 1e-4, seed: int = 0) -> torch.nn.Linear:
    """A linear classifier on standardised features x [N, D] for multi-hot targets [N, C]: full-batch Adam,
    cross-entropy (single-label) or binary cross-entropy (multi-label), weights drawn N(0, 0.01) from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    classifier = torch.nn.Linear(x.shape[1], targets.shape[1])
    torch.nn.init.normal_(classifier.weight, std=0.01, generator=generator)
    torch.nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    if multilabel:
        target, loss_fn = targets, torch.nn.BCEWithLogitsLoss()
    else:
        target, loss_fn = targets.argmax(dim=1), torch.nn.CrossEntropyLoss()
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss_fn(classifier(x), target).backward()
            optimizer.step()
    return classifier.requires_grad_(False)


def linear_probe(train_x: torch.Tensor, train_targets: torch.Tensor, test_x: torch.Tensor,
                 test_targets: torch.Tensor, steps: int = 500, lr: float = 1e-3, weight_decay: float = 1e-4,
                 seed: int = 0) -> tuple[dict, torch.Tensor]:
    """A linear classifier on frozen, standardised features; accuracy (and mAP if multi-label) in %.

    Features are standardised with the training set's mean and std; the
    classifier (fit_linear) uses binary cross-entropy when some clip has
    several labels. Targets are multi-hot [N, C]. Returns the scores and the
    test logits [N_test, C].
    """
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    multilabel = bool((train_targets.sum(dim=1) > 1).any() or (test_targets.sum(dim=1) > 1).any())
    classifier = fit_linear(train_x, train_targets, multilabel, steps, lr, weight_decay, seed)
    with torch.no_grad():
        scores = classifier(test_x)
    result = {"accuracy": metrics.accuracy(scores, test_targets)}
    if multilabel:
        result["mAP"] = metrics.mean_average_precision(scores, test_targets)
    return result, scores


# -----------------------------------------------------------------------------
# The feature API on raw waveforms (HEAR's convention)


MAX_CHANNELS = 8  # a second dimension this small, under a long first one, is a channel axis


def check_audio(audio) -> torch.Tensor:
    """audio as a float tensor [n_sounds, n_samples] of finite samples, or an error saying how to fix it."""
    audio = torch.as_tensor(audio)
    expected = "expected [n_sounds, n_samples]: mono, 16 kHz, float in [-1, 1]"
    if audio.ndim == 2 and audio.shape[1] <= MAX_CHANNELS and audio.shape[0] >= data.SAMPLE_RATE // 10:
        raise ValueError(f"audio has shape {tuple(audio.shape)}: one clip of {audio.shape[0]} samples in "
                         f"{audio.shape[1]} channels (soundfile's [n_samples, n_channels] layout), not "
                         f"{audio.shape[0]} clips; {expected}. Downmix it: audio.mean(1)[None] (one clip), or "
                         "pass audio.T (each channel a clip).")
    if audio.ndim != 2 or 0 in audio.shape:
        raise ValueError(f"audio must be [n_sounds, n_samples], both at least 1, mono at 16 kHz; got shape "
                         f"{tuple(audio.shape)}. Average channels and resample first (data.resample).")
    if not audio.is_floating_point():
        raise ValueError(f"audio is {audio.dtype}; {expected}. Scale integer samples, e.g. audio / 32768 for int16.")
    finite = torch.isfinite(audio)
    if not finite.all():
        clips = (~finite).any(dim=1).nonzero()[:, 0].tolist()
        raise ValueError(f"audio has {int((~finite).sum())} NaN or infinite samples, in clip(s) {clips[:10]}; "
                         "their features would be NaN. Repair or drop those clips (torch.nan_to_num).")
    return audio


def _log_mels(audio: torch.Tensor, model: Embedder) -> Iterator[torch.Tensor]:
    """Log-mel [F, frames] of each waveform of audio [n_sounds, n_samples], one at a time."""
    for wave in check_audio(audio):
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
    return torch.stack([clip_feature(p, flat) for p in
                        iter_patch_features(model.model, _log_mels(audio, model), batch_size)])


@torch.no_grad()
def get_timestamp_embeddings(audio: torch.Tensor, model: Embedder, flat: bool = False,
                             batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame embeddings [n, T, F*D] per 160 ms time column, and their timestamps [n, T] in ms.

    flat=True: [n, T, D], each column's F patch features averaged. The
    timestamps are regularly spaced, as HEAR asks; timestamps_ms says how
    they map to the audio (at most 88.5 ms after a column's true centre).
    """
    frames = torch.stack([frames_of(p, flat) for p in
                          iter_patch_features(model.model, _log_mels(audio, model), batch_size)])
    times = timestamps_ms(frames.shape[1], model.model.config).to(frames.device)
    return frames, times.expand(frames.shape[0], -1).contiguous()


def encode_clap_audio(audio: torch.Tensor, model: Embedder, batch_size: int = 64) -> torch.Tensor:
    """CLAP audio embeddings [n, D], not L2-normalised (as the authors' runtime returns them)."""
    if not model.has_clap:
        raise ValueError(f"{model.info.get('path')}: has no CLAP audio projector (an encoder-only file)")
    return clap_audio(model.model, _log_mels(audio, model), batch_size)


def check_texts(texts) -> list[str]:
    """texts as a list of non-blank strings, or an error.

    A bare string would be embedded one character at a time, and an empty or
    whitespace-only text gives a vector that stands for no sound at all.
    """
    if isinstance(texts, str):
        raise TypeError(f"texts must be a list of strings, got one string ({texts[:40]!r}); pass [text]")
    texts = list(texts)
    wrong = [t for t in texts if not isinstance(t, str)]
    if wrong:
        raise TypeError(f"texts must be a list of strings; got {type(wrong[0]).__name__} {wrong[0]!r}")
    blank = [i for i, t in enumerate(texts) if not t.strip()]
    if blank:
        raise ValueError(f"texts at index {blank[:10]}{' ...' if len(blank) > 10 else ''} ({len(blank)} of "
                         f"{len(texts)}) are empty or whitespace only; their embedding would mean nothing. "
                         "Drop them, or give each a caption.")
    return texts


def text_side_ready(model: Embedder):
    """Check that new text can be encoded (tokenizer or sentence model), loading a sentence model on first use."""
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


@torch.no_grad()
def encode_clap_text(texts: list[str], model: Embedder, batch_size: int = 64,
                     sentence_embeddings: np.ndarray | None = None) -> torch.Tensor:
    """CLAP text embeddings [m, D], not L2-normalised: the text feature, then the text projector.

    Encoders give their CLS token (BERT) or the mean over real tokens (GTE,
    sentence-transformers models), up to 512 tokens; sentence models
    (NV-Embed-v2, our stage-1 embedding models) their own embedding.
    sentence_embeddings [m, text_dim], precomputed for these texts, are used
    by a model without a text encoder instead of a sentence model.
    An empty list gives an empty [0, D] tensor.
    """
    texts = check_texts(texts)
    if sentence_embeddings is not None and model.model.text_encoder is None:
        emb = torch.as_tensor(sentence_embeddings, dtype=torch.float32, device=model.device)
        return model.model.text_features(emb).float()
    text_side_ready(model)
    out = [torch.zeros(0, model.model.config.embed_dim, device=model.device)]
    for start in range(0, len(texts), batch_size):
        batch = texts[start:start + batch_size]
        if model.text.kind == "encoder":
            text = {k: v.to(model.device) for k, v in text_embed.tokenize(model.text.tokenizer, batch).items()}
        else:
            emb = text_embed.embed_texts(batch, model.sentence_encoder, batch_size, progress=False,
                                         append_eos=model.text.append_eos)
            text = torch.from_numpy(emb).to(model.device)
        out.append(model.model.text_features(text).float())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# Embedding a corpus: python features.py embed


def audio_files(source: Path, audio_root: Path | None = None) -> tuple[Path, list[str], list[str]]:
    """(root, audio file names relative to it, names skipped as not audio) of a folder or a manifest CSV.

    A folder is searched recursively for every format soundfile reads; a CSV
    names its files in a file_name column, relative to audio_root (default:
    the CSV's folder).
    """
    if source.is_dir():
        files = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
        return source, [f for f in files if Path(f).suffix.lower() in data.AUDIO_SUFFIXES], \
            [f for f in files if Path(f).suffix.lower() not in data.AUDIO_SUFFIXES]
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such folder or manifest CSV")
    with open(source, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "file_name" not in (reader.fieldnames or []):
            raise ValueError(f"{source}: no 'file_name' column; the header has {reader.fieldnames}. A list of "
                             "files to embed is a CSV with a file_name column, or pass a folder.")
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
    """Write a float32 .npy atomically: an interrupted run never leaves a half-written feature file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    runs.atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False))


INDEX_COLUMNS = ("file_name", "seconds", "columns", "clip", "frames", "clap")


@torch.no_grad()
def save_features(embedder: Embedder, patches: torch.Tensor, out: Path, name: str, frames: bool,
                  flat: bool) -> dict:
    """Write one file's features under out/features/; their paths relative to out ("" where not written)."""
    arrays = {"clip": clip_feature(patches, flat),
              "frames": frames_of(patches, flat) if frames else None,
              "clap": clap_audio_of(embedder.model, patches) if embedder.has_clap else None}
    paths = {}
    for kind, array in arrays.items():
        paths[kind] = "" if array is None else f"features/{name}.{kind}.npy"
        if array is not None:
            save_npy(out / paths[kind], array.cpu().numpy())
    return paths


def embed_corpus(embedder: Embedder, root: Path, names: list[str], out: Path, frames: bool = False,
                 flat: bool = False, batch_size: int = 64, workers: int = 0) -> dict:
    """Write features of every readable file under out/, resuming where out/index.csv stops.

    Per file: <name>.clip.npy (clip features), with frames=True <name>.frames.npy
    ([T, F*D] per 160 ms column; flat=True: D-wide), and <name>.clap.npy (the
    CLAP audio embedding, not normalised) where the model has one. index.csv
    lists each written file; unreadable.csv the files that could not be read,
    with the reason (they are tried again on the next run). It adds to
    whatever out/ holds: claim_out_folder first checks that out/ was made
    with the same checkpoint, frames and flat (the embed command does).
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
    for k, patches in enumerate(iter_patch_features(embedder.model, log_mels(), batch_size)):
        name, seconds = readable[k]
        row = {"file_name": name, "seconds": f"{seconds:.3f}", "columns": patches.shape[1],
               **save_features(embedder, patches, out, name, frames, flat)}
        index.writerow([row[c] for c in INDEX_COLUMNS])
        index_file.flush()  # a file counts as done only once its features are all on disk
        counts["written"] += 1
        progress.update(k + 1 + counts["unreadable"], counts["unreadable"])
    progress.update(len(todo), counts["unreadable"], final=True)
    index_file.close()
    report_file.close()
    return counts


# What decides the features embed writes, recorded in out/settings.json, and what embed writes under out/.
SETTINGS_FILE = "settings.json"
EMBED_OUTPUTS = ("features/", "index.csv", "unreadable.csv", SETTINGS_FILE)


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The sha256 of a file's bytes (as sha256sum prints it), read a chunk at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def corpus_settings(checkpoint: Path, frames: bool, flat: bool) -> dict:
    """The settings that decide what embed writes: the checkpoint (its path and the sha256 of its bytes), frames, flat.

    The hash, not the file's size or time, tells the weights apart: a
    checkpoint retrained and saved over the same path has the same size.
    """
    return {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": file_sha256(checkpoint),
            "frames": frames, "flat": flat}


def settings_changes(old: dict, new: dict) -> list[str]:
    """'setting: old -> new' for each setting that differs; the checkpoint differs when its bytes do."""
    changes = []
    if old.get("checkpoint_sha256") != new["checkpoint_sha256"]:
        changes.append(f"--checkpoint: {old.get('checkpoint')} (sha256 {str(old.get('checkpoint_sha256'))[:12]}) "
                       f"-> {new['checkpoint']} (sha256 {new['checkpoint_sha256'][:12]})")
    on_off = {True: "on", False: "off"}
    changes += [f"--{k}: {on_off.get(old.get(k), old.get(k))} -> {on_off[new[k]]}" for k in ("frames", "flat")
                if old.get(k) != new[k]]
    return changes


def claim_out_folder(out: Path, settings: dict, overwrite: bool = False):
    """Make out/ the folder of these settings, or refuse: one folder never mixes features of two settings.

    A new folder records them in out/settings.json; a folder of the same
    settings is resumed. One of other settings, or with an index.csv but no
    settings.json (an earlier version wrote it), is refused, unless
    overwrite, which first deletes what embed wrote there (EMBED_OUTPUTS)
    and nothing else.
    """
    if overwrite:
        for name in EMBED_OUTPUTS:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink(missing_ok=True)
    way_out = (f"Pass a new --out, or --overwrite to delete its {', '.join(EMBED_OUTPUTS)} and embed afresh "
               "(nothing else in it is touched).")
    try:
        old = json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none there, or unreadable
        old = None
    if not isinstance(old, dict):
        if (out / "index.csv").is_file():
            raise ValueError(f"{out}: holds features (index.csv) but no readable {SETTINGS_FILE}, as earlier "
                             "versions wrote them: cannot tell which checkpoint, --frames and --flat made them, so "
                             f"new features cannot safely join them. {way_out}")
        out.mkdir(parents=True, exist_ok=True)
        runs.atomic_write(out / SETTINGS_FILE, lambda f: f.write(json.dumps(settings, indent=2).encode("utf-8")))
        return
    changes = settings_changes(old, settings)
    if changes:
        raise ValueError(f"{out}: holds features made with other settings ({'; '.join(changes)}); adding to them "
                         f"would mix the two in one index. {way_out}")


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
    """Write features of every audio file of a folder or manifest CSV; a rerun resumes where it stopped.

    Per file, under OUT/features/: <name>.clip.npy (the clip feature), with
    --frames <name>.frames.npy ([T, F*D], one row per 160 ms column; --flat:
    D-wide), and <name>.clap.npy (the CLAP audio embedding, not normalised)
    where the model has one. OUT/index.csv lists each written file,
    OUT/unreadable.csv the files that could not be read and why (they are
    tried again on the next run). OUT/settings.json records the checkpoint
    (its path and sha256), --frames and --flat: the same command resumes,
    and one with other settings is refused rather than mixing two kinds of
    features in one folder.

    python features.py embed --checkpoint runs/stage2/last.pt --audio /data/audio --out features/
    """
    gpu = torch.cuda.is_available()
    p = command_parser("embed", embed_main)
    p.add_argument("--checkpoint", type=Path, required=True, help="our checkpoint or a released .pth (required)")
    p.add_argument("--audio", type=Path, required=True,
                   help="a folder (searched recursively, any format soundfile reads, any rate and channel count) "
                        "or a manifest CSV with a file_name column (required)")
    p.add_argument("--audio-root", type=Path, default=None,
                   help="folder the manifest's file names are relative to (default: the manifest's folder)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (required); a rerun with the same settings resumes where it stopped")
    p.add_argument("--overwrite", action="store_true",
                   help=f"first delete what embed wrote in --out ({', '.join(EMBED_OUTPUTS)}), e.g. to embed it "
                        "again with another checkpoint (default: off: resume, or refuse other settings)")
    p.add_argument("--frames", action="store_true",
                   help="also write frame features [T, F*D], one row per 160 ms column (default: off)")
    p.add_argument("--flat", action="store_true",
                   help="D-wide features: the F frequency rows of each column averaged (default: off, the F rows "
                        "stacked: F*D)")
    p.add_argument("--batch-size", type=int, default=64, help="crops encoded together (default: 64)")
    p.add_argument("--workers", type=int, default=2 if gpu else 0,
                   help=f"processes decoding audio alongside the encoder (default: {2 if gpu else 0}; "
                        "2 with a GPU, 0 without)")
    p.add_argument("--device", default="cuda" if gpu else "cpu",
                   help=f"where the model runs (default: {'cuda' if gpu else 'cpu'}; cuda when a GPU is visible)")
    args = p.parse_args(argv)
    try:
        root, names, skipped = audio_files(args.audio, args.audio_root)
        embedder = load_model(args.checkpoint, runs.check_device(args.device))
        claim_out_folder(args.out, corpus_settings(args.checkpoint, args.frames, args.flat), args.overwrite)
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
    if skipped:
        print(f"not audio by name, left out: {len(skipped)} file(s): {', '.join(skipped[:5])}"
              f"{' ...' if len(skipped) > 5 else ''}")
    try:
        counts = embed_corpus(embedder, root, names, args.out, args.frames, args.flat, args.batch_size, args.workers)
    except OSError as e:  # a full disk, a folder that cannot be written
        sys.exit(f"error: {e}")
    print(f"{counts['written']} file(s) written, {counts['already_done']} done before, {counts['unreadable']} "
          f"unreadable (listed in {args.out / 'unreadable.csv'}); index: {args.out / 'index.csv'}")



# -----------------------------------------------------------------------------
# Fine-tuned files: the classifier finetune.py trains, and its class scores


def finetuned_checkpoint(init: m2d.M2DCLAP, classifier: m2d.AudioClassifier, classes: list[str], multi_label: bool,
                         recipe: dict, settings: dict, stage: str = "finetune") -> dict:
    """The file finetune.py writes: our checkpoint layout, so that load_model reads it and stage 2 can start from it.

    model_config is the init's with crop_frames = the task's input; the
    encoder (with the stretched position table) is the fine-tuned one; the
    target, predictor and CLAP heads come from the init (decoder_pos_embed
    rebuilt for the new grid); a text encoder is left out. "head" holds
    head_norm.* and head.*; "recipe" the fine-tuning recipe's fields.
    """
    config = replace(init.config, crop_frames=classifier.config.crop_frames)
    full = m2d.M2DCLAP(config, tuple(init.norm_stats.tolist())).state_dict()  # the new grid's tables
    for key, value in init.state_dict().items():
        if key in full and value.shape == full[key].shape:
            full[key] = value
    tuned = {k: v.detach().cpu() for k, v in classifier.state_dict().items()}
    full.update({k: v for k, v in tuned.items() if k in full})
    return {"stage": stage, "model_config": asdict(config), "norm_stats": init.norm_stats.tolist(), "model": full,
            "head": {k: v for k, v in tuned.items() if k.startswith("head")}, "classes": classes,
            "multi_label": multi_label, "recipe": recipe, "args": settings}


def attach_classifier(embedder: Embedder, ckpt: dict):
    """Give an Embedder of a fine-tuned checkpoint its classifier: .classifier, .classes, .task (the recipe's fields).

    The classifier is model.AudioClassifier, the network fine-tuning trained:
    the checkpoint's encoder (its input length and stretched position table)
    and its head.
    """
    model = embedder.model
    classifier = m2d.AudioClassifier(model.config, len(ckpt["classes"]), tuple(model.norm_stats.tolist()),
                                     feature=ckpt["recipe"]["feature"])
    encoder = {k: v for k, v in model.state_dict().items() if k.startswith(m2d.ENCODER_PREFIXES)}
    classifier.load_state_dict({**encoder, **ckpt["head"]})
    embedder.classifier = classifier.to(embedder.device).eval()
    embedder.classes = list(ckpt["classes"])
    embedder.task = {**ckpt["recipe"], "multi_label": bool(ckpt["multi_label"])}


def start_crop(x: torch.Tensor, length: int) -> torch.Tensor:
    """The evaluation crop, [..., L] -> [..., length]: the start, zeros appended when shorter."""
    return F.pad(x[..., :length], (0, max(length - x.shape[-1], 0)))


def raw_crop_length(raw_input: str, input_frames: int) -> int:
    """A crop of input_frames log-mel frames on the raw input: frames, or (frames - 1) x hop samples of waveform."""
    return input_frames if raw_input == "log_mel" else (input_frames - 1) * data.HOP_SAMPLES


def classifier_input(x: torch.Tensor, raw_input: str, classifier: m2d.AudioEncoder) -> torch.Tensor:
    """Raw input, waveforms [B, samples] or log-mels [B, F, T], -> the normalised log-mel [B, 1, F, T]."""
    expected = 2 if raw_input == "wave" else 3
    if x.dim() != expected:
        raise ValueError(f"raw_input={raw_input!r} expects clips of {expected - 1} dimension(s), "
                         f"got a batch of shape {tuple(x.shape)}")
    log_mel = data.log_mel(x) if raw_input == "wave" else x
    return classifier.normalize(log_mel.unsqueeze(1))


@torch.no_grad()
def classify(classifier: m2d.AudioClassifier, clips, raw_input: str, input_frames: int,
             batch_size: int = 64, padding: str = "counted") -> torch.Tensor:
    """Logits [N, C] on the CPU of raw clips (waveforms [samples] or log-mels [F, T]), as fine-tuning evaluates.

    padding "counted" (the authors'): one crop from the start of each clip
    at the task's length, zeros appended to shorter clips and averaged in.
    "masked": each clip whole, at its own length (own_column_features). No
    token drop, BatchNorm in eval mode.
    """
    classifier.eval()
    if padding == "masked":
        x = own_column_features(classifier, clips, raw_input, batch_size).to(classifier.norm_stats.device)
        return classifier.head(classifier.head_norm(x)).cpu()
    logits = [classifier(x).cpu() for x in evaluation_inputs(classifier, clips, raw_input, input_frames, batch_size)]
    return torch.cat(logits) if logits else torch.zeros(0, classifier.head.out_features)


@torch.no_grad()
def classifier_features(classifier: m2d.AudioClassifier, clips, raw_input: str, input_frames: int,
                        batch_size: int = 64, padding: str = "counted") -> torch.Tensor:
    """The features the head reads [N, D or F*D] on the CPU, of the evaluation view `classify` takes."""
    classifier.eval()
    if padding == "masked":
        return own_column_features(classifier, clips, raw_input, batch_size)
    x = [classifier.clip_feature(x).cpu() for x in evaluation_inputs(classifier, clips, raw_input, input_frames,
                                                                       batch_size)]
    return torch.cat(x) if x else torch.zeros(0, classifier.head.in_features)


@torch.no_grad()
def own_column_features(classifier: m2d.AudioClassifier, clips, raw_input: str,
                        batch_size: int = 64) -> torch.Tensor:
    """The head's input [N, D or F*D] on the CPU of each clip read whole, at its own length.

    As clip_features reads a clip for the frozen probe: its normalised
    log-mel cut into consecutive crops of the classifier's input length
    (feature_crops), each crop encoded with its padding masked out
    (AudioClassifier.clip_feature's frames), and the crops' column means
    averaged, each weighted by its columns: the mean over all of the clip's
    own time columns. No crop of any clip is left out.
    """
    config, device = classifier.config, classifier.norm_stats.device
    length, patch = config.crop_frames, config.patch_size
    sums = torch.zeros(len(clips), classifier.head.in_features)
    counts = torch.zeros(len(clips), 1)
    waiting: list[tuple[int, torch.Tensor]] = []   # (clip, normalised crop [F, frames])

    def encode():
        x = torch.stack([F.pad(crop, (0, length - crop.shape[-1])) for _, crop in waiting])[:, None]  # [B, 1, F, L]
        frames = torch.tensor([crop.shape[-1] for _, crop in waiting], device=device)
        features = classifier.clip_feature(x, frames=frames).float().cpu()                       # [B, dim]
        for (clip, crop), feature in zip(waiting, features):
            columns = crop.shape[-1] // patch
            sums[clip] += feature * columns
            counts[clip] += columns
        waiting.clear()

    for i, clip in enumerate(clips):
        mel = data.log_mel(clip.to(device)) if raw_input == "wave" else clip.to(device)
        for crop in feature_crops(classifier.normalize(mel.float()), length, patch):
            waiting.append((i, crop))
            if len(waiting) == batch_size:
                encode()
    if waiting:
        encode()
    return sums / counts


def evaluation_inputs(classifier: m2d.AudioEncoder, clips, raw_input: str, input_frames: int,
                      batch_size: int = 64) -> Iterator[torch.Tensor]:
    """The evaluation crop of raw clips, batch_size at a time: normalised log-mels [B, 1, F, T] on the
    classifier's device, one crop from the start of each clip, zeros appended to shorter clips."""
    device, length = classifier.norm_stats.device, raw_crop_length(raw_input, input_frames)
    for i in range(0, len(clips), batch_size):
        x = torch.stack([start_crop(c, length) for c in clips[i:i + batch_size]]).to(device)
        yield classifier_input(x, raw_input, classifier)


def tag_audio(audio: torch.Tensor, model: Embedder, batch_size: int = 64) -> torch.Tensor:
    """Class scores [n, n_classes] of a fine-tuned model: sigmoid (multi-label) or softmax.

    As the fine-tuning evaluation computes them (classify): a task trained on
    waveforms crops the waveform, one trained on log-mels crops the clip's
    log-mel. Class names: model.classes.
    """
    if getattr(model, "classifier", None) is None:
        raise ValueError(f"{model.info.get('path')}: not a fine-tuned checkpoint (no classification head); "
                         "tag_audio needs a file written by finetune.py")
    task = model.task
    clips = [wave for wave in check_audio(audio).to(model.device)]
    if task["raw_input"] == "log_mel":
        clips = [data.log_mel(wave) for wave in clips]
    logits = classify(model.classifier, clips, task["raw_input"], task["input_frames"], batch_size,
                      task.get("padding", "counted"))
    return logits.sigmoid() if task["multi_label"] else logits.softmax(dim=-1)


def tag_main(argv):
    """Print the top classes of each audio file under a fine-tuned checkpoint.

    One line per file: PATH: class score, class score, ... highest first.
    The scores are those of the fine-tuning evaluation (tag_audio): sigmoids
    for a multi-label task (each class scored on its own, 0 to 1), softmax
    otherwise (the scores of all classes sum to 1). A file that cannot be
    read is reported on stderr as PATH: reason and the others are still
    tagged; the exit status is then 1.

    python features.py tag --checkpoint runs/finetune-esc50/best.pt a.wav b.flac
    """
    gpu = torch.cuda.is_available()
    p = command_parser("tag", tag_main)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a fine-tuned file, the best.pt that finetune.py writes (required)")
    p.add_argument("--top", type=int, default=3, help="how many classes to print per file (default: 3)")
    p.add_argument("--device", default="cuda" if gpu else "cpu",
                   help=f"where the model runs (default: {'cuda' if gpu else 'cpu'}; cuda when a GPU is visible)")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE",
                   help="audio files, in any format soundfile reads, at any sample rate and channel count "
                        "(downmixed to mono and resampled to 16 kHz)")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error(f"--top must be at least 1, got {args.top}")
    try:
        model = load_model(args.checkpoint, runs.check_device(args.device))
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
    if getattr(model, "classifier", None) is None:
        sys.exit(f"error: {args.checkpoint}: not a fine-tuned checkpoint (it has no classification head); tag "
                 "needs the best.pt that finetune.py writes")
    failed = 0
    for path in args.files:
        try:
            scores = tag_audio(data.load_audio(path)[None], model)[0]
        except (ValueError, OSError) as e:  # data.AudioError is a ValueError
            print(one_line(path, e), file=sys.stderr, flush=True)
            failed += 1
            continue
        top = scores.topk(min(args.top, len(model.classes)))
        print(f"{path}: " + ", ".join(f"{model.classes[k]} {v:.3f}" for v, k in zip(top.values.tolist(),
                                                                                    top.indices.tolist())), flush=True)
    if failed:
        sys.exit(f"{failed} of {len(args.files)} file(s) could not be read (listed above); the others are tagged")


def one_line(path: Path, error: Exception) -> str:
    """'PATH: reason' on one line, the path said once where the message already starts with it."""
    reason = " ".join(str(error).splitlines())
    return reason if reason.startswith(f"{path}:") else f"{path}: {reason}"


# -----------------------------------------------------------------------------
# Captioning files: the decoder caption.py trains on the frozen encoder, and the captions it writes


def fit_columns(frames: torch.Tensor, max_columns: int) -> torch.Tensor:
    """[T, C] frame features -> at most max_columns rows: a longer clip's consecutive columns averaged in groups
    of ceil(T / max_columns) (the last group may be shorter), so that it fits the decoder's positions."""
    if frames.shape[0] <= max_columns:
        return frames
    group = -(-frames.shape[0] // max_columns)
    return torch.stack([chunk.mean(dim=0) for chunk in frames.split(group)])


@torch.no_grad()
def caption_inputs(model: m2d.M2DCLAP, log_mels: Iterable[torch.Tensor], max_columns: int, with_clap: bool,
                   batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """What a captioner reads of each full-length log-mel, on the CPU: (frame features [T, F*D], CLAP audio [D]).

    The frame features are get_timestamp_embeddings' (frames_of, the clip cut
    as the authors' runtime cuts it), fitted to max_columns (fit_columns);
    the CLAP audio embedding (None without with_clap) is encode_clap_audio's.
    """
    return [(fit_columns(frames_of(p), max_columns).cpu(), clap_audio_of(model, p).cpu() if with_clap else None)
            for p in iter_patch_features(model, log_mels, batch_size)]


def caption_batch(inputs: list[tuple[torch.Tensor, torch.Tensor | None]],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Clips' caption_inputs as one batch on `device`: frames [B, T, F*D] zero-padded to the longest clip,
    the mask of real columns [B, T] (bool), CLAP audio [B, D] (or None)."""
    longest = max(frames.shape[0] for frames, _ in inputs)
    frames = torch.stack([F.pad(f.float(), (0, 0, 0, longest - f.shape[0])) for f, _ in inputs])
    mask = torch.arange(longest)[None] < torch.tensor([f.shape[0] for f, _ in inputs])[:, None]
    clap = torch.stack([c.float() for _, c in inputs]).to(device) if inputs[0][1] is not None else None
    return frames.to(device), mask.to(device), clap


def captioner_checkpoint(encoder: m2d.M2DCLAP, captioner: m2d.AudioCaptioner, tokenizer, captioning: dict,
                         recipe: dict, settings: dict) -> dict:
    """The file caption.py writes (best.pt): the frozen encoder in our layout, so that load_model reads it, and
    "captioner": the prefix's sizes and weights, the language model's config and weights, the tokenizer's
    record (text_embed.caption_tokenizer), and `captioning` (beam_width, max_tokens, max_columns)."""
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items() if not k.startswith("text_encoder.")}
    prefix, language_model = captioner.prefix, captioner.language_model
    record = {"prefix": {"frame_dim": prefix.frame_proj.in_features, "width": prefix.frame_proj.out_features,
                         "clap_dim": prefix.clap_proj.in_features if prefix.clap_proj is not None else 0},
              "prefix_state": {k: v.detach().cpu() for k, v in prefix.state_dict().items()},
              "language_model_config": language_model.config.to_dict(),
              "language_model": {k: v.detach().cpu() for k, v in language_model.state_dict().items()},
              "tokenizer": tokenizer.record(), **captioning}
    return {"stage": "caption", "model_config": asdict(encoder.config), "norm_stats": encoder.norm_stats.tolist(),
            "model": state, "captioner": record, "recipe": recipe, "args": settings}


def attach_captioner(embedder: Embedder, ckpt: dict, decoder_folder: str | Path | None = None):
    """Give an Embedder of a captioning checkpoint its captioner: .captioner (model.AudioCaptioner),
    .caption_tokenizer, .captioning (beam_width, max_tokens, max_columns). A pretrained BART's tokenizer is
    read from the folder the checkpoint names, or decoder_folder; where neither is there, caption_audio
    says so."""
    record = ckpt["captioner"]
    language_model = text_embed.caption_decoder_from_config(record["language_model_config"])
    language_model.load_state_dict(record["language_model"])
    prefix = m2d.CaptionPrefix(**record["prefix"])
    prefix.load_state_dict(record["prefix_state"])
    config = language_model.config
    captioner = m2d.AudioCaptioner(prefix, language_model, config.decoder_start_token_id, config.eos_token_id)
    embedder.captioner = captioner.to(embedder.device).eval()
    embedder.captioning = {k: record[k] for k in ("beam_width", "max_tokens", "max_columns")}
    try:
        embedder.caption_tokenizer = text_embed.caption_tokenizer(record["tokenizer"], decoder_folder)
    except (OSError, ImportError) as e:
        embedder.caption_tokenizer = None
        embedder.captioning["unavailable"] = (f"{e} (pass the BART folder the decoder was trained from: "
                                              "caption.py predict --decoder FOLDER)")


@torch.no_grad()
def caption_audio(audio: torch.Tensor, model: Embedder, beam_width: int | None = None,
                  max_tokens: int | None = None, batch_size: int = 16) -> list[str]:
    """One caption per clip of audio [n, samples] under a captioning checkpoint (caption.py's best.pt).

    Beam search with the checkpoint's width and maximum length unless given;
    the captions are written in the checkpoint tokenizer's words.
    """
    if getattr(model, "captioner", None) is None:
        raise ValueError(f"{model.info.get('path')}: not a captioning checkpoint (no caption decoder); "
                         "caption_audio needs the best.pt that caption.py writes")
    if model.caption_tokenizer is None:
        raise ValueError(f"cannot write captions: {model.captioning['unavailable']}")
    settings, captioner = model.captioning, model.captioner
    with_clap = captioner.prefix.clap_proj is not None
    inputs = caption_inputs(model.model, _log_mels(audio, model), settings["max_columns"], with_clap, batch_size)
    captions = []
    for start in range(0, len(inputs), batch_size):
        frames, mask, clap = caption_batch(inputs[start:start + batch_size], model.device)
        for ids in captioner.generate(frames, mask, clap, beam_width or settings["beam_width"],
                                      max_tokens or settings["max_tokens"]):
            captions.append(model.caption_tokenizer.decode(ids))
    return captions


# -----------------------------------------------------------------------------
# The command line: python features.py {embed,export,tag} ...


COMMANDS = {"embed": embed_main, "export": export_main, "tag": tag_main}


def command_parser(name: str, command) -> argparse.ArgumentParser:
    """The parser of `python features.py NAME`, described by the command function's docstring."""
    return argparse.ArgumentParser(prog=f"features.py {name}", description=inspect.cleandoc(command.__doc__),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def usage() -> str:
    """The usage of features.py: each command with the first line of its description."""
    commands = [f"  {name:<8}{inspect.cleandoc(command.__doc__).splitlines()[0]}" for name, command in COMMANDS.items()]
    return (f"usage: features.py {{{','.join(COMMANDS)}}} ...\n\n"
            "The command line of the inference API; the Python functions are described at the top of\n"
            "features.py and in docs/FEATURES.md.\n\ncommands:\n" + "\n".join(commands) + "\n\n"
            "python features.py COMMAND --help describes a command and its options.")


def main(argv=None):
    """Run the command argv names; --help prints the usage; no command, or an unknown one, exits with status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{usage()}\nfeatures.py: error: {problem}", file=sys.stderr)
        sys.exit(2)
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
