"""Stage-wise training of M2D-CLAP: the program that runs each stage.

Stage 1 learns general-purpose audio features and CLAP features together,
L = L_M2D + lambda * L_CLAP, with frozen precomputed sentence embeddings as
the text. Stage 1.1 fine-tunes that encoder on labelled clips and lengthens
its input (finetune.py; `--stage 1.1` hands its arguments over). Stage 2
freezes the stage-1.1 encoder and trains new CLAP parts on it: a semantic
audio projector, the logit scale, and a pretrained text encoder (the paper)
or a projector on the sentence embeddings (--text-side embeddings), with the
structured token drop on the encoder's input. Stage 2.1 continues stage 2 on
a smaller target-domain caption set, without the token drop.

    python train.py --stage 1        # tiny preset, built-in data, CPU friendly
    python train.py --stage 1.1      # from runs/stage1/last.pt, on the built-in event labels
    python train.py --stage 2        # from runs/stage1.1/last.pt
    python train.py --stage 2.1      # from runs/stage2/last.pt
    python train.py --stage 1 --preset base --data captions.csv --audio-root /audio
                                     # the paper's ViT-Base recipe
    torchrun --nproc_per_node=4 train.py --stage 1 --preset base --data captions.csv --shards shards/
                                     # data parallel on 4 GPUs, log-mels from 'data.py prepare'

Outputs in --out-dir (default runs/stage<STAGE>): last.pt (a checkpoint that
loads with torch.load(weights_only=True) and holds all a resume needs),
log.jsonl (one JSON object per logged step) and, with --skip-bad,
bad_clips.csv. Running the same command again resumes the run exactly where
it stopped. This file is the program: config and command line, one setup
function per stage, data and loop. What a step is (each stage's recipes, the
schedules, train_step) is engine.py's; the run machinery (checkpoints,
torchrun, exact resume, AMP and compile, the non-finite guard, the log) runs.py's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import builtin_data
import data
import engine
import features
import finetune
import model as m2d
import runs
import text_embed
from engine import RECIPES, Recipe

STAGES = ("1", "2", "2.1")                       # the stages this file trains
ALL_STAGES = ("1", "1.1", "2", "2.1")            # 1.1, supervised fine-tuning, is finetune.py's
PREVIOUS_STAGE = {"2": "1.1", "2.1": "2"}        # the checkpoint each stage starts from by default
STAGE2_INITS = ("1.1", "finetune", "1")          # what stage 2 may start from (--init): the authors' 1.1 first


# -----------------------------------------------------------------------------
# The command line: one dataclass, one flag per field


def flag(default, help: str, stages: tuple[str, ...] = STAGES, **argparse_options):
    """A Config field: its default, its --help text, the stages that take it, and how argparse reads it."""
    return field(default=default, metadata={"help": help, "stages": stages, **argparse_options})


def recipe_flag(name: str, help: str, stages: tuple[str, ...] = STAGES, fmt: str = "{:g}", **argparse_options):
    """A Config field that overrides Recipe.<name>: its default, None, keeps the recipe's, which --help lists."""
    return flag(None, f"{help} (default: {engine.defaults_by_stage(name, stages, fmt)})", stages, **argparse_options)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def share(low_ok: bool, high_ok: bool):
    """An argparse type: a float in the unit interval, each end allowed or not ([0, 1), (0, 1), [0, 1])."""
    interval = f"{'[' if low_ok else '('}0, 1{']' if high_ok else ')'}"

    def read(text: str) -> float:
        value = float(text)
        if not ((0 <= value if low_ok else 0 < value) and (value <= 1 if high_ok else value < 1)):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {value:g}")
        return value
    read.__name__ = f"a number in {interval}"
    return read


