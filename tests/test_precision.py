"""The GPU path of every training program, run on the CPU: one tiny step under autocast in bfloat16, one in float16
through the GradScaler, and one with --compile (regional compilation of the program's blocks, on dynamo's
"aot_eager_decomp_partition" backend: the graphs and autograd of inductor without its code generation, seconds on a
CPU), with dynamo told to fail rather than fall back to eager at its recompile limit. eval_linear.py has no
--dtype (bfloat16 on CUDA, float32 on a CPU) and nothing to compile."""
import pytest
import torch
import torch._dynamo
import torch._dynamo.utils

import bench
import common
import droppos
import finetune
import hpm
import mokd
import scfs
import semaim
import training
from conftest import TINY

PROGRAMS = {"hpm": hpm, "droppos": droppos, "semaim": semaim, "mokd": mokd, "scfs": scfs, "finetune": finetune}
# Local crops of 24 px, not the tiny runs' 16: a ResNet-18 without the CIFAR stem then never convolves a 1 x 1 map,
# whose bfloat16 weight gradient oneDNN computes from uninitialised memory on a CPU (a different, sometimes
# infinite, value on every call; GPUs and real crop sizes are not affected).
LOCAL = {"mokd": ["--local_size", "24"], "scfs": ["--local_size", "24"]}
BACKEND = "aot_eager_decomp_partition"


def tiny_config(name, tmp_path, *extra):
    """The tests' tiny model of the program at its cifar10 preset, micro-batches of 2, on the CPU."""
    return training.parse_config(PROGRAMS[name].Config, [
        "--preset", "cifar10", *TINY[name], *LOCAL.get(name, []), "--batch_size", "2", "--device", "cpu",
        "--output_dir", str(tmp_path), *extra])


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def step(name, model, optimizer, cfg, ctx, progress=0.5):
    """One train_step of the program on a synthetic micro-batch of its real input shape -> stats."""
    module = PROGRAMS[name]
    return module.train_step(model, optimizer, [bench.synthetic_batch(module, cfg, ctx.device)], progress, cfg, ctx)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", PROGRAMS)
def test_one_step_in_reduced_precision(name, dtype, tmp_path):
    """training.setup's context runs the forward in autocast (a Linear's output is in the dtype) and a finite loss
    trains the weights; float16 goes through the GradScaler: the loss is scaled, and a step whose scaled gradients
    overflow is skipped (no weight moves) and halves the scale, else every weight that moved is finite."""
    cfg = tiny_config(name, tmp_path, "--dtype", dtype)
    ctx = training.setup(cfg)
    assert ctx.dtype == training.DTYPES[dtype] and ctx.scaler.is_enabled() == (dtype == "float16")
    module = PROGRAMS[name]
    model = module.build(cfg)
    optimizer, schedule = module.make_optimizer(model, cfg, steps_per_epoch=2)
    schedule(1)  # past the first warm-up step: lr > 0
    before, scale = trainable(model), ctx.scaler.get_scale() if ctx.scaler.is_enabled() else None
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    outputs = []
    hook = linear.register_forward_hook(lambda m, args, out: outputs.append(out.dtype))
    stats = step(name, model, optimizer, cfg, ctx)
    hook.remove()
    assert torch.isfinite(stats["loss"]) and outputs and set(outputs) == {ctx.dtype}
    moved = [n for n, p in trainable(model).items() if not torch.equal(p, before[n])]
    skipped = dtype == "float16" and ctx.scaler.get_scale() < scale
    if skipped:  # the overflow GradScaler exists for (MOKD's tiny heads at the initial scale 2^16)
        assert ctx.scaler.get_scale() == scale / 2 and not moved
    else:
        assert moved and all(torch.isfinite(p).all() for p in trainable(model).values())
        assert dtype != "float16" or ctx.scaler.get_scale() == scale


def structures(regions):
    """Distinct compiled modules up to what a graph specialises on: class, parameter shapes, drop path on or off."""
    return {(type(m), tuple((n, tuple(p.shape)) for n, p in m.named_parameters()),
             tuple(d.p > 0 for d in m.modules() if isinstance(d, common.DropPath))) for m in regions}


@pytest.mark.parametrize("name", PROGRAMS)
def test_one_compiled_step_compiles_each_structure_not_each_block(name, tmp_path):
    """--compile as main() does it (scfs: its stages and stage heads; the others: their transformer blocks): a
    finite loss that trains, at most 4 graphs per distinct compiled structure (grad and no-grad passes, static and
    dynamic shapes), never one per block (DropPath's rate as a graph constant compiled every block of a rising
    drop-path rate anew, past dynamo's limit of 8, after which the rest ran eagerly; here that limit fails the
    test), and a second step compiles nothing new."""
    cfg = tiny_config(name, tmp_path, "--compile")
    assert cfg.compile
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        ctx = training.setup(cfg)
        module = PROGRAMS[name]
        model = module.build(cfg)
        optimizer, schedule = module.make_optimizer(model, cfg, steps_per_epoch=2)
        schedule(1)
        if name == "scfs":
            regions = scfs.compiled_regions(model)
            training.compile_modules(regions, backend=BACKEND)
        else:
            regions = [m for m in model.modules() if isinstance(m, common.Block)]
            training.compile_blocks(model, backend=BACKEND)
        before = trainable(model)
        stats = step(name, model, optimizer, cfg, ctx, progress=0.5)
        graphs = counters["stats"]["unique_graphs"]
        assert torch.isfinite(stats["loss"]) and any(not torch.equal(p, before[n]) for n, p in trainable(model).items())
        assert 1 <= graphs <= 4 * len(structures(regions)) < len(regions) * 4, (graphs, len(structures(regions)))
        step(name, model, optimizer, cfg, ctx, progress=0.6)
        assert counters["stats"]["unique_graphs"] == graphs  # no recompiles in the steady state
    torch._dynamo.reset()
