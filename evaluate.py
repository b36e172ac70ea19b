"""Evaluation of M2D-CLAP checkpoints: the protocols used to judge them (linear
probe, zero-shot classification, audio-text retrieval, RankMe), their command
line and plots. Features and the linear probe come from features.py (fine-tuning
reports the same probe beside its result), manifests from data.py (the same
rules as fine-tuning's), the scores from metrics.py.

Command line:
    python evaluate.py                                   # newest runs/stage*/last.pt, built-in held-out clips
    python evaluate.py --checkpoint runs/stage1/last.pt --json results.json
    python evaluate.py --data manifest.csv --plot figures/   # your clips: file_name, label, caption, split
Embedding a corpus and exporting to the released layout are features.py's commands:
    python features.py embed ...   /   python features.py export ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import builtin_data
import data
import features
import metrics
import runs


# -----------------------------------------------------------------------------
# Evaluation data: a manifest (data.read_manifest's rules), or the built-in held-out split


def evaluation_set(csv_path: Path | None, audio_root: Path | None = None) -> data.Manifest:
    """The manifest to evaluate on (default: the built-in data), checked for what the protocols need.

    The linear probe trains on the split "train" and tests on "test" ("valid"
    clips are not used), or holds each fold out in turn; zero-shot, retrieval
    and RankMe use the test clips (every clip without a split).
    """
    if csv_path is None:
        return builtin_data.builtin_eval_set()
    manifest = data.read_manifest(csv_path, audio_root)
    missing = data.AudioFolder(manifest.root).missing(manifest.files)
    if missing:
        raise data.ManifestError(f"{csv_path}: {len(missing)} audio file(s) such as {manifest.root / missing[0]} "
                                 "not found. Fix file_name or pass the right --audio-root.")
    if manifest.split is not None or manifest.fold is not None:
        data.holdouts(manifest)  # train and test clips, or at least 2 folds, and test labels a training class has
    return manifest


def manifest_log_mels(manifest: data.Manifest) -> list[torch.Tensor]:
    """Full-length log-mels [n_mels, frames] of a manifest's clips (any format, rate, channel count and length:
    feature extraction pads any length); a file that cannot be read stops it, named with its manifest line."""
    mels = []
    for i, name in enumerate(manifest.files):
        try:
            mels.append(data.log_mel(data.load_audio(manifest.root / name)))
        except data.AudioError as e:
            raise manifest.unreadable(i, e) from e
    return mels


# -----------------------------------------------------------------------------
# Running the protocols


TASKS = ("linear_probe", "zero_shot", "retrieval", "rankme")
DEFAULT_PROMPT = "{label} can be heard"  # the authors' zero-shot prompt (EVAR)


def text_side_embeddings(embedder: features.Embedder, texts, precomputed=None):
    """CLAP text embeddings [m, D], unit length, or the reason they cannot be had (returned as a string)."""
    try:
        return F.normalize(features.encode_clap_text(texts, embedder, sentence_embeddings=precomputed), dim=-1).cpu()
    except (ImportError, ValueError, OSError) as e:  # OSError: a sentence model that is not on this machine
        return f"no text side for new text: {e}"


def class_prompts(classes: list[str], prompt: str) -> list[str]:
    """One zero-shot prompt per class, underscores in labels read as spaces (the authors' convention)."""
    return [prompt.format(label=c.replace("_", " ")) for c in classes]


def evaluate_model(embedder: features.Embedder, eval_set: data.Manifest, mels, tasks,
                   prompt: str) -> tuple[dict, dict]:
    """Results of the tasks, and the arrays the plots need."""
    results, skipped, arrays = {}, {}, {}
    targets = data.label_targets(eval_set.labels, eval_set.classes, eval_set.name)  # [N, C] multi-hot
    test = [i for i in range(len(eval_set.files)) if eval_set.split is None or eval_set.split[i] == "test"]
    if {"linear_probe", "rankme"} & set(tasks):
        clip = features.clip_features(embedder.model, mels)
        if "linear_probe" in tasks:
            run_linear_probe(clip, eval_set, targets, results, skipped, arrays)
        if "rankme" in tasks:
            results["rankme"] = {"clip_features": metrics.effective_rank(clip[test])}
    clap_tasks = [t for t in ("zero_shot", "retrieval") if t in tasks]
    if clap_tasks and not embedder.has_clap:
        for task in clap_tasks:
            skipped[task] = "the checkpoint has no CLAP audio projector (an encoder-only file)"
    elif clap_tasks:
        audio = F.normalize(features.clap_audio(embedder.model, [mels[i] for i in test]), dim=-1).cpu()
        if "zero_shot" in tasks:
            run_zero_shot(embedder, audio, targets[test], eval_set.classes, prompt,
                          results, skipped, arrays)
        if "retrieval" in tasks:
            run_retrieval(embedder, audio, eval_set, test, results, skipped, arrays)
    if skipped:
        results["skipped"] = skipped
    return results, arrays


def run_linear_probe(clip: torch.Tensor, eval_set: data.Manifest, targets: torch.Tensor, results: dict,
                     skipped: dict, arrays: dict):
    """The linear probe on the train/test split, or averaged over the folds (each held out in turn)."""
    if eval_set.split is not None or eval_set.fold is not None:
        groups = [(eval_set.indices("train", fold), eval_set.indices("test", fold))
                  for fold in eval_set.folds or [None]]
    else:
        skipped["linear_probe"] = "the manifest has neither a split nor a fold column"
        return
    fold_results = []
    for train_ids, test_ids in groups:
        result, scores = features.linear_probe(clip[train_ids], targets[train_ids], clip[test_ids],
                                               targets[test_ids])
        fold_results.append(result)
        arrays["probe"] = (scores, targets[test_ids])
    results["linear_probe"] = {k: float(np.mean([r[k] for r in fold_results])) for k in fold_results[0]}


def run_zero_shot(embedder: features.Embedder, audio: torch.Tensor, test_targets: torch.Tensor,
                  classes: list[str], prompt: str, results: dict, skipped: dict, arrays: dict):
    """Zero-shot classification of the test clips' CLAP audio embeddings [N, D] with one prompt per class."""
    class_text = text_side_embeddings(embedder, class_prompts(classes, prompt))
    if isinstance(class_text, str):
        skipped["zero_shot"] = class_text
        return
    results["zero_shot"] = {"accuracy": metrics.zero_shot_accuracy(audio, class_text, test_targets),
                            "chance": 100 * float(test_targets.sum(dim=1).mean()) / len(classes)}
    arrays["zero_shot"] = (audio @ class_text.T, test_targets)


def run_retrieval(embedder: features.Embedder, audio: torch.Tensor, eval_set: data.Manifest, test: list[int],
                  results: dict, skipped: dict, arrays: dict):
    """Audio-text retrieval between the test clips' CLAP audio embeddings [N, D] and their captions."""
    position = {clip: k for k, clip in enumerate(test)}
    rows = [j for j, clip in enumerate(eval_set.caption_clip) if clip in position]
    if not rows:
        skipped["retrieval"] = "the manifest has no captions for the evaluated clips"
        return
    pre = eval_set.caption_embeddings[rows] if eval_set.caption_embeddings is not None else None
    text = text_side_embeddings(embedder, [eval_set.captions[j] for j in rows], pre)
    if isinstance(text, str):
        skipped["retrieval"] = text
        return
    clip_index = torch.tensor([position[eval_set.caption_clip[j]] for j in rows])
    results["retrieval"] = metrics.retrieval_metrics(audio @ text.T, clip_index)
    arrays["similarity"] = (audio @ text.T, clip_index, [eval_set.captions[j] for j in rows])


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
    """One row per metric: the checkpoint's value, and the random-init baseline's when it was measured."""
    baseline = flatten(random_init) if random_init else None
    print(f"{'metric':36s} {'checkpoint':>10s}" + (f" {'random_init':>12s}" if baseline is not None else ""))
    for key, value in flatten({k: v for k, v in checkpoint.items() if k != "skipped"}).items():
        base = "" if baseline is None else f" {baseline[key]:12.1f}" if key in baseline else f" {'-':>12s}"
        print(f"{key:36s} {value:10.1f}{base}")
    for task, reason in checkpoint.get("skipped", {}).items():
        print(f"{task}: skipped, {reason}")


def fine_tuning_line(path: Path) -> str:
    """Fine-tuning, the one protocol that trains the encoder, is finetune.py's: its result beside a fine-tuned
    checkpoint, or the command that measures it."""
    result = Path(path).parent / "result.json"
    if result.is_file():
        r = json.loads(result.read_text())
        return (f"fine-tuning ({r['recipe_name']} recipe, {r['rule']}, from {result}): {r['metric']} "
                f"{r['score']:.1f}, best epoch {r['best_epoch']}")
    return (f"fine-tuning: python finetune.py --init {path}   (the built-in event labels; "
            "--manifest CSV --recipe NAME for yours; docs/TRAINING.md#fine-tuning)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint to evaluate (default: the most recently written runs/stage{1,1.1,2,2.1}/last.pt)")
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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON (default: none)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads torch computes with (default: torch's choice, one per core). On a machine "
                        "shared with other jobs, fewer threads than cores can be several times faster")
    p.add_argument("--plot", type=Path, default=None,
                   help="write PNG figures here (similarity matrix, confusion matrix, training curves); "
                        "needs matplotlib")
    return p.parse_args(argv)


def add_text_encoder_flag(p: argparse.ArgumentParser):
    p.add_argument("--text-encoder", dest="text_encoder", default=None, metavar="FOLDER",
                   help="local Hugging Face folder for the text side where the checkpoint does not hold it all: "
                        "the tokenizer and config of a released stage-2 file's BERT (bert-base-uncased), or "
                        "the GTE-base / NV-Embed-v2 of a released stage-1 file")


def main(argv=None):
    args = parse_args(argv)
    try:
        runs.check_device(args.device)
        runs.set_threads(args.threads)
        path = args.checkpoint or features.newest_run()
        embedder = features.load_model(path, args.device, args.text_encoder)
        eval_set = evaluation_set(args.data, args.audio_root)
        mels = manifest_log_mels(eval_set)
    except (ValueError, FileNotFoundError) as e:  # ManifestError and AudioError included
        sys.exit(f"error: {e}")
    stage = embedder.info["stage"]
    parts = (f"{eval_set.split.count('train')} train / {eval_set.split.count('test')} test clips"
             if eval_set.split else f"{len(eval_set.files)} clips")
    chosen = "" if args.checkpoint else " (the most recently written runs/stage*/last.pt; --checkpoint picks another)"
    print(f"{path}{chosen}, stage {stage}, on {eval_set.name}: {parts}, {len(eval_set.classes)} classes, "
          f"{len(eval_set.captions)} captions")
    results = {"checkpoint_path": str(path), "stage": stage, "data": eval_set.name}
    results["checkpoint"], arrays = evaluate_model(embedder, eval_set, mels, args.tasks, args.prompt)
    if not args.no_baseline:
        baseline = features.Embedder(features.random_init_copy(embedder.model), embedder.info, embedder.text)
        results["random_init"], _ = evaluate_model(baseline, eval_set, mels, args.tasks, args.prompt)
    print_table(results["checkpoint"], results.get("random_init"))
    print(fine_tuning_line(path))
    # The flat keys of the results: linear_probe.accuracy, zero_shot.accuracy, retrieval.*.R@1, ...
    out = {**results["checkpoint"], **{k: v for k, v in results.items() if k != "checkpoint"}}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        write_plots(args.plot, arrays, eval_set, Path(path).parent / "log.jsonl")


# -----------------------------------------------------------------------------
# Figures (optional matplotlib)


def write_plots(folder: Path, arrays: dict, eval_set: data.Manifest, log_path: Path):
    """PNG figures of the arrays evaluate_model returned, and of the run's training curves."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: --plot needs matplotlib: pip install matplotlib")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in (("similarity", plot_similarity), ("confusion", plot_confusion),
                       ("training_curves", plot_training_curves)):
        fig = plot(plt, arrays, eval_set, log_path)
        if fig is not None:
            written.append(folder / f"{name}.png")
            fig.savefig(written[-1], dpi=120, bbox_inches="tight")
            plt.close(fig)
    print("wrote " + ", ".join(map(str, written)))


def plot_similarity(plt, arrays: dict, eval_set: data.Manifest, log_path: Path, n_clips: int = 12):
    if "similarity" not in arrays:
        return None
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
    return fig


def plot_confusion(plt, arrays: dict, eval_set: data.Manifest, log_path: Path):
    source = "probe" if "probe" in arrays else "zero_shot" if "zero_shot" in arrays else None
    if source is None:
        return None
    scores, targets = arrays[source]
    classes = eval_set.classes
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for row, truth in zip(scores.argmax(dim=1).tolist(), targets):
        if truth.sum() == 1:  # a confusion matrix is defined for single-label clips
            confusion[int(truth.argmax()), row] += 1
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (single-label clips)")
    ax.set_title(f"Confusion matrix ({'linear probe' if source == 'probe' else 'zero-shot'})")
    return fig


def plot_training_curves(plt, arrays: dict, eval_set: data.Manifest, log_path: Path):
    if not log_path.is_file():
        return None
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    keys = [k for k in records[0] if k.startswith("loss_")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot([r["step"] for r in records], [r[key] for r in records])
        ax.set_xlabel("step")
        ax.set_title(key)
    return fig


if __name__ == "__main__":
    main()
