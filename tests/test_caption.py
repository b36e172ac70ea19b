"""Captioning (caption.py and the pieces it is built from): the decoder's shapes and masks, the loss against a
hand-written one, beam search against exhaustive search on a hand-made language, the scores against aac-metrics,
caption manifests and their errors, a whole tiny run, bit-identical resume, and the written file reloaded to
caption audio (features.caption_audio, caption.py predict)."""

import csv
import itertools
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

import builtin_data
import caption
import data
import features
import losses
import metrics
import model as m2d
import runs
import text_embed

pytest.importorskip("transformers")

TINY = ["--width", "16", "--layers", "1", "--heads", "2", "--positions", "32", "--epochs", "2",
        "--warmup-epochs", "1", "--batch-size", "4", "--beam-width", "2", "--max-tokens", "6", "--device", "cpu"]


def tiny_captioner(vocab_size: int = 12, frame_dim: int = 20, clap_dim: int = 8) -> m2d.AudioCaptioner:
    torch.manual_seed(0)
    words = text_embed.CaptionVocabulary([*text_embed.CaptionVocabulary.SPECIALS, *"abcdefgh"][:vocab_size])
    bart = text_embed.new_caption_decoder(vocab_size, 16, 1, 2, 32, 0.0, words)
    return caption.build_captioner(bart, frame_dim, clap_dim).eval()


# -----------------------------------------------------------------------------
# The decoder, the loss, beam search


def test_prefix_puts_the_clap_token_first_and_masks_padding():
    prefix = m2d.CaptionPrefix(frame_dim=20, width=16, clap_dim=8)
    frames, mask = torch.randn(3, 5, 20), torch.arange(5)[None] < torch.tensor([[5], [3], [1]])
    x, x_mask = prefix(frames, mask, torch.randn(3, 8))
    assert x.shape == (3, 6, 16) and x_mask.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    no_clap = m2d.CaptionPrefix(20, 16)
    assert no_clap(frames, mask)[0].shape == (3, 5, 16) and no_clap(frames, mask)[1].tolist() == mask.long().tolist()


def test_decoder_logits_ignore_padded_columns_and_later_tokens():
    captioner = tiny_captioner()
    frames, mask, clap = torch.randn(2, 6, 20), torch.tensor([[True] * 6, [True] * 4 + [False] * 2]), torch.randn(2, 8)
    tokens = torch.tensor([[1, 4, 5, 6, 7], [1, 8, 9, 0, 0]])
    logits = captioner(frames, mask, clap, tokens)
    assert logits.shape == (2, 5, 12)
    padded = frames.clone()
    padded[1, 4:] = 100.0  # what sits in the padded columns is never read
    assert torch.allclose(captioner(padded, mask, clap, tokens), logits, atol=1e-5)
    later = tokens.clone()
    later[:, 3:] = 10  # the decoder is causal: position 2 reads tokens 0..2 only
    assert torch.allclose(captioner(frames, mask, clap, later)[:, :3], logits[:, :3], atol=1e-5)
    assert (captioner(frames.flip(0), mask, clap, tokens)[0] - logits[0]).abs().max() > 1e-5  # the frames are read
    memory, memory_mask = captioner.encode(frames, mask, clap)  # one step of the search = teacher forcing
    step = captioner.next_log_probs(memory[1:2], memory_mask[1:2], tokens[1:, :2])
    assert torch.allclose(step[0], logits[1, 1].log_softmax(-1), atol=1e-5)


def test_caption_loss_is_the_mean_cross_entropy_over_real_tokens():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=generator)
    targets = torch.tensor([[3, 4, 2, 0], [5, 2, 0, 0]])  # pad 0
    rows, wanted = logits.tolist(), targets.tolist()
    terms = [-math.log(math.exp(rows[b][k][wanted[b][k]]) / sum(math.exp(v) for v in rows[b][k]))
             for b in range(2) for k in range(4) if wanted[b][k] != 0]
    assert losses.caption_loss(logits, targets, pad_id=0).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


START, END, A, B = 0, 1, 2, 3
# A hand-made language: A is the likelier first word, but every sentence through A is poor; "B" then the end is best.
NEXT = {(START,): [0.0, 0.6, 0.4], (START, A): [0.3, 0.35, 0.35], (START, B): [0.9, 0.05, 0.05],
        (START, A, A): [0.3, 0.35, 0.35], (START, A, B): [0.3, 0.35, 0.35], (START, B, A): [0.4, 0.3, 0.3],
        (START, B, B): [0.4, 0.3, 0.3]}  # probabilities of END, A, B