@dataclass
class Config:
    """Everything a run is told, settled by settle_defaults (right after parsing) and settle_run (after loading
    the checkpoints). A field None after that means what its help says, or a flag of another stage."""

    stage: str = flag(MISSING, "training stage (1.1 is finetune.py's: see its --help)", choices=ALL_STAGES)
    preset: str | None = flag(None, "model size and recipe: tiny (CPU, built-in data), base (the paper) or large. "
                              "Default: tiny in stage 1; stages 2 and 2.1 take it from --init",
                              choices=sorted(m2d.PRESETS))
    data: Path | None = flag(None, "captions CSV (columns file_name, caption; see text_embed.py). Default: the "
                             "built-in synthetic training set (stage 2.1: its refinement subset)", type=Path)
    embeddings: Path | None = flag(None, "caption embeddings .npy, row-aligned with --data (default: --data with "
                                   ".npy)", type=Path)
    embedding_model: str | None = flag(None, "the sentence model that made --embeddings, recorded to embed new text "
                                       "(zero-shot prompts) the same way (default: all-MiniLM-L6-v2 for the built-in "
                                       "data; with --data, the one the checkpoint a run starts from records)")
    audio_root: Path | None = flag(None, "folder the CSV's file_name paths are relative to (default: the CSV's "
                                   "folder)", type=Path)
    shards: Path | None = flag(None, "read log-mels from the shards 'python data.py prepare' wrote, instead of "
                               "decoding audio", type=Path)
    init: Path | None = flag(None, "checkpoint to start from (default: runs/stage1.1/last.pt for stage 2, "
                             "runs/stage2/last.pt for stage 2.1; stage 2 also starts from a stage-1 file or "
                             "a finetune.py result)", ("2", "2.1"), type=Path)
    token_drop: float | None = recipe_flag("token_drop", "ratio of the structured token drop on the frozen encoder's "
                                           "input while training; a resumed run keeps its own", ("2", "2.1"),
                                           type=share(True, False))
    text_side: str = flag("encoder", "train a pretrained text encoder on caption text (encoder, needs the "
                          "transformers extra), or a projector on the precomputed sentence embeddings",
                          ("2",), choices=["encoder", "embeddings"])
    text_encoder: str = flag(text_embed.DEFAULT_MODEL, "local Hugging Face folder of the text encoder, e.g. "
                             "bert-base-uncased (default: the bundled all-MiniLM-L6-v2)", ("2",))
    text_pooling: str = flag("auto", "the text encoder's feature: its CLS token (as the paper's BERT) or the mean "
                             "over real tokens; auto: what a sentence-transformers folder declares (mean for "
                             "all-MiniLM-L6-v2, GTE-base), else CLS", ("2",), choices=["auto", "cls", "mean"])
    out_dir: Path | None = flag(None, "run folder (default: runs/stage<STAGE>)", type=Path)
    max_steps: int | None = flag(None, "stop after this many optimiser steps; schedules span them (default: the "
                                 "recipe's epochs)", type=positive_int)
    epochs: float | None = recipe_flag("epochs", "epochs over the data", type=float)
    batch_size: int | None = recipe_flag("batch_size", "total clips per optimiser step", type=positive_int)
    accum_steps: int = flag(1, "split each step's batch into this many micro-batches (gradient accumulation)",
                            type=positive_int)
    lr: float | None = recipe_flag("peak_lr", "peak learning rate; without it, the recipe's base_lr x batch / 256",
                                   fmt="{:.3g}", type=float)
    clap_weight: float | None = recipe_flag("clap_weight", "lambda, the weight of the CLAP loss", ("1",), type=float)
    mask_ratio: float | None = flag(None, "share of masked patches (default: the preset's, 0.7; a resumed run's "
                                    "own)", ("1",), type=share(False, False))
    ema_decay: tuple[float, float] | None = recipe_flag("ema_decay", "EMA decay of the target, linear from START "
                                                        "to END over training", ("1",), type=share(True, True), nargs=2,
                                                        metavar=("START", "END"))
    norm_stats: tuple[float, float] | None = flag(None, "log-mel normalisation statistics (default: measured on "
                                                  "the training clips, or the shards' norm_stats.json)", ("1",),
                                                  type=float, nargs=2, metavar=("MEAN", "STD"))
    device: str = flag("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, cuda:1, ...")
    precision: str | None = flag(None, "autocast precision (default: bf16 on CUDA, fp32 on CPU); fp16 uses a "
                                 "dynamic loss scale", choices=["fp32", "bf16", "fp16"])
    compile: bool | None = flag(None, "torch.compile the model (default: on for stage 1 on CUDA, off otherwise)",
                                action=argparse.BooleanOptionalAction)
    workers: int | None = flag(None, "DataLoader worker processes (default: 8 on CUDA, 0 on CPU)", type=int)
    threads: int | None = flag(None, "CPU threads torch computes with (default: torch's choice, one per core). "
                               "On a machine shared with other jobs, fewer threads than cores can be several "
                               "times faster", type=positive_int)
    preload: bool | None = flag(None, "decode every clip into memory once (default: on for the built-in data)",
                                action=argparse.BooleanOptionalAction)
    grad_checkpointing: bool = flag(False, "recompute block activations in the backward pass, trading time for "
                                    "memory (fits the large preset at batch 64 per 80 GB GPU)", ("1",),
                                    action="store_true")
    seed: int = flag(0, "seed of the masks, crops, caption choice and clip order", type=int)
    log_every: int = flag(10, "steps between progress lines and log records", type=positive_int)
    save_every: int = flag(1000, "steps between checkpoint saves (last.pt is replaced atomically each time)",
                           type=positive_int)
    keep: int = flag(2, "also keep the last K periodic checkpoints as step_<N>.pt (0: only last.pt)", type=int)
    resume: bool | None = flag(None, "continue the run in --out-dir from its last.pt, exactly where it stopped "
                               "(default: resume when last.pt exists; --no-resume starts over and overwrites the "
                               "run)", action=argparse.BooleanOptionalAction)
    skip_bad: bool = flag(False, "skip audio files that cannot be read, listing them in <out-dir>/bad_clips.csv "
                          "(default: the first one stops the run)", action="store_true")
    convert_audio: bool = flag(False, "downmix and resample files that are not 16 kHz mono while loading "
                               "(default: such a file stops the run; 'python data.py prepare' converts a corpus "
                               "once)", action="store_true")
    max_bad_steps: int = flag(10, "stop after this many steps in a row with a non-finite loss or gradient (each "
                              "is skipped with a warning)", type=positive_int)

    def saved(self) -> dict:
        """The settings as plain values, for the checkpoint."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


FLAG_STAGES = {f.name: f.metadata["stages"] for f in fields(Config)}    # the stages that take each flag
RECIPE_FLAGS = ("batch_size", "epochs", "lr", "clap_weight", "ema_decay", "token_drop")  # Recipe fields too


def parse_config(argv=None) -> Config:
    """The Config of a command line: one flag per field, stage-specific flags checked against --stage, then
    every default the command line decides settled (settle_defaults)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Recipes (engine.RECIPES: every default of batch, epochs, learning rate, EMA, "
                                       "lambda and token drop; AdamW, weight decay 0.05, clipping at 3.0):\n"
                                       + engine.recipes_table())
    for f in fields(Config):
        options = {k: v for k, v in f.metadata.items() if k != "stages"}
        if f.default is MISSING:
            options["required"] = True
        else:
            options["default"] = f.default
        if "default" not in options["help"].lower() and not any(f.default is v for v in (MISSING, None, False)):
            options["help"] += f" (default: {f.default})"
        if f.metadata["stages"] != STAGES:
            options["help"] = f"stage {' and '.join(f.metadata['stages'])}: {options['help']}"
        p.add_argument("--" + f.name.replace("_", "-"), **options)
    config = Config(**vars(p.parse_args(argv)))
    for f in fields(Config):
        if config.stage not in FLAG_STAGES[f.name] and getattr(config, f.name) != f.default:
            p.error(f"--{f.name.replace('_', '-')} is for stage {' and '.join(FLAG_STAGES[f.name])} only, "
                    f"not stage {config.stage}")
    if config.data is None and (config.embeddings or config.audio_root):
        p.error("--embeddings and --audio-root describe your own data; pass --data CSV with them")
    try:
        runs.check_device(config.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    return settle_defaults(config)


def settle_defaults(config: Config) -> Config:
    """Every default that the command line alone decides, in one place (the --help texts say the same)."""
    stage, cuda = config.stage, torch.device(config.device).type == "cuda"
    out_dir = config.out_dir or Path("runs") / f"stage{stage}"
    # Compiled by default for the stage-1 step on CUDA; a text encoder's varying token counts would recompile.
    precision, use_compile = runs.amp_defaults("cuda" if cuda else "cpu", config.precision, config.compile,
                                               compile_on_cuda=stage == "1")
    own_data = config.data is not None
    return replace(
        config, out_dir=out_dir, precision=precision, compile=use_compile,
        preset=config.preset or ("tiny" if stage == "1" else None),
        init=config.init or (Path("runs") / f"stage{PREVIOUS_STAGE[stage]}" / "last.pt" if stage != "1" else None),
        audio_root=config.audio_root or (config.data.parent if own_data else None),
        embeddings=config.embeddings or (text_embed.default_npy_path(config.data) if own_data else None),
        embedding_model=config.embedding_model or (None if own_data else text_embed.DEFAULT_MODEL),
        workers=(8 if cuda else 0) if config.workers is None else config.workers,
        preload=not own_data if config.preload is None else config.preload,
        resume=(out_dir / "last.pt").is_file() if config.resume is None else config.resume)


def settle_run(config: Config, resume: dict | None, init: dict | None) -> tuple[Config, Recipe]:
    """What a run takes from the checkpoint it starts from, then its recipe: after this every setting is final.

    Stages 2 and 2.1 take --init's preset, a resumed run keeps its own preset,
    mask ratio and token drop, and with your own --data the sentence model is
    the start's unless given. The recipe is the stage and preset's row of
    engine.RECIPES with the command line's overrides; the Config records the
    values the run trains with.
    """
    start, preset, mask_ratio = resume or init, config.preset, config.mask_ratio
    if start is not None:
        preset = start["args"].get("preset") or "tiny"
        if init is not None and config.preset not in (None, preset):  # a new run of stage 2 or 2.1
            raise ValueError(f"{config.init}: a stage-{init['stage']} checkpoint of the {preset} preset, but this "
                             f"run asks for --preset {config.preset}. Drop --preset (stages 2 and 2.1 take it "
                             f"from the checkpoint they start from), or pass --init with a {config.preset} "
                             "checkpoint.")
    if config.stage == "1" and mask_ratio is None:
        mask_ratio = resume["model_config"]["mask_ratio"] if resume else m2d.preset(preset).mask_ratio
    token_drop = (resume["args"].get("token_drop") or 0.0) if resume is not None else config.token_drop
    config = replace(config, preset=preset, mask_ratio=mask_ratio, token_drop=token_drop,
                     embedding_model=config.embedding_model or (start.get("embedding_model") if start else None))
    overrides = {name: getattr(config, name) for name in RECIPE_FLAGS if getattr(config, name) is not None}
    if "ema_decay" in overrides:
        overrides["ema_decay"] = tuple(overrides["ema_decay"])
    recipe = replace(RECIPES[(config.stage, preset)], **overrides)
    ran_with = {name: getattr(recipe, "peak_lr" if name == "lr" else name) for name in RECIPE_FLAGS
                if config.stage in FLAG_STAGES[name]}
    return replace(config, **ran_with), recipe


def load_previous_stage(stage: str, path: Path) -> dict:
    """The checkpoint a stage starts from, checked to be of the stage before it.

    Stage 2 starts from stage 1.1 as the authors do, and also from a stage-1
    file (the 2024 recipe), any finetune.py result, or any file of the
    authors that features.load_model reads (their own stage 2 starts from
    their stage-1.1 file, an EVAR fine-tuning result), when --init names one.
    """
    previous = PREVIOUS_STAGE[stage]
    result = path.parent / "result.json"  # finetune.py's report: a stage 1.1 whose epochs all scored 0 kept no model
    if not path.is_file() and result.is_file() and json.loads(result.read_text()).get("model", "") is None:
        raise FileNotFoundError(f"{path}: stage {previous} ran but kept no model, since none of its epochs scored "
                                f"above 0 ({result}). Run stage {previous} again longer or at another --lr, or pass "
                                "--init PATH.")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no stage-{previous} checkpoint to start stage {stage} from. "
                                f"Run 'python train.py --stage {previous}' first, or pass --init PATH.")
    ckpt = runs.load_checkpoint(path)
    if stage == "2" and not (isinstance(ckpt, dict) and "model_config" in ckpt):  # not one of ours
        return features.released_init(path, ckpt)
    if ckpt.get("stage") not in (STAGE2_INITS if stage == "2" else (previous,)):
        raise ValueError(f"{path}: is a stage-{ckpt.get('stage')} checkpoint, but stage {stage} starts "
                         f"from stage {previous}. Run 'python train.py --stage {previous}' first, or pass "
                         f"--init with a stage-{previous} checkpoint.")
    return ckpt


