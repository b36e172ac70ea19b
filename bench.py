"""Benchmarks: the training step against the authors' recipe, the prepared GPU run, and the loader.

In one process, on the same inputs and from the same weights, it times
(a) the baseline: the authors' training recipe as their engine runs each
    step (authors_step): eager, fp16 autocast with a GradScaler on GPU (fp32
    on CPU), torch's default AdamW, clipping at 3.0, the loss read back every
    step, a device synchronisation, the EMA as a Python loop and the
    logit-scale clamp;
(b) our step: engine.train_step itself, the function train.py calls each
    step (losses.m2d_clap_loss driving runs.Stepper: fused AdamW, non-finite
    steps skipped on the device with no host round trip, bf16 and
    torch.compile by default on CUDA, as runs.amp_defaults chooses for
    train.py; then the logit-scale clamp and the fused EMA).
Both take the benchmarked stage and preset's recipe (engine.RECIPES): betas,
weight decay, clipping norm, lambda, the EMA decay's start and, in stage 2,
the token drop of the frozen encoder's input. The prepared run also runs
train.py itself, in a subprocess.

    python bench.py --preset tiny --device cpu --json bench.json
    python bench.py prepared --json bench_h100.json   # the prepared GPU run, sized for under 5 min on one H100
    python bench.py loader SHARDS/ [--synthetic-clips 2000]  # loader clips/s: shards vs one .npy per clip

It reports clips/s, ms/step (median over runs of up to 5 steps back to back,
after warm-up), peak memory (CUDA: the most allocated during the variant's
steps beyond what was allocated before them; CPU: the peak resident set of a
fresh process running that variant), model FLOPs per clip (analytic,
cross-checked with torch.utils.flop_counter), MFU on GPU, and the loss of
each variant's first step, which must agree. The prepared run adds our step
at a larger batch, train.py itself on synthetic log-mel shards, and Large
with gradient checkpointing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import engine
import model as m2d
import runs
from losses import ClapLoss, m2d_clap_loss

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
    """FLOPs of one forward and backward as torch.utils.flop_counter counts them, per clip.

    Like analytic_flops_per_clip, it counts stage 2's encoder on the whole
    input: the token drop makes the step itself do somewhat less.
    """
    with FlopCounterMode(display=False) as counter:
        outputs = model(mel, text, frozen_encoder=frozen_encoder)
        m2d_clap_loss(outputs, model.logit_scale, engine.Recipe().clap_weight)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / mel.shape[0]


# -----------------------------------------------------------------------------
# The baseline: the authors' training step


def authors_step(model, optimizer, scaler, autocast, mel, text, clap_loss, recipe: engine.Recipe, ema_decay, sync):
    """The authors' training recipe, as their engine runs each step (train_one_epoch in m2d/engine_pretrain_m2d.py).

    The same model and loss, stepped their way: fp16 autocast on GPU with a
    torch.amp.GradScaler; the loss read back and checked every step (a
    non-finite loss stops their run); the scaler's backward, unscale, gradient
    clipping at the recipe's norm over all parameters, step and update;
    torch's default AdamW; a device synchronisation; the EMA target as a
    Python loop that replaces each target tensor by decay * target + (1 -
    decay) * online; and the logit-scale clamp. Our model already runs the
    target (stage 1) and the frozen encoder (stage 2, with the recipe's token
    drop) under no_grad, as theirs does.
    """
    with autocast:
        outputs = model(mel, text, frozen_encoder=ema_decay is None, token_drop=recipe.token_drop)
        loss = m2d_clap_loss(outputs, model.logit_scale, recipe.clap_weight, clap_loss)["loss"]
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise SystemExit(f"Loss is {loss_value}, stopping training")
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    sync()
    if ema_decay is not None:
        for target, online in zip(model.target_parameters(), model.online_parameters()):
            target.data = target.data * ema_decay + (1 - ema_decay) * online.data
    model.clamp_logit_scale()
    return loss_value


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

    Alternating runs of steps keeps a shared, noisy machine's load changes
    from favouring either variant; each run starts from the same seed, so both
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
    # Timed in runs of a few steps back to back, as a training loop runs them:
    # a step that never waits for the device lets the host queue the next one
    # while the device still works, which timing single steps would hide.
    run_length = min(5, steps)
    times = {name: [] for name in steps_by_variant}
    for k in range(0, steps, run_length):
        for name, step in steps_by_variant.items():
            torch.manual_seed(1000 + warmup + k)
            sync()
            t0 = time.perf_counter()
            for _ in range(min(run_length, steps - k)):
                step()
            sync()
            times[name].append((time.perf_counter() - t0) / min(run_length, steps - k))
    for name in results:
        results[name]["ms_per_step"] = 1000 * statistics.median(times[name])
    return results


def build_variants(args, only: str | None = None):
    """The batch, and the two steps from identical weights: {"baseline": step, "optimized": step}.

    Both train with the stage and preset's recipe; only="baseline" or
    "optimized" builds just that one (for its memory figure).
    """
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config = m2d.preset(args.preset, text_dim=args.text_dim, grad_checkpointing=args.grad_checkpointing)
    recipe = engine.RECIPES[(args.stage, args.preset)]
    torch.manual_seed(0)
    reference = m2d.M2DCLAP(config, norm_stats=(-7.0, 4.0)).to(device)
    if args.stage == "2":
        reference.freeze_encoder()
    g = torch.Generator(device="cpu").manual_seed(0)
    mel = (torch.randn(args.batch, 1, config.n_mels, config.crop_frames, generator=g) * 4 - 7)
    text = torch.randn(args.batch, config.text_dim, generator=g)
    if cuda:
        mel, text = mel.pin_memory().to(device, non_blocking=True), text.pin_memory().to(device, non_blocking=True)
    ema_decay = recipe.ema_decay[0] if args.stage == "1" else None  # stage 2: a frozen encoder, no EMA

    def fresh():
        model = copy.deepcopy(reference)
        model.train_clap() if args.stage == "2" else model.train()
        return model

    variants, info = {}, {}
    if only in (None, "baseline"):
        variants["baseline"], info["baseline"] = _baseline_variant(fresh(), mel, text, recipe, ema_decay, device)
    if only in (None, "optimized"):
        variants["optimized"], info["optimized"] = _optimized_variant(args, fresh(), mel, text, recipe, ema_decay,
                                                                      device)
    return config, fresh, mel, text, variants, info


def _baseline_variant(model, mel, text, recipe: engine.Recipe, ema_decay, device):
    """The authors' recipe: eager, fp16 autocast with a GradScaler on GPU (fp32 on CPU), torch's default AdamW."""
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.param_groups(recipe.weight_decay), lr=recipe.peak_lr, betas=recipe.betas)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    autocast = torch.autocast(device.type, dtype=torch.float16) if cuda else contextlib.nullcontext()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clap_loss = ClapLoss()

    def baseline():
        return authors_step(model, optimizer, scaler, autocast, mel, text, clap_loss, recipe, ema_decay, sync)

    return baseline, {"precision": "fp16" if cuda else "fp32", "compiled": False}


def _optimized_variant(args, model, mel, text, recipe: engine.Recipe, ema_decay, device):
    """Ours: engine.train_step, as train.py runs it, with train.py's optimiser, precision and compile defaults."""
    optimizer = engine.make_optimizer(model, recipe)
    precision, use_compile = runs.amp_defaults(device.type, args.precision, args.compile,
                                               compile_on_cuda=args.stage == "1")
    stepper = runs.Stepper.build(model, optimizer, device, precision, use_compile, recipe.clip_grad_norm)

    def ours():
        sums, _, _ = engine.train_step(model, stepper, [(mel, text)], recipe.clap_weight, ema_decay, recipe.token_drop)
        return sums["loss"]

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


