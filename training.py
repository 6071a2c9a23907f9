"""training.py: the plumbing every training program here shares, kept apart from the models (common.py).

Process setup under torchrun with guarded collectives, the gradient-accumulation step, AdamW parameter groups and
per-step schedules, checkpoints that resume exactly (and refuse a changed run), rank agreement on the checkpoint,
the logger, and config parsing. The contract with a training program is `TrainConfig` (at the end): the fields
this file reads. Imports run one way: common.py <- training.py <- the programs.
"""
import argparse
import dataclasses
import importlib
import inspect
import itertools
import json
import math
import os
import random
import re
import resource
import socket
import sys
import time
from contextlib import nullcontext
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torchvision

import common
from common import fail, progress_bar


# --- Distributed setup, seeding, precision ---------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Context:
    """Where this process runs: rank, number of processes, device, autocast dtype, and the gradient scaler
    (active only for float16; a no-op otherwise)."""
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    scaler: torch.amp.GradScaler
    main = property(lambda self: self.rank == 0)

    def autocast(self):  # reduced-precision autocast, or nothing for float32
        return nullcontext() if self.dtype == torch.float32 else torch.autocast(self.device.type, dtype=self.dtype)


def setup(cfg):
    """Process group under torchrun (nccl on CUDA, gloo on CPU), else none; device, dtype, seed + rank; the
    output folder checked (a directory we can write) and cleared of a checkpoint half-written by a killed run."""
    want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", want):
        fail(f"unknown --device {cfg.device}; choose auto, cpu, cuda or cuda:N")
    if want.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {cfg.device} but no GPU is visible; pass --device cpu")
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if want.startswith("cuda") else "float32")
    if dtype_name not in DTYPES:
        fail(f"unknown --dtype {cfg.dtype}; choose auto, float32, bfloat16 or float16")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(want)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if rank == 0:
        prepare_output_dir(cfg.output_dir)
    if world > 1 and not distributed():
        init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed_all(cfg.seed + rank)
    scaler = torch.amp.GradScaler(device.type, enabled=DTYPES[dtype_name] == torch.float16)
    return Context(rank, world, device, DTYPES[dtype_name], scaler)


def prepare_output_dir(path):
    """Create the output folder, check that we can write there, remove a stale checkpoint.pth.tmp."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"--output_dir {path} is a file; pass a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write to --output_dir {path} ({e.strerror}); pass a folder you can write to")
    stale = os.path.join(path, "checkpoint.pth.tmp")
    if os.path.exists(stale):  # a save killed mid-write: the last complete checkpoint.pth is intact
        os.remove(stale)


def init_process_group(backend):
    """torchrun's process group, keyed by its restart count. A torchrun restart (--max-restarts) reuses the
    agent's store, where the dead round's keys are still present: with the plain env:// init, restarted
    workers read them and fail to connect (Gloo 'connectFullMesh failed', or a hang; the same with NCCL:
    pytorch/pytorch#167288). A PrefixStore per restart gives every round a fresh namespace."""
    store, rank, world = next(dist.rendezvous("env://"))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"restart{restart}/", store), rank=rank, world_size=world)


def seed_all(seed):  # python, numpy and torch (CPU and every GPU)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def distributed():  # inside a process group? (our collectives are no-ops without one)
    return dist.is_available() and dist.is_initialized()


def all_reduce_mean(x):
    """Mean over processes; the identity without a process group."""
    if distributed():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def all_gather(obj):
    """Every process's obj, in rank order; [obj] without a process group."""
    if not distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


DDP = torch.nn.parallel.DistributedDataParallel
# Buffers (EMA teachers, centres, BatchNorm statistics) are kept equal on every rank by the methods themselves,
# so DDP need not broadcast them before every forward (torch >= 2.13 names the switch forward_sync_buffers).
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})


def wrap_ddp(model, ctx):
    """DistributedDataParallel when launched on several processes, else the model itself."""
    if ctx.world == 1:
        return model
    return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, **_NO_BUFFER_SYNC)


def unwrap(ddp):
    return ddp.module if isinstance(ddp, DDP) else ddp


def compile_modules(modules, backend="inductor"):
    """Regional compilation: compile each module in place (short compile times, parameter names unchanged). The
    method's own schedule and masking logic stays eager, so changing schedule values never trigger recompiles.
    Modules of one class share dynamo's cache of that class's forward: each structure (ViT blocks of the encoder and
    of a narrower decoder, blocks with and without drop path; ResNet stages of other widths), grad mode (a teacher's
    no-grad pass) and input shape (multi-crop: a static graph, then a dynamic one) is one more graph, at most 4 per
    module. Dynamo's recompile limit (8 per function), past which it quietly runs the rest eagerly, is raised to
    that. backend: tests pass a light one ("aot_eager_decomp_partition") that compiles in seconds on a CPU."""
    modules = list(modules)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(modules))
    for m in modules:
        m.compile(backend=backend)