# -----------------------------------------------------------------------------
# The data of a run


@dataclass
class RunData:
    name: str                       # for the log and the resume check
    csv_path: Path
    npy_path: Path | None
    table: text_embed.CaptionTable
    source: data.AudioFolder | data.ShardStore
    dataset: data.ClipDataset
    embedding_model: str | None     # the sentence model behind the embeddings, to embed new text later


def load_data(config: Config, start: dict | None, ddp: runs.Distributed) -> RunData:
    """Captions (with embeddings for the embeddings text side), audio source and dataset of a run."""
    if config.data is None:
        split = "refine" if config.stage == "2.1" else "train"
        if ddp.main:
            builtin_data.builtin_dataset(split)  # renders the audio cache once, before the other ranks read it
        ddp.barrier()
        csv_path, audio_root = builtin_data.builtin_dataset(split)
        npy_path, name = None, f"built-in {split}"
    else:
        csv_path, npy_path, name, audio_root = config.data, config.embeddings, str(config.data), config.audio_root
    if stage_text_side(config, start)[0] == "encoder":  # caption text, no embeddings
        table, npy_path = text_embed.load_captions(csv_path), None
    else:
        table = text_embed.load_caption_embeddings(csv_path, npy_path)
    crop_frames = (m2d.preset(config.preset).crop_frames if config.stage == "1"
                   else start["model_config"]["crop_frames"])
    source = data.ShardStore(config.shards) if config.shards else data.AudioFolder(audio_root, config.convert_audio)
    bad_clips = data.BadClipReport(config.out_dir / "bad_clips.csv") if config.skip_bad else None
    dataset = data.ClipDataset(table, source, crop_frames, preload=config.preload, skip_bad=bad_clips)
    return RunData(name, csv_path, npy_path, table, source, dataset, config.embedding_model)


