"""Tests of metrics.py: every score on hand-worked examples, ties included."""

import pytest
import torch

import metrics


def multi_hot(labels, n_classes):
    targets = torch.zeros(len(labels), n_classes)
    for i, classes in enumerate(labels):
        targets[i, list(classes)] = 1.0
    return targets


def test_retrieval_metrics_by_hand():
    # 3 clips; captions 0,1 -> clip 0, caption 2 -> clip 1, caption 3 -> clip 2.
    caption_clip = torch.tensor([0, 0, 1, 2])
    similarity = torch.tensor([[0.1, 0.9, 0.5, 0.0],    # clip 0: ranks caption 1 first (correct)
                               [0.8, 0.0, 0.7, 0.05],   # clip 1: caption 2 second
                               [0.9, 0.0, 0.2, 0.1]])   # clip 2: caption 3 third
    r = metrics.retrieval_metrics(similarity, caption_clip)
    a2t, t2a = r["audio_to_text"], r["text_to_audio"]
    assert a2t["R@1"] == pytest.approx(100 / 3) and a2t["R@5"] == pytest.approx(100)
    # AP@10: clip 0 hits at ranks 1 and 3 -> (1 + 2/3) / 2; clip 1 -> 1/2; clip 2 -> 1/3.
    assert a2t["mAP@10"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 / 2 + 1 / 3) / 3)
    # Text -> audio ranks: caption 0 -> clip 0 third; 1 -> first; 2 -> clip 1 first; 3 -> clip 2 first.
    assert t2a["R@1"] == pytest.approx(75) and t2a["R@5"] == pytest.approx(100)
    assert t2a["mAP@10"] == pytest.approx(100 * (1 / 3 + 1 + 1 + 1) / 4)


def test_zero_shot_accuracy_counts_a_hit_when_the_top_class_is_among_the_labels():
    audio = torch.eye(3)
    class_text = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    assert metrics.zero_shot_accuracy(audio, class_text, multi_hot([{0}, {0, 2}, {2}], 3)) == pytest.approx(200 / 3)
    assert metrics.zero_shot_accuracy(audio, class_text, multi_hot([{0}, {0, 1}, {2}], 3)) == pytest.approx(100)


def test_retrieval_ties_count_against_the_model_and_several_captions_per_clip():
    # A collapsed model: every similarity equal. Ties rank the correct item last.
    caption_clip = torch.tensor([0, 0, 1, 1, 2, 2])
    r = metrics.retrieval_metrics(torch.zeros(3, 6), caption_clip)
    assert r["audio_to_text"]["R@1"] == 0 and r["text_to_audio"]["R@1"] == 0
    assert r["audio_to_text"]["R@5"] == 100  # 4 wrong captions, then the 2 correct ones at ranks 5 and 6
    assert r["audio_to_text"]["mAP@10"] == pytest.approx(100 * (1 / 5 + 2 / 6) / 2)
    assert r["text_to_audio"]["R@5"] == 100 and r["text_to_audio"]["mAP@10"] == pytest.approx(100 / 3)
    # Clip 0 ties its correct caption 1 with a wrong caption 2 at the top: the wrong one ranks first.
    similarity = torch.tensor([[0.2, 0.9, 0.9, 0.0, 0.0, 0.0],
                               [0.0, 0.0, 0.8, 0.7, 0.0, 0.0],
                               [0.0, 0.0, 0.0, 0.0, 0.6, 0.5]])
    r = metrics.retrieval_metrics(similarity, caption_clip)
    a2t = r["audio_to_text"]
    assert a2t["R@1"] == pytest.approx(200 / 3)  # clips 1 and 2
    # AP@10, clip 0: ranks 1 (wrong), 2 (caption 1), 3 (caption 0) -> (1/2 + 2/3) / 2; clips 1, 2: 1.
    assert a2t["mAP@10"] == pytest.approx(100 * ((1 / 2 + 2 / 3) / 2 + 1 + 1) / 3)
    # Caption 2 (clip 1) scores 0.9 for clip 0 and 0.8 for clip 1: rank 2. The others rank 1.
    assert r["text_to_audio"]["R@1"] == pytest.approx(500 / 6)


def test_zero_shot_tie_between_a_true_and_a_false_class_is_a_miss():
    class_text = torch.eye(3)
    audio = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert metrics.zero_shot_accuracy(audio, class_text, multi_hot([{0}, {2}], 3)) == pytest.approx(50)
    assert metrics.zero_shot_accuracy(audio, class_text, multi_hot([{0, 1}, {2}], 3)) == pytest.approx(100)


def test_mean_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.1, 0.6]])
    labels = [{0}, {1}, {0, 1}]
    # class 0: positives at ranks 1 and 3 -> (1 + 2/3) / 2; class 1: ranks 1, 2 -> 1.
    assert metrics.mean_average_precision(scores, multi_hot(labels, 2)) == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1) / 2)


def test_effective_rank_detects_collapse():
    assert metrics.effective_rank(torch.eye(16)) == pytest.approx(16, rel=1e-6)
    collapsed = torch.randn(100, 1) @ torch.randn(1, 32)
    assert metrics.effective_rank(collapsed) < 1.01


def test_roc_auc_skips_a_class_without_a_curve_and_counts_ties_one_half():
    scores = torch.tensor([[0.1, 0.0], [0.4, 1.0], [0.35, 2.0], [0.8, 3.0]])
    targets = torch.tensor([[0, 1], [0, 1], [1, 1], [1, 1]]).float()  # class 1: one label value only
    auc, skipped = metrics.roc_auc(scores, targets)
    assert auc == pytest.approx(0.75) and skipped == 1
    assert metrics.class_roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])) == 0.5
    assert metrics.class_roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])) is None


def test_accuracy_takes_the_top_class_and_counts_a_tie_with_a_wrong_class_as_a_miss():
    scores = torch.tensor([[0.1, 0.0], [0.4, 1.0], [0.35, 2.0], [0.8, 3.0]])
    assert metrics.accuracy(scores, multi_hot([{0}, {1}, {1}, {0}], 2)) == 75.0
    assert metrics.accuracy(torch.zeros(2, 3), multi_hot([{0}, {1}], 3)) == 0.0   # a collapsed model
    assert metrics.accuracy(torch.tensor([[1.0, 1.0, 0.0]]), multi_hot([{0, 1}], 3)) == 100.0


def test_average_precision_of_one_class_and_the_classification_scores_together():
    scores, truth = torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert metrics.average_precision(scores, truth) == pytest.approx(100 * (1 + 2 / 3) / 2)  # tie: negative first
    assert metrics.average_precision(scores, torch.zeros(4)) is None
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.5]])
    targets = multi_hot([{0}, {1}, {0}], 2)
    scored = metrics.classification_scores(logits, targets)
    assert scored == {"mAP": 100.0, "roc_auc": 1.0, "roc_auc_skipped_classes": 0, "accuracy": 100.0}