def compile_blocks(model, backend="inductor"):
    """compile_modules on each transformer common.Block of the model (blocks of one width share one graph)."""
    compile_modules((m for m in model.modules() if isinstance(m, common.Block)), backend)


# --- The batch stream: optimizer steps of micro-batches -------------------------------------------------
class Step:
    """The micro-batches of one optimizer step: len() of them, read lazily, so one is on the device at a time."""
    def __init__(self, stream, count):
        self.stream, self.count = stream, count

    def __len__(self):
        return self.count

    def __iter__(self):
        return itertools.islice(self.stream, self.count)


class Batches:
    """Epoch-wise iteration over a training set in optimizer steps of cfg.batch_size images: per process
    batch_size / world images, in micro-batches of cfg.micro_batch (gradient accumulation makes up the rest);
    a fresh seeded shuffle and augmentation stream each epoch (so a resumed run sees the same images as an
    uninterrupted one); images moved to the device; a count of unreadable files that stops the run once most
    files fail. Images past the last full step of an epoch are left out (drop_last, as MAE and DINO).
    A data set smaller than one batch (a quick check on a few images) trains one smaller step per epoch: the
    batch shrinks to the images (in equal micro-batches of at most cfg.micro_batch), and cfg.batch_size and
    cfg.micro_batch are set to it before the lr (blr x batch / 256), the log and the checkpoint's config read
    them; one line says so.
    labels=True yields (images, labels) pairs instead of images (supervised training: finetune.py)."""

    def __init__(self, dataset, cfg, ctx, labels=False):
        self.files = getattr(dataset, "samples", None)  # (path, label) per index, to name an unreadable file
        self.kind = "clips" if isinstance(dataset, common.ClipFolder) else "images"
        self.total, self.classes, self.limit = len(dataset), len(getattr(dataset, "classes", ())), cfg.limit
        dataset = common.subset(dataset, cfg.limit)
        self.size = len(dataset)  # what is trained on: --limit of them
        per_process = cfg.batch_size // ctx.world
        if cfg.batch_size % ctx.world or per_process % cfg.micro_batch:
            fail(f"--batch_size {cfg.batch_size} is not a multiple of --micro_batch {cfg.micro_batch} x {ctx.world} "
                 "process(es); change one of them (or leave --micro_batch unset: it then divides the batch)")
        images = len(dataset) // ctx.world  # per process (DistributedSampler with drop_last)
        if 0 < images < per_process:
            accum = -(-images // cfg.micro_batch)  # as few micro-batches as the cap allows, of equal size
            micro = images // accum
            smaller = accum * micro * ctx.world
            if ctx.main:
                print(f"{len(dataset)} images make no full batch of --batch_size {cfg.batch_size}: each epoch is one "
                      f"step of {smaller} ({ctx.world} process(es) x {accum} micro-batch(es) of {micro}), "
                      "the lr scaled to it", file=sys.stderr)
            cfg.batch_size, cfg.micro_batch, per_process = smaller, micro, smaller // ctx.world
        self.accum = per_process // cfg.micro_batch
        self.sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        self.generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            dataset, cfg.micro_batch, sampler=self.sampler, num_workers=cfg.num_workers, drop_last=True,
            pin_memory=ctx.device.type == "cuda", generator=self.generator)
        self.steps_per_epoch = len(self.loader) // self.accum
        if self.steps_per_epoch == 0:
            fail(f"{len(dataset)} images are fewer than the {ctx.world} processes; pass a data set with more images")
        self.seed, self.device, self.read, self.skipped = cfg.seed, ctx.device, 0, 0
        self.labels = labels

    def found(self):
        """'24 images in 2 classes', or with --limit '8 of 24 images in 2 classes (--limit 8)'."""
        limited = f"{self.size} of " if self.size < self.total else ""
        return (f"{limited}{self.total} {self.kind} in {self.classes} class{'es' * (self.classes != 1)}"
                + (f" (--limit {self.limit})" if limited else ""))

    def epoch(self, epoch):
        """The epoch's optimizer steps, each a Step of `accum` micro-batches on the device."""
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(self.seed + 1000 * epoch)  # loader workers' augmentation seeds
        stream = self._micro_batches()
        for _ in range(self.steps_per_epoch):
            yield Step(stream, self.accum)
        stream.close()  # shuts the loader's workers down now, not when garbage-collected

    def _micro_batches(self):
        for images, labels, skipped in self.loader:  # images: a tensor, or a list of crops (multi-crop)
            if int(skipped.min()) < 0:  # a CPU tensor from the loader: no device sync
                index = -int(skipped.min()) - 1
                fail(f"{common.ImageFolder.max_skips} files in a row could not be read (from {self.files[index][0]}); "
                     "check the dataset's files")
            self.read += len(skipped)
            self.skipped += int(skipped.sum())
            if self.skipped > max(self.read, 8):  # more unreadable files than readable ones
                fail(f"most images could not be read ({self.skipped} unreadable, {self.read} read); check the dataset")
            if isinstance(images, (list, tuple)):  # crop-major: V tensors of (B, 3, h, w)
                yield [x.to(self.device, non_blocking=True) for x in images]
            elif self.labels:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            else:
                yield images.to(self.device, non_blocking=True)


