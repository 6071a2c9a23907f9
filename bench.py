"""bench.py: time full training steps of a method (forward, backward, optimizer step, teacher update)
on synthetic input of its real shape, through the method's own train_step, and print one JSON line.
Run: python bench.py hpm --model vit_small --input_size 224 --patch_size 16 --micro_batch 16 --progress 0.5
Every flag after the method name that bench.py does not know goes to the method's config, so
`python bench.py hpm --no-learning_loss ...` times plain MAE. --progress places the step in the
schedule (0.5: the middle of training, where HPM's hard-patch masking is active)."""
import argparse
import importlib
import json
import statistics
import time

import torch

import common


def synthetic_stream(module, cfg, device):
    """Endless micro-batches of the method's input shape (random pixels, fixed for the run)."""
    if hasattr(module, "synthetic_batch"):  # methods with multi-crop inputs define their own
        batch = module.synthetic_batch(cfg, device)
    else:
        batch = torch.randn(cfg.micro_batch, 3, cfg.input_size, cfg.input_size, device=device)
    while True:
        yield batch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("method", help="hpm, droppos, semaim, mokd or scfs")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, caches)")
    parser.add_argument("--progress", type=float, default=0.5, help="position in the schedule, in [0, 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args, rest = parser.parse_known_args()
    module = importlib.import_module(args.method)
    cfg = common.parse_config(module.Config, rest)
    cfg.batch_size = cfg.micro_batch  # one micro-batch per step, on one device
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = common.setup(cfg)
    model = module.build(cfg).to(ctx.device)
    if hasattr(module, "make_optimizer"):  # methods with their own optimizer(s) (MOKD: SGD + AdamW)
        optimizer = module.make_optimizer(model, cfg)
    else:
        optimizer = common.adamw(model, cfg.blr * cfg.batch_size / 256, cfg.weight_decay)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.dtype == torch.float16)
    if cfg.compile:
        common.compile_blocks(model)
    model.train()
    stream = synthetic_stream(module, cfg, ctx.device)
    epoch = int(args.progress * cfg.epochs)
    times = []
    for i in range(args.warmup + args.steps):
        sync(ctx.device)
        t0 = time.perf_counter()
        loss, stats = module.train_step(model, model, optimizer, scaler, stream, 1, ctx, cfg, args.progress, epoch)
        loss = loss.item()  # waits for the step to finish
        times.append(time.perf_counter() - t0)
    times = times[args.warmup:]
    median = statistics.median(times)
    peak = common.peak_memory_gib(ctx.device)
    print(json.dumps({
        "method": args.method, "model": cfg.model, "input_size": cfg.input_size, "patch_size": getattr(cfg, "patch_size", None),
        "device": str(ctx.device) if ctx.device.type == "cpu" else torch.cuda.get_device_name(),
        "dtype": str(ctx.dtype).removeprefix("torch."), "compile": cfg.compile, "threads": torch.get_num_threads(),
        "micro_batch": cfg.micro_batch, "progress": args.progress,
        "img_per_s": cfg.micro_batch / median, "ms_per_step": 1000 * median,
        "min_ms": 1000 * min(times), "max_ms": 1000 * max(times), "peak_mem_gib": peak,
        "trainable_params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "loss": loss, **{k: float(v) for k, v in stats.items()}}))


if __name__ == "__main__":
    main()
