"""Evaluation of M2D-CLAP checkpoints: features for downstream use, and the
protocols used to judge them (zero-shot classification, audio-text retrieval).

Feature API (import it into your own code):
    model, tokenizer, ckpt = load_model("runs/stage2/last.pt")
    feats = frame_features(model, [data.log_mel(data.load_audio("a.wav"))])  # [T_cols, 5 * D] per clip
    audio = clap_audio_embeddings(model, log_mels)                          # [N, D], unit length
    text = clap_text_embeddings(model, tokenizer, ckpt, ["The sound of rain."])

Command line:
    python evaluate.py                                   # newest run, built-in held-out clips
    python evaluate.py --checkpoint runs/stage1/last.pt --json results.json
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import text_embed
import train


# -----------------------------------------------------------------------------
# Loading


def load_model(path: str | Path, device: str = "cpu", tokenizer: str | None = None):
    """(model in eval mode, tokenizer or None, checkpoint dict) of our checkpoint or a released one.

    A released stage-2 file holds its text encoder but not its tokenizer: pass
    the tokenizer's local folder (e.g. bert-base-uncased) to encode text.
    """
    ckpt = train.load_checkpoint(path)
    if "model_config" in ckpt:
        model, tok = train.build_model(ckpt)
    else:
        model, tok, ckpt = train.load_released(path, tokenizer)
    return model.to(device).eval(), tok, ckpt


def newest_run(root: Path = Path("runs")) -> Path:
    """The checkpoint of the latest stage that has one: stage 2.1, then 2, then 1."""
    for stage in ("2.1", "2", "1"):
        path = root / f"stage{stage}" / "last.pt"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no checkpoint under {root}/stage{{1,2,2.1}}; run 'python train.py --stage 1' "
                            "first or pass --checkpoint PATH")


# -----------------------------------------------------------------------------
# Features of clips of any length


def split_crops(mel: torch.Tensor, crop_frames: int, patch_size: int) -> list[torch.Tensor]:
    """[F, T] log-mel -> consecutive [F, crop_frames] crops; the last is zero-padded to whole patches."""
    crops = list(mel.split(crop_frames, dim=-1))
    tail = crops[-1].shape[-1]
    if tail % patch_size:
        crops[-1] = F.pad(crops[-1], (0, patch_size - tail % patch_size))
    return crops


@torch.no_grad()
def patch_features(model, log_mels: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
    """Encoder patch features of each clip: list of [F_patches, T_cols, D] (CLS dropped).

    Each clip is cut into consecutive crops of the training length; crops of
    equal length from all clips are batched together; the crops' time columns
    are concatenated back per clip.
    """
    config = model.config
    device = model.norm_stats.device
    crops = [(i, c) for i, mel in enumerate(log_mels)
             for c in split_crops(mel, config.crop_frames, config.patch_size)]
    outputs: list[torch.Tensor | None] = [None] * len(crops)
    by_length: dict[int, list[int]] = {}
    for k, (_, crop) in enumerate(crops):
        by_length.setdefault(crop.shape[-1], []).append(k)
    grid_f = config.n_mels // config.patch_size
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            x = torch.stack([crops[k][1] for k in chunk])[:, None].to(device)  # [B, 1, F, T]
            tokens = model.encode(x)[:, 1:].float()                            # [B, F*T', D]
            tokens = tokens.reshape(len(chunk), grid_f, -1, tokens.shape[-1])  # [B, F, T', D]
            for k, t in zip(chunk, tokens):
                outputs[k] = t.cpu()
    per_clip: list[list[torch.Tensor]] = [[] for _ in log_mels]
    for (i, _), out in zip(crops, outputs):
        per_clip[i].append(out)
    return [torch.cat(parts, dim=1) for parts in per_clip]  # [F, T_cols, D]


def frame_features(model, log_mels: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
    """Frame-level features: per 160 ms time column, the F frequency rows stacked -> [T_cols, F * D]."""
    return [p.permute(1, 0, 2).reshape(p.shape[1], -1) for p in patch_features(model, log_mels, batch_size)]


def clip_features(model, log_mels: list[torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Clip-level features: the mean of the frame-level features over time -> [N, F * D]."""
    return torch.stack([f.mean(dim=0) for f in frame_features(model, log_mels, batch_size)])