# --- One optimizer step ------------------------------------------------------------------------------
def forward_backward(ddp, micro_batches, progress, ctx):
    """Forward and backward of every micro-batch of one optimizer step; each loss is divided by their number,
    so the gradients are those of the mean loss, and DDP all-reduces them only after the last (no_sync before).
    -> {"loss": ..., **stats}, each the mean over the micro-batches (detached tensors: no host sync)."""
    n, sums = len(micro_batches), {}
    for i, batch in enumerate(micro_batches):
        last = i == n - 1
        with ddp.no_sync() if isinstance(ddp, DDP) and not last else nullcontext():
            with ctx.autocast():
                loss, stats = ddp(batch, progress)
            ctx.scaler.scale(loss / n).backward()
        for k, v in {"loss": loss, **stats}.items():
            v = v.detach().float() / n
            sums[k] = sums[k] + v if k in sums else v
    return sums


def optimizer_step(optimizer, ctx):
    """Step (through the fp16 scaler, a no-op otherwise) and clear the gradients (set to None: no memset)."""
    ctx.scaler.step(optimizer)
    ctx.scaler.update()
    optimizer.zero_grad(set_to_none=True)


# --- Optimisation ----------------------------------------------------------------------------------
def cosine_schedule(base, final, total_steps, warmup_steps=0, dino_warmup=False):
    """Per-step values: a linear warm-up from 0, then a half-cosine from base to final over the other steps.
    MAE's warm-up is base * step / W (util/lr_sched.py); DINO's is np.linspace(0, base, W) (utils.py,
    cosine_scheduler), which reaches base at its last step. A warm-up longer than the run is cut off at the
    end of the run, as MAE's per-iteration rule does (DINO's would fail an assertion)."""
    steps = np.arange(total_steps, dtype=np.float64)
    t = (steps - warmup_steps) / max(total_steps - warmup_steps, 1)
    values = final + (base - final) * 0.5 * (1 + np.cos(np.pi * t))
    w = min(warmup_steps, total_steps)
    if dino_warmup:
        values[:w] = np.linspace(0, base, warmup_steps)[:w]
    else:
        values[:w] = base * steps[:w] / warmup_steps
    return values


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices and conv kernels (ndim >= 2), none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def adamw(model, lr, weight_decay, betas=(0.9, 0.95)):
    """Fused AdamW (a single kernel per step on CUDA, also available on CPU)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=True)


def mae_optimizer(model, cfg, steps_per_epoch):
    """MAE's optimizer and lr (main_pretrain.py, util/lr_sched.py) for a config with blr, min_lr, weight_decay and
    warmup_epochs: fused AdamW (0.9, 0.95), lr = blr * batch_size / 256, warm-up then cosine, per step.
    -> (optimizer, schedule); schedule(step) sets that step's lr and returns it."""
    lr = cfg.blr * cfg.batch_size / 256
    lrs = cosine_schedule(lr, cfg.min_lr, cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch)
    optimizer = adamw(model, lr, cfg.weight_decay)
    return optimizer, lambda step: set_lr(optimizer, lrs[step])


def set_lr(optimizer, lr):
    """Every group's lr (a plain float: numpy scalars would not pass torch.load(weights_only)); returns it."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr)
    return float(lr)


def clip_per_tensor(parameters, max_norm):
    """DINO's clip_gradients: each gradient scaled by max_norm / (norm + 1e-6) where that is below 1, every
    tensor on its own (not a global norm); foreach norms, no host sync. NOTE(official): DINO also calls
    .item() on every norm. Returns the global norm before clipping (detached), for the log."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), device=parameters[0].device if parameters else None)
    norms = torch.stack(torch._foreach_norm(grads))  # (P,)
    if max_norm > 0:
        torch._foreach_mul_(grads, list((max_norm / (norms + 1e-6)).clamp(max=1.0).unbind()))
    return norms.norm()


