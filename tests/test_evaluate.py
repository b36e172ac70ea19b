"""Tests of evaluate.py: features of clips of any length, and the metrics."""

import pytest
import torch

import evaluate
import model as m2d


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return m2d.M2DCLAP(m2d.preset("tiny", text_dim=8)).eval()


def test_split_crops_pads_only_the_last_crop_to_whole_patches():
    mel = torch.randn(80, 201)
    crops = evaluate.split_crops(mel, 192, 16)
    assert [c.shape[-1] for c in crops] == [192, 16]
    assert torch.equal(crops[0], mel[:, :192]) and torch.equal(crops[1][:, :9], mel[:, 192:])
    assert not crops[1][:, 9:].any()


def test_features_equal_a_direct_encoder_computation(tiny):
    # 192 frames: one crop; 400: two crops and 16 frames; 30: padded to 32 frames, 2 columns.
    mels = [torch.randn(80, 192) - 8, torch.randn(80, 400) - 8, torch.randn(80, 30) - 8]
    frames = evaluate.frame_features(tiny, mels, batch_size=2)
    assert [f.shape for f in frames] == [(12, 5 * 192), (12 + 12 + 1, 5 * 192), (2, 5 * 192)]
    # Second clip, second crop, by hand: encode, drop CLS, stack the 5 rows of each column.
    with torch.no_grad():
        tokens = tiny.encode(mels[1][None, None, :, 192:384])[0, 1:]            # [5 * 12, D]
    by_hand = tokens.reshape(5, 12, -1).permute(1, 0, 2).reshape(12, -1)        # [12, 5 * D]
    torch.testing.assert_close(frames[1][12:24], by_hand, atol=1e-5, rtol=1e-5)
    clip = evaluate.clip_features(tiny, mels)
    torch.testing.assert_close(clip[1], frames[1].mean(dim=0), atol=1e-5, rtol=1e-5)


def test_clap_audio_embedding_of_a_crop_length_clip_is_encode_audio(tiny):
    mel = torch.randn(2, 80, 192) - 8
    ours = evaluate.clap_audio_embeddings(tiny, list(mel))
    torch.testing.assert_close(ours, tiny.encode_audio(mel[:, None]), atol=1e-5, rtol=1e-5)


def test_retrieval_metrics_by_hand():
    # 3 clips; captions 0,1 -> clip 0, caption 2 -> clip 1, caption 3 -> clip 2.
    caption_clip = torch.tensor([0, 0, 1, 2])
    similarity = torch.tensor([[0.1, 0.9, 0.5, 0.0],    # clip 0: ranks caption 1 first (correct)
                               [0.8, 0.0, 0.7, 0.05],   # clip 1: caption 2 second
                               [0.9, 0.0, 0.2, 0.1]])   # clip 2: caption 3 third
    r = evaluate.retrieval_metrics(similarity, caption_clip)
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
    assert evaluate.zero_shot_accuracy(audio, class_text, [{0}, {0, 2}, {2}]) == pytest.approx(200 / 3)
    assert evaluate.zero_shot_accuracy(audio, class_text, [{0}, {0, 1}, {2}]) == pytest.approx(100)
