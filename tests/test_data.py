"""Tests of data.py: the log-mel front end, resampling, audio reading, datasets."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import text_embed


# --- front end -------------------------------------------------------------------------------


def test_mel_filterbank_matches_librosa_slaney():
    librosa = pytest.importorskip("librosa")
    expected = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80, fmin=50, fmax=8000, htk=False, norm="slaney")
    ours = data.mel_filterbank().numpy()
    assert ours.shape == (80, 201)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-8)


def test_slaney_mel_scale_is_linear_below_1khz_and_logarithmic_above():
    assert data.hz_to_mel(200.0) == pytest.approx(3.0)
    assert data.hz_to_mel(1000.0) == pytest.approx(15.0)
    assert data.hz_to_mel(6400.0) == pytest.approx(15.0 + 27.0)
    hz = np.array([50.0, 700.0, 1000.0, 3000.0, 8000.0])
    np.testing.assert_allclose(data.mel_to_hz(data.hz_to_mel(hz)), hz)


def reference_log_mel(wave: np.ndarray) -> np.ndarray:
    """The front end written out in float64 numpy (the authors' runtime settings).

    Framing, periodic Hann, rfft, Slaney mel."""
    librosa = pytest.importorskip("librosa")
    padded = np.pad(wave.astype(np.float64), 200, mode="reflect")
    n_frames = 1 + len(wave) // 160
    frames = np.stack([padded[i * 160:i * 160 + 400] for i in range(n_frames)])      # [T, 400]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)                       # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2                           # [T, 201]
    fb = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80, fmin=50, fmax=8000, dtype=np.float64)
    return np.log(fb @ power.T + np.finfo(np.float32).eps)                              # [80, T]


def test_log_mel_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    ours = data.log_mel(torch.from_numpy(wave)).numpy()
    assert ours.shape == (80, 201)  # 100 frames per second, centred
    np.testing.assert_allclose(ours, reference_log_mel(wave), atol=2e-4)


def test_log_mel_of_silence_is_log_eps_and_batches_work():
    mel = data.log_mel(torch.zeros(2, 3, 1600))
    assert mel.shape == (2, 3, 80, 11)
    torch.testing.assert_close(mel, torch.full_like(mel, math.log(1.1920929e-07)))


# --- resampling ------------------------------------------------------------------------------


def sine(freq_hz, sr, seconds=1.0):
    return torch.sin(2 * math.pi * freq_hz * torch.arange(int(sr * seconds), dtype=torch.float64) / sr).float()


@pytest.mark.parametrize("orig_sr", [44100, 48000, 22050, 8000, 32000])
def test_resample_keeps_an_in_band_tone(orig_sr):
    out = data.resample(sine(1000, orig_sr), orig_sr, 16000)
    assert out.shape == (16000,)
    expected = sine(1000, 16000)
    middle = slice(800, -800)  # away from the zero-padded edges
    assert (out[middle] - expected[middle]).abs().max() < 2e-3


@pytest.mark.parametrize("orig_sr,freq_hz", [(44100, 10000), (48000, 12000), (32000, 9000)])
def test_resample_removes_what_would_alias(orig_sr, freq_hz):
    out = data.resample(sine(freq_hz, orig_sr), orig_sr, 16000)
    rms = out[800:-800].pow(2).mean().sqrt()
    assert 20 * math.log10(rms / math.sqrt(0.5)) < -60  # more than 60 dB down


def test_resample_length_and_identity():
    x = torch.randn(2, 44101)
    assert data.resample(x, 44100, 16000).shape == (2, math.ceil(44101 * 160 / 441))
    assert data.resample(x, 16000, 16000) is x


# --- reading audio ---------------------------------------------------------------------------


def test_load_audio_mixes_down_and_resamples(tmp_path):
    t = np.arange(44100) / 44100
    left = 0.5 * np.sin(2 * np.pi * 500 * t)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    sf.write(tmp_path / "stereo.flac", stereo, 44100)
    wave = data.load_audio(tmp_path / "stereo.flac")
    assert wave.dtype == torch.float32 and wave.shape == (16000,)
    expected = 0.25 * sine(500, 16000)
    assert (wave[800:-800] - expected[800:-800]).abs().max() < 2e-3  # 16-bit FLAC rounding included


@pytest.mark.parametrize("content,problem", [
    (b"this is not audio at all", "cannot be decoded"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "cannot be decoded"),  # truncated header
])
def test_load_audio_names_an_unreadable_file(tmp_path, content, problem):
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(data.AudioError, match=problem) as e:
        data.load_audio(path)
    assert str(path) in str(e.value)


def test_load_audio_rejects_empty_missing_and_nan_files(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1)), 16000)
    with pytest.raises(data.AudioError, match="empty.wav: has no samples"):
        data.load_audio(tmp_path / "empty.wav")
    with pytest.raises(data.AudioError, match="missing.wav: audio file not found"):
        data.load_audio(tmp_path / "missing.wav")
    wave = np.zeros(1600, dtype=np.float32)
    wave[10] = np.nan
    sf.write(tmp_path / "nan.wav", wave, 16000, subtype="FLOAT")
    with pytest.raises(data.AudioError, match="nan.wav: contains NaN"):
        data.load_audio(tmp_path / "nan.wav")


# --- dataset ---------------------------------------------------------------------------------


def test_crop_or_pad():
    mel = torch.arange(10.0).expand(3, 10)
    padded = data.crop_or_pad(mel, 14)
    assert torch.equal(padded[:, :10], mel) and not padded[:, 10:].any()
    crops = {data.crop_or_pad(mel, 4)[0, 0].item() for _ in range(200)}
    assert crops == {0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0}


def write_corpus(root, durations_s=(1.0, 0.5, 2.0), captions_per_clip=2, dim=4):
    rows, emb = [], []
    for i, seconds in enumerate(durations_s):
        name = f"clip{i}.wav"
        sf.write(root / name, 0.1 * np.random.default_rng(i).standard_normal(int(16000 * seconds)), 16000)
        for j in range(captions_per_clip):
            rows.append(f"{name},caption {j} of clip {i}")
            emb.append(np.full(dim, 10 * i + j, dtype=np.float32))
    (root / "captions.csv").write_text("file_name,caption\n" + "\n".join(rows) + "\n")
    np.save(root / "captions.npy", np.stack(emb))
    return root / "captions.csv"


def test_clip_dataset_crops_pads_and_draws_one_caption_per_clip(tmp_path):
    csv_path = write_corpus(tmp_path)
    table = text_embed.load_caption_embeddings(csv_path)
    dataset = data.ClipDataset(table, tmp_path, crop_frames=80)
    assert len(dataset) == 3
    torch.manual_seed(0)
    seen = set()
    for _ in range(50):
        mel, text = dataset[1]
        assert mel.shape == (1, 80, 80)
        assert not mel[..., 51:].any()  # 0.5 s = 51 frames, zero-padded after
        seen.add(text[0].item())
    assert seen == {10.0, 11.0}  # both captions of clip 1, never another clip's
    # A seeded item is the same whenever and wherever it is read, and the global RNG is left alone.
    state = torch.get_rng_state()
    first = [dataset[(2, seed)] for seed in range(20)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, (dataset[(2, seed)] for seed in range(20))))
    assert len({(m[0, 0, 0].item(), t[0].item()) for m, t in first}) > 10  # the seed picks crop and caption
    assert torch.equal(torch.get_rng_state(), state)


def test_clip_dataset_names_missing_files(tmp_path):
    csv_path = write_corpus(tmp_path)
    (tmp_path / "clip2.wav").unlink()
    with pytest.raises(data.AudioError, match=r"captions.csv: 1 of 3 audio file\(s\).*clip2.wav"):
        data.ClipDataset(text_embed.load_caption_embeddings(csv_path), tmp_path, 80)


def test_clip_dataset_rejects_a_clip_shorter_than_one_patch(tmp_path):
    csv_path = write_corpus(tmp_path, durations_s=(1.0, 0.05))
    dataset = data.ClipDataset(text_embed.load_caption_embeddings(csv_path), tmp_path, 80)
    with pytest.raises(data.AudioError, match="clip1.wav: only 0.050 s long"):
        dataset[1]


def test_norm_stats_are_the_mean_and_std_of_unpadded_log_mels(tmp_path):
    csv_path = write_corpus(tmp_path)
    dataset = data.ClipDataset(text_embed.load_caption_embeddings(csv_path), tmp_path, 80, preload=True)
    values = torch.cat([data.log_mel(data.load_audio(tmp_path / f"clip{i}.wav")).flatten() for i in range(3)])
    mean, std = data.compute_norm_stats(dataset)
    assert mean == pytest.approx(values.double().mean().item(), rel=1e-6)
    assert std == pytest.approx(values.double().std(unbiased=False).item(), rel=1e-5)


# --- corpus shards ---------------------------------------------------------------------------


def mixed_corpus(root):
    """44.1 kHz stereo FLAC, 8 kHz mono WAV (in a subfolder), and one corrupt file."""
    t = np.arange(int(44100 * 1.5)) / 44100
    sf.write(root / "stereo.flac", np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 880 * t)], 1), 44100)
    (root / "sub").mkdir()
    t8 = np.arange(8000 * 2) / 8000
    sf.write(root / "sub" / "mono8k.wav", 0.2 * np.sin(2 * np.pi * 300 * t8), 8000)
    (root / "broken.ogg").write_bytes(b"OggS this is not a real ogg stream")
    (root / "notes.txt").write_text("not audio, not listed")
    return ["stereo.flac", "sub/mono8k.wav"]


def test_prepare_writes_shards_an_index_and_a_report_and_resumes(tmp_path, capsys):
    audio, out = tmp_path / "audio", tmp_path / "shards"
    audio.mkdir()
    good = mixed_corpus(audio)
    written, failed = data.prepare(audio, out, workers=2, shard_mb=1)
    assert (written, failed) == (2, 1)
    store = data.ShardStore(out)
    assert sorted(store.entries) == sorted(good)
    for name in good:
        expected = data.log_mel(data.load_audio(audio / name))
        stored = store.log_mel(name)
        assert stored.shape == expected.shape
        torch.testing.assert_close(stored, expected, atol=0.02, rtol=2e-3)  # float16 storage
    report = (out / "report.csv").read_text()
    assert "broken.ogg" in report and "stereo.flac" not in report
    assert "1 file(s) could not be read" in capsys.readouterr().out
    # Resuming skips what is done; a newly added file is appended.
    sf.write(audio / "late.wav", 0.1 * np.ones(16000), 16000)
    assert data.prepare(audio, out, workers=1) == (1, 1)
    assert sorted(data.ShardStore(out).entries) == sorted(good + ["late.wav"])
    mean, std = data.shard_stats(out)
    assert data.ShardStore(out).norm_stats == pytest.approx((mean, std))


def test_training_reads_the_shards(tmp_path):
    import train
    audio, out = tmp_path / "audio", tmp_path / "shards"
    audio.mkdir()
    names = mixed_corpus(audio)
    data.prepare(audio, out, workers=1)
    (audio / "stereo.flac").unlink()  # from now on only the shards hold the audio
    rows = [f"{n},caption {k} of {n}" for n in names for k in range(2)]
    (tmp_path / "captions.csv").write_text("file_name,caption\n" + "\n".join(rows) + "\n")
    np.save(tmp_path / "captions.npy", np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32))
    train.main(["--stage", "1", "--data", str(tmp_path / "captions.csv"), "--shards", str(out),
                "--batch-size", "2", "--max-steps", "2", "--out-dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "last.pt").is_file()
    (tmp_path / "captions.csv").write_text("file_name,caption\nbroken.ogg,never prepared\n")
    np.save(tmp_path / "captions.npy", np.zeros((1, 8), np.float32))
    with pytest.raises(SystemExit, match=r"broken.ogg.*not found in the shard index"):
        train.main(["--stage", "1", "--data", str(tmp_path / "captions.csv"), "--shards", str(out),
                    "--batch-size", "1", "--max-steps", "1", "--out-dir", str(tmp_path / "run2")])


def test_clip_order_is_the_same_global_batches_for_any_split_and_resumes_mid_epoch():
    def global_batches(world_size, accum_steps, epoch=0, start=0):
        orders = [data.ClipOrder(50, 8, seed=3, rank=r, world_size=world_size, accum_steps=accum_steps)
                  for r in range(world_size)]
        keys = []
        for order in orders:
            order.set_position(epoch, start)
            keys.append(list(order))
            assert len(keys[-1]) == len(order)
        per_step = 8 // world_size  # what each rank reads per optimiser step
        return [sorted(k for rank in keys for k in rank[b * per_step:(b + 1) * per_step])
                for b in range(len(keys[0]) // per_step)]

    one = global_batches(1, 1)
    assert len(one) == 6  # 50 // 8 full batches; the last 2 clips wait for another epoch's shuffle
    assert global_batches(2, 1) == one and global_batches(2, 2) == one and global_batches(4, 2) == one
    assert global_batches(2, 2, start=4) == one[4:]  # a resume at step 4 reads the rest of the epoch
    clips = [index for batch in one for index, _ in batch]
    assert len(set(clips)) == 48 and len({seed for batch in one for _, seed in batch}) == 48
    assert global_batches(1, 1, epoch=1) != one  # a new shuffle and new seeds every epoch


# --- manifests ----------------------------------------------------------------------------------


def test_manifest_classes_are_sorted_training_labels_and_both_separators_split_labels(tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("file_name,label,split\na.wav,dog;cat,train\nb.wav,bird|dog,train\nc.wav,cat,test\n"
                        "d.wav,dog,valid\n")
    manifest = data.read_manifest(csv_path)
    assert manifest.classes == ["bird", "cat", "dog"] and manifest.multi_label
    assert manifest.root == tmp_path and manifest.labels[1] == ["bird", "dog"]
    assert manifest.indices("train") == [0, 1] and manifest.indices("test") == [2] and manifest.indices("valid") == [3]
    targets = data.label_targets([manifest.labels[i] for i in (0, 1)], manifest.classes)
    assert targets.tolist() == [[0, 1, 1], [1, 0, 1]]
    with pytest.raises(data.ManifestError, match="zebra"):
        data.label_targets([["zebra"]], manifest.classes, str(csv_path))
    data.check_labels(manifest)  # every test and valid label is a training class


def test_manifest_rows_of_one_file_give_captions_and_must_repeat_its_labels(tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("file_name,label,caption,fold\na.wav,dog,a dog barks,1\na.wav,dog,barking,1\n"
                        "b.wav,cat,a cat,2\n")
    manifest = data.read_manifest(csv_path, audio_root=tmp_path / "audio")
    assert manifest.files == ["a.wav", "b.wav"] and manifest.captions == ["a dog barks", "barking", "a cat"]
    assert manifest.caption_clip == [0, 0, 1] and manifest.root == tmp_path / "audio"
    (tmp_path / "bad.csv").write_text("file_name,label\na.wav,dog\na.wav,cat\n")
    with pytest.raises(data.ManifestError, match="line 3: a.wav has labels"):
        data.read_manifest(tmp_path / "bad.csv")


def test_folds_hold_out_one_fold_as_test_in_natural_order(tmp_path):
    csv_path = tmp_path / "folds.csv"
    csv_path.write_text("file_name,label,fold\na.wav,dog,10\nb.wav,cat,2\nc.wav,dog,2\nd.wav,cat,10\n")
    manifest = data.read_manifest(csv_path)
    assert not manifest.multi_label and manifest.folds == ["2", "10"]
    assert manifest.indices("test", "2") == [1, 2] and manifest.indices("train", "2") == [0, 3]
    assert manifest.indices("valid", "2") == [] and manifest.classes == ["cat", "dog"]
    with pytest.raises(data.ManifestError, match="pass the fold to hold out"):
        manifest.indices("test")


@pytest.mark.parametrize("text,message", [
    ("file_name,split\na.wav,train\n", "needs file_name, label"),
    ("file_name,label,split\na.wav,dog,training\n", "line 2: split must be train, valid or test, got 'training'"),
    ("file_name,label,split\n,dog,train\n", "line 2: empty file_name or label"),
    ("file_name,label,split,fold\na.wav,dog,train,1\n", "both a split and a fold"),
    ("file_name,label\n", "no rows"),
    ("file_name,label,split\na.wav,dog,train\na.wav,dog,test\n", "line 3: a.wav is in split 'test' here but"),
])
def test_a_bad_manifest_is_named_with_its_line_and_the_fix(tmp_path, text, message):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(data.ManifestError, match=message):
        data.read_manifest(tmp_path / "bad.csv")
    with pytest.raises(data.ManifestError, match="not found"):
        data.read_manifest(tmp_path / "missing.csv")


def test_a_test_label_no_training_clip_has_is_refused_for_splits_and_for_each_held_out_fold(tmp_path):
    (tmp_path / "split.csv").write_text("file_name,label,split\na.wav,dog,train\nb.wav,cat,test\n")
    with pytest.raises(data.ManifestError, match=r"split.csv, line 3 \(b.wav\): a test clip with label\(s\) \['cat'\]"):
        data.check_labels(data.read_manifest(tmp_path / "split.csv"))
    (tmp_path / "folds.csv").write_text("file_name,label,fold\na.wav,dog,1\nb.wav,dog,2\nc.wav,cat,2\n")
    folds = data.read_manifest(tmp_path / "folds.csv")
    data.check_labels(folds, "1")
    with pytest.raises(data.ManifestError, match=r"line 4 \(c.wav\): a test clip with label\(s\) \['cat'\].*fold 2 held out"):
        data.check_labels(folds, "2")


def test_the_shard_commands_say_what_is_missing_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not audio")
    for argv, message in ((["prepare", str(tmp_path / "nowhere"), str(tmp_path / "out")], "nowhere: no such folder"),
                          (["prepare", str(tmp_path / "empty"), str(tmp_path / "out")],
                           "empty: no audio files in it or its subfolders"),
                          (["stats", str(tmp_path / "out")], "out/index.csv: no shard index. Run 'python data.py "
                                                              "prepare AUDIO_DIR")):
        with pytest.raises(SystemExit) as stop:
            data.main(argv)
        assert str(stop.value).startswith("error: ") and message in str(stop.value)
    assert not (tmp_path / "out").exists()  # nothing made for a folder that had nothing to prepare


def test_audio_folder_reads_a_clips_length_from_its_header(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(44100 * 2, dtype=np.float32), 44100)   # 2 s at 44.1 kHz
    folder = data.AudioFolder(tmp_path)
    assert folder.frames("a.wav") == folder.log_mel("a.wav").shape[-1] == 201