@torch.no_grad()
def clap_audio_embeddings(model, log_mels: list[torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """CLAP audio embeddings [N, D], unit length: the audio projector over all patches of a clip."""
    device = model.norm_stats.device
    out = []
    for p in patch_features(model, log_mels, batch_size):
        tokens = p.reshape(1, -1, p.shape[-1]).to(device)  # [1, F*T_cols, D]; order is irrelevant to the projector
        out.append(F.normalize(model.audio_proj(tokens).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def clap_text_embeddings(model, tokenizer, ckpt: dict, captions: list[str],
                         sentence_embeddings: np.ndarray | None = None, batch_size: int = 256) -> torch.Tensor:
    """CLAP text embeddings [M, D], unit length.

    With a trainable text encoder the captions are tokenised; otherwise they
    need sentence embeddings from the model that made the training embeddings:
    pass them, or they are computed with the checkpoint's embedding_model.
    """
    device = model.norm_stats.device
    if model.text_encoder is not None and tokenizer is None:
        raise ValueError("the checkpoint's text encoder needs its tokenizer: pass --tokenizer PATH")
    if tokenizer is None and sentence_embeddings is None:
        name = ckpt.get("embedding_model")
        if not name:
            raise ValueError("this checkpoint does not record which sentence model made its caption embeddings; "
                             "pass precomputed embeddings")
        sentence_embeddings = text_embed.embed_texts(captions, text_embed.load_sentence_model(name, "cpu"),
                                                     progress=False)
    out = []
    for start in range(0, len(captions), batch_size):
        if tokenizer is not None:
            text = {k: v.to(device) for k, v in
                    text_embed.tokenize(tokenizer, captions[start:start + batch_size]).items()}
        else:
            text = torch.as_tensor(sentence_embeddings[start:start + batch_size], dtype=torch.float32).to(device)
        out.append(model.encode_text(text).float().cpu())
    return torch.cat(out)


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
    eval_set = EvalSet("built-in held-out split", data.builtin_cache_dir(), [], [], [])
    for part in ("train", "test"):
        data.builtin_dataset(part)  # renders the audio on first use
        for row in data.builtin_rows(part):
            if row["file_name"] not in eval_set.files[-1:]:  # a clip's caption rows are consecutive
                eval_set.files.append(row["file_name"])
                eval_set.labels.append(row["label"].split(";"))
                eval_set.split.append(part)
    test = text_embed.load_caption_embeddings(data.builtin_csv("test"))
    clip_of = {name: k for k, name in enumerate(eval_set.files)}
    eval_set.captions = test.captions
    eval_set.caption_clip = [clip_of[n] for n in test.file_names]
    eval_set.caption_embeddings = test.embeddings
    return eval_set


def log_mels_from_files(paths: list[Path]) -> list[torch.Tensor]:
    """Full-length log-mels [n_mels, frames] of audio files (any format, rate and channel count)."""
    return [data.read_log_mel(p) for p in paths]


def log_mels_from_waves(waves: list, sample_rate: int) -> list[torch.Tensor]:
    """Full-length log-mels of mono waveforms [samples] at sample_rate."""
    return [data.log_mel(data.resample(torch.as_tensor(w, dtype=torch.float32), sample_rate, data.SAMPLE_RATE))
            for w in waves]


# -----------------------------------------------------------------------------
# Running the protocols


TASKS = ("linear_probe", "zero_shot", "retrieval", "rankme")


def random_init_copy(model, seed: int = 0):
    """The same model with its audio encoder replaced by an untrained one of the same shape."""
    torch.manual_seed(seed)
    fresh = type(model)(model.config, tuple(model.norm_stats.tolist()))
    baseline = copy.deepcopy(model)
    encoder_keys = ("patch_embed.", "cls_token", "blocks.", "norm.")
    state = {k: v for k, v in fresh.state_dict().items() if k.startswith(encoder_keys)}
    baseline.load_state_dict(state, strict=False)
    return baseline.to(model.norm_stats.device).eval()


def text_side_embeddings(model, tokenizer, ckpt, texts, precomputed=None):
    """CLAP text embeddings, or the reason they cannot be had (returned as a string)."""
    try:
        return clap_text_embeddings(model, tokenizer, ckpt, texts, precomputed)
    except (ImportError, ValueError, OSError) as e:  # OSError: a sentence model that is not on this machine
        return f"no text side for new text: {e}"


def evaluate_model(model, tokenizer, ckpt, eval_set: EvalSet, mels, tasks, prompt: str) -> tuple[dict, dict]:
    """Results of the tasks, and the arrays the plots need."""
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

    no_heads = [part for part in ("audio_proj", "logit_scale") if part in ckpt.get("missing_parts", [])]
    if not ckpt.get("text_side") or no_heads:
        for task in {"zero_shot", "retrieval"} & set(tasks):
            skipped[task] = "the checkpoint has no CLAP audio projector or text side (an encoder-only file)"
        tasks = [t for t in tasks if t not in skipped]
    need_audio = {"zero_shot", "retrieval"} & set(tasks)
    audio = clap_audio_embeddings(model, [mels[i] for i in test]) if need_audio else None
    if "zero_shot" in tasks:
        class_text = text_side_embeddings(model, tokenizer, ckpt, [prompt.format(label=c) for c in classes])
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
            text = text_side_embeddings(model, tokenizer, ckpt, [eval_set.captions[j] for j in rows], pre)
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
    p.add_argument("--prompt", default="The sound of {label}.", help="zero-shot prompt template")
    p.add_argument("--tokenizer", default=None,
                   help="local tokenizer folder for a released stage-2 file's text encoder (e.g. bert-base-uncased)")
    p.add_argument("--no-baseline", action="store_true", help="skip the random-init encoder baseline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--plot", type=Path, default=None,
                   help="write PNG figures here (similarity matrix, confusion matrix, training curves); "
                        "needs matplotlib")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        path = args.checkpoint or newest_run()
        model, tokenizer, ckpt = load_model(path, args.device, args.tokenizer)
        eval_set = builtin_eval_set() if args.data is None else read_manifest(args.data, args.audio_root)
        mels = log_mels_from_files([eval_set.audio_root / f for f in eval_set.files])
    except (ValueError, FileNotFoundError) as e:  # ManifestError and AudioError included
        sys.exit(f"error: {e}")
    parts = (f"{eval_set.split.count('train')} train / {eval_set.split.count('test')} test clips"
             if eval_set.split else f"{len(eval_set.files)} clips")
    print(f"{path} (stage {ckpt['stage']}) on {eval_set.name}: {parts}, {len(eval_set.classes)} classes, "
          f"{len(eval_set.captions)} captions")
    results = {"checkpoint_path": str(path), "stage": ckpt["stage"], "data": eval_set.name}
    results["checkpoint"], arrays = evaluate_model(model, tokenizer, ckpt, eval_set, mels, args.tasks, args.prompt)
    if not args.no_baseline:
        baseline = random_init_copy(model)
        results["random_init"], _ = evaluate_model(baseline, tokenizer, ckpt, eval_set, mels, args.tasks,
                                                   args.prompt)
    print_table(results["checkpoint"], results.get("random_init"))
    # The flat keys of the results: linear_probe.accuracy, zero_shot.accuracy, retrieval.*.R@1, ...
    out = {**results["checkpoint"], **{k: v for k, v in results.items() if k != "checkpoint"}}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        write_plots(args.plot, arrays, eval_set, Path(path).parent / "log.jsonl")


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
