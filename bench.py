"""Benchmark of the training step: a plain eager baseline and our step, side by side.

In one process, on the same inputs and from the same weights, it times
(a) the baseline: the same model stepped as a careful but unoptimised
    implementation would: eager, fp32 on CPU or fp16 autocast with a
    GradScaler on GPU, the target network run under autograd and detached,
    a per-tensor AdamW, the EMA as a Python loop over tensors, and the loss
    read back (.item()) every step;
(b) our step: train.train_step exactly as train.py runs it (no autograd in the
    target, fused AdamW, one fused EMA op, one host sync to skip non-finite
    steps, bf16 and torch.compile by default on CUDA).

    python bench.py --preset tiny --device cpu --json bench.json
    python bench.py --device cuda --preset base --quick     # the prepared GPU run, under 5 min on one H100
    python bench.py loader SHARDS/ [--synthetic-clips 2000]  # loader clips/s: shards vs one .npy per clip

It reports clips/s, ms/step (median of the timed steps after warm-up), peak
memory (CUDA: the most allocated during the variant's steps beyond what was
allocated before them; CPU: the peak resident set of a fresh process running
that variant), model FLOPs per clip
(analytic, cross-checked with torch.utils.flop_counter), MFU on GPU, and the
loss of each variant's first step, which must agree.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import model as m2d
import train
from losses import ClapLoss

# Dense bf16 tensor-core peaks (FLOP/s), by a name fragment of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


# -----------------------------------------------------------------------------
# FLOPs


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> float:
    """Forward matmul FLOPs of one Transformer block: qkv, attention, projection, MLP."""
    hidden = int(dim * mlp_ratio)
    return 2 * tokens * dim * 3 * dim + 4 * tokens * tokens * dim + 2 * tokens * dim * dim + 4 * tokens * dim * hidden


def audio_proj_flops(tokens: int, config: m2d.M2DConfig) -> float:
    """Forward matmul FLOPs of the audio projector on `tokens` patch features.

    The semantic projector's last block computes the semantic token's row
    only: keys and values for every token, one query, a one-row MLP.
    """
    D = config.embed_dim
    if config.audio_proj == "mlp":
        return 4 * D * D
    ratio = 1.0 if config.audio_proj_depth <= 2 else 2.0
    last = 2 * (tokens + 1) * D * 3 * D + 4 * (tokens + 1) * D + 2 * D * D + 4 * D * int(D * ratio)
    return (config.audio_proj_depth - 1) * block_flops(tokens + 1, D, ratio) + last


def analytic_flops_per_clip(config: m2d.M2DConfig, stage: str) -> float:
    """Model FLOPs of one clip's training step; backward counts twice the forward where gradients flow."""
    D, n = config.embed_dim, config.num_patches
    visible = int(n * (1 - config.mask_ratio))
    patch = 2 * n * D * config.patch_size**2
    text = 2 * config.text_dim * D if config.text_proj == "linear" else 0
    if stage == "2":  # frozen encoder forward, then the CLAP heads with gradients
        encoder = patch + config.depth * block_flops(n + 1, D, config.mlp_ratio)
        return encoder + 3 * (audio_proj_flops(n, config) + text)
    online = config.depth * block_flops(visible + 1, D, config.mlp_ratio)
    target = config.depth * block_flops(n - visible + 1, D, config.mlp_ratio)
    P = config.predictor_dim
    predictor = (2 * (visible + 1) * D * P + config.predictor_depth * block_flops(n + 1, P, config.mlp_ratio)
                 + 2 * (n + 1) * P * D)
    heads = audio_proj_flops(visible, config) + text
    return 3 * (patch + online + predictor + heads) + 2 * patch + target


def counted_flops_per_clip(model, mel, text, frozen_encoder: bool) -> float:
    """FLOPs of one forward and backward as torch.utils.flop_counter counts them, per clip."""
    with FlopCounterMode(display=False) as counter:
        outputs = model(mel, text, frozen_encoder=frozen_encoder)
        loss, _ = train.step_losses(outputs, model.logit_scale, ClapLoss(), 0.01, frozen_encoder)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / mel.shape[0]


# -----------------------------------------------------------------------------
# The baseline step


