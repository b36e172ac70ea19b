"""Data parallelism on the CPU with Gloo: the distributed CLAP loss equals the
single-process one, and a 2-process stage-1 run keeps identical replicas and
resumes bit-identically (fine-tuning's: test_finetune_run.py)."""

import json
import math
import os
import shutil
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import conftest
import model as m2d
from losses import ClapLoss

GLOBAL_BATCH, N_PATCHES, DIM, TEXT_DIM = 8, 10, 32, 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClapHeads(torch.nn.Module):
    """The CLAP parts of M2D-CLAP on given patch features and sentence embeddings."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.audio_proj = m2d.SemanticAudioProjector(DIM)
        self.text_proj = m2d.make_text_proj("linear", TEXT_DIM, DIM)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, patches, text):
        return self.audio_proj(patches), self.text_proj(text)


def global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, N_PATCHES, DIM, generator=g), torch.randn(GLOBAL_BATCH, TEXT_DIM, generator=g)


def clap_worker(rank, world, store_file, out):
    # A file store needs no server process that could leave before the other rank does.
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    heads = ClapHeads()
    net = torch.nn.parallel.DistributedDataParallel(heads)
    patches, text = global_batch()
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    loss = ClapLoss()(*net(patches[local], text[local]), heads.logit_scale)
    loss.backward()  # DDP averages the gradients of the two ranks
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": {n: p.grad for n, p in heads.named_parameters()}}, out)
    dist.barrier()  # leave the group together
    del net  # DistributedDataParallel must go before its process group does
    dist.destroy_process_group()


def test_distributed_clap_loss_and_gradients_equal_one_process_on_the_global_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(clap_worker, args=(2, tmp_path / "store", out), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)

    heads = ClapHeads()
    patches, text = global_batch()
    loss = ClapLoss()(*heads(patches, text), heads.logit_scale)
    loss.backward()
    torch.testing.assert_close(distributed["loss"], loss.detach(), atol=1e-6, rtol=1e-6)
    for name, param in heads.named_parameters():
        # float32 sums in another order: within 1e-6 of the tensor's largest gradient
        scale = float(param.grad.abs().max())
        torch.testing.assert_close(distributed["grads"][name], param.grad, atol=1e-6 * scale, rtol=1e-5, msg=name)
    # Without the gather, each rank would see 4 clips: a different loss.
    local_only = ClapLoss(gather=lambda a, t: (a, t))(*heads(patches[:4], text[:4]), heads.logit_scale)
    assert abs(local_only.item() - loss.item()) > 1e-3


def write_corpus(root):
    conftest.write_corpus(root, n_clips=16, dim=8)


def train_worker(rank, world, port, root, run, steps):
    import runs
    import train
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    # Let every rank write its own checkpoint, to compare the replicas from outside.
    runs.Distributed.main = property(lambda self: True)
    train.main(["--stage", "1", "--data", str(root / "captions.csv"), "--batch-size", "8", "--max-steps", str(steps),
                "--save-every", "2", "--log-every", "1", "--out-dir", str(root / f"{run}{rank}")])


def test_two_process_run_keeps_identical_replicas_and_resumes_bit_identically(tmp_path):
    write_corpus(tmp_path)  # 2 steps an epoch
    mp.spawn(train_worker, args=(2, free_port(), tmp_path, "whole", 5), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"whole{r}" / "last.pt", weights_only=True) for r in (0, 1))
    fresh = m2d.M2DCLAP(m2d.M2DConfig(**rank0["model_config"]))
    for key, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][key]), key  # EMA target included
    assert not torch.equal(rank0["model"]["blocks.0.attn.qkv.weight"], fresh.blocks[0].attn.qkv.weight)
    for rank in (0, 1):  # both stopped after step 2: rank 0's periodic copy holds every rank's RNG states
        (tmp_path / f"resumed{rank}").mkdir()
        shutil.copy(tmp_path / "whole0" / "step_00000002.pt", tmp_path / f"resumed{rank}" / "last.pt")
    mp.spawn(train_worker, args=(2, free_port(), tmp_path, "resumed", 5), nprocs=2, join=True)
    whole, resumed = (torch.load(tmp_path / f"{run}0" / "last.pt", weights_only=True) for run in ("whole", "resumed"))
    assert whole["step"] == resumed["step"] == 5 and len(whole["resume"]["rng"]) == 2
    logged = [json.loads(line)["step"] for line in (tmp_path / "resumed0" / "log.jsonl").read_text().splitlines()]
    assert logged == [3, 4, 5]  # it went on from step 2 rather than starting over
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
