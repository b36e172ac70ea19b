"""The scores that judge a model, in one place: evaluate.py's protocols and finetune.py's reports use them.

Classification scores take logits or similarities [N, C] and multi-hot
targets [N, C] (one-hot for single-label tasks), and are in %:
    mean_average_precision (and average_precision of one class),
    roc_auc (and class_roc_auc), accuracy, zero_shot_accuracy,
    classification_scores (all of them at once, as fine-tuning logs them).
Audio-text retrieval: retrieval_metrics (R@1/5/10, mAP@10, both directions).
Feature collapse: effective_rank (RankMe).
Captioning: caption_scores (CIDEr-D, BLEU-4, ROUGE-L; METEOR, SPICE, SPIDEr
where their Java tools are installed) through the optional aac-metrics
package, the DCASE captioning scores, on captions normalised by caption_words.

Ties are resolved against the model wherever a rank decides: a wrong item
that scores the same as a right one ranks above it, so a collapsed model
scores chance, never 100. ROC-AUC is the exception, by its definition: tied
scores count one half.

Imports torch and numpy only (aac-metrics inside caption_scores, when called).
"""

from __future__ import annotations

import re

import numpy as np
import torch


def pessimistic_order(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per row, item indices by descending score, wrong items first among equal scores."""
    return np.stack([np.lexsort((r, -s)) for s, r in zip(scores, relevant)])


def average_precision(scores: torch.Tensor, truth: torch.Tensor) -> float | None:
    """One class's average precision in % from its scores [N] and 0/1 truth [N]; None without a positive."""
    truth = truth.numpy() > 0.5
    if not truth.any():
        return None
    hits = truth[pessimistic_order(scores.double().numpy()[None], truth[None])[0]]  # ranked, ties: negatives first
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return 100 * float(precision[hits].mean())


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Multi-label mAP in %: the average precision of each class that has a positive, averaged."""
    aps = [ap for ap in (average_precision(s, y) for s, y in zip(scores.T, targets.T)) if ap is not None]
    return float(np.mean(aps))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts + 1) / 2)[inverse]


def class_roc_auc(scores: torch.Tensor, targets: torch.Tensor) -> float | None:
    """One class's ROC-AUC from its scores [N] and 0/1 targets [N] (ties count one half); None without a ROC curve."""
    s, y = scores.double().numpy(), targets.numpy() > 0.5
    n_pos = int(y.sum())
    if n_pos in (0, len(y)):
        return None
    ranks = average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(y) - n_pos)))


def roc_auc(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """ROC-AUC per class, averaged, and how many classes were skipped (labels all 0 or all 1: no ROC curve)."""
    aucs = [a for a in (class_roc_auc(s, y) for s, y in zip(scores.T, targets.T)) if a is not None]
    return (float(np.mean(aucs)) if aucs else float("nan")), scores.shape[1] - len(aucs)


def top1_hits(scores: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Per clip: does one of its true classes score strictly above every other class?"""
    scores, truth = scores.double().numpy(), targets.numpy() > 0.5
    best_true = np.where(truth, scores, -np.inf).max(axis=1)
    best_wrong = np.where(truth, -np.inf, scores).max(axis=1)
    return best_true > best_wrong


def accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in %: the top-scoring class must be a true class (a wrong class tied with it is a miss)."""
    return 100 * float(top1_hits(scores, targets).mean())


def zero_shot_accuracy(audio: torch.Tensor, class_text: torch.Tensor, targets: torch.Tensor) -> float:
    """Zero-shot top-1 accuracy in %: the class whose prompt embedding [C, D] is most similar to the clip's [N, D]."""
    return accuracy(audio @ class_text.T, targets)


def classification_scores(scores: torch.Tensor, targets: torch.Tensor) -> dict:
    """mAP (%), ROC-AUC (with the classes it skipped) and accuracy (%) of logits [N, C] against targets [N, C]."""
    auc, skipped = roc_auc(scores, targets)
    return {"mAP": mean_average_precision(scores, targets), "roc_auc": auc, "roc_auc_skipped_classes": skipped,
            "accuracy": accuracy(scores, targets)}


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


def seed_summary(scores: list[float]) -> dict:
    """A score over seeds (the authors report 43, 44, 45) or folds: the mean, with the spread (sample std)."""
    values = np.asarray(scores, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


def effective_rank(features: torch.Tensor) -> float:
    """RankMe: exp of the entropy of the normalised singular values of features [N, D]; near 1 means collapse."""
    sigma = torch.linalg.svdvals(features.double())
    p = sigma / sigma.sum() + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


# -----------------------------------------------------------------------------
# Captioning scores (the DCASE / AudioCaps convention)


WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")  # a word: letters and digits, with an apostrophe's ending ("dog's")


def caption_words(text: str) -> list[str]:
    """A caption as the scores read it: lower-cased words, punctuation dropped ("A dog barks." -> a dog barks).

    The COCO caption tools' PTB tokenizer (a Java program) does the same for
    the captions of audio datasets, which are plain English sentences; this
    rule needs no Java and is applied to generated and reference captions alike.
    """
    return WORD.findall(text.lower())


def aac_metrics():
    """aac-metrics' functions (aac_metrics.functional), or an ImportError saying how to install it."""
    try:
        from aac_metrics import functional
    except ImportError as e:
        raise ImportError("captioning scores need the optional aac-metrics package (DCASE's captioning metrics): "
                          "pip install -r requirements-extras.txt, or pip install aac-metrics==0.5.4") from e
    return functional


def caption_scores(candidates: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    """Corpus-level captioning scores of one generated caption per clip against all of its references.

    Returns ({score name: value}, {score name: why it was not computed}).
    CIDEr-D (from 2 clips on), BLEU-4 and ROUGE-L are always computed (pure Python); METEOR,
    SPICE and SPIDEr = (CIDEr-D + SPICE) / 2 only where Java and the tools'
    jar files are installed (aac-metrics-download), else listed as not
    computed with the reason. Values are aac-metrics' own (CIDEr-D about 0-3,
    the others 0-1), on captions normalised by caption_words.
    """
    aac = aac_metrics()
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"caption_scores: {len(candidates)} generated captions for {len(references)} clips' "
                         "references; give one generated caption per clip, for at least one clip")
    cands = [" ".join(caption_words(c)) for c in candidates]
    refs = [[" ".join(caption_words(r)) for r in rs] for rs in references]
    scores, missing = {}, {}
    if len(cands) > 1:
        scores["cider_d"] = aac.cider_d(cands, refs)[0]["cider_d"]
    else:  # its n-gram weights are document frequencies over the clips
        missing["cider_d"] = "CIDEr-D needs at least 2 clips"
    scores.update(bleu_4=aac.bleu_4(cands, refs)[0]["bleu_4"], rouge_l=aac.rouge_l(cands, refs)[0]["rouge_l"])
    for name, score in (("meteor", aac.meteor), ("spice", aac.spice)):
        try:
            scores[name] = score(cands, refs)[0][name]
        except (FileNotFoundError, RuntimeError, OSError, ValueError) as e:  # no Java, or no jar: not installed
            missing[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    if "spice" in scores and "cider_d" in scores:
        scores["spider"] = (scores["cider_d"] + scores["spice"]) / 2
    else:
        missing["spider"] = "needs CIDEr-D and SPICE"
    return {k: float(v) for k, v in scores.items()}, missing