def in_fresh_process(function, *args):
    """function(*args) in a new spawned process (for peak memory free of what this process allocated before)."""
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(function, args)


def run(args) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config, fresh, mel, text, variants, info = build_variants(args)
    results = measure(variants, device, args.warmup, args.steps)
    if not cuda:
        for name in results:
            results[name]["peak_memory_bytes"] = in_fresh_process(cpu_step_peak_bytes, args, name)
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
        summary["peak_bf16_flops"] = peak_bf16_flops(device)
        for key in ("baseline", "optimized"):
            results[key]["mfu"] = mfu(analytic, results[key]["clips_per_s"], device)
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
# The prepared GPU run: every figure of the README's performance table in one command


def peak_bf16_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak, by its name (None on a CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    return next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name(device)), None)


def mfu(flops_per_clip: float, clips_per_s: float, device: torch.device) -> float | None:
    """Model FLOPs utilisation against the GPU's dense bf16 peak (None where that is unknown)."""
    peak = peak_bf16_flops(device)
    return flops_per_clip * clips_per_s / peak if peak else None


def ours_alone(args) -> dict:
    """Our step alone at args' shape: clips/s, peak memory and MFU."""
    device = torch.device(args.device)
    config, _, _, _, variants, info = build_variants(args, only="optimized")
    result = {**measure(variants, device, args.warmup, args.steps)["optimized"], **info["optimized"]}
    if device.type != "cuda":
        result["peak_memory_bytes"] = in_fresh_process(cpu_step_peak_bytes, args, "optimized")
    result["clips_per_s"] = args.batch / result["ms_per_step"] * 1000
    result["mfu"] = mfu(analytic_flops_per_clip(config, args.stage), result["clips_per_s"], device)
    return result