# -----------------------------------------------------------------------------
# The stages: what each one trains, on what text, from where


@dataclass
class Stage:
    """What the training loop needs to know of a stage."""

    model: m2d.M2DCLAP
    tokenizer: object | None          # for a trainable text encoder
    text_side: str                    # "embeddings" (precomputed sentence embeddings) or "encoder"
    text_encoder: str | None          # the text encoder's folder, for the checkpoint
    frozen_encoder: bool              # stages 2 and 2.1: only the CLAP parts train


def stage_text_side(config: Config, start: dict | None) -> tuple[str, str | None]:
    """(text side, text encoder name): stage 1 embeddings, stage 2 as asked, stage 2.1 as its stage 2."""
    if config.stage == "1":
        return "embeddings", None
    if config.stage == "2":
        return config.text_side, config.text_encoder
    return start["text_side"], start["text_encoder"]["name"] if start["text_encoder"] else None


def setup_stage1(config: Config, init: None, run_data: RunData) -> Stage:
    """Stage 1 from scratch: M2D and CLAP together, with precomputed sentence embeddings as the text."""
    if config.norm_stats:
        norm_stats = tuple(config.norm_stats)
    elif isinstance(run_data.source, data.ShardStore) and run_data.source.norm_stats:  # from 'data.py stats'
        norm_stats = run_data.source.norm_stats
    else:
        norm_stats = data.compute_norm_stats(run_data.dataset)
    model = m2d.M2DCLAP(m2d.preset(config.preset, text_dim=run_data.table.dim, mask_ratio=config.mask_ratio,
                                   grad_checkpointing=config.grad_checkpointing), norm_stats)
    return Stage(model, None, "embeddings", None, frozen_encoder=False)