def hand_made(prefixes: torch.Tensor) -> torch.Tensor:
    probs = torch.tensor([[1e-9, *NEXT[tuple(p)]] for p in prefixes.tolist()])  # [N, V]; START is never next
    return probs.log()


def test_beam_search_returns_the_highest_scoring_sentence():
    def score(tokens):  # the mean log-probability per token, the end token included where the sentence ends
        logp = [hand_made(torch.tensor([[START, *tokens[:k]]]))[0, t].item() for k, t in enumerate(tokens)]
        return sum(logp) / len(logp)
    ended = [[*w, END] for n in range(0, 3) for w in itertools.product([A, B], repeat=n)]
    unfinished = [list(w) for w in itertools.product([A, B], repeat=3)]  # cut at max_tokens = 3
    best = max(ended + unfinished, key=score)
    assert best == [B, END]
    assert m2d.beam_search(hand_made, START, END, beam_width=2, max_tokens=3) == [B]
    assert m2d.beam_search(hand_made, START, END, beam_width=1, max_tokens=3)[0] == A  # greedy is led astray


# -----------------------------------------------------------------------------
# Scores


CANDIDATES = ["A dog barks.", "Rain falls on a roof", "a bell rings twice"]
REFERENCES = [["A dog is barking.", "a dog barks loudly"], ["rain falls on the roof", "Heavy rain."],
              ["a bell is ringing", "bells ring, then silence"]]


def test_caption_scores_are_aac_metrics_on_normalised_captions():
    aac = pytest.importorskip("aac_metrics.functional")
    scores, not_computed = metrics.caption_scores(CANDIDATES, REFERENCES)
    clean = [" ".join(metrics.caption_words(c)) for c in CANDIDATES]
    clean_refs = [[" ".join(metrics.caption_words(r)) for r in rs] for rs in REFERENCES]
    assert clean[0] == "a dog barks" and clean_refs[2][1] == "bells ring then silence"
    assert scores["cider_d"] == pytest.approx(aac.cider_d(clean, clean_refs)[0]["cider_d"].item())
    assert scores["bleu_4"] == pytest.approx(aac.bleu_4(clean, clean_refs)[0]["bleu_4"].item())
    assert scores["rouge_l"] == pytest.approx(aac.rouge_l(clean, clean_refs)[0]["rouge_l"].item())
    assert set(scores) | set(not_computed) == {"cider_d", "bleu_4", "rouge_l", "meteor", "spice", "spider"}
    # ROUGE-L by hand: "a dog barks" against "a dog is barking": LCS 2, P 2/3, R 2/4, F with beta 1.2
    p, r = 2 / 3, 2 / 4
    expected = (1 + 1.2 ** 2) * p * r / (r + 1.2 ** 2 * p)
    pair = metrics.caption_scores(["a dog barks"] * 2, [["A dog is barking!"]] * 2)[0]
    assert pair["rouge_l"] == pytest.approx(expected)
    perfect = metrics.caption_scores(["A bell rings twice, far away.", "Heavy rain falls on a tin roof"],
                                     [["a bell rings twice far away"], ["heavy rain falls on a tin roof!"]])[0]
    assert perfect["bleu_4"] == pytest.approx(1.0, abs=1e-6) and perfect["rouge_l"] == pytest.approx(1.0)
    _, one_clip = metrics.caption_scores(["a dog barks"], [["a dog barks"]])
    assert "at least 2 clips" in one_clip["cider_d"]


def test_vocabulary_round_trip_and_unknown_words():
    words = text_embed.CaptionVocabulary.from_captions(["A dog barks.", "a dog runs"])
    assert words.words[:7] == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog", "barks"]
    ids = words.encode("A dog flies!")
    assert ids == [4, 5, words.unk_id, words.eos_id]
    assert words.decode([4, 5, 6, words.eos_id, 4]) == "a dog barks"
    assert text_embed.caption_tokenizer(words.record()).words == words.words