# --- Checkpoints: output_dir/checkpoint.pth, written atomically; auto-resume -----------------------
def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def export_state(model, encoder="encoder"):
    """State dict with the encoder at the top level under timm's names (MAE fine-tuning and timm load it)."""
    prefix = encoder + "."
    return {k.removeprefix(prefix): v for k, v in model.state_dict().items()}


def mismatch(wanted, state, limit=3):
    """What keeps `state` from loading into a model whose state dict is `wanted`, in one short sentence (the
    counts and the first few names of missing, unexpected and wrong-shape keys), or '' if it fits."""
    def names(keys):
        return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted]
    shapes = [f"{k} {tuple(state[k].shape)} here {tuple(wanted[k].shape)}" for k in wanted
              if k in state and (not torch.is_tensor(state[k]) or state[k].shape != wanted[k].shape)]
    parts = [f"{len(keys)} {what} ({names(keys)})" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if keys]
    return "; ".join(parts)


def import_state(model, state, encoder="encoder"):
    """Inverse of export_state: put the encoder's prefix back, then load strictly (one-line error if it does not fit)."""
    own = model.state_dict()
    state = {(k if k in own else f"{encoder}.{k}"): v for k, v in state.items()}
    problem = mismatch(own, state)
    if problem:
        plain = {k.removeprefix(encoder + "."): v for k, v in own.items()}  # report under the checkpoint's names
        problem = mismatch(plain, {k.removeprefix(encoder + "."): v for k, v in state.items()})
        fail(f"the checkpoint's weights do not fit this model: {problem}; resume with the same model settings "
             "(--model, --input_size, --patch_size, ...) or use a fresh --output_dir")
    model.load_state_dict(state)


def save_checkpoint(cfg, method, model, optimizer, epoch, ctx, encoders=None, extra=None):
    """Rank 0 writes output_dir/checkpoint.pth: {method, model, optimizer, epoch (the next one), config, rng (one
    per rank), scaler}; encoders {name: (module, arch)} adds encoders[name] = {arch, state} (torchvision / timm
    names) for eval_linear; extra {key: value} adds more top-level entries (finetune.py: best_top1). Written to a
    temporary file, flushed to disk, then renamed: a crash or a power loss leaves the previous checkpoint or this
    one, never a torn or empty file."""
    rngs = all_gather(rng_state())
    if ctx.main:
        state = {"method": method, "model": export_state(model), "optimizer": optimizer.state_dict(),
                 "epoch": epoch, "config": dataclasses.asdict(cfg), "rng": rngs, "scaler": ctx.scaler.state_dict()}
        if encoders:
            state["encoders"] = {k: {"arch": arch, "state": m.state_dict()} for k, (m, arch) in encoders.items()}
        state.update(extra or {})
        path = os.path.join(cfg.output_dir, "checkpoint.pth")
        with open(path + ".tmp", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        folder = os.open(cfg.output_dir, os.O_RDONLY)  # the rename itself reaches the disk
        os.fsync(folder)
        os.close(folder)
    if distributed():
        dist.barrier()


def load_checkpoint(path, method=None):
    """Load safely (weights_only: a checkpoint cannot run code), check its layout, and that it came from `method`."""
    if os.path.isdir(path):
        fail(f"checkpoint {path} is a folder; pass the checkpoint.pth inside it")
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist; check the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); it is damaged or was not written by "
             "one of our training scripts")
    if method is not None and isinstance(ckpt, dict) and isinstance(ckpt.get("method"), str) and ckpt["method"] != method:
        fail(f"{path} was written by {ckpt['method']}.py, not {method}.py; "
             "use a fresh --output_dir or the matching script")
    layout = {"method": str, "model": dict, "epoch": int, "config": dict}
    bad = [k for k, kind in layout.items() if not isinstance(ckpt, dict) or not isinstance(ckpt.get(k), kind)]
    encoders = ckpt.get("encoders") if isinstance(ckpt, dict) else None
    if encoders is not None and not (isinstance(encoders, dict) and all(
            isinstance(e, dict) and isinstance(e.get("state"), dict) and isinstance(e.get("arch"), dict)
            and isinstance(e["arch"].get("model"), str) for e in encoders.values())):
        bad.append("encoders")
    if bad:
        fail(f"{path} is not a checkpoint of ours (no valid {', '.join(bad)}); pass a checkpoint.pth written by "
             "one of our training scripts")
    return ckpt