def setup_stage2(config: Config, init: dict, run_data: RunData) -> Stage:
    """Stage 2 as the authors released it: new CLAP parts on the frozen stage-1.1 encoder.

    A fresh semantic audio projector (one block), the logit scale at 4.6052
    (log 100, as the authors write it), and a new text side: a pretrained text encoder (with a fresh projector only
    when its width differs from the audio width) or a fresh projector on the
    sentence embeddings. Only the encoder and the unused M2D parts are kept.
    """
    model, _ = features.model_from_checkpoint(init)
    encoder = tokenizer = None
    text_dim, pooling = model.config.text_dim, model.config.text_pooling
    if config.text_side == "encoder":
        encoder, tokenizer = text_embed.load_text_encoder(config.text_encoder)
        text_dim = encoder.config.hidden_size
        pooling = (text_embed.default_text_pooling(config.text_encoder) if config.text_pooling == "auto"
                   else config.text_pooling)
    text_proj = "none" if text_dim == model.config.embed_dim else "linear"
    model_config = replace(model.config, audio_proj="semantic", audio_proj_depth=1, text_dim=text_dim,
                           text_proj=text_proj, text_pooling=pooling)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(("audio_proj.", "text_proj.", "text_encoder.", "logit_scale"))}
    model = m2d.M2DCLAP(model_config, tuple(init["norm_stats"]), encoder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("audio_proj.", "text_proj.", "text_encoder.", "logit_scale"))
                                  for k in missing)
    with torch.no_grad():
        model.logit_scale.fill_(m2d.MAX_LOGIT_SCALE)
    source = "an encoder of the authors' files" if init["stage"] == "released" else f"a stage-{init['stage']} encoder"
    print(f"stage 2 from {source} | new semantic audio projector | logit scale 4.6052 | "
          f"text side: {config.text_encoder if encoder is not None else 'sentence embeddings'} ({text_dim}-d"
          f"{f', {pooling} feature' if encoder is not None else ''}, "
          f"{'no projector' if text_proj == 'none' else 'new linear projector'}) | token drop {config.token_drop:g}")
    model.freeze_encoder()
    return Stage(model, tokenizer, config.text_side, config.text_encoder, frozen_encoder=True)


def setup_stage21(config: Config, init: dict, run_data: RunData) -> Stage:
    """Stage 2.1: stage 2 as it ended (same text side), refined on target-domain captions."""
    model, tokenizer = features.model_from_checkpoint(init)
    model.freeze_encoder()
    text_side, text_encoder = stage_text_side(config, init)
    return Stage(model, tokenizer, text_side, text_encoder, frozen_encoder=True)


# How each stage starts a new run: setup(config, the previous stage's checkpoint, the run's data) -> Stage.
NEW_STAGE = {"1": setup_stage1, "2": setup_stage2, "2.1": setup_stage21}


def setup_resumed(config: Config, resume: dict) -> Stage:
    """A run's own last.pt: weights, EMA target, normalisation statistics and text side."""
    if resume["model_config"].get("text_proj") == "linear" and "text_proj.bias" not in resume["model"]:
        raise ValueError("the run's last.pt was written by an earlier version whose text projector had no bias, so its "
                         "optimiser state does not fit this one. Train it again with --no-resume, or go on "
                         "from its weights with the next stage (--init).")
    asked = {"grad_checkpointing": config.grad_checkpointing}
    if config.mask_ratio is not None:  # stage 1's: a different one than the run's is refused by the resume check
        asked["mask_ratio"] = config.mask_ratio
    model, tokenizer = features.model_from_checkpoint({**resume, "model_config": {**resume["model_config"], **asked}})
    frozen = config.stage != "1"
    if frozen:
        model.freeze_encoder()
    text_side, text_encoder = stage_text_side(config, resume)
    return Stage(model, tokenizer, text_side, text_encoder, frozen_encoder=frozen)