def baseline_step(model, optimizer, scaler, autocast, mel, text, clap_loss, clap_weight, ema_decay):
    """A plain step: the same computation, none of the optimisations."""
    with autocast:
        if ema_decay is None:  # stage 2: the frozen encoder still runs under autograd
            patches = model.encode(mel)[:, 1:]
            outputs = model.audio_proj(patches.detach()), model.text_features(text)
        else:
            patches = model.embed_patches(model.normalize(mel))
            visible, masked, restore = m2d.random_masking(mel.shape[0], patches.shape[1], model.config.mask_ratio,
                                                          mel.device)
            online = model.forward_online(patches, visible)
            prediction = model.forward_predictor(online, restore, masked)
            x = model._with_cls(m2d.gather_tokens(patches, masked))
            for block in model.target_blocks:  # recorded by autograd, then thrown away
                x = block(x)
            target = model.target_norm(x)[:, 1:].detach()
            outputs = prediction, target, model.audio_proj(online[:, 1:]), model.text_features(text)
        loss, _ = train.step_losses(outputs, model.logit_scale, clap_loss, clap_weight, ema_decay is None)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 3.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    model.clamp_logit_scale()
    if ema_decay is not None:
        with torch.no_grad():
            for t, o in zip(model.target_parameters(), model.online_parameters()):
                t.mul_(ema_decay).add_(o, alpha=1 - ema_decay)
    return loss.item()  # a naive loop prints the loss every step


# -----------------------------------------------------------------------------
# Timing


def peak_memory_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):  # Linux: "5" resets the peak resident set size
            Path("/proc/self/clear_refs").write_text("5")


def memory_bytes(device, peak: bool) -> int:
    """CUDA memory allocated (or its peak); on the CPU the resident set size (or its peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
    field = "VmHWM:" if peak else "VmRSS:"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def measure(steps_by_variant: dict, device, warmup: int, steps: int) -> dict:
    """Warm up each variant alone (its first loss and peak memory), then time them in alternation.

    Alternating one step of each keeps a shared, noisy machine's load changes
    from favouring either variant; each step starts from the same seed, so both
    draw the same masks.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {}
    for name, step in steps_by_variant.items():
        peak_memory_reset(device)
        before = memory_bytes(device, peak=False)
        for k in range(warmup):
            torch.manual_seed(1000 + k)
            loss = step()
            if k == 0:
                results[name] = {"first_loss": float(loss)}
        sync()
        # What the step adds on top of the weights: activations, gradients, optimiser state.
        results[name]["peak_memory_bytes"] = memory_bytes(device, peak=True) - before
    times = {name: [] for name in steps_by_variant}
    for k in range(steps):
        for name, step in steps_by_variant.items():
            torch.manual_seed(1000 + warmup + k)
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
    for name in results:
        results[name]["ms_per_step"] = 1000 * statistics.median(times[name])
    return results


def build_variants(args, only: str | None = None):
    """The batch, and the two steps from identical weights: {"baseline": step, "optimized": step}.

    only="baseline" or "optimized" builds just that one (for its memory figure).
    """
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config = m2d.preset(args.preset, text_dim=args.text_dim, grad_checkpointing=args.grad_checkpointing)
    recipe = train.RECIPES[(args.stage, args.preset)]
    torch.manual_seed(0)
    reference = m2d.M2DCLAP(config, norm_stats=(-7.0, 4.0)).to(device)
    if args.stage == "2":
        reference.freeze_encoder()
    g = torch.Generator(device="cpu").manual_seed(0)
    mel = (torch.randn(args.batch, 1, config.n_mels, config.crop_frames, generator=g) * 4 - 7)
    text = torch.randn(args.batch, config.text_dim, generator=g)
    if cuda:
        mel, text = mel.pin_memory().to(device, non_blocking=True), text.pin_memory().to(device, non_blocking=True)
    ema_decay = 0.9999 if args.stage == "1" else None
    clap_loss = ClapLoss()

    def fresh():
        model = copy.deepcopy(reference)
        model.train_clap() if args.stage == "2" else model.train()
        return model

    variants, info = {}, {}
    if only in (None, "baseline"):
        variants["baseline"], info["baseline"] = _baseline_variant(args, fresh, mel, text, clap_loss, ema_decay,
                                                                   recipe, device)
    if only in (None, "optimized"):
        variants["optimized"], info["optimized"] = _optimized_variant(args, fresh, mel, text, clap_loss,
                                                                      ema_decay, recipe, device)
    return config, fresh, mel, text, variants, info


