"""Audio captioning on the frozen M2D-CLAP encoder: a sequence-to-sequence decoder, its training, beam search,
and the captioning scores (the paper's sixth task).

    python caption.py                                    # newest runs/stage*/last.pt, built-in captions
    python caption.py --encoder runs/stage2.1/last.pt --manifest clotho.csv --decoder bart-base/ \\
        --recipe pretrained-bart                         # your captions, a local pretrained BART
    python caption.py predict --checkpoint runs/caption/best.pt a.wav b.flac   # one caption per file
    python caption.py --help                             # every flag, with each recipe's value

The method, in the order data meets it:
(1) each clip's frame features from the frozen encoder, as get_timestamp_embeddings
    gives them (one F*D vector per 160 ms time column, the clip cut as the authors'
    runtime cuts it), and its CLAP audio embedding: computed once, kept in memory;
(2) model.CaptionPrefix: each frame layer-normalised and projected to the decoder's
    width, the CLAP embedding as one token before them (EnCLAP's prefix);
(3) BART (transformers' BartForConditionalGeneration: small with random weights by
    default, or a local pretrained folder with --decoder) reads them in place of
    word embeddings; its decoder is teacher-forced on every reference caption of
    every training clip, cross-entropy on the caption's tokens (losses.caption_loss);
(4) AdamW (weight decay on matrices only), linear warm-up then cosine decay, set
    every step; gradients clipped;
(5) beam search (model.beam_search) writes a caption for each test clip, and
    metrics.caption_scores scores them against all of the clip's references.
Beside it, on the same clips: the same decoder trained on a random-init encoder
(features.random_init_copy), and, with no decoder at all, the training caption
nearest each clip by CLAP audio-text similarity.

Tokenizer: the training captions' own words (text_embed.CaptionVocabulary), so the
default needs nothing downloaded; a --decoder folder brings its own tokenizer.
A manifest follows data.read_caption_manifest's rules: file_name, split
(train/valid/test), and caption (one per row) or caption_1 ... caption_N (Clotho's
layout). With valid clips, the epoch with the lowest valid loss is kept, and
best.pt is the seed with the lowest; without, the last epoch and the first seed.
The built-in captions have 250 valid clips, new to the encoder too. Outputs in
--out-dir (default runs/caption): best.pt (the frozen encoder and the decoder:
features.load_model reads it, features.caption_audio and 'caption.py predict'
caption with it), result.json, predictions.csv, curves.png, log.jsonl, and
resume.pt: running the same command again resumes exactly where a stopped run
left off. One process: the decoder is small beside the encoder.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import builtin_data
import data
import features
import losses
import metrics
import model as m2d
import runs
import text_embed


# -----------------------------------------------------------------------------
# Recipes


def option(default, help: str, choices: tuple[str, ...] | None = None):
    """A recipe field: its default, its --help text and, for a string, its choices."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class CaptionRecipe:
    """One captioning recipe. Every field is a command-line flag (caption.py --help)."""

    width: int = option(128, "decoder width W (random-init decoder; a --decoder folder keeps its own)")
    layers: int = option(2, "encoder layers and decoder layers, each (random-init decoder)")
    heads: int = option(4, "attention heads (random-init decoder)")
    positions: int = option(256, "positions (random-init decoder); a clip with more time columns has groups of "
                            "consecutive columns averaged to fit")
    dropout: float = option(0.1, "dropout inside the decoder (random-init decoder)")
    frame_feature: str = option("stacked", "each time column's F patch features stacked (F*D, the timestamp "
                                "embeddings) or averaged (D: 5x less memory for large corpora)", ("stacked", "flat"))
    clap_prefix: bool = option(True, "the CLAP audio embedding as one token before the frames")
    lr: float = option(2e-3, "peak learning rate")
    lr_min: float = option(1e-5, "the cosine's floor")
    weight_decay: float = option(0.01, "AdamW's weight decay, on weight matrices only")
    batch_size: int = option(64, "(clip, caption) pairs per step")
    epochs: int = option(20, "passes over every training caption")
    warmup_epochs: int = option(1, "linear warm-up from 0, in epochs")
    clip_grad_norm: float = option(1.0, "gradient norm clipped to this")
    beam_width: int = option(3, "beams of the search that writes captions")
    max_tokens: int = option(30, "longest caption written, in tokens")
    seeds: tuple[int, ...] = option((0,), "one run per seed (and per encoder, with --baselines)")

    def __post_init__(self):
        for name in ("width", "layers", "heads", "positions", "batch_size", "epochs", "beam_width", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(f"--warmup-epochs {self.warmup_epochs} does not fit in --epochs {self.epochs}; pass "
                             f"a smaller one, e.g. --warmup-epochs {self.epochs // 10}")


CAPTION_RECIPES: dict[str, CaptionRecipe] = {
    # The built-in data on 2 CPU cores: 2,000 caption pairs in a 71-word language, a 2 + 2-layer BART of width
    # 128 (1.2 M weights), 20 epochs of 32 steps, the epoch kept by the loss on the 250 valid clips, which
    # pre-training never saw. Both choices were made on that loss, never on the test clips. Without the CLAP
    # prefix the pre-trained encoder's valid loss is 0.38 against 0.52 with it (seed 0): the encoder's CLAP
    # embedding was trained on these very training captions and finds them better than a new clip's (audio-to-
    # text R@1 42 against 34), so a decoder leans on it and misses on new clips. 30 epochs: 0.385 against 0.380
    # (3 seeds), so the shorter one. docs/PERFORMANCE.md has the table.
    "builtin": CaptionRecipe(clap_prefix=False),
    # A local pretrained BART (--decoder, e.g. bart-base) on AudioCaps or Clotho, on a GPU: a fine-tuning rate
    # for a pretrained language model, and the usual beam and length of the field (ours, not measured here).
    "pretrained-bart": CaptionRecipe(lr=5e-5, lr_min=1e-6, beam_width=4, seeds=(0, 1, 2)),
}


def lr_at(step: int, steps_per_epoch: int, recipe: CaptionRecipe) -> float:
    """Linear warm-up from 0 over warmup_epochs, then lr_min + (lr - lr_min)(1 + cos(pi t)) / 2, t from 0 to 1."""
    warmup, total = recipe.warmup_epochs * steps_per_epoch, recipe.epochs * steps_per_epoch
    if step < warmup:
        return recipe.lr * step / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return recipe.lr_min + 0.5 * (recipe.lr - recipe.lr_min) * (1 + math.cos(math.pi * min(t, 1.0)))


# -----------------------------------------------------------------------------
# Data: captioned clips, their tokens, the frozen encoder's features


def load_manifest(manifest_path: Path | None, audio_root: Path | None) -> data.CaptionManifest:
    """The captions to train and score on: a manifest (data.read_caption_manifest), or the built-in data."""
    if manifest_path is None:
        return builtin_data.builtin_caption_set()  # renders the audio on first use
    manifest = data.read_caption_manifest(manifest_path, audio_root)
    missing = data.AudioFolder(manifest.root).missing(manifest.files)
    if missing:
        raise data.ManifestError(f"{manifest_path}: {len(missing)} audio file(s) such as {manifest.root / missing[0]} "
                                 "not found. Fix file_name or pass the right --audio-root.")
    return manifest


def clip_log_mels(manifest: data.CaptionManifest):
    """Each clip's full-length log-mel [n_mels, frames], read when needed; an unreadable file names its line."""
    source = data.AudioFolder(manifest.root)
    for i, name in enumerate(manifest.files):
        try:
            yield source.log_mel(name)
        except data.AudioError as e:
            raise manifest.unreadable(i, e) from e


def encoder_inputs(embedder: features.Embedder, manifest: data.CaptionManifest, max_columns: int,
                   frame_feature: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(frame features [T, F*D or D], CLAP audio [D] or None) of every clip, float16 on the CPU: the cache the
    decoder trains on (features.caption_inputs; flat: each column's F rows averaged)."""
    inputs = features.caption_inputs(embedder.model, clip_log_mels(manifest), max_columns, embedder.has_clap)
    if frame_feature == "flat":
        grid_f = embedder.model.config.grid_size[0]
        inputs = [(f.view(f.shape[0], grid_f, -1).mean(dim=1), c) for f, c in inputs]
    return [(f.half(), c) for f, c in inputs]


def caption_pairs(manifest: data.CaptionManifest, clips: list[int], tokenizer, max_length: int) -> list[tuple]:
    """(clip index, caption tokens) for every caption of the clips; tokens cut to max_length, the end kept."""
    pairs = []
    for i in clips:
        for caption in manifest.captions[i]:
            tokens = tokenizer.encode(caption)
            pairs.append((i, tokens[:max_length - 1] + tokens[-1:] if len(tokens) > max_length else tokens))
    return pairs


def pair_batch(pairs: list[tuple], inputs: list, start_id: int, pad_id: int, device: torch.device) -> tuple:
    """Pairs as a batch: frames [B, T, C], mask [B, T], CLAP [B, D] or None, decoder inputs [B, L] (the start
    token, then the caption shifted right) and targets [B, L] (the caption), both padded with pad_id."""
    frames, mask, clap = features.caption_batch([inputs[i] for i, _ in pairs], device)
    length = max(len(tokens) for _, tokens in pairs)
    targets = torch.full((len(pairs), length), pad_id)
    decoder_inputs = torch.full((len(pairs), length), pad_id)
    for b, (_, tokens) in enumerate(pairs):
        targets[b, :len(tokens)] = torch.tensor(tokens)
        decoder_inputs[b, 0] = start_id
        decoder_inputs[b, 1:len(tokens)] = torch.tensor(tokens[:-1])
    return frames, mask, clap, decoder_inputs.to(device), targets.to(device)


# -----------------------------------------------------------------------------
# The decoder, its optimiser, the loss


def language_model(decoder_folder: Path | None, recipe: CaptionRecipe, tokenizer):
    """A local pretrained BART, or a small one with random weights (drawn from torch's global generator)."""
    if decoder_folder is not None:
        return text_embed.pretrained_caption_decoder(decoder_folder)
    return text_embed.new_caption_decoder(len(tokenizer), recipe.width, recipe.layers, recipe.heads,
                                          recipe.positions, recipe.dropout, tokenizer)


def build_captioner(bart, frame_dim: int, clap_dim: int) -> m2d.AudioCaptioner:
    """The prefix (model.CaptionPrefix, clap_dim 0: no CLAP token) on a BART, with BART's start and end tokens."""
    prefix = m2d.CaptionPrefix(frame_dim, bart.config.d_model, clap_dim)
    return m2d.AudioCaptioner(prefix, bart, bart.config.decoder_start_token_id, bart.config.eos_token_id)


def make_optimizer(captioner: m2d.AudioCaptioner, recipe: CaptionRecipe) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices and embeddings only, not on biases and norms (nanoGPT's
    rule); the rate is set every step (lr_at)."""
    params = [p for p in captioner.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999))


@torch.no_grad()
def held_out_loss(captioner: m2d.AudioCaptioner, pairs: list[tuple], inputs: list, pad_id: int,
                  batch_size: int) -> float:
    """The teacher-forced loss over held-out pairs, every real token weighted alike, in eval mode (no dropout)."""
    captioner.eval()
    total, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        frames, mask, clap, decoder_inputs, targets = pair_batch(pairs[start:start + batch_size], inputs,
                                                                 captioner.start_id, pad_id, device_of(captioner))
        tokens = int((targets != pad_id).sum())
        total += float(losses.caption_loss(captioner(frames, mask, clap, decoder_inputs), targets, pad_id)) * tokens
        count += tokens
    return total / max(count, 1)


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are."""
    return next(module.parameters()).device


@torch.no_grad()
def write_captions(captioner: m2d.AudioCaptioner, clips: list[int], inputs: list, tokenizer, recipe: CaptionRecipe,
                   batch_size: int = 32) -> list[str]:
    """A caption for each clip, by beam search (recipe.beam_width, recipe.max_tokens)."""
    captioner.eval()
    captions = []
    for start in range(0, len(clips), batch_size):
        frames, mask, clap = features.caption_batch([inputs[i] for i in clips[start:start + batch_size]],
                                                    device_of(captioner))
        for ids in captioner.generate(frames, mask, clap, recipe.beam_width, recipe.max_tokens):
            captions.append(tokenizer.decode(ids))
    return captions


# -----------------------------------------------------------------------------
# Training: epochs over every training caption, a held-out loss after each


@dataclass
class FitState:
    """Where a fit stands after some epochs: what a resumed run needs besides weights and generators."""

    epoch: int = 0                        # epochs done
    step: int = 0                         # optimiser steps done
    history: list[dict] = field(default_factory=list)
    best_loss: float = math.inf           # the lowest valid loss so far (with valid clips)
    best_epoch: int | None = None
    best_state: dict | None = None        # that epoch's weights


@dataclass
class Trainer:
    """One captioning job in training: its decoder, step, data and progress."""

    captioner: m2d.AudioCaptioner
    stepper: runs.Stepper
    order: torch.Generator                # draws the batches
    train: list[tuple]                    # (clip, tokens) pairs
    held_out: list[tuple]                 # the valid pairs (else the test pairs: logged, never selected on)
    selects: bool                         # whether held_out is valid clips, which select the epoch
    inputs: list
    pad_id: int
    guard: runs.NonFiniteGuard
    state: FitState = field(default_factory=FitState)


def train_epoch(t: Trainer, recipe: CaptionRecipe) -> tuple[float, float]:
    """One pass over the training pairs in a fresh order: (mean loss, last learning rate)."""
    batches = torch.randperm(len(t.train), generator=t.order).split(recipe.batch_size)
    device, epoch_losses = device_of(t.captioner), []
    t.captioner.train()
    for ids in batches:
        lr = lr_at(t.state.step, len(batches), recipe)
        for group in t.stepper.optimizer.param_groups:
            group["lr"] = lr
        batch = pair_batch([t.train[k] for k in ids], t.inputs, t.captioner.start_id, t.pad_id, device)
        sums, _, finite = t.stepper.step([batch], lambda frames, mask, clap, decoder_inputs, targets: {
            "loss": losses.caption_loss(t.stepper.forward(frames, mask, clap, decoder_inputs), targets, t.pad_id)})
        t.state.step += 1
        t.guard.record(t.state.step, finite, sums, None)
        epoch_losses.append(float(sums["loss"]))
    t.guard.check(None)  # a warning per skipped non-finite step; a stop after 10 in a row
    return float(np.mean(epoch_losses)), lr


def fit(t: Trainer, recipe: CaptionRecipe, on_epoch) -> dict:
    """Train up to recipe.epochs; returns the kept weights (the lowest valid loss's, else the last epoch's)."""
    state = t.state
    while state.epoch < recipe.epochs:
        loss, lr = train_epoch(t, recipe)
        state.epoch += 1
        held = held_out_loss(t.captioner, t.held_out, t.inputs, t.pad_id, recipe.batch_size)
        state.history.append({"epoch": state.epoch, "loss": loss, "lr": lr,
                              ("valid_loss" if t.selects else "test_loss"): held})
        if t.selects and held < state.best_loss:
            state.best_loss, state.best_epoch = held, state.epoch
            state.best_state = {k: v.detach().clone() for k, v in t.captioner.state_dict().items()}
        on_epoch(t)
    if t.selects:
        return state.best_state
    state.best_epoch = state.epoch
    return t.captioner.state_dict()


# -----------------------------------------------------------------------------
# The run: seeds x encoders (pre-trained, random init), a resume file after every epoch, the outputs


RESUME_FILE, MODEL_FILE = "resume.pt", "best.pt"
RUN_FILES = (RESUME_FILE, RESUME_FILE + ".tmp", MODEL_FILE, "log.jsonl", "result.json", "predictions.csv",
             "curves.png")
ENCODERS = ("pretrained", "random_init")


def setting(default, help: str, **argparse_options):
    """A RunSettings field: its default, its --help text and how argparse reads it (flag: another flag name)."""
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass
class RunSettings:
    """What a captioning run is told besides its recipe: one flag per field, every default settled by parse_args."""

    encoder: Path | None = setting(None, "the frozen encoder, ours or a released file (default: the most recently "
                                   "written runs/stage{1,1.1,2,2.1}/last.pt)", type=Path)
    recipe_name: str = setting("builtin", "recipe (default: builtin; pretrained-bart with --decoder)",
                               flag="--recipe", choices=tuple(CAPTION_RECIPES))
    manifest: Path | None = setting(None, "CSV: file_name, split (train/valid/test), and caption (one per row) or "
                                    "caption_1 ... caption_N (Clotho). Default: the built-in captions", type=Path)
    audio_root: Path | None = setting(None, "folder the file names are relative to (default: the manifest's)",
                                      type=Path)
    decoder: Path | None = setting(None, "a local pretrained BART folder (config, weights, tokenizer) to start "
                                   "from, with its tokenizer (default: a small BART with random weights and the "
                                   "captions' own words)", type=Path)
    baselines: bool = setting(True, "also train the same decoder on a random-init encoder, and pick each clip's "
                              "nearest training caption by CLAP similarity", action=argparse.BooleanOptionalAction)
    device: str = setting("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, cuda:1, ...")
    precision: str = setting("fp32", "autocast precision of training steps on a GPU; fp16 uses a dynamic loss "
                             "scale", choices=("fp32", "bf16", "fp16"))
    threads: int | None = setting(None, "CPU threads torch computes with (default: torch's choice, one per core)",
                                  type=int)
    out_dir: Path = setting(Path("runs/caption"), "run folder", type=Path)
    resume: bool = setting(False, "go on from the run folder's resume.pt (default: when it exists; --no-resume "
                           "starts over)", action=argparse.BooleanOptionalAction)
    epochs_limit: int | None = setting(None, "stop after this many epochs; the same command resumes (default: no "
                                       "limit)", type=int)

    def identity(self, recipe: CaptionRecipe) -> dict:
        """What must stay the same for a run to resume."""
        return {"encoder": str(self.encoder), "recipe_name": self.recipe_name, "recipe": recipe_record(recipe),
                "manifest": str(self.manifest), "audio_root": str(self.audio_root), "decoder": str(self.decoder),
                "baselines": self.baselines}

    def saved(self) -> dict:
        return {k: str(v) for k, v in vars(self).items()}


def recipe_record(recipe: CaptionRecipe) -> dict:
    return {**asdict(recipe), "seeds": list(recipe.seeds)}


@dataclass
class CaptionRun:
    """A captioning run in progress: its settings, data, folder and log."""

    settings: RunSettings
    recipe: CaptionRecipe
    manifest: data.CaptionManifest
    embedder: features.Embedder
    tokenizer: object                    # text_embed.CaptionVocabulary or PretrainedCaptionTokenizer
    device: torch.device
    log: runs.RunLog
    identity: dict
    jobs: list[tuple[int, str]]          # (seed, encoder) in the order they run
    scoring: str | None                  # None, or why the captions cannot be scored here
    results: list[dict] = field(default_factory=list)
    epochs_run: int = 0                  # in this invocation
    inputs: dict = field(default_factory=dict)  # (encoder, seed) -> encoder_inputs
    max_columns: int = 0                 # the decoder's positions for frames, set by the first job run


def caption(settings: RunSettings, recipe: CaptionRecipe) -> Path:
    """Run every (seed, encoder) job, resuming where a stopped run left off; returns best.pt's path."""
    run = start_run(settings, recipe)
    resume = runs.find_resume(settings.out_dir / RESUME_FILE, settings.resume, "caption")
    if resume is not None:
        runs.check_same_run(settings.out_dir / RESUME_FILE, resume["resume"]["run"], run.identity)
        run.results = list(resume["results"])
    runs.prepare_out_dir(settings.out_dir, resume is None, runs.Distributed(), also_stale=RUN_FILES)
    start_job = resume["job"] if resume else 0
    done_epochs = start_job * recipe.epochs + resume["fit"]["epoch"] if resume else 0
    run.log.start(done_epochs, resume["resume"]["elapsed_s"] if resume else 0.0, keep_records=done_epochs)
    split = {part: len(run.manifest.indices(part)) for part in data.SPLITS}
    run.log.print(f"captioning {run.manifest.name} ({split['train']} training, {split['valid']} valid, "
                  f"{split['test']} test clips) on the frozen {run.embedder.info['path']}: {len(run.jobs)} run(s) of "
                  f"{recipe.epochs} epochs, decoder {settings.decoder or 'small BART, random init'}, tokenizer "
                  f"{describe_tokenizer(run.tokenizer)}, {run.device}, writing {settings.out_dir}"
                  + (f"; resuming at run {start_job + 1}, epoch {resume['fit']['epoch']}" if resume else ""))
    if run.scoring:
        run.log.print(f"warning: {run.scoring}; the captions are written to predictions.csv but not scored")
    for j in range(start_job, len(run.jobs)):
        run.results.append(run_job(run, j, resume if j == start_job else None))
    write_outputs(run)
    return settings.out_dir / MODEL_FILE


def start_run(settings: RunSettings, recipe: CaptionRecipe) -> CaptionRun:
    """The run's encoder, data, tokenizer and log, checked before anything trains."""
    runs.set_threads(settings.threads)
    device = runs.check_device(settings.device)
    embedder = features.load_model(settings.encoder or features.newest_run(), device)
    if recipe.clap_prefix and not embedder.has_clap:
        raise ValueError(f"{embedder.info['path']}: has no CLAP audio projector (an encoder-only file), so there "
                         "is no CLAP prefix to give the decoder; pass --no-clap-prefix")
    manifest = load_manifest(settings.manifest, settings.audio_root)
    train_captions = [c for i in manifest.indices("train") for c in manifest.captions[i]]
    tokenizer = (text_embed.PretrainedCaptionTokenizer(settings.decoder) if settings.decoder
                 else text_embed.CaptionVocabulary.from_captions(train_captions))
    jobs = [(seed, encoder) for seed in recipe.seeds for encoder in ENCODERS[:2 if settings.baselines else 1]]
    settings = replace(settings, encoder=Path(embedder.info["path"]))
    log = runs.RunLog(settings.out_dir / "log.jsonl", len(jobs) * recipe.epochs)
    return CaptionRun(settings, recipe, manifest, embedder, tokenizer, device, log, settings.identity(recipe), jobs,
                      scoring_unavailable())


def scoring_unavailable() -> str | None:
    """None where the captioning scores can be computed, else why not (aac-metrics is an optional extra)."""
    try:
        metrics.aac_metrics()
    except ImportError as e:
        return str(e)
    return None


def describe_tokenizer(tokenizer) -> str:
    if isinstance(tokenizer, text_embed.CaptionVocabulary):
        return f"the training captions' {len(tokenizer) - len(tokenizer.SPECIALS)} words"
    return f"{tokenizer.folder}'s ({len(tokenizer)} tokens)"


def inputs_of(run: CaptionRun, seed: int, encoder: str, max_columns: int) -> list:
    """The cached encoder inputs of every clip: the pre-trained encoder's once, a random-init copy's per seed."""
    key = ("pretrained", None) if encoder == "pretrained" else (encoder, seed)
    if key not in run.inputs:
        embedder = run.embedder
        if encoder == "random_init":
            embedder = features.Embedder(features.random_init_copy(run.embedder.model, seed), run.embedder.info,
                                         run.embedder.text).to(run.device)
        run.log.print(f"computing the {encoder.replace('_', '-')} encoder's frame features of "
                      f"{len(run.manifest.files)} clips")
        run.inputs[key] = encoder_inputs(embedder, run.manifest, max_columns, run.recipe.frame_feature)
    return run.inputs[key]


def run_job(run: CaptionRun, j: int, resume: dict | None) -> dict:
    """Train and score one decoder on one encoder's features; resumes from `resume` when it is this job's."""
    seed, encoder = run.jobs[j]
    recipe, manifest, out = run.recipe, run.manifest, run.settings.out_dir
    torch.manual_seed(seed)  # the decoder's initialisation
    bart = language_model(run.settings.decoder, recipe, run.tokenizer)
    run.max_columns = max_columns = bart.config.max_position_embeddings - int(recipe.clap_prefix)
    inputs = inputs_of(run, seed, encoder, max_columns)
    frames, clap = inputs[0]
    captioner = build_captioner(bart, frames.shape[1], clap.shape[0] if recipe.clap_prefix else 0).to(run.device)
    valid, test = manifest.indices("valid"), manifest.indices("test")
    pad_id, positions = bart.config.pad_token_id, bart.config.max_position_embeddings
    t = Trainer(captioner, runs.Stepper.build(captioner, make_optimizer(captioner, recipe), run.device,
                                              run.settings.precision, False, recipe.clip_grad_norm),
                torch.Generator().manual_seed(seed),
                caption_pairs(manifest, manifest.indices("train"), run.tokenizer, positions),
                caption_pairs(manifest, valid or test, run.tokenizer, positions), bool(valid), inputs, pad_id,
                runs.NonFiniteGuard(10, out / RESUME_FILE, run.log.print))
    torch.manual_seed(seed)  # the decoder's dropout, whatever computing the features drew
    if resume is not None:
        captioner.load_state_dict(resume["model"])
        runs.restore_training(resume, out / RESUME_FILE, run.identity, recipe.lr, t.stepper.optimizer,
                              t.stepper.scaler, run.log.print)
        t.state = FitState(**resume["fit"])
        t.order.set_state(resume["resume"]["rng"][0]["order"])
        runs.set_rng_state(resume["resume"]["rng"][0]["global"], run.device)
    captioner.load_state_dict(fit(t, recipe, lambda t: end_epoch(run, j, t)))
    captions = write_captions(captioner, test, inputs, run.tokenizer, recipe)
    references = [manifest.captions[i] for i in test]
    scores, missing = ({}, {}) if run.scoring else metrics.caption_scores(captions, references)
    held = "valid_loss" if valid else "test_loss"
    summary = {"seed": seed, "encoder": encoder, "best_epoch": t.state.best_epoch, "steps": t.state.step,
               held: t.state.best_loss if valid else t.state.history[-1][held], "scores": scores,
               "not_computed": missing, "captions": captions}
    kept = [r for r in run.results if r["encoder"] == "pretrained"]
    if encoder == "pretrained" and all(rank_key(summary) > rank_key(r) for r in kept):
        ckpt = features.captioner_checkpoint(run.embedder.model, captioner, run.tokenizer,
                                             {"beam_width": recipe.beam_width, "max_tokens": recipe.max_tokens,
                                              "max_columns": max_columns}, recipe_record(recipe), run.settings.saved())
        runs.save_checkpoint(out / MODEL_FILE, **ckpt)
    return summary


def rank_key(result: dict) -> float:
    """What best.pt is chosen by among the pre-trained encoder's runs: the lowest valid loss. Without valid clips
    nothing is chosen and the first seed's decoder is kept: the test clips never choose a model."""
    return -result.get("valid_loss", 0.0)


def end_epoch(run: CaptionRun, j: int, t: Trainer):
    """After each epoch: resume.pt, log.jsonl's record and the progress line; stops at --epochs-limit."""
    rng = [{"order": t.order.get_state(), "global": runs.rng_state(run.device)}]
    runs.save_checkpoint(run.settings.out_dir / RESUME_FILE, stage="caption", step=t.state.step, job=j,
                         results=run.results, model=t.captioner.state_dict(), fit=vars(t.state),
                         optimizer=t.stepper.optimizer.state_dict(), scaler=t.stepper.scaler.state_dict(),
                         resume=runs.resume_state(run.identity, run.recipe.lr, rng, run.log.elapsed_s()))
    seed, encoder = run.jobs[j]
    record = {"step": t.state.step, "seed": seed, "encoder": encoder, **t.state.history[-1]}
    run.log.write(record)
    held = "valid_loss" if t.selects else "test_loss"
    run.log.progress(j * run.recipe.epochs + t.state.epoch, {"loss": record["loss"]},
                     [f"lr {record['lr']:.3g}", f"{held.replace('_', ' ')} {record[held]:.4f}"],
                     where=f"seed {seed} {encoder.replace('_', '-')} | epoch {t.state.epoch}/{run.recipe.epochs}")
    run.epochs_run += 1
    if run.settings.epochs_limit and run.epochs_run >= run.settings.epochs_limit:
        raise runs.EpochLimit(f"stopped after {run.epochs_run} epoch(s) (--epochs-limit); "
                              "run the same command to resume")


# -----------------------------------------------------------------------------
# The outputs: the nearest-caption baseline, result.json, predictions.csv, curves.png, the table


def nearest_captions(run: CaptionRun) -> tuple[list[str] | None, str | None]:
    """(for each test clip, the training caption of highest CLAP audio-text cosine similarity; or None and why).

    No decoder: what the encoder's CLAP embedding alone can say. The captions'
    text embeddings are the precomputed sentence embeddings where the data has
    them (the built-in captions), else the checkpoint's own text side.
    """
    manifest, train = run.manifest, run.manifest.indices("train")
    inputs = inputs_of(run, None, "pretrained", run.max_columns)  # computed already, unless a resume skipped it
    if inputs[0][1] is None:
        return None, "the encoder has no CLAP audio projector"
    texts = [c for i in train for c in manifest.captions[i]]
    precomputed = None
    if manifest.caption_embeddings is not None:
        first = np.cumsum([0] + [len(c) for c in manifest.captions])  # each clip's first caption row
        precomputed = manifest.caption_embeddings[[r for i in train for r in range(first[i], first[i + 1])]]
    try:
        text = features.encode_clap_text(texts, run.embedder, sentence_embeddings=precomputed)
    except (ValueError, OSError, ImportError) as e:
        return None, f"the captions' CLAP text embeddings could not be computed ({e})"
    audio = torch.stack([inputs[i][1] for i in manifest.indices("test")]).float()
    similarity = F.normalize(audio, dim=-1) @ F.normalize(text.cpu(), dim=-1).T  # [N_test, N_captions]
    return [texts[k] for k in similarity.argmax(dim=1).tolist()], None


def write_outputs(run: CaptionRun):
    """result.json, predictions.csv and curves.png, and the table of scores on the console."""
    manifest, test = run.manifest, run.manifest.indices("test")
    references = [manifest.captions[i] for i in test]
    table = {}
    for encoder in ENCODERS:
        scored = [r["scores"] for r in run.results if r["encoder"] == encoder and r["scores"]]
        if scored:
            table[encoder] = {name: metrics.seed_summary([s[name] for s in scored]) for name in scored[0]}
    nearest, why = nearest_captions(run) if run.settings.baselines else (None, "--no-baselines")
    if nearest is not None and run.scoring is None:
        scores, _ = metrics.caption_scores(nearest, references)
        table["nearest_caption"] = {name: metrics.seed_summary([value]) for name, value in scores.items()}
    best = max((r for r in run.results if r["encoder"] == "pretrained"), key=rank_key)
    result = {"data": manifest.name, "encoder": str(run.settings.encoder),
              "decoder": str(run.settings.decoder or "small BART, random init"),
              "tokenizer": describe_tokenizer(run.tokenizer),
              "clips": {part: len(manifest.indices(part)) for part in data.SPLITS},
              "scores": table, "computed": sorted(next(iter(table.values()), {})),
              "not_computed": {"all": run.scoring} if run.scoring else run.results[0]["not_computed"],
              "nearest_caption": why or "computed",
              "selection": ("the epoch with the lowest loss on the valid clips" if manifest.indices("valid")
                            else "the last epoch (no valid clips)"),
              "model": str(run.settings.out_dir / MODEL_FILE), "model_seed": best["seed"],
              "runs": [{k: v for k, v in r.items() if k != "captions"} for r in run.results],
              "recipe": recipe_record(run.recipe), "settings": run.settings.saved()}
    (run.settings.out_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    baseline = next((r for r in run.results if r["encoder"] == "random_init" and r["seed"] == best["seed"]), None)
    write_predictions(run.settings.out_dir / "predictions.csv", [manifest.files[i] for i in test], best["captions"],
                      references, baseline["captions"] if baseline else None, nearest)
    plot_curves(run.settings.out_dir / "curves.png", run.log.records, best["seed"], run.log.print)
    print_table(run, table, result)


def write_predictions(path: Path, files: list[str], captions: list[str], references: list[list[str]],
                      random_init: list[str] | None, nearest: list[str] | None):
    """file, caption (best.pt's), references (joined by ' | '), and the baselines' captions where they were made."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption", "references"] + (["random_init_caption"] if random_init else [])
                        + (["nearest_caption"] if nearest else []))
        for k, name in enumerate(files):
            writer.writerow([name, captions[k], " | ".join(references[k])] + ([random_init[k]] if random_init else [])
                            + ([nearest[k]] if nearest else []))


def plot_curves(path: Path, records: list[dict], seed: int, log=print):
    """Train and held-out loss per epoch, for each encoder of one seed (skipped without matplotlib)."""
    plt = runs.pyplot(log, "curves.png")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for encoder in ENCODERS:
        rows = [r for r in records if r["seed"] == seed and r["encoder"] == encoder]
        if rows:
            held = "valid_loss" if "valid_loss" in rows[0] else "test_loss"
            ax.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], label=f"{encoder} train")
            ax.plot([r["epoch"] for r in rows], [r[held] for r in rows], "--", label=f"{encoder} {held[:-5]}")
    ax.set(xlabel="epoch", ylabel="cross-entropy per token")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(run: CaptionRun, table: dict, result: dict):
    """One row per score: the pre-trained encoder's, the random-init encoder's, the nearest caption's."""
    columns = [c for c in (*ENCODERS, "nearest_caption") if c in table]
    if columns:
        print(f"{'score':10s}" + "".join(f"{c.replace('_', '-'):>22s}" for c in columns))
        for name in table[columns[0]]:
            cells = [table[c].get(name) for c in columns]
            print(f"{name:10s}" + "".join(f"{'-':>22s}" if s is None else
                                          f"{s['mean']:>14.4f} ± {s['std']:.3f}" for s in cells))
    for name, why in result["not_computed"].items():
        print(f"not computed: {name}: {why}")
    if result["nearest_caption"] != "computed":
        print(f"nearest-caption baseline: not computed ({result['nearest_caption']})")
    print(f"wrote {run.settings.out_dir / MODEL_FILE} (seed {result['model_seed']}), predictions.csv, result.json")


# -----------------------------------------------------------------------------
# python caption.py predict: captions of audio files


def predict_main(argv):
    """Print a caption for each audio file under a captioning checkpoint.

    One line per file: PATH: caption. The caption is written by beam search
    with the checkpoint's width and maximum length (or --beam-width,
    --max-tokens). A file that cannot be read is reported on stderr as
    PATH: reason and the others are still captioned; the exit status is then 1.

    python caption.py predict --checkpoint runs/caption/best.pt a.wav b.flac
    """
    p = argparse.ArgumentParser(prog="caption.py predict", description=inspect.cleandoc(predict_main.__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="the best.pt that caption.py writes (required)")
    p.add_argument("--decoder", type=Path, default=None, help="the pretrained BART folder the decoder was trained "
                   "from, where it is not where the checkpoint says (its tokenizer is read there)")
    p.add_argument("--beam-width", type=int, default=None, help="beams (default: the checkpoint's)")
    p.add_argument("--max-tokens", type=int, default=None, help="longest caption in tokens (default: the checkpoint's)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=device, help=f"where the model runs (default: {device}; cuda when a GPU is "
                   "visible)")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="audio files, in any format soundfile reads, "
                   "at any sample rate and channel count (downmixed to mono and resampled to 16 kHz)")
    args = p.parse_args(argv)
    try:
        model = features.load_model(args.checkpoint, runs.check_device(args.device))
        if getattr(model, "captioner", None) is None:
            raise ValueError(f"{args.checkpoint}: not a captioning checkpoint (it has no caption decoder); predict "
                             "needs the best.pt that caption.py writes")
        if args.decoder is not None:
            model.caption_tokenizer = text_embed.PretrainedCaptionTokenizer(args.decoder)
    except (ValueError, FileNotFoundError, OSError, ImportError) as e:
        sys.exit(f"error: {e}")
    failed = 0
    for path in args.files:
        try:
            text = features.caption_audio(data.load_audio(path)[None], model, args.beam_width, args.max_tokens)[0]
        except (ValueError, OSError) as e:  # data.AudioError is a ValueError
            print(features.one_line(path, e), file=sys.stderr, flush=True)
            failed += 1
            continue
        print(f"{path}: {text}", flush=True)
    if failed:
        sys.exit(f"{failed} of {len(args.files)} file(s) could not be read (listed above); the others are captioned")


# -----------------------------------------------------------------------------
# The command line: the run's flags, then one flag per recipe field


def parse_args(argv=None) -> tuple[RunSettings, CaptionRecipe]:
    """RunSettings with every default settled, and the recipe with the command line's overrides."""
    args = vars(runs.command_line(__doc__, RunSettings, CaptionRecipe, CAPTION_RECIPES).parse_args(argv))
    overrides = {f.name: args[f.name] for f in fields(CaptionRecipe) if args[f.name] is not None}
    given = {f.name: args[f.name] for f in fields(RunSettings) if args[f.name] is not None}
    settings = RunSettings(**given)
    audio_root = settings.audio_root or (settings.manifest.parent if settings.manifest else None)
    resume = given.get("resume", (settings.out_dir / RESUME_FILE).is_file())
    if "seeds" in overrides:
        overrides["seeds"] = tuple(overrides["seeds"])
    try:
        recipe = replace(CAPTION_RECIPES[settings.recipe_name], **overrides)
    except ValueError as e:
        sys.exit(f"error: recipe {settings.recipe_name}: {e}")
    return replace(settings, audio_root=audio_root, resume=resume), recipe


def main(argv=None):
    """Train and score (the default), or `predict` captions of audio files."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:
        return predict_main(argv[1:])
    settings, recipe = parse_args(argv)
    try:
        caption(settings, recipe)
    except runs.EpochLimit as stop:
        print(stop)
    except (ValueError, FileNotFoundError, ImportError, runs.CheckpointWriteError, runs.NonFiniteError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