def test_learning_rate_warms_up_then_decays_to_its_floor():
    recipe = caption.CaptionRecipe(lr=1e-3, lr_min=1e-5, epochs=10, warmup_epochs=2)
    assert caption.lr_at(0, 5, recipe) == 0.0 and caption.lr_at(5, 5, recipe) == pytest.approx(5e-4)
    assert caption.lr_at(10, 5, recipe) == pytest.approx(1e-3)
    assert caption.lr_at(50, 5, recipe) == pytest.approx(1e-5)


def test_long_clips_have_their_columns_averaged_to_fit():
    frames = torch.arange(10.0)[:, None].expand(10, 3)
    fitted = features.fit_columns(frames, 4)  # groups of 3: (0 1 2) (3 4 5) (6 7 8) (9)
    assert fitted[:, 0].tolist() == [1.0, 4.0, 7.0, 9.0]
    assert features.fit_columns(frames, 10) is frames


# -----------------------------------------------------------------------------
# Manifests


def write_manifest(root, header: str, rows: list[str], n_clips: int = 4) -> str:
    for i in range(n_clips):
        sf.write(root / f"c{i}.wav", 0.1 * np.random.default_rng(i).standard_normal(8000).astype(np.float32), 16000)
    (root / "m.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return str(root / "m.csv")


def test_both_manifest_layouts_give_each_clip_all_its_captions(tmp_path):
    one_per_row = write_manifest(tmp_path, "file_name,caption,split,label",
                                 ["c0.wav,a dog,train,x", "c0.wav,a barking dog,train,x", "c1.wav,rain,test,y"])
    m = data.read_caption_manifest(one_per_row)
    assert m.files == ["c0.wav", "c1.wav"] and m.captions == [["a dog", "a barking dog"], ["rain"]]
    clotho = write_manifest(tmp_path, "file_name,caption_1,caption_2,caption_10,split",
                            ["c0.wav,one,two,ten,train", "c1.wav,rain,,,valid", "c2.wav,wind,gust,,test"])
    m = data.read_caption_manifest(clotho)
    assert m.captions == [["one", "two", "ten"], ["rain"], ["wind", "gust"]] and m.split == ["train", "valid", "test"]


@pytest.mark.parametrize("header,rows,message", [
    ("file_name,caption", ["c0.wav,a dog"], r"no split column\. A caption manifest needs file_name, split"),
    ("file_name,split,label", ["c0.wav,train,x"], r"no caption column"),
    ("file_name,caption,caption_1,split", ["c0.wav,a,b,train"], r"both a caption column and caption_1"),
    ("file_name,caption,split", ["c0.wav,a dog,train", "c1.wav,,test"],
     r"m\.csv, line 3: c1\.wav has no caption on this row"),
    ("file_name,caption,split", ["c0.wav,a dog,training"],
     r"line 2: split must be train, valid or test, got 'training'"),
    ("file_name,caption,split", ["c0.wav,a dog,train", "c0.wav,a cat,test"],
     r"line 3: c0\.wav is in split 'test' here but 'train' on line 2; a file belongs to one split"),
    ("file_name,caption,split", ["c0.wav,a dog,train"], r"no clip in the test split"),
    ("file_name,caption,split", ["c0.wav,a dog,train", "gone.wav,a cat,test"],
     r"1 audio file\(s\) such as .*gone\.wav not found\. Fix file_name or pass the right --audio-root"),
])
def test_bad_manifests_are_refused_naming_the_line_and_the_fix(tmp_path, header, rows, message):
    with pytest.raises(data.ManifestError, match=message):
        caption.load_manifest(write_manifest(tmp_path, header, rows), None)


def test_builtin_captions_are_the_committed_rows_with_their_embeddings():
    m = builtin_data.builtin_caption_set()
    assert [len(m.indices(part)) for part in ("train", "valid", "test")] == [1000, 250, 250]
    assert all(len(c) == 2 for c in m.captions)
    for part, first in (("valid", 1000), ("test", 1250)):
        table = text_embed.load_caption_embeddings(builtin_data.builtin_csv(part))
        assert m.captions[first] == table.captions[:2] and m.files[first] == table.file_names[0]
        assert np.array_equal(m.caption_embeddings[2 * first:2 * first + 500], table.embeddings)
    names = [set(m.files[i] for i in m.indices(part)) for part in ("train", "valid", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])  # the valid clips are new clips


def test_best_pt_is_chosen_on_the_valid_loss_never_on_the_test_scores():
    runs = [{"seed": 0, "valid_loss": 0.50, "scores": {"cider_d": 3.0}},
            {"seed": 1, "valid_loss": 0.40, "scores": {"cider_d": 2.0}}]
    assert max(runs, key=caption.rank_key)["seed"] == 1
    unselected = [{"seed": 0, "test_loss": 0.5, "scores": {"cider_d": 2.0}},
                  {"seed": 1, "test_loss": 0.4, "scores": {"cider_d": 3.0}}]
    assert max(unselected, key=caption.rank_key)["seed"] == 0  # no valid clips: the first seed's, not the best


# -----------------------------------------------------------------------------
# Whole runs


def captioned_clips(root) -> str:
    """12 half-second WAVs, each a tone whose pitch its captions name (8 train, 4 test): the manifest's path."""
    words = ["low", "middle", "high"]
    rows = []
    for i in range(12):
        t = np.arange(8000) / 16000
        noise = 0.01 * np.random.default_rng(i).standard_normal(8000)
        wave = 0.3 * np.sin(2 * np.pi * (300 + 900 * (i % 3)) * t) + noise
        sf.write(root / f"c{i}.wav", wave.astype(np.float32), 16000)
        rows.append(f"c{i}.wav,a {words[i % 3]} tone,a {words[i % 3]} pitched tone,{'train' if i < 8 else 'test'}")
    (root / "m.csv").write_text("file_name,caption_1,caption_2,split\n" + "\n".join(rows) + "\n")
    return str(root / "m.csv")


@pytest.fixture(scope="module")
def caption_run(stage1_run, tmp_path_factory):
    """A whole tiny run with both baselines and the CLAP prefix (the builtin recipe leaves it out) on a manifest of
    12 clips: (its folder, the manifest)."""
    root = tmp_path_factory.mktemp("caption")
    manifest = captioned_clips(root)
    caption.main(["--encoder", str(stage1_run / "last.pt"), "--manifest", manifest, "--out-dir",
                  str(root / "run"), "--clap-prefix", *TINY])
    return root / "run", manifest


def test_a_tiny_run_writes_every_output(caption_run):
    out, _ = caption_run
    result = json.loads((out / "result.json").read_text())
    assert result["clips"] == {"train": 8, "valid": 0, "test": 4} and result["selection"].startswith("the last epoch")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["encoder"], r["epoch"]) for r in records] == [("pretrained", 1), ("pretrained", 2),
                                                             ("random_init", 1), ("random_init", 2)]
    assert all(r["step"] == 4 * r["epoch"] for r in records)  # 16 caption pairs, batches of 4
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file_name"] for r in rows] == ["c8.wav", "c9.wav", "c10.wav", "c11.wav"]
    assert rows[0]["references"] == "a high tone | a high pitched tone" and "random_init_caption" in rows[0]
    assert {"caption", "nearest_caption"} <= set(rows[0])
    assert all(r["nearest_caption"] in {"a low tone", "a low pitched tone", "a middle tone", "a middle pitched tone",
                                        "a high tone", "a high pitched tone"} for r in rows)
    if result["scores"]:  # aac-metrics installed
        assert set(result["scores"]) == {"pretrained", "random_init", "nearest_caption"}
        assert {"cider_d", "bleu_4", "rouge_l"} <= set(result["computed"])
    assert (out / "best.pt").is_file() and (out / "resume.pt").is_file()
    assert runs.load_checkpoint(out / "best.pt")["captioner"]["prefix"]["clap_dim"] > 0


