"""End-to-end tests of train.py: a short real run, checkpoints, and bad --data."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

import model as m2d
import train


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [train.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    train.main(["--stage", "1", "--max-steps", "80", "--log-every", "5", "--out-dir", str(out)])
    return out


def test_short_stage1_run_learns(short_run):
    records = [json.loads(line) for line in (short_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] + list(range(5, 81, 5))
    for key in ("loss", "loss_m2d", "loss_clap", "lr", "ema_decay", "clips_per_s"):
        assert all(math.isfinite(r[key]) for r in records), key
    first, last = records[0], records[-3:]
    assert np.mean([r["loss_m2d"] for r in last]) < 0.6 * first["loss_m2d"]
    assert np.mean([r["loss_clap"] for r in last]) < first["loss_clap"] - 0.5  # chance is log(64) = 4.16
    assert records[-1]["lr"] < records[5]["lr"]
    assert records[-1]["ema_decay"] > records[0]["ema_decay"]


def test_checkpoint_round_trip(short_run):
    ckpt = torch.load(short_run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["stage"] == "1" and ckpt["step"] == 80
    model, tokenizer = train.build_model(ckpt)
    assert tokenizer is None
    assert model.config == m2d.preset("tiny", text_dim=384)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key
    assert torch.allclose(model.norm_stats, torch.tensor(ckpt["norm_stats"]))
    # Training moved the encoder away from a fresh initialisation, and the EMA target followed.
    fresh = m2d.M2DCLAP(model.config)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, fresh.blocks[0].attn.qkv.weight)
    model.eval()
    x = torch.randn(2, 1, 80, 192)
    assert torch.equal(model.encode(x), model.encode(x))


def write_user_data(root, n_clips=4):
    names = []
    for i in range(n_clips):
        names.append(f"c{i}.wav")
        sf.write(root / names[-1], 0.1 * np.random.default_rng(i).standard_normal(16000), 16000)
    rows = [f"{n},a caption for {n}" for n in names]
    (root / "captions.csv").write_text("file_name,caption\n" + "\n".join(rows) + "\n")
    np.save(root / "captions.npy", np.random.default_rng(0).standard_normal((n_clips, 16)).astype(np.float32))
    return root / "captions.csv"


def run_user_data(tmp_path, *extra):
    return ["--stage", "1", "--data", str(tmp_path / "captions.csv"), "--batch-size", "2",
            "--max-steps", "2", "--out-dir", str(tmp_path / "run"), *extra]


def test_training_on_user_data(tmp_path):
    write_user_data(tmp_path)
    train.main(run_user_data(tmp_path))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["model_config"]["text_dim"] == 16


def test_unreadable_audio_stops_with_the_file_name(tmp_path, capsys):
    write_user_data(tmp_path)
    (tmp_path / "c2.wav").write_bytes(b"not audio")
    with pytest.raises(SystemExit, match=r"c2.wav: cannot be decoded as audio"):
        train.main(run_user_data(tmp_path))


def test_caption_row_for_a_missing_clip_stops_with_the_file_name(tmp_path):
    write_user_data(tmp_path)
    (tmp_path / "c3.wav").unlink()
    with pytest.raises(SystemExit, match=r"captions.csv: 1 of 4 audio file\(s\).*c3.wav.*--audio-root"):
        train.main(run_user_data(tmp_path))


def test_mismatched_embedding_file_stops_with_the_file_name(tmp_path):
    write_user_data(tmp_path)
    np.save(tmp_path / "captions.npy", np.zeros((3, 16), np.float32))
    with pytest.raises(SystemExit, match=r"captions.npy: 3 embedding rows but .*captions.csv has 4"):
        train.main(run_user_data(tmp_path))
    np.save(tmp_path / "captions.npy", np.zeros((4, 16, 2), np.float32))
    with pytest.raises(SystemExit, match=r"captions.npy: expected a 2-D float array"):
        train.main(run_user_data(tmp_path))


def test_periodic_checkpoints_keep_only_the_newest(tmp_path):
    write_user_data(tmp_path)
    train.main(run_user_data(tmp_path)[:-4] + ["--max-steps", "7", "--save-every", "2", "--keep", "2",
                                               "--out-dir", str(tmp_path / "run")])
    names = sorted(p.name for p in (tmp_path / "run").glob("*.pt"))
    assert names == ["last.pt", "step_00000004.pt", "step_00000006.pt"]
    assert torch.load(tmp_path / "run" / "step_00000006.pt", weights_only=True)["step"] == 6
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 7


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    write_user_data(tmp_path)
    real_save, saves = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) > 1:
            f.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(SystemExit, match=r"last.pt: could not write the checkpoint.*No space left on device.*"
                                         r"previous checkpoint there, if any, is unchanged"):
        train.main(run_user_data(tmp_path)[:-4] + ["--max-steps", "4", "--save-every", "2", "--keep", "0",
                                                   "--out-dir", str(tmp_path / "run")])
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "run" / "last.pt.tmp").exists()