def load_encoder(path, name=""):
    """The encoder of one of our checkpoints, for evaluation and fine-tuning: ckpt["encoders"][name] when the method
    saved several (MOKD: cnn, common.vit), else the one stored at the top level of its model, built from its config.
    -> (encoder in eval mode, ckpt, arch); arch = {model, input_size, patch_size, num_frames, tubelet_size (ViT;
    num_frames > 1: a clip model) / cifar_stem (ResNet)}."""
    ckpt = load_checkpoint(path)
    if ckpt["method"] == "finetune":  # a classifier: its encoder lost the final norm (global pool) and its features
        source = ckpt["config"].get("checkpoint") or ""  # are tuned to its labels
        fail(f"{path} is a fine-tuned classifier (written by finetune.py), not a pre-trained encoder; pass the "
             + (f"pre-training checkpoint it started from instead: {source}" if source else
                "checkpoint.pth of a pre-training run instead (hpm.py, droppos.py, semaim.py, mokd.py, scfs.py)"))
    if ckpt.get("encoders"):
        names = sorted(ckpt["encoders"])
        if not name and len(names) > 1:
            fail(f"{path} holds the encoders {', '.join(names)}; pick one with --encoder")
        name = name or names[0]
        if name not in ckpt["encoders"]:
            fail(f"{path} has no encoder {name!r}; pass --encoder {' or '.join(names)}")
        arch, state = ckpt["encoders"][name]["arch"], ckpt["encoders"][name]["state"]
    else:
        cfg = ckpt["config"]
        arch = {"model": cfg.get("model"), "input_size": cfg.get("input_size"), "patch_size": cfg.get("patch_size", 16),
                "cifar_stem": cfg.get("cifar_stem", False), "num_frames": cfg.get("num_frames", 1),
                "tubelet_size": cfg.get("tubelet_size", 1)}
        state = ckpt["model"]
    vit_arch = isinstance(arch["model"], str) and arch["model"] in common.VIT_SIZES
    sizes_ok = isinstance(arch.get("input_size"), int) and (not vit_arch or isinstance(arch.get("patch_size"), int))
    frames, tubelet = arch.get("num_frames", 1), arch.get("tubelet_size", 1)
    sizes_ok = (sizes_ok and isinstance(frames, int) and isinstance(tubelet, int) and 1 <= tubelet <= frames
                and frames % tubelet == 0)
    if not sizes_ok or not (vit_arch or hasattr(torchvision.models, str(arch["model"]))):
        fail(f"{path} names no encoder we can build (model {arch['model']!r}, input size {arch.get('input_size')!r}); "
             "pass a checkpoint written by one of our training scripts")
    if vit_arch:
        encoder = common.vit(arch["model"], arch["input_size"], arch["patch_size"], num_frames=frames, tubelet_size=tubelet)
    else:
        encoder = common.resnet(arch["model"], arch.get("cifar_stem", False))
    wanted = encoder.state_dict()
    problem = mismatch(wanted, {k: v for k, v in state.items() if k in wanted})
    if problem:
        fail(f"{path} has no complete {arch['model']} encoder ({problem}); pass a checkpoint written by one of our "
             "training scripts")
    encoder.load_state_dict({k: state[k] for k in wanted})
    return encoder.eval(), ckpt, arch


def agree_on_checkpoint(output_dir, path, epoch, ctx):
    """Before any step: every rank must see rank 0's output folder (a file rank 0 writes there) and the same
    checkpoint (epoch), else all stop with one line naming a rank and host that differ: with node-local folders
    the ranks would resume different states and their weights drift apart until the job dies mid-step."""
    marker = all_gather(f".shared_check_{os.getpid()}_{time.time_ns()}")[0]  # rank 0's name, on every rank
    if ctx.main:
        open(os.path.join(output_dir, marker), "w").close()
    dist.barrier()
    views = all_gather((socket.gethostname(), os.path.exists(os.path.join(output_dir, marker)), epoch, path,
                        os.path.abspath(output_dir)))
    if ctx.main:
        os.remove(os.path.join(output_dir, marker))

    def sees(e, p):
        return f"no checkpoint at {p}" if e is None else f"a checkpoint at epoch {e} at {p}"
    host0, _, epoch0, path0, folder0 = views[0]
    for r, (host, shared, e, p, folder) in enumerate(views):
        if not shared or e != epoch0:
            if not ctx.main:
                sys.exit(1)  # the line comes from rank 0
            what = f"does not see in {folder} the file rank 0 wrote in {folder0}" if not shared else sees(e, p)
            fail(f"rank {r} on {host} {what}, while rank 0 on {host0} sees {sees(epoch0, path0)}; the output folder "
                 "must be on a filesystem all nodes share")