# -----------------------------------------------------------------------------
# Training


@dataclass
class Run:
    """A run being trained: the stage's model with its optimiser step and everything the loop reads."""

    config: Config
    recipe: Recipe
    stage: Stage
    data: RunData
    ddp: runs.Distributed
    device: torch.device
    stepper: runs.Stepper | None     # None once the run has finished
    loader: DataLoader
    order: data.ClipOrder
    log: runs.RunLog
    guard: runs.NonFiniteGuard
    total_steps: int
    warmup_steps: int
    start_step: int = 0
    last_saved: int | None = None
    bad_clips_reported: int = 0

    @property
    def model(self) -> m2d.M2DCLAP:
        return self.stage.model

    def settings(self) -> dict:
        """What makes a run this run: a resume must match it (the peak lr may change; the token drop is its own)."""
        c = self.config
        recipe = {k: v for k, v in asdict(self.recipe).items() if k not in ("lr", "token_drop")}
        return dict(stage=c.stage, preset=c.preset, data=self.data.name,
                    embeddings=str(self.data.npy_path) if self.data.npy_path else None,
                    shards=str(c.shards) if c.shards else None, text_side=self.stage.text_side,
                    text_encoder=self.stage.text_encoder, clips=len(self.data.dataset), seed=c.seed,
                    batch_size=self.recipe.batch_size, mask_ratio=self.model.config.mask_ratio,
                    total_steps=self.total_steps, warmup_steps=self.warmup_steps, recipe=recipe)


def train(config: Config):
    """Train one stage: set the run up (or resume it), then step until the schedule ends."""
    runs.set_threads(config.threads)
    ddp, device = runs.setup_distributed(torch.device(config.device))
    resume = runs.find_resume(config.out_dir / "last.pt", config.resume, config.stage)
    if resume is not None and resume["step"] >= resume["resume"]["run"]["total_steps"]:
        if ddp.main:
            print(f"{config.out_dir / 'last.pt'}: this run finished at step {resume['step']}; nothing to resume. "
                  "Pass --no-resume to train it again from scratch (overwrites it), or another --out-dir.")
        ddp.leave()
        return
    run = setup_run(config, resume, ddp, device)
    try:
        train_loop(run)
    finally:
        runs.stop_workers(run.loader)
    finish(run)


def setup_run(config: Config, resume: dict | None, ddp: runs.Distributed, device: torch.device) -> Run:
    """Everything before the first step, in an order that keeps runs reproducible."""
    # Every rank draws its own masks; the weights start equal because
    # DistributedDataParallel copies rank 0's to the others. A resumed run
    # restores each rank's states just before its first step.
    runs.seed_everything(config.seed + ddp.rank)
    init = load_previous_stage(config.stage, config.init) if config.stage != "1" and resume is None else None
    config, recipe = settle_run(config, resume, init)
    if recipe.batch_size % (config.accum_steps * ddp.world_size):
        raise ValueError(f"--batch-size {recipe.batch_size} is not divisible by {config.accum_steps} accumulation "
                         f"steps x {ddp.world_size} processes")
    runs.prepare_out_dir(config.out_dir, resume is None, ddp, also_stale=("bad_clips.csv",))
    run_data = load_data(config, resume or init, ddp)
    order = data.ClipOrder(len(run_data.dataset), recipe.batch_size, config.seed, ddp.rank, ddp.world_size,
                           config.accum_steps)  # depends on the seed and the global batch only
    if order.batches_per_epoch == 0:
        raise ValueError(f"{run_data.csv_path} has {len(run_data.dataset)} usable clips, fewer than one batch of "
                         f"{recipe.batch_size}; lower --batch-size")
    stage = setup_resumed(config, resume) if resume is not None else NEW_STAGE[config.stage](config, init, run_data)
    if stage.text_side == "embeddings":
        text_embed.check_dim(run_data.table, stage.model.config.text_dim)
    model = stage.model.to(device)
    model.train_clap() if stage.frozen_encoder else model.train()  # a frozen encoder stays in eval mode
    total_steps = config.max_steps or max(1, round(recipe.epochs * order.batches_per_epoch))
    optimizer = engine.make_optimizer(model, recipe)
    # The loader gets a generator of its own: starting an epoch must not draw
    # from the global RNG that the masks come from.
    loader = DataLoader(run_data.dataset, batch_size=recipe.batch_size // (config.accum_steps * ddp.world_size),
                        sampler=order, num_workers=config.workers, pin_memory=device.type == "cuda",
                        persistent_workers=config.workers > 0, generator=torch.Generator())
    log = runs.RunLog(config.out_dir / "log.jsonl", total_steps, ddp.main)
    run = Run(config=config, recipe=recipe, stage=stage, data=run_data, ddp=ddp, device=device,
              stepper=runs.Stepper.build(ddp.wrap(model, device), optimizer, device, config.precision,
                                         config.compile, recipe.clip_grad_norm),
              loader=loader, order=order, log=log,
              guard=runs.NonFiniteGuard(config.max_bad_steps, config.out_dir / "last.pt", log.print),
              total_steps=total_steps, warmup_steps=max(1, round(total_steps * recipe.warmup_epochs / recipe.epochs)))
    start(run, resume)
    return run


