"""bench.py: time full training steps of a method (forward, backward, optimizer step at the schedule's real lr,
teacher update) on synthetic input of its real shape, through the method's own train_step.
Run:  python bench.py hpm --model vit_small --input_size 224 --patch_size 16 --micro_batch 16 --progress 0.5
      python bench.py all                   # every method at the official-code baseline config, eager and compiled
      python bench.py all --preset cifar10  # every method at its CIFAR-10 preset (minutes on a CPU)
      python bench.py hpm --preset ssv2 --micro_batch 8  # HPM on clips (16 x 224 px); --no-learning_loss: VideoMAE
One method prints one JSON line (img/s, ms/step, peak memory, FLOPs per step and MFU where the device's peak is
known); `all` runs each config in its own process and ends with a markdown table. Every flag after the method
name that bench.py does not know goes to the method's config, so `python bench.py hpm --no-learning_loss ...`
times plain MAE. --progress places the step in the schedule (0.5: the middle of training, where HPM's
hard-patch masking is active). Progress of each timed step goes to stderr; JSON and the table to stdout."""
import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import common
import training

# The configs of the comparison with the official code (docs/results.md), one line each.
BASELINES = {
    "hpm": ["hpm", "--model", "vit_small", "--input_size", "224", "--patch_size", "16", "--micro_batch", "16"],
    "mae": ["hpm", "--no-learning_loss", "--norm_pix_loss", "--model", "vit_small", "--input_size", "224",
            "--patch_size", "16", "--micro_batch", "16"],
    "droppos": ["droppos", "--model", "vit_small", "--input_size", "224", "--patch_size", "16", "--micro_batch", "16"],
    "semaim": ["semaim", "--model", "vit_small", "--input_size", "224", "--patch_size", "16", "--micro_batch", "16"],
    "mokd": ["mokd", "--cnn_model", "resnet18", "--model", "vit_tiny", "--input_size", "224", "--local_size", "96",
             "--patch_size", "16", "--local_crops", "8", "--out_dim", "65536", "--micro_batch", "8"],
    "scfs": ["scfs", "--model", "resnet50", "--input_size", "224", "--local_size", "96", "--local_crops", "8",
             "--out_dim", "65536", "--micro_batch", "8"],
}
# Dense peak FLOP/s per GPU by name and dtype (vendor datasheets; float32 runs as TF32 here: allow_tf32 is on).
PEAK_FLOPS = {"H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
              "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
              "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}}


def peak_flops(device, dtype):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[dtype] for gpu, peaks in PEAK_FLOPS.items() if gpu in name), None)