def resume(cfg, method, model, optimizer, ctx):
    """Continue from --resume, or from output_dir/checkpoint.pth if it exists; returns the epoch to start from.
    Under torchrun every rank must see the same output folder and checkpoint (agree_on_checkpoint). The checkpoint's config must match this run's, apart from the settings TrainConfig.free_on_resume
    lists; an explicit --resume continues with the new settings and prints what changed. A run that has
    already trained cfg.epochs epochs exits 0 without training."""
    path = cfg.resume or os.path.join(cfg.output_dir, "checkpoint.pth")
    ckpt = load_checkpoint(path, method) if os.path.exists(path) or cfg.resume else None
    if distributed():
        agree_on_checkpoint(cfg.output_dir, path, ckpt["epoch"] if ckpt else None, ctx)
    if ckpt is None:
        return 0
    old, new = ckpt["config"], dataclasses.asdict(cfg)
    changed = [f"--{k} {old[k]} (now {v})" for k, v in new.items()
               if k in old and k not in cfg.free_on_resume and old[k] != v]
    if changed and not cfg.resume:
        fail(f"{path} was trained with other settings: {', '.join(changed)}; pass a new --output_dir for a fresh "
             f"run, or --resume {path} to continue it with the new settings")
    if ckpt["epoch"] >= cfg.epochs:
        if ctx.main:
            n = ckpt["epoch"]
            print(f"{path} has already trained {n} epoch{'s' * (n != 1)} and --epochs is {cfg.epochs}: nothing to "
                  "train (pass a larger --epochs to train on)", file=sys.stderr)
        sys.exit(0)
    missing = [k for k in ("optimizer", "rng") if k not in ckpt]
    if missing:
        fail(f"{path} has no {' or '.join(missing)} state to resume from; start a fresh --output_dir")
    import_state(model, ckpt["model"])
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        fail(f"the optimizer state in {path} does not fit this model ({e}); use a fresh --output_dir")
    if ckpt.get("scaler"):
        ctx.scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt["rng"]
    if len(rngs) == ctx.world:
        set_rng_state(rngs[ctx.rank])
    else:  # another world size: a fresh, distinct stream per rank
        seed_all(cfg.seed + ctx.rank + 7919 * ckpt["epoch"])
    if ctx.main:
        if changed:
            print(f"resuming {path} with changed settings: {', '.join(changed)}", file=sys.stderr)
        print(f"resumed from {path}: epoch {ckpt['epoch']} of {cfg.epochs}", file=sys.stderr)
    return ckpt["epoch"]  # NOTE(official): the next epoch itself; HPM's and DropPos's forks of MAE store epoch + 1
    # and add 1 again at load (util/misc.py), skipping an epoch on every resume


