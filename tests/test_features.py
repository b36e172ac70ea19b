"""Tests of features.py: features of clips of any length, the HEAR functions on waveforms (and the HEAR
validator), CLAP embeddings, bad input, and corpus embedding."""

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import data
import features
import model as m2d
import runs


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return m2d.M2DCLAP(m2d.preset("tiny", text_dim=8)).eval()


@pytest.fixture
def stage1_checkpoint(stage1_run):
    return stage1_run / "last.pt"


def test_feature_crops_pad_the_normalised_log_mel_and_never_exceed_the_crop():
    mel = torch.randn(80, 201)
    crops = features.feature_crops(mel, 192, 16)
    assert [c.shape[-1] for c in crops] == [192, 16]
    assert torch.equal(crops[0], mel[:, :192]) and torch.equal(crops[1][:, :9], mel[:, 192:])
    assert not crops[1][:, 9:].any()  # zeros in normalised units
    # A last crop of 190 frames would pad to 192 (12 patches) and one of 1000 frames to 1008: the crop
    # stays at 1001 frames (62 patches), as the authors' runtime has it.
    assert [c.shape[-1] for c in features.feature_crops(torch.randn(80, 1001 + 1000), 1001, 16)] == [1001, 1001]
    assert [c.shape[-1] for c in features.feature_crops(torch.randn(80, 2002), 1001, 16)] == [1001, 1001]
    assert [c.shape[-1] for c in features.feature_crops(torch.randn(80, 1), 1001, 16)] == [16]


def test_features_equal_a_direct_encoder_computation(tiny):
    # 192 frames: one crop; 400: two crops and 16 frames; 30: padded to 32 frames, 2 columns.
    mels = [torch.randn(80, 192) - 8, torch.randn(80, 400) - 8, torch.randn(80, 30) - 8]
    frames = features.frame_features(tiny, mels, batch_size=2)
    assert [f.shape for f in frames] == [(12, 5 * 192), (12 + 12 + 1, 5 * 192), (2, 5 * 192)]
    with torch.no_grad():
        # Second clip, second crop, by hand: encode, drop CLS, stack the 5 rows of each column.
        tokens = tiny.encode(mels[1][None, None, :, 192:384])[0, 1:]                # [5 * 12, D]
        by_hand = tokens.reshape(5, 12, -1).permute(1, 0, 2).reshape(12, -1)        # [12, 5 * D]
        torch.testing.assert_close(frames[1][12:24], by_hand, atol=1e-5, rtol=1e-5)
        # Third clip: normalised first, then zero-padded to 32 frames.
        x = torch.nn.functional.pad(tiny.normalize(mels[2]), (0, 2))
        tokens = tiny.encode_normalized(x[None, None])[0, 1:]                       # [5 * 2, D]
        by_hand = tokens.reshape(5, 2, -1).permute(1, 0, 2).reshape(2, -1)
        torch.testing.assert_close(frames[2], by_hand, atol=1e-5, rtol=1e-5)
    clip = features.clip_features(tiny, mels)
    torch.testing.assert_close(clip[1], frames[1].mean(dim=0), atol=1e-5, rtol=1e-5)


def test_streaming_gives_the_same_features_in_order_for_any_batch_size(tiny):
    torch.manual_seed(1)
    mels = [torch.randn(80, n) - 8 for n in (5, 192, 700, 30, 193, 384, 1, 64)]
    reference = features.patch_features(tiny, mels, batch_size=64)
    for batch_size in (1, 2, 3):
        streamed = list(features.iter_patch_features(tiny, iter(mels), batch_size))
        assert len(streamed) == len(mels)
        for a, b in zip(streamed, reference):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_clap_audio_embedding_of_a_crop_length_clip_is_encode_audio(tiny):
    mel = torch.randn(2, 80, 192) - 8
    ours = F.normalize(features.clap_audio(tiny, list(mel)), dim=-1)
    torch.testing.assert_close(ours, tiny.encode_audio(mel[:, None]), atol=1e-5, rtol=1e-5)


# --- the HEAR-style API on waveforms ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_embedder(tiny):
    return features.Embedder(tiny, {"stage": "1", "missing_parts": []},
                             features.TextSide("none", unavailable="no text side in this test"))