def _baseline_variant(args, fresh, mel, text, clap_loss, ema_decay, recipe, device):
    """The plain eager step, as a careful but unoptimised implementation runs it."""
    cuda = device.type == "cuda"
    base_model = fresh()
    base_opt = torch.optim.AdamW(base_model.param_groups(0.05), lr=1e-4, betas=recipe.betas, foreach=False)
    base_scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    base_autocast = torch.autocast(device.type, dtype=torch.float16) if cuda else contextlib.nullcontext()

    def baseline():
        return baseline_step(base_model, base_opt, base_scaler, base_autocast, mel, text, clap_loss, 0.01, ema_decay)

    return baseline, {"precision": "fp16" if cuda else "fp32", "compiled": False}


def _optimized_variant(args, fresh, mel, text, clap_loss, ema_decay, recipe, device):
    """Ours, as train.py runs it."""
    cuda = device.type == "cuda"
    model = fresh()
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4, betas=recipe.betas, fused=True)
    precision = args.precision or ("bf16" if cuda else "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else contextlib.nullcontext())
    use_compile = (cuda and args.stage == "1") if args.compile is None else args.compile
    forward = train.compiled(model) if use_compile else model

    def ours():
        sums, _, _ = train.train_step(model, model, forward, optimizer, scaler, autocast, clap_loss,
                                      [(mel, text)], 0.01, 3.0, ema_decay)
        return sums.get("loss_m2d", 0) + (0.01 if args.stage == "1" else 1.0) * sums["loss_clap"]

    return ours, {"precision": precision, "compiled": use_compile}


def cpu_step_peak_bytes(args, name: str) -> int:
    """Peak resident set of a fresh process that builds one variant only and runs its steps.

    The CPU allocator keeps freed memory resident, so within one process the
    second variant would reuse the first's memory; each gets its own process,
    and the figure is the whole process's peak (runtime and weights included).
    """
    _, _, _, _, variants, _ = build_variants(args, only=name)
    for k in range(max(args.warmup, 1)):
        torch.manual_seed(1000 + k)
        variants[name]()
    return memory_bytes(torch.device("cpu"), peak=True)


def run(args) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config, fresh, mel, text, variants, info = build_variants(args)
    results = measure(variants, device, args.warmup, args.steps)
    if not cuda:
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:  # a fresh process each
            for name in results:
                results[name]["peak_memory_bytes"] = pool.apply(cpu_step_peak_bytes, (args, name))
    for name in results:
        results[name].update(info[name])
    analytic = analytic_flops_per_clip(config, args.stage)
    counted = counted_flops_per_clip(fresh(), mel[:2], text[:2], args.stage == "2")
    for variant in results.values():
        variant["clips_per_s"] = args.batch / variant["ms_per_step"] * 1000
        variant["peak_memory_per_clip_mb"] = variant["peak_memory_bytes"] / args.batch / 2**20
    summary = {"preset": args.preset, "stage": args.stage, "device": torch.cuda.get_device_name() if cuda else "cpu",
               "threads": torch.get_num_threads(), "batch": args.batch, **results,
               "speedup": results["optimized"]["clips_per_s"] / results["baseline"]["clips_per_s"],
               "first_loss_difference": abs(results["optimized"]["first_loss"] - results["baseline"]["first_loss"]),
               "flops_per_clip": analytic, "flops_per_clip_counted": counted}
    if cuda:
        name = summary["device"]
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        summary["peak_bf16_flops"] = peak
        for key in ("baseline", "optimized"):
            results[key]["mfu"] = analytic * results[key]["clips_per_s"] / peak if peak else None
        summary["mfu"] = results["optimized"]["mfu"]
    return summary


def print_table(s: dict):
    print(f"stage {s['stage']} step, preset {s['preset']}, batch {s['batch']}, {s['device']} "
          f"({s['threads']} threads)")
    print(f"{'':10s} {'precision':>9s} {'compiled':>8s} {'ms/step':>9s} {'clips/s':>9s} {'peak MB/clip':>12s} "
          f"{'first loss':>11s}{'   MFU' if 'mfu' in s else ''}")
    for key in ("baseline", "optimized"):
        v = s[key]
        mfu = f" {100 * v['mfu']:5.1f}%" if v.get("mfu") is not None else ""
        print(f"{key:10s} {v['precision']:>9s} {str(v['compiled']):>8s} {v['ms_per_step']:9.1f} "
              f"{v['clips_per_s']:9.1f} {v['peak_memory_per_clip_mb']:12.2f} {v['first_loss']:11.6f}{mfu}")
    print(f"speedup {s['speedup']:.2f}x | first-step losses differ by {s['first_loss_difference']:.2e} | "
          f"{s['flops_per_clip'] / 1e9:.2f} GFLOPs per clip (flop_counter: {s['flops_per_clip_counted'] / 1e9:.2f})")


# -----------------------------------------------------------------------------
# The loader: clips/s from log-mel shards and from one .npy per clip


class CropDataset(torch.utils.data.Dataset):
    """Random crops of a list of clips from one source (for the loader benchmark)."""

    def __init__(self, read, names, crop_frames):
        self.read, self.names, self.crop_frames = read, names, crop_frames

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        return data.crop_or_pad(self.read(self.names[i]), self.crop_frames)[None]


def _read_npy(path: str) -> torch.Tensor:
    return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))