# --- Logging ---------------------------------------------------------------------------------------
def peak_memory_gib(device):
    """Peak GPU memory allocated on CUDA; peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


class Logger:
    """A progress bar over the run's optimizer steps (its label says the epoch) and, at the run's first step
    and every cfg.log_every steps, a log line and a JSON record in output_dir/log.jsonl. A logged value is the
    mean over the steps since the last line of each step's value, itself the mean over the step's micro-batches
    (common.forward_backward), averaged over all processes: one all-reduce and one host sync per log line,
    none per step. Every process calls step(); rank 0 writes. At start, config.json is written and log records
    from a step this run will train again (after a resume, or a fresh start over an old log) are dropped."""

    def __init__(self, cfg, ctx, steps_per_epoch, start_epoch):
        self.cfg, self.ctx, self.every, self.epochs = cfg, ctx, cfg.log_every, cfg.epochs
        self.steps_per_epoch = steps_per_epoch
        self.images_per_step, self.first = cfg.batch_size, start_epoch * steps_per_epoch
        self.path = os.path.join(cfg.output_dir, "log.jsonl")
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()
        self.last_step = self.t0  # when the last step() returned (record() leaves the time after it out)
        self.bar = progress_bar(total=cfg.epochs * steps_per_epoch, initial=self.first, disable=not ctx.main,
                                desc=f"epoch {start_epoch + 1}/{cfg.epochs}")
        if ctx.main:
            with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=1)
            self._drop_records_from(self.first)

    def _drop_records_from(self, step):
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", -1) < step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(self.path + ".tmp", self.path)  # atomic: a kill leaves the old log or the new one

    def info(self, message):
        if self.ctx.main:
            self.bar.write(message)

    def run_line(self, name, model, batches, **blrs):
        """One line on the run: the training images (clips) and classes found (Batches.found), trainable
        parameters, each lr = blr x batch / 256 (blr=, or one per model: blr_cnn=, blr_vit=), processes x
        micro-batches, steps per epoch, device and dtype."""
        cfg, ctx = self.cfg, self.ctx
        params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        lrs = ", ".join(f"{k[1:]} {b * cfg.batch_size / 256:.3g} = {k} {b:g} x {cfg.batch_size} / 256"
                        for k, b in blrs.items())
        self.info(f"{name}: {batches.found()}; {params:.1f}M trainable params; {lrs}; {ctx.world} process(es) x "
                  f"{batches.accum} micro-batch(es) of {cfg.micro_batch}; {self.steps_per_epoch} steps/epoch; "
                  f"{ctx.device}, {ctx.dtype}")

    def warmups(self, **flags):
        """One line naming the warm-ups (name=the config field of its epochs) longer than the run: they are cut off
        at its end; the line names the flags that switch them off for a quick check."""
        cut = {name: flag for name, flag in flags.items() if getattr(self.cfg, flag) > self.epochs}
        if cut:
            names = ", ".join(f"{name.replace('_', ' ')} ({getattr(self.cfg, flag)} epochs)" for name, flag in cut.items())
            self.info(f"warm-up longer than the {self.epochs}-epoch run, cut off at its end: {names}; for a quick "
                      f"check without it pass {' '.join(f'--{flag} 0' for flag in cut.values())}")

    def step(self, step, lr, stats):
        """Record one optimizer step's stats (detached tensors, e.g. from forward_backward)."""
        epoch = step // self.steps_per_epoch
        if step % self.steps_per_epoch == 0:
            self.bar.set_description(f"epoch {epoch + 1}/{self.epochs}", refresh=False)
        self.bar.update(1)
        self.last_step = time.perf_counter()
        for k, v in stats.items():
            v = v.detach().float().to(self.ctx.device)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1
        if self.count < self.every and step != self.first and step + 1 < self.bar.total:
            return
        keys = sorted(self.sums)  # the same order on every rank
        means = all_reduce_mean(torch.stack([self.sums[k] for k in keys]) / self.count)
        values = dict(zip(keys, means.tolist()))  # the one host sync
        if not math.isfinite(values["loss"]):
            fail(f"the loss became {values['loss']} within steps {step + 1 - self.count}..{step}; "
                 "lower the learning rate or check the data")
        seconds = time.perf_counter() - self.t0
        record = {"step": step, "epoch": epoch, "lr": lr, **values, "peak_mem_gib": peak_memory_gib(self.ctx.device),
                  "img_per_s": self.count * self.images_per_step / seconds}
        if self.ctx.main:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}", refresh=False)
            self.bar.write(f"epoch {epoch} step {step}: " + " ".join(
                f"{k} {v:.4g}" for k, v in record.items() if k not in ("step", "epoch")))
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()

    def record(self, **values):
        """Rank 0 writes one more line and JSON record (finetune.py: an evaluation); give it a "step" (the last
        step it follows), so a resumed run drops it with the steps it trains again. The time since the last step
        (the evaluation) is left out of the next img_per_s."""
        self.t0 += time.perf_counter() - max(self.last_step, self.t0)  # t0 is later if the last step logged
        if self.ctx.main:
            self.bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))
            with open(self.path, "a") as f:
                f.write(json.dumps(values) + "\n")

    def close(self):
        self.bar.close()


