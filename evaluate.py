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
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import text_embed
import train


# -----------------------------------------------------------------------------
# Loading


def load_model(path: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer or None, checkpoint dict) of one of our checkpoints."""
    ckpt = train.load_checkpoint(path)
    model, tokenizer = train.build_model(ckpt)
    return model.to(device).eval(), tokenizer, ckpt


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


def retrieval_metrics(similarity: torch.Tensor, caption_clip: torch.Tensor) -> dict:
    """Audio->text and text->audio R@1/5/10 and mAP@10.

    similarity [N_clips, M_captions]; caption_clip [M] is the clip index of
    each caption, so a clip may have several correct captions. Audio->text
    counts a hit at k when any correct caption ranks within k; its mAP@10
    averages precision over all of a clip's correct captions.
    """
    n_clips = similarity.shape[0]
    relevant = caption_clip[None, :] == torch.arange(n_clips)[:, None]    # [N, M]
    # audio -> text
    order = similarity.argsort(dim=1, descending=True)                     # [N, M]
    hits = torch.gather(relevant, 1, order).float()                        # [N, M] in ranked order
    first_hit = hits.argmax(dim=1)                                         # 0-based rank of the first correct
    top10 = hits[:, :10]
    precision = top10.cumsum(dim=1) / torch.arange(1, top10.shape[1] + 1)
    ap10 = (precision * top10).sum(dim=1) / relevant.sum(dim=1).clamp(max=10)
    a2t = {f"R@{k}": (first_hit < k).float().mean().item() * 100 for k in (1, 5, 10)}
    a2t["mAP@10"] = ap10.mean().item() * 100
    # text -> audio: one correct clip per caption
    order = similarity.T.argsort(dim=1, descending=True)                   # [M, N]
    rank = (order == caption_clip[:, None]).float().argmax(dim=1)          # 0-based
    t2a = {f"R@{k}": (rank < k).float().mean().item() * 100 for k in (1, 5, 10)}
    t2a["mAP@10"] = torch.where(rank < 10, 1.0 / (rank + 1), 0.0).mean().item() * 100
    return {"audio_to_text": a2t, "text_to_audio": t2a}


def zero_shot_accuracy(audio: torch.Tensor, class_text: torch.Tensor, labels: list[set[int]]) -> float:
    """Top-1 accuracy in %: the class whose prompt is most similar must be one of the clip's labels."""
    predicted = (audio @ class_text.T).argmax(dim=1).tolist()
    return 100.0 * float(np.mean([p in truth for p, truth in zip(predicted, labels)]))


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint to evaluate (default: the newest of runs/stage2.1, stage2, stage1)")
    p.add_argument("--prompt", default="The sound of {label}.", help="zero-shot prompt template")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def builtin_test_set():
    """Log-mels, captions (with their committed embeddings) and labels of the built-in held-out split."""
    csv_path, root = data.builtin_dataset("test")
    table = text_embed.load_caption_embeddings(csv_path)
    files = list(dict.fromkeys(table.file_names))
    clip_of = {name: i for i, name in enumerate(files)}
    mels = [data.log_mel(data.load_audio(root / name)) for name in files]
    rows = data.builtin_rows("test")
    labels_of = {r["file_name"]: r["label"].split(";") for r in rows}
    return mels, table, torch.tensor([clip_of[n] for n in table.file_names]), [labels_of[n] for n in files]


def main(argv=None):
    args = parse_args(argv)
    path = args.checkpoint or newest_run()
    model, tokenizer, ckpt = load_model(path, args.device)
    mels, table, caption_clip, clip_labels = builtin_test_set()
    audio = clap_audio_embeddings(model, mels)
    text = clap_text_embeddings(model, tokenizer, ckpt, table.captions, table.embeddings)
    results = {"checkpoint": str(path), "stage": ckpt["stage"],
               "retrieval": retrieval_metrics(audio @ text.T, caption_clip)}
    classes = list(data.EVENT_CLASSES)
    prompts = [args.prompt.format(label=c) for c in classes]
    class_text = clap_text_embeddings(model, tokenizer, ckpt, prompts)
    labels = [{classes.index(c) for c in clip} for clip in clip_labels]
    results["zero_shot"] = {"accuracy": zero_shot_accuracy(audio, class_text, labels),
                            "chance": 100.0 * float(np.mean([len(s) for s in labels])) / len(classes)}
    r = results["retrieval"]
    print(f"{path} (stage {ckpt['stage']}), built-in held-out split: {len(mels)} clips, {len(table)} captions")
    for direction in ("audio_to_text", "text_to_audio"):
        print(f"  {direction:14s} " + "  ".join(f"{k} {v:5.1f}" for k, v in r[direction].items()))
    print(f"  zero-shot accuracy {results['zero_shot']['accuracy']:.1f} % "
          f"(chance {results['zero_shot']['chance']:.1f} %)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