def write_synthetic_shards(out_dir: Path, n_clips: int, frames: int, seed: int = 0):
    """Random log-mels of AudioSet's size (10 s = 1001 frames) for timing the loader."""
    rng = np.random.default_rng(seed)
    writer = data.ShardWriter(out_dir)
    for k in range(n_clips):
        writer.add(f"synthetic/{k:07d}", (rng.standard_normal((data.N_MELS, frames)) * 4 - 7).astype(data.SHARD_DTYPE))
    writer.close()


def bench_loader(shard_dir: Path, crop_frames: int = 1001, batch_size: int = 64, workers: int = 4,
                 seconds: float = 15.0) -> dict:
    """Clips/s of a DataLoader (workers, pinned memory) from shards and from one .npy per clip."""
    store = data.ShardStore(shard_dir)
    names = list(store.entries)
    npy_dir = Path(shard_dir) / "bench_npy"
    npy_dir.mkdir(exist_ok=True)
    npy_paths = []
    for k, name in enumerate(names):  # the same clips as per-file float16 .npy, written once
        path = npy_dir / f"{k:07d}.npy"
        if not path.exists():
            np.save(path, store.log_mel(name).numpy().astype(np.float16))
        npy_paths.append(str(path))
    results = {}
    for label, dataset in (("shards", CropDataset(store.log_mel, names, crop_frames)),
                           ("npy_files", CropDataset(_read_npy, npy_paths, crop_frames))):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                            pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=workers > 0)
        clips, t0 = 0, None
        while t0 is None or time.perf_counter() - t0 < seconds:
            for batch in loader:
                if t0 is None:  # start timing after the workers are up
                    t0 = time.perf_counter()
                    continue
                clips += batch.shape[0]
                if time.perf_counter() - t0 >= seconds:
                    break
        results[label] = clips / (time.perf_counter() - t0)
    return results


def loader_main(argv):
    p = argparse.ArgumentParser(prog="bench.py loader", description="DataLoader clips/s from shards and from "
                                "per-file .npy of the same clips")
    p.add_argument("out_dir", type=Path, help="shards written by 'python data.py prepare'")
    p.add_argument("--crop-frames", type=int, default=1001)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seconds", type=float, default=15.0, help="timed seconds per source")
    p.add_argument("--synthetic-clips", type=int, default=0,
                   help="first fill an empty OUT_DIR with this many random 10 s (1001-frame) clips")
    args = p.parse_args(argv)
    if args.synthetic_clips and not (args.out_dir / "index.csv").exists():
        write_synthetic_shards(args.out_dir, args.synthetic_clips, 1001)
    rates = bench_loader(args.out_dir, args.crop_frames, args.batch_size, args.workers, args.seconds)
    print(f"DataLoader, batch {args.batch_size}, {args.workers} workers, {args.crop_frames}-frame crops: "
          + ", ".join(f"{k} {v:.0f} clips/s" for k, v in rates.items()))


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(m2d.PRESETS))
    p.add_argument("--stage", default="1", choices=["1", "2"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="clips per step (default: 64 tiny, 16 base on CPU, 128 on GPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant first (compilation happens here)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="our step's precision (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our step (default: as train.py, on for stage 1 on CUDA)")
    p.add_argument("--text-dim", type=int, default=None, help="sentence-embedding width (default: the preset's)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (both variants)")
    p.add_argument("--quick", action="store_true", help="fewer steps: the prepared GPU run")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 128 if args.device.startswith("cuda") else (64 if args.preset == "tiny" else 16)
    if args.text_dim is None:
        args.text_dim = m2d.preset(args.preset).text_dim
    if args.quick:
        args.steps, args.warmup = 10, 3
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["loader"]:
        return loader_main(argv[1:])
    args = parse_args(argv)
    summary = run(args)
    print_table(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