def train_py_clips_per_s(preset: str, device: str, batch: int, steps: int, work_dir: Path) -> float:
    """clips/s of `train.py --stage 1` itself over its last third of `steps`, on random log-mel shards.

    Everything a real run does is in it: loader workers reading shards, random
    crops, caption choice, the copy to the device, logging and the final
    checkpoint; the first steps (compilation) are left out.
    """
    config = m2d.preset(preset)
    n_clips = 4 * batch
    write_synthetic_shards(work_dir / "shards", n_clips, config.crop_frames)
    names = [f"synthetic/{k:07d}" for k in range(n_clips)]
    (work_dir / "captions.csv").write_text("file_name,caption\n" + "".join(f"{n},clip {n}\n" for n in names))
    np.save(work_dir / "captions.npy", np.random.default_rng(0).standard_normal((n_clips, config.text_dim),
                                                                                 dtype=np.float32))
    command = [sys.executable, str(Path(__file__).resolve().parent / "train.py"), "--stage", "1", "--preset", preset,
               "--data", str(work_dir / "captions.csv"), "--shards", str(work_dir / "shards"), "--device", device,
               "--batch-size", str(batch), "--max-steps", str(steps), "--log-every", str(steps // 3), "--save-every",
               str(steps), "--norm-stats", "-7", "4", "--out-dir", str(work_dir / "run"), "--no-resume"]
    result = subprocess.run(command, capture_output=True, text=True)
    print(result.stdout, end="")
    if result.returncode != 0:
        raise RuntimeError(f"train.py stopped (exit status {result.returncode}):\n{result.stderr}")
    records = (work_dir / "run" / "log.jsonl").read_text().splitlines()
    return json.loads(records[-1])["clips_per_s"]


def prepared_run(args) -> dict:
    """The authors' recipe and our step at one batch, ours at a larger one, train.py end to end, and Large."""
    cuda = args.device.startswith("cuda")
    common = ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    summary = run(parse_args(["--preset", args.preset, "--batch", str(args.batch), *common]))
    print_table(summary)
    large_batch = args.large_batch or (64 if cuda else 2)
    rows = {"authors' recipe": {**summary["baseline"], "batch": args.batch},
            "ours": {**summary["optimized"], "batch": args.batch}}
    if args.big_batch:
        rows["ours, larger batch"] = {**ours_alone(parse_args(["--preset", args.preset, "--batch",
                                                               str(args.big_batch), *common])), "batch": args.big_batch}
    with tempfile.TemporaryDirectory() as work_dir:
        clips_per_s = train_py_clips_per_s(args.preset, args.device, args.batch, args.train_steps, Path(work_dir))
    rows["train.py, synthetic shards"] = {"batch": args.batch, "clips_per_s": clips_per_s, "precision": "default",
                                          "mfu": mfu(summary["flops_per_clip"], clips_per_s, torch.device(args.device))}
    large_name = f"ours, {args.large_preset} + grad checkpointing"
    try:
        rows[large_name] = {**ours_alone(parse_args(
            ["--preset", args.large_preset, "--batch", str(large_batch), "--grad-checkpointing", *common])),
            "batch": large_batch}
    except torch.OutOfMemoryError:  # a finding, not a reason to lose the other rows
        rows[large_name] = {"batch": large_batch, "clips_per_s": float("nan"), "out_of_memory": True}
    print(f"\nprepared run on {summary['device']}, stage 1 ({args.preset}; last row {args.large_preset})")
    print(f"{'':38s} {'batch':>5s} {'clips/s':>9s} {'vs authors':>10s} {'MFU':>6s} {'peak GiB':>8s}")
    base = rows["authors' recipe"]["clips_per_s"]
    for name, r in rows.items():
        peak = (f"{r['peak_memory_bytes'] / 2**30:8.2f}" if "peak_memory_bytes" in r
                else f"{'OOM' if r.get('out_of_memory') else '-':>8s}")
        share = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else f"{'-':>6s}"
        ratio = f"{r['clips_per_s'] / base:9.2f}x" if name != large_name else f"{'-':>10s}"
        print(f"{name:38s} {r['batch']:5d} {r['clips_per_s']:9.1f} {ratio} {share} {peak}")
    return {"device": summary["device"], "preset": args.preset, "steps": summary, "rows": rows}


def prepared_main(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="bench.py prepared", description="The prepared GPU run (sized for under 5 "
                                "minutes on one H100): the authors' recipe, our step at two batch sizes, train.py "
                                "end to end, and Large with gradient checkpointing. With --device cpu it checks the "
                                "same path.")
    p.add_argument("--device", default="cuda" if cuda else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--preset", default="base" if cuda else "tiny", choices=sorted(m2d.PRESETS),
                   help="model size (default: base on a GPU, tiny on the CPU)")
    p.add_argument("--batch", type=int, default=128 if cuda else 16,
                   help="clips per step of the recipe comparison (default: 128 on a GPU, 16 on the CPU)")
    p.add_argument("--big-batch", type=int, default=256 if cuda else 32,
                   help="our step's larger batch, the GPU default (0: skip; default: 256 on a GPU, 32 on the CPU)")
    p.add_argument("--large-preset", default="large", choices=sorted(m2d.PRESETS),
                   help="the model timed with gradient checkpointing (default: large)")
    p.add_argument("--large-batch", type=int, default=None, help="default: 64 on GPU, 2 on CPU")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (default: 10)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps of each variant first, compilation included (default: 3)")
    p.add_argument("--train-steps", type=int, default=90,
                   help="steps of the train.py run, the last third timed (default: 90)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON (default: none)")
    args = p.parse_args(argv)
    refuse_missing_device(args.device)
    result = prepared_run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


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
    p.add_argument("--crop-frames", type=int, default=1001, help="log-mel frames per crop (default: 1001)")
    p.add_argument("--batch-size", type=int, default=64, help="clips per batch (default: 64)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes (default: 4)")
    p.add_argument("--seconds", type=float, default=15.0, help="timed seconds per source (default: 15)")
    p.add_argument("--synthetic-clips", type=int, default=0,
                   help="first fill an empty OUT_DIR with this many random 10 s (1001-frame) clips (default: 0)")
    args = p.parse_args(argv)
    if args.synthetic_clips and not (args.out_dir / "index.csv").exists():
        write_synthetic_shards(args.out_dir, args.synthetic_clips, 1001)
    try:
        rates = bench_loader(args.out_dir, args.crop_frames, args.batch_size, args.workers, args.seconds)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e} (or pass --synthetic-clips N to time random clips)")
    print(f"DataLoader, batch {args.batch_size}, {args.workers} workers, {args.crop_frames}-frame crops: "
          + ", ".join(f"{k} {v:.0f} clips/s" for k, v in rates.items()))


# -----------------------------------------------------------------------------
# Command line


def refuse_missing_device(name: str):
    """Stop with one line where --device names a device this machine does not have."""
    try:
        runs.check_device(name)
    except ValueError as e:
        sys.exit(f"error: {e}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(m2d.PRESETS), help="model size (default: tiny)")
    p.add_argument("--stage", default="1", choices=["1", "2"],
                   help="whose step: stage 1 (M2D + CLAP), or stage 2 (CLAP, 0.3 token drop) (default: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--batch", type=int, default=None, help="clips per step (default: 64 tiny, 16 base on CPU, 128 on GPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (default: 20; --quick: 10)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps of each variant first, compilation included (default: 3)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="our step's precision (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our step (default: as train.py, on for stage 1 on CUDA)")
    p.add_argument("--text-dim", type=int, default=None, help="sentence-embedding width (default: the preset's)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (both variants)")
    p.add_argument("--quick", action="store_true", help="fewer steps: the prepared GPU run")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON (default: none)")
    args = p.parse_args(argv)
    refuse_missing_device(args.device)
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
    if argv[:1] == ["prepared"]:
        return prepared_main(argv[1:])
    args = parse_args(argv)
    summary = run(args)
    print_table(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