def synthetic_batch(module, cfg, device):
    """One micro-batch of the method's input shape (random pixels, fixed for the run)."""
    if hasattr(module, "synthetic_batch"):  # methods with multi-crop inputs define their own
        return module.synthetic_batch(cfg, device)
    if getattr(cfg, "num_frames", 1) > 1:  # clips (3, T, H, W), as common.ClipFolder yields them
        return torch.randn(cfg.micro_batch, 3, cfg.num_frames, cfg.input_size, cfg.input_size, device=device)
    return torch.randn(cfg.micro_batch, 3, cfg.input_size, cfg.input_size, device=device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_one(args, rest):
    module = importlib.import_module(args.method)
    cfg = training.parse_config(module.Config, rest)
    cfg.output_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench_output")
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = training.setup(cfg)
    model = module.build(cfg).to(ctx.device)
    steps_per_epoch = 1000  # any: the schedule is read at `progress` (lr of the configured --batch_size there)
    optimizer, schedule = module.make_optimizer(model, cfg, steps_per_epoch)
    lr = schedule(int(args.progress * cfg.epochs * steps_per_epoch))
    model.train()
    batch = synthetic_batch(module, cfg, ctx.device)
    with FlopCounterMode(display=False) as counter:  # one eager step, counted, not timed
        module.train_step(model, optimizer, [batch], args.progress, cfg, ctx)
    flops = counter.get_total_flops()
    if cfg.compile:  # what the program's main() compiles (scfs: its ResNet stages and stage heads)
        if hasattr(module, "compiled_regions"):
            training.compile_modules(module.compiled_regions(model))
        else:
            training.compile_blocks(model)
    times = []
    for i in range(args.warmup + args.steps):
        sync(ctx.device)
        t0 = time.perf_counter()
        stats = module.train_step(model, optimizer, [batch], args.progress, cfg, ctx)
        loss = stats["loss"].item()  # waits for the step to finish
        times.append(time.perf_counter() - t0)
        kind = "warm-up" if i < args.warmup else "timed"
        print(f"{args.method}{' compiled' if cfg.compile else ''}: {kind} step {i + 1}/{args.warmup + args.steps} "
              f"{1000 * times[-1]:.0f} ms", file=sys.stderr, flush=True)
    median = statistics.median(times[args.warmup:])
    peak = peak_flops(ctx.device, str(ctx.dtype).removeprefix("torch."))
    print(json.dumps({
        "method": args.method, "model": cfg.model, "input_size": cfg.input_size,
        "patch_size": getattr(cfg, "patch_size", None), "num_frames": getattr(cfg, "num_frames", 1),
        "device": str(ctx.device) if ctx.device.type == "cpu" else torch.cuda.get_device_name(),
        "dtype": str(ctx.dtype).removeprefix("torch."), "compile": cfg.compile, "threads": torch.get_num_threads(),
        "micro_batch": cfg.micro_batch, "progress": args.progress, "lr": lr,
        "img_per_s": cfg.micro_batch / median, "ms_per_step": 1000 * median,
        "min_ms": 1000 * min(times[args.warmup:]), "max_ms": 1000 * max(times[args.warmup:]),
        "peak_mem_gib": training.peak_memory_gib(ctx.device), "tflop_per_step": flops / 1e12,
        "mfu": flops / median / peak if peak else None,
        "trainable_params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "loss": loss, **{k: float(v) for k, v in stats.items() if k != "loss"}}), flush=True)


def bench_all(args, rest):
    """Each method (MAE too) eager and compiled, each in its own process (honest peak memory, no shared caches)."""
    runs = []
    for name, line in BASELINES.items():
        method_args = [line[0], *(["--preset", "cifar10"] + [a for a in line[1:] if a.startswith("--no-")]
                                  if args.preset else line[1:])]
        for compiled in (False, True):
            cmd = [sys.executable, os.path.abspath(__file__), *method_args, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--progress", str(args.progress), "--threads", str(args.threads),
                   *rest, *(["--compile"] if compiled else [])]
            p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if p.returncode != 0:
                print(f"{name}{' compiled' if compiled else ''}: failed (exit {p.returncode})", file=sys.stderr)
                continue
            result = {"name": name, **json.loads(p.stdout.strip().splitlines()[-1])}
            print(json.dumps(result), flush=True)
            runs.append(result)
    print("\n| method | compile | device | dtype | micro-batch | ms/step | img/s | peak memory (GiB) | TFLOP/step | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-"
        print(f"| {r['name']} | {'yes' if r['compile'] else 'no'} | {r['device']} | {r['dtype']} | {r['micro_batch']} | "
              f"{r['ms_per_step']:.0f} | {r['img_per_s']:.1f} | {r['peak_mem_gib']:.2f} | {r['tflop_per_step']:.3f} | "
              f"{mfu} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="hpm, droppos, semaim, mokd, scfs, finetune, or all")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, caches)")
    parser.add_argument("--progress", type=float, default=0.5, help="position in the schedule, in [0, 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--preset", help="the method's preset (hpm: cifar10, ssv2, video_tiny); with all: cifar10, "
                        "every method at it instead")
    args, rest = parser.parse_known_args()
    if args.steps < 1 or args.warmup < 0 or not 0 <= args.progress < 1 or args.threads < 0:
        common.fail("--steps must be >= 1, --warmup >= 0, --threads >= 0 and --progress in [0, 1)")
    if args.method == "all":
        if args.preset not in (None, "cifar10"):
            common.fail(f"all --preset {args.preset}: only cifar10 is a preset of every method; time one method instead")
        bench_all(args, rest)
    elif args.method in ("hpm", "droppos", "semaim", "mokd", "scfs", "finetune"):
        bench_one(args, (["--preset", args.preset] if args.preset else []) + rest)
    else:
        common.fail(f"unknown method {args.method}; choose hpm, droppos, semaim, mokd, scfs, finetune or all")


if __name__ == "__main__":
    main()