# --- Config: a dataclass becomes --flags; its field comments become --help -------------------------
def optional(module, what):
    """A file of ours that only some runs import (teachers.py, for feature targets), imported when a run needs it;
    one line where it was not copied along."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # the file is there; something it imports is not
            raise
        fail(f"{what} needs {module}.py beside this file; copy it from the repository")


@dataclasses.dataclass
class TrainConfig:
    """The settings this file reads (setup, Batches, Logger, save_checkpoint, resume). Every training program's
    Config extends it, redeclaring a field where its own default differs (the paper's epochs and batch size)."""
    data_path: str = ""  # ImageFolder of training images (one sub-folder per class), or the word cifar10
    data_root: str = "./data"  # where --data_path cifar10 is downloaded to
    output_dir: str = "./runs/run"  # checkpoint.pth, log.jsonl, config.json; rerun the same command to resume
    limit: int = 0  # train on at most this many images, evenly spaced so every class stays (a quick check); 0: all
    epochs: int = 100  # training epochs
    batch_size: int = 256  # global batch over all processes and accumulation steps (the paper's number)
    micro_batch: int = 64  # per-process batch; if not given, the largest divisor of the per-process batch up to this
    num_workers: int = 10  # data loader processes per device; if not given, at most the CPU cores per process
    seed: int = 0  # each process uses seed + rank
    device: str = "auto"  # auto (cuda if available), cpu, cuda or cuda:N
    dtype: str = "auto"  # auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16
    compile: bool = False  # torch.compile the repeated blocks (transformer blocks; ResNet stages)
    resume: str = ""  # checkpoint to continue, even with changed settings; default: output_dir/checkpoint.pth
    log_every: int = 50  # optimizer steps between log lines (the first step is always logged)

    # The allowed range of every numeric field, in interval notation; parse_config checks them all.
    # Upper bounds where a huge value would fail late or badly, beyond any recipe (MAE's longest run: 1600 epochs):
    # epochs (per-step schedule arrays: 1e9 epochs allocate gigabytes; every program bounds its warm-ups and other
    # epoch counts at 10000 too, and its image sides at 4096 px), loader workers (a fork each).
    limits: ClassVar[dict] = {"limit": "[0, inf)", "epochs": "[1, 10000]", "batch_size": "[1, inf)",
                              "micro_batch": "[1, inf)", "num_workers": "[0, 256]", "seed": "[0, 2147483647]",
                              "log_every": "[1, inf)"}
    # Settings a resumed run may change: they do not change what is trained (more --epochs extends the run).
    free_on_resume: ClassVar[frozenset] = frozenset({
        "data_root", "output_dir", "epochs", "micro_batch", "num_workers", "device", "dtype", "compile", "resume",
        "log_every"})


def in_range(value, interval):
    """Is value in an interval written as '[a, b)', '(0, 1]', '[1, inf)'?"""
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def largest_divisor(n, cap):
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def parse_config(cls, argv=None):
    """Fields of `cls` become --flags (bools: --no-x); --preset loads new defaults (shown by --help), explicit
    flags win; every numeric field is checked against the ranges in `limits`. A loader worker count not given on
    the command line (any config with num_workers) follows the cores per process, and a TrainConfig's micro-batch
    the batch size (torchrun's LOCAL_WORLD_SIZE and WORLD_SIZE are read here): the default is a cap, an explicit
    value is kept and checked."""
    klasses = [k for k in reversed(cls.__mro__) if dataclasses.is_dataclass(k)]
    comments, limits = {}, {}
    for k in klasses:
        comments.update(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(k), flags=re.M))
        limits.update(k.__dict__.get("limits", {}))
    presets = getattr(cls, "presets", {})
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=sorted(presets) if presets else None)
    preset_name = first.parse_known_args(argv)[0].preset
    defaults = {f.name: f.default for f in dataclasses.fields(cls)} | presets.get(preset_name, {})
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="a recipe sized for a smaller setting")
    for f in dataclasses.fields(cls):
        kind = type(f.default)
        extra = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        source = f"preset {preset_name}" if preset_name and f.name in presets[preset_name] else "default"
        parser.add_argument(f"--{f.name}", default=None, **extra,
                            help=f"{comments.get(f.name, '')} ({source}: {defaults[f.name]})".replace("%", "%%"))
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None and k != "preset"}
    values = {**defaults, **given}
    for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if name not in limits:
                raise TypeError(f"{cls.__name__}.{name} has no range in `limits`")
            if not in_range(value, limits[name]):
                fail(f"--{name} {value} is out of range; pass a value in {limits[name]}")
    if "num_workers" in values and "num_workers" not in given:  # every config with loader workers (eval_linear too)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        values["num_workers"] = min(values["num_workers"], max(cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1))
    if issubclass(cls, TrainConfig):
        world = int(os.environ.get("WORLD_SIZE", 1))
        if values["batch_size"] % world:
            fail(f"--batch_size {values['batch_size']} does not split over {world} processes; pass a multiple of {world}")
        per_process = values["batch_size"] // world
        if "micro_batch" not in given:
            values["micro_batch"] = largest_divisor(per_process, values["micro_batch"])
        elif per_process % values["micro_batch"]:
            fail(f"--batch_size {values['batch_size']} is not a multiple of --micro_batch {values['micro_batch']} x "
                 f"{world} process(es); change one of them (or leave --micro_batch out: it then divides the batch)")
    return cls(**values)