def start(run: Run, resume: dict | None):
    """Open the log and print the run's setup; a resumed run first restores its optimiser, scaler, step and
    clock, and last of all (so that nothing before draws from them) its RNG states."""
    elapsed_s = 0.0
    if resume is not None:
        run.start_step, elapsed_s = runs.restore_training(resume, run.config.out_dir / "last.pt", run.settings(),
                                                          run.recipe.peak_lr, run.stepper.optimizer, run.stepper.scaler,
                                                          run.log.print)
        run.last_saved = run.start_step
    run.log.start(run.start_step, elapsed_s)
    c, r, stepper = run.config, run.recipe, run.stepper
    n_params = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    norm_stats = run.model.norm_stats.tolist()
    run.log.print(f"stage {c.stage} | preset {c.preset} ({n_params / 1e6:.1f}M trainable parameters) | "
                  f"{len(run.data.dataset)} clips from {run.data.csv_path} | norm stats {norm_stats[0]:.4f} "
                  f"{norm_stats[1]:.4f}")
    run.log.print(f"{run.total_steps} steps ({run.order.batches_per_epoch} per epoch) | global batch "
                  f"{r.batch_size} = {run.ddp.world_size} processes x {c.accum_steps} accumulation steps x "
                  f"{r.batch_size // (c.accum_steps * run.ddp.world_size)} clips | peak lr {r.peak_lr:.2e}"
                  f"{f' = {r.base_lr:.2e} x {r.batch_size} / 256' if r.lr is None else ' (--lr)'} | "
                  f"{run.device} {stepper.precision}{' compiled' if stepper.compiled else ''} | writing {c.out_dir}")
    run.bad_clips_reported = bad_clip_count(run)
    if resume is None:
        return
    epoch, batch = divmod(run.start_step, run.order.batches_per_epoch)
    run.log.print(f"resuming {c.out_dir / 'last.pt'} at step {run.start_step} of {run.total_steps} (epoch {epoch}, "
                  f"batch {batch} of {run.order.batches_per_epoch}): weights, EMA target, optimiser, scaler, "
                  "schedules, data order and RNG states")
    runs.restore_rng(resume["resume"]["rng"], run.ddp, run.device, c.seed, run.start_step, run.log.print)


def micro_batches(run: Run):
    """Each step's micro-batches on the device, from the run's position on: each epoch a new shuffle, the first
    one mid-epoch on resume, captions tokenised for a text encoder."""
    first_epoch, batch = divmod(run.start_step, run.order.batches_per_epoch)
    for epoch in itertools.count(first_epoch):
        run.order.set_position(epoch, batch if epoch == first_epoch else 0)
        for mel, text in run.loader:
            if run.stage.tokenizer is not None:
                text = text_embed.tokenize(run.stage.tokenizer, text)
            yield runs.to_device(mel, run.device), runs.to_device(text, run.device)


def train_loop(run: Run):
    """The steps: schedules, one engine.train_step, then logging, non-finite handling and periodic checkpoints."""
    c, recipe, model = run.config, run.recipe, run.model
    batch_iter = micro_batches(run)
    for step in range(run.start_step, run.total_steps):
        lr = engine.lr_at(step, run.total_steps, run.warmup_steps, recipe.peak_lr)
        engine.set_lr(run.stepper.optimizer, lr)
        ema_decay = None if run.stage.frozen_encoder else engine.ema_decay_at(step, run.total_steps, *recipe.ema_decay)
        sums, grad_norm, finite = engine.train_step(model, run.stepper,
                                                    [next(batch_iter) for _ in range(c.accum_steps)],
                                                    recipe.clap_weight, ema_decay, recipe.token_drop)
        done = step + 1
        run.guard.record(done, finite, sums, grad_norm)
        log_now = done % c.log_every == 0 or done == run.total_steps or done == 1
        save_now = done % c.save_every == 0 and done < run.total_steps
        if log_now or save_now or done % c.max_bad_steps == 0:
            run.guard.check(run.last_saved, run.stepper.scaler)  # these steps' one wait for the device
        if log_now:
            log_step(run, done, sums, grad_norm, lr, ema_decay)
        if save_now and not run.guard.bad_streak:  # keep the pre-trouble one
            save_run(run, done)
            if run.ddp.main and c.keep > 0:
                runs.keep_periodic(c.out_dir, done, c.keep)