def test_the_written_file_reloads_and_captions_as_the_run_did(caption_run, tmp_path, capsys):
    out, manifest = caption_run
    model = features.load_model(out / "best.pt")
    with open(out / "predictions.csv", newline="") as f:
        written = [r["caption"] for r in csv.DictReader(f)]
    audio = torch.stack([data.load_audio(out.parent / f"c{i}.wav") for i in range(8, 12)])
    assert features.caption_audio(audio, model) == written
    (tmp_path / "bad.wav").write_text("not audio")
    files = [str(out.parent / "c8.wav"), str(tmp_path / "bad.wav"), str(out.parent / "c9.wav")]
    with pytest.raises(SystemExit, match=r"1 of 3 file\(s\) could not be read"):
        caption.main(["predict", "--checkpoint", str(out / "best.pt"), "--device", "cpu", *files])
    printed = capsys.readouterr()
    assert printed.out.splitlines() == [f"{files[0]}: {written[0]}", f"{files[2]}: {written[1]}"]
    assert "bad.wav: cannot be decoded as audio" in printed.err


def test_predict_refuses_a_checkpoint_without_a_decoder(stage1_run, capsys):
    with pytest.raises(SystemExit, match=r"not a captioning checkpoint .* needs the best\.pt that caption\.py writes"):
        caption.main(["predict", "--checkpoint", str(stage1_run / "last.pt"), "--device", "cpu", "x.wav"])