@pytest.mark.parametrize("samples", [1, 160, 1601, 16000 * 2 + 7, 30_720 * 2 + 33])
def test_hear_functions_give_shapes_dtypes_and_timestamps(tiny_embedder, samples):
    audio = torch.rand(3, samples) * 2 - 1
    frames_per_crop = 192  # the tiny preset's crop: 12 columns of 160 ms, then the next crop at 1.92 s
    frames = 1 + samples // 160
    crops = -(-frames // frames_per_crop)
    last = frames - (crops - 1) * frames_per_crop
    columns = (crops - 1) * 12 + -(-last // 16)
    scene = features.get_scene_embeddings(audio, tiny_embedder)
    assert scene.shape == (3, tiny_embedder.scene_embedding_size) == (3, 5 * 192) and scene.dtype == torch.float32
    emb, times = features.get_timestamp_embeddings(audio, tiny_embedder)
    assert emb.shape == (3, columns, tiny_embedder.timestamp_embedding_size) and emb.dtype == torch.float32
    assert times.shape == (3, columns) and times.dtype == torch.float64
    expected = [k * 1920 + j * 160 + 80 for k in range(crops) for j in range(12)][:columns]
    assert times[2].tolist() == expected
    torch.testing.assert_close(scene, emb.mean(dim=1))
    flat, _ = features.get_timestamp_embeddings(audio, tiny_embedder, flat=True)
    assert flat.shape == (3, columns, 192)
    torch.testing.assert_close(flat, emb.reshape(3, columns, 5, 192).mean(dim=2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(features.get_scene_embeddings(audio, tiny_embedder, flat=True), flat.mean(dim=1))
    assert features.encode_clap_audio(audio, tiny_embedder).shape == (3, 192)


def test_clips_in_a_batch_do_not_affect_each_other(tiny_embedder):
    audio = torch.rand(4, 5000) * 2 - 1
    together = features.get_scene_embeddings(audio, tiny_embedder)
    alone = torch.cat([features.get_scene_embeddings(a[None], tiny_embedder) for a in audio])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_bad_waveforms_and_missing_text_side_say_what_to_do(tiny_embedder):
    with pytest.raises(ValueError, match=r"\[n_sounds, n_samples\].*got shape \(2, 3, 100\)"):
        features.get_scene_embeddings(torch.zeros(2, 3, 100), tiny_embedder)
    with pytest.raises(ValueError, match="cannot encode text: no text side in this test"):
        features.encode_clap_text(["a dog"], tiny_embedder)


# --- embedding a corpus ----------------------------------------------------------------------


def test_embed_command_writes_every_readable_file_resumes_and_reports_the_rest(stage1_checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    sf.write(corpus / "stereo44k.flac", 0.1 * rng.standard_normal((44100 * 3, 2)), 44100)
    sf.write(corpus / "sub" / "narrow8k.wav", 0.1 * rng.standard_normal(8000 * 2), 8000)
    sf.write(corpus / "ten_seconds.wav", 0.1 * rng.standard_normal(160000), 16000)
    sf.write(corpus / "three_minutes.wav", 0.1 * rng.standard_normal(16000 * 180).astype(np.float32), 16000)
    (corpus / "corrupt.wav").write_bytes(b"RIFF\x00\x10\x00\x00WAVEfmt garbage")
    (corpus / "notes.txt").write_text("not audio")
    out = tmp_path / "features"
    first = tmp_path / "first.csv"
    first.write_text("file_name\nten_seconds.wav\nsub/narrow8k.wav\n")
    features.main(["embed", "--checkpoint", str(stage1_checkpoint), "--audio", str(first), "--audio-root",
                   str(corpus), "--out", str(out), "--frames"])
    assert "2 file(s) written, 0 done before, 0 unreadable" in capsys.readouterr().out

    features.main(["embed", "--checkpoint", str(stage1_checkpoint), "--audio", str(corpus), "--out", str(out),
                   "--frames", "--workers", "1"])  # audio decoded in a loader worker
    printed = capsys.readouterr()
    assert "2 file(s) written, 2 done before, 1 unreadable" in printed.out
    assert "notes.txt" in printed.out and "files/s" in printed.err
    with open(out / "index.csv", newline="") as f:
        index = {row["file_name"]: row for row in csv.DictReader(f)}
    assert sorted(index) == ["stereo44k.flac", "sub/narrow8k.wav", "ten_seconds.wav", "three_minutes.wav"]
    with open(out / "unreadable.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert [r["file_name"] for r in report] == ["corrupt.wav"] and "cannot be decoded" in report[0]["error"]

    model = features.load_model(stage1_checkpoint)
    for name, row in index.items():
        wave = data.load_audio(corpus / name)  # downmixed and resampled to 16 kHz
        clip = np.load(out / row["clip"])
        frames = np.load(out / row["frames"])
        assert clip.dtype == frames.dtype == np.float32 and clip.shape == (5 * 192,)
        assert frames.shape == (int(row["columns"]), 5 * 192)
        assert float(row["seconds"]) == pytest.approx(len(wave) / 16000, abs=1e-3)
        expected = features.get_scene_embeddings(wave[None], model)[0]
        np.testing.assert_allclose(clip, expected.numpy(), atol=1e-4)
        np.testing.assert_allclose(np.load(out / row["clap"]), features.encode_clap_audio(wave[None], model)[0],
                                   atol=1e-4)
    # 18001 frames: 93 full 192-frame crops of 12 columns, then 145 frames padded to 10 patches
    assert int(index["three_minutes.wav"]["columns"]) == 93 * 12 + 10


# --- HEAR conventions -------------------------------------------------------------------------


def test_hear_validator_passes_on_our_checkpoint(stage1_checkpoint):
    """The HEAR kit's own check, as a user runs it: the module is imported by name from the checkout."""
    pytest.importorskip("hearvalidator")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "hearvalidator.validate", "features", "--model",
                           str(stage1_checkpoint), "--device", "cpu"],
                          cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Looks good!" in done.stdout


def test_load_model_without_a_path_takes_the_newest_run_or_says_which_file_to_pass(stage1_checkpoint, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint under runs/stage\{1,1.1,2,2.1\}.*load_model\(PATH\)"):
        features.load_model()
    (tmp_path / "runs" / "stage1").mkdir(parents=True)
    (tmp_path / "runs" / "stage1" / "last.pt").write_bytes(stage1_checkpoint.read_bytes())
    assert features.load_model().info["path"] == str(Path("runs/stage1/last.pt"))
    # The most recently written run, not the latest stage: a stale stage 2 loses to a fresh stage 1.
    (tmp_path / "runs" / "stage2").mkdir()
    (tmp_path / "runs" / "stage2" / "last.pt").write_bytes(stage1_checkpoint.read_bytes())
    os.utime(tmp_path / "runs" / "stage2" / "last.pt", (1e9, 1e9))
    assert features.newest_run() == Path("runs/stage1/last.pt")
    os.utime(tmp_path / "runs" / "stage1" / "last.pt", (5e8, 5e8))
    assert features.load_model().info["path"] == str(Path("runs/stage2/last.pt"))


def test_timestamps_of_a_25_s_clip_are_regular_and_within_the_documented_bound():
    # A 2025-shaped crop (1001 frames: 62 columns and 9 frames left over), on a small encoder.
    torch.manual_seed(0)
    small = m2d.M2DCLAP(m2d.preset("tiny", crop_frames=1001, text_dim=8)).eval()
    embedder = features.Embedder(small, {"stage": "1", "missing_parts": []}, features.TextSide("none"))
    audio = torch.rand(2, 25 * 16000) * 2 - 1
    frames, times = features.get_timestamp_embeddings(audio, embedder)
    assert frames.shape[1] == times.shape[1] == 62 + 62 + 32                   # 2501 frames: 1001 + 1001 + 499
    steps = torch.diff(times)
    assert bool(((steps - steps.mean()).abs() < 1e-3).all())                 # HEAR's regularity check
    i = torch.arange(times.shape[1])
    centre = ((i // 62) * 1001 + (i % 62) * 16 + 8) * 10.0                    # true column centres in ms
    lateness = times[0] - centre
    assert lateness.min() >= 0 and lateness.max() <= 88.6 and lateness.max() > 80
    # The features are those of the runtime's crops, whatever the timestamps say.
    x = small.normalize(data.log_mel(audio[0]))[:, 1001:2002]
    tokens = small.encode_normalized(x[None, None])[0, 1:]                    # [5 * 62, D]
    by_hand = tokens.reshape(5, 62, -1).permute(1, 0, 2).reshape(62, -1)       # [62, 5 * D]
    torch.testing.assert_close(frames[0, 62:124], by_hand, atol=1e-5, rtol=1e-5)


# --- bad input, as a new user gives it --------------------------------------------------------


def test_soundfile_stereo_layout_is_refused_with_the_fix(tiny_embedder):
    stereo = torch.rand(16000 * 3, 2) * 2 - 1                                 # sf.read's [n_samples, n_channels]
    with pytest.raises(ValueError, match=r"\(48000, 2\).*\[n_samples, n_channels\].*\[n_sounds, n_samples\].*"
                                         r"audio.mean\(1\)\[None\].*audio.T"):
        features.get_scene_embeddings(stereo, tiny_embedder)
    assert features.get_scene_embeddings(stereo.mean(1)[None], tiny_embedder).shape == (1, 5 * 192)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_samples_are_refused(tiny_embedder, bad):
    audio = torch.zeros(3, 4000)
    audio[1, 17] = bad
    with pytest.raises(ValueError, match=r"1 NaN or infinite samples, in clip\(s\) \[1\]"):
        features.get_timestamp_embeddings(audio, tiny_embedder)
    with pytest.raises(ValueError, match="NaN or infinite"):
        features.encode_clap_audio(audio, tiny_embedder)


def test_integer_samples_are_refused(tiny_embedder):
    with pytest.raises(ValueError, match=r"torch.int16.*audio / 32768"):
        features.get_scene_embeddings(torch.zeros(1, 4000, dtype=torch.int16), tiny_embedder)


def test_texts_must_be_a_list_and_an_empty_list_gives_an_empty_tensor(tiny_embedder):
    with pytest.raises(TypeError, match=r"a list of strings, got one string \('a dog barks'\); pass \[text\]"):
        features.encode_clap_text("a dog barks", tiny_embedder)
    with pytest.raises(TypeError, match="a list of strings; got int 3"):
        features.encode_clap_text(["a dog", 3], tiny_embedder)
    sentences = np.zeros((0, 8), dtype=np.float32)
    assert features.encode_clap_text([], tiny_embedder, sentence_embeddings=sentences).shape == (0, 192)


def test_an_empty_text_list_gives_an_empty_tensor_through_a_text_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    torch.manual_seed(0)
    clap = m2d.M2DCLAP(m2d.preset("tiny", text_dim=32), text_encoder=transformers.BertModel(config)).eval()
    embedder = features.Embedder(clap, {"stage": "2", "missing_parts": []},
                                 features.TextSide("encoder", tokenizer=object()))
    empty = features.encode_clap_text([], embedder)
    assert empty.shape == (0, 192) and empty.dtype == torch.float32


def test_empty_or_blank_texts_are_refused_with_their_indices(tiny_embedder):
    with pytest.raises(ValueError, match=r"texts at index \[1, 2\] \(2 of 3\) are empty or whitespace only.*"
                                         r"Drop them, or give each a caption"):
        features.encode_clap_text(["a dog", "", " \n\t"], tiny_embedder, sentence_embeddings=np.zeros((3, 8)))
    with pytest.raises(ValueError, match=r"texts at index \[0\]"):
        features.encode_clap_text([""], tiny_embedder)  # before the model's text side is asked for
    kept = features.encode_clap_text(["a dog"], tiny_embedder, sentence_embeddings=np.zeros((1, 8)))
    assert kept.shape == (1, 192)


# --- the command line ---------------------------------------------------------------------------


def test_help_lists_the_commands_and_a_missing_or_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as done:
        features.main(["--help"])
    printed = capsys.readouterr()
    assert done.value.code == 0 and printed.err == ""
    for command in ("embed", "export", "tag"):
        assert re.search(rf"^  {command} +\w.+$", printed.out, re.MULTILINE), printed.out
    assert "python features.py COMMAND --help" in printed.out
    for argv, problem in (([], "no command given"), (["bogus"], "unknown command 'bogus'")):
        with pytest.raises(SystemExit) as done:
            features.main(argv)
        printed = capsys.readouterr()
        assert done.value.code == 2 and printed.out == ""
        assert printed.err.startswith("usage: features.py {embed,export,tag}") and problem in printed.err


def command_help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        features.main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def help_entries(text: str) -> dict[str, str]:
    """Each argument listed in a --help text (an entry starts two spaces in), its help text on one line."""
    arguments = text[text.index("\n\npositional arguments:\n") if "positional arguments:" in text
                     else text.index("\n\noptions:\n"):]
    entries = re.split(r"\n  (?=\S)", arguments)[1:]
    return {e.split()[0].rstrip(","): " ".join(e.split()) for e in entries}


@pytest.mark.parametrize("command", ["embed", "export", "tag"])
def test_every_option_of_every_command_has_help_stating_its_default(command, capsys):
    text = command_help(command, capsys)
    entries = help_entries(text)
    assert "--help" not in entries and "-h" in entries
    for name, entry in entries.items():
        assert len(entry.split()) > 3, entry  # a help text beside the name
        if name.startswith("--") and "(required)" not in entry:
            assert "(default: " in entry, entry
    if command == "tag":
        assert "(default: 3)" in entries["--top"] and "per file" in entries["--top"]
        assert "any format soundfile reads" in entries["FILE"] and "sample rate and channel count" in entries["FILE"]
        assert "(default: " in entries["--device"]
        description = " ".join(text.split())
        assert "sigmoids for a multi-label task" in description and "softmax otherwise" in description


# --- tagging with a fine-tuned file -----------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned_file(tiny, tmp_path_factory) -> Path:
    """A fine-tuned checkpoint of the tiny model, as finetune.py writes it: 3 classes, single-label, on waveforms."""
    torch.manual_seed(0)
    classifier = m2d.AudioClassifier.from_encoder(tiny, 3, 48)
    torch.nn.init.normal_(classifier.head.weight)  # scores that differ from class to class
    recipe = {"feature": "mean", "raw_input": "wave", "input_frames": 48}
    path = tmp_path_factory.mktemp("finetuned") / "best.pt"
    runs.save_checkpoint(path, **features.finetuned_checkpoint(tiny, classifier, ["bird", "cat", "dog"], False,
                                                               recipe, {}))
    return path


def test_tag_reports_each_unreadable_file_in_one_line_tags_the_others_and_exits_1(finetuned_file, tmp_path,
                                                                                   capsys):
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "a.wav", 0.1 * rng.standard_normal(8000), 16000)
    sf.write(tmp_path / "b.flac", 0.1 * rng.standard_normal((22050, 2)), 44100)
    (tmp_path / "garbage.wav").write_bytes(b"RIFF\x00\x10\x00\x00WAVEfmt garbage")
    files = [tmp_path / "a.wav", tmp_path / "missing.wav", tmp_path / "garbage.wav", tmp_path / "b.flac"]
    with pytest.raises(SystemExit) as done:
        features.main(["tag", "--checkpoint", str(finetuned_file), "--top", "2", "--device", "cpu", *map(str, files)])
    printed = capsys.readouterr()
    assert done.value.code == "2 of 4 file(s) could not be read (listed above); the others are tagged"
    errors = printed.err.splitlines()
    assert len(errors) == 2 and "Traceback" not in printed.err
    assert errors[0].startswith(f"{files[1]}: ") and "not found" in errors[0]
    assert errors[1].startswith(f"{files[2]}: ") and "cannot be decoded" in errors[1]
    model = features.load_model(finetuned_file)
    lines = printed.out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(files[0]), str(files[3])]
    for line, path in zip(lines, (files[0], files[3])):
        scores = features.tag_audio(data.load_audio(path)[None], model)[0]
        assert scores.sum().item() == pytest.approx(1.0, abs=1e-5)  # single-label: softmax
        top = scores.topk(2)
        assert line == f"{path}: " + ", ".join(f"{model.classes[k]} {v:.3f}" for v, k in zip(top.values.tolist(),
                                                                                           top.indices.tolist()))
    features.main(["tag", "--checkpoint", str(finetuned_file), "--device", "cpu", str(files[0])])  # exit 0
    assert len(capsys.readouterr().out.split(", ")) == 3  # --top's default


def test_tag_with_a_checkpoint_that_cannot_tag_stops_in_one_line(finetuned_file, tiny, tmp_path, capsys):
    sf.write(tmp_path / "a.wav", np.zeros(8000), 16000)
    pretrained = tmp_path / "last.pt"
    runs.save_checkpoint(pretrained, stage="1", model_config=asdict(tiny.config), norm_stats=tiny.norm_stats.tolist(),
                         model=tiny.state_dict())
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(1000))
    (tmp_path / "notes.pt").write_text("my notes")
    for checkpoint, reason, *flags in (
            (pretrained, "not a fine-tuned checkpoint.*finetune.py"),
            (tmp_path / "missing.pt", "missing.pt: checkpoint not found"),
            (tmp_path / "random.pt", "random.pt: not a PyTorch checkpoint; it is binary data"),
            (tmp_path / "notes.pt", "notes.pt: not a PyTorch checkpoint; it is a text file starting 'my notes'"),
            (finetuned_file, "--device cuda:99: ", "--device", "cuda:99")):  # no such GPU, or no CUDA at all
        with pytest.raises(SystemExit, match=f"^error: .*{reason}") as done:
            features.main(["tag", "--checkpoint", str(checkpoint), *flags, str(tmp_path / "a.wav")])
        assert "\n" not in done.value.code
        assert capsys.readouterr().out == ""


def folder_state(folder: Path) -> dict:
    """Every file under folder: its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_embed_into_a_folder_of_other_settings_is_refused_and_the_same_settings_resume(stage1_checkpoint, tmp_path,
                                                                                      capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        sf.write(corpus / f"c{i}.wav", 0.1 * np.random.default_rng(i).standard_normal(8000), 16000)
    checkpoint, out = tmp_path / "last.pt", tmp_path / "features"
    checkpoint.write_bytes(stage1_checkpoint.read_bytes())

    def embed(*flags):
        features.main(["embed", "--checkpoint", str(checkpoint), "--audio", str(corpus), "--out", str(out), *flags])
        return capsys.readouterr().out

    assert "2 file(s) written, 0 done before" in embed()
    settings = json.loads((out / "settings.json").read_text())
    assert settings == {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": hashlib.sha256(
        checkpoint.read_bytes()).hexdigest(), "frames": False, "flat": False}
    assert "0 file(s) written, 2 done before" in embed()  # the same settings resume
    before = folder_state(out)
    for flags, change in ((["--frames"], "--frames: off -> on"), (["--flat"], "--flat: off -> on")):
        with pytest.raises(SystemExit, match=rf"^error: {out}: holds features made with other settings "
                                             rf"\({change}\).*a new --out, or --overwrite"):
            embed(*flags)
    # The checkpoint retrained and saved over the same path: the same size and time, other weights.
    ckpt = runs.load_checkpoint(checkpoint)
    ckpt["model"]["blocks.0.attn.qkv.weight"] += 1.0
    stat = checkpoint.stat()
    runs.save_checkpoint(checkpoint, **ckpt)
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert checkpoint.stat().st_size == stat.st_size
    with pytest.raises(SystemExit, match=rf"\(--checkpoint: {checkpoint.resolve()} \(sha256 "
                                         rf"{settings['checkpoint_sha256'][:12]}\) -> {checkpoint.resolve()} "
                                         r"\(sha256 [0-9a-f]{12}\)\)") as refused:
        embed()
    assert "\n" not in refused.value.code
    assert folder_state(out) == before  # refusals touch nothing

    (out / "notes.txt").write_text("mine")
    assert "2 file(s) written, 0 done before" in embed("--frames", "--overwrite")
    assert json.loads((out / "settings.json").read_text())["frames"] is True
    assert (out / "notes.txt").read_text() == "mine"
    with open(out / "index.csv", newline="") as f:
        assert all(row["frames"] for row in csv.DictReader(f))

    for settings_file in ("[1, 2]", None):  # not settings, and none: a folder an earlier version wrote
        (out / "settings.json").unlink()
        if settings_file:
            (out / "settings.json").write_text(settings_file)
        with pytest.raises(SystemExit, match=r"index.csv\) but no readable settings.json.*cannot tell which "
                                             r"checkpoint.*--overwrite to delete its features/, index.csv"):
            embed("--frames")


def test_export_with_bad_paths_stops_in_one_line(stage1_checkpoint, tmp_path):
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(1000))
    (tmp_path / "a_file").write_text("")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for checkpoint, out, reason in (
            (tmp_path / "missing.pt", tmp_path / "w.pth", "missing.pt: checkpoint not found"),
            (tmp_path / "random.pt", tmp_path / "w.pth", "random.pt: not a PyTorch checkpoint"),
            (tmp_path / "tensor.pt", tmp_path / "w.pth", "tensor.pt: not a checkpoint written by train.py"),
            (stage1_checkpoint, tmp_path / "a_file" / "w.pth", "File exists"),
            (stage1_checkpoint, tmp_path, "is a folder; name the file to write")):
        with pytest.raises(SystemExit, match=f"^error: .*{reason}") as done:
            features.main(["export", str(checkpoint), str(out)])
        assert "\n" not in done.value.code
    assert not (tmp_path / "w.pth").exists()