def log_step(run: Run, done: int, sums: dict, grad_norm: torch.Tensor, lr: float, ema_decay: float | None):
    """One record in log.jsonl and one progress line; the losses are averaged over ranks."""
    values = dict(zip(sums, run.ddp.mean(torch.stack(list(sums.values()))).tolist()))  # the M2D loss is per rank
    clips_per_s = run.log.pace(done, run.recipe.batch_size)
    ema = {"ema_decay": ema_decay} if ema_decay is not None else {}
    run.log.write(dict(step=done, epoch=round(done / run.order.batches_per_epoch, 3), **values, lr=lr, **ema,
                       logit_scale=run.model.logit_scale.exp().item(), grad_norm=grad_norm.item(),
                       clips_per_s=round(clips_per_s, 1), elapsed_s=round(run.log.elapsed_s(), 2),
                       skipped_steps=run.guard.skipped_steps))
    run.log.progress(done, values, [f"lr {lr:.2e}", *(f"ema {d:.5f}" for d in ema.values())], clips_per_s)
    n_bad = bad_clip_count(run)
    if n_bad > run.bad_clips_reported:
        run.bad_clips_reported = n_bad
        run.log.print(f"{n_bad} unreadable clip(s) skipped so far; listed in {run.data.dataset.skip_bad.path}",
                      flush=True)


def bad_clip_count(run: Run) -> int:
    """Unreadable clips skipped with --skip-bad so far (listed in bad_clips.csv)."""
    return len(run.data.dataset.skip_bad.names()) if run.data.dataset.skip_bad is not None else 0


def save_run(run: Run, step: int):
    """last.pt: the model, optimiser, scaler, settings and every rank's RNG states (every rank must call this)."""
    rng = runs.gather_rng_states(run.ddp, run.device)
    if not run.ddp.main:
        return
    model = run.model
    text_encoder = (None if model.text_encoder is None
                    else {"name": run.stage.text_encoder, "config": model.text_encoder.config.to_dict()})
    runs.save_checkpoint(
        run.config.out_dir / "last.pt", stage=run.config.stage, step=step, model=model.state_dict(),
        model_config=asdict(model.config), norm_stats=model.norm_stats.tolist(), text_side=run.stage.text_side,
        text_encoder=text_encoder, embedding_model=run.data.embedding_model, recipe=asdict(run.recipe),
        optimizer=run.stepper.optimizer.state_dict(), scaler=run.stepper.scaler.state_dict(),
        args=run.config.saved(), resume=runs.resume_state(run.settings(), run.recipe.peak_lr, rng, run.log.elapsed_s()))
    run.last_saved = step


def finish(run: Run):
    """The final checkpoint (after checking the replicas agree), a summary, and leaving the process group."""
    if run.ddp.check_replicas(run.model):
        run.log.print(f"parameters identical on all {run.ddp.world_size} ranks")
    save_run(run, run.total_steps)
    run.log.print(f"done in {runs.format_duration(run.log.elapsed_s())}; checkpoint {run.config.out_dir / 'last.pt'}")
    if run.log.records:
        run.log.print(run.log.summary())
    if run.guard.skipped_steps:
        run.log.print(f"{run.guard.skipped_steps} step(s) skipped for a non-finite loss or gradient in this session")
    if run.data.dataset.skip_bad is not None:
        run.log.print(f"{bad_clip_count(run)} unreadable clip(s) skipped; listed in {run.data.dataset.skip_bad.path}")
    run.stepper = None  # DistributedDataParallel must go before its process group does
    run.ddp.leave()


# -----------------------------------------------------------------------------
# Command line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    stage = argparse.ArgumentParser(add_help=False)
    stage.add_argument("--stage")
    if stage.parse_known_args(argv)[0].stage == "1.1":  # supervised fine-tuning: finetune.py's flags
        return finetune.main(["--stage", "1.1", *stage.parse_known_args(argv)[1]])
    config = parse_config(argv)
    try:
        train(config)
    except (ValueError, FileNotFoundError, ImportError, runs.CheckpointWriteError, runs.NonFiniteError) as e:
        # AudioError, CaptionFileError and ResumeError are ValueErrors too
        message = str(e)
        if message.startswith("Caught ") and "Original Traceback" in message:  # raised in a DataLoader worker
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        sys.exit(f"error: {message}")


if __name__ == "__main__":
    main()