def test_resume_after_a_stop_is_bit_identical(stage1_run, tmp_path):
    args = ["--encoder", str(stage1_run / "last.pt"), "--manifest", captioned_clips(tmp_path), "--no-baselines",
            *TINY, "--epochs", "3"]
    caption.main([*args, "--out-dir", str(tmp_path / "whole")])
    caption.main([*args, "--out-dir", str(tmp_path / "parts"), "--epochs-limit", "2"])
    assert not (tmp_path / "parts" / "best.pt").exists()
    caption.main([*args, "--out-dir", str(tmp_path / "parts")])
    for name, key in (("resume.pt", "model"), ("resume.pt", "optimizer"), ("best.pt", "captioner")):
        whole, parts = (runs.load_checkpoint(tmp_path / run / name)[key] for run in ("whole", "parts"))
        flat_whole, flat_parts = (torch.utils._pytree.tree_flatten(x)[0] for x in (whole, parts))
        assert len(flat_whole) == len(flat_parts)
        assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(flat_whole, flat_parts))
    logs = [(tmp_path / run / "log.jsonl").read_text() for run in ("whole", "parts")]
    assert logs[0] == logs[1] and len(logs[0].splitlines()) == 3
    assert (tmp_path / "whole" / "predictions.csv").read_text() == (tmp_path / "parts" / "predictions.csv").read_text()
    with pytest.raises(SystemExit, match=r"resume.pt: cannot resume with other settings than the run's "
                                         r"\(recipe.epochs 3 -> 4\)"):
        caption.main([*args, "--out-dir", str(tmp_path / "parts"), "--epochs", "4"])


def local_bart(folder) -> str:
    """A tiny BART saved as a pretrained folder would be (config, weights, a byte-level BPE tokenizer of single
    letters), standing in for a downloaded bart-base: nothing is fetched."""
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *letters, *("\u0120" + c for c in letters),
                                         "\u0120", "<mask>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_position_embeddings=64)
    BartForConditionalGeneration(config).save_pretrained(folder / "bart")
    BartTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder / "bart")
    return str(folder / "bart")


def test_a_pretrained_bart_folder_trains_with_its_own_tokenizer_and_reloads(stage1_run, tmp_path):
    folder = local_bart(tmp_path)
    out = tmp_path / "run"
    caption.main(["--encoder", str(stage1_run / "last.pt"), "--manifest", captioned_clips(tmp_path),
                  "--decoder", folder, "--no-baselines", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8",
                  "--max-tokens", "5", "--device", "cpu", "--out-dir", str(out)])
    ckpt = runs.load_checkpoint(out / "best.pt")
    assert ckpt["captioner"]["prefix"]["clap_dim"] == 0  # the builtin recipe: frames only
    assert ckpt["captioner"]["tokenizer"] == {"kind": "pretrained", "folder": folder}
    assert ckpt["captioner"]["language_model_config"]["decoder_start_token_id"] == 2  # BART's: </s>, then <s>
    model = features.load_model(out / "best.pt")
    assert model.caption_tokenizer.encode("a tone") == [0, 4, 56, 23, 18, 17, 8, 2]  # <s> a ' t' o n e </s>
    with open(out / "predictions.csv", newline="") as f:
        written = [r["caption"] for r in csv.DictReader(f)]
    audio = torch.stack([data.load_audio(tmp_path / f"c{i}.wav") for i in range(8, 12)])
    assert features.caption_audio(audio, model) == written
    (tmp_path / "bart").rename(tmp_path / "moved")
    moved = features.load_model(out / "best.pt")
    with pytest.raises(ValueError, match=r"cannot write captions: .*caption.py predict --decoder FOLDER"):
        features.caption_audio(audio, moved)
