"""Shared fixtures: tiny image and clip folders made on the fly (the tests never need a real dataset). The makers
themselves are plain functions in tests/synthetic.py, which users run too."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from synthetic import make_image_folder, write_timm_vit, write_tiny_clip  # noqa: E402


def unpatchify(x, p):
    """(B, N, p*p*3) -> (B, 3, H, W): the inverse of common.patchify on a square grid (tests only)."""
    B, N, _ = x.shape
    g = int(round(N ** 0.5))
    return torch.einsum("bhwpqc->bchpwq", x.reshape(B, g, g, p, p, 3)).reshape(B, 3, g * p, g * p)


def cpu_context():
    """The Context of a single CPU process in float32 (what training.setup returns there), without its side effects."""
    import training
    return training.Context(0, 1, torch.device("cpu"), torch.float32, torch.amp.GradScaler("cpu", enabled=False))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: more threads only add contention on a shared machine (restored afterwards);
    subprocesses get OMP_NUM_THREADS=1 instead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def image_root(tmp_path_factory):
    """<root>/train and <root>/val, 2 classes x 12 images each."""
    root = tmp_path_factory.mktemp("images")
    make_image_folder(str(root / "train"), seed=0)
    make_image_folder(str(root / "val"), seed=1)
    return root


# The method-specific part of a tiny run (everything else is shared): small heads, towers and decoders.
TINY = {
    "hpm": ["--decoder_dim", "32", "--decoder_depth", "1", "--decoder_heads", "2"],
    "droppos": ["--decoder_dim", "32", "--decoder_depth", "1", "--decoder_heads", "2"],
    "semaim": ["--query_depth", "2"],
    # the ResNets without the CIFAR stem (layer4 maps of 1 x 1): 10x cheaper, the same code paths
    "mokd": ["--out_dim", "64", "--hidden_dim", "32", "--bottleneck_dim", "16", "--thead_depth", "1",
             "--local_crops", "2", "--no-cifar_stem", "--patch_size", "8"],
    "scfs": ["--out_dim", "256", "--hidden_dim", "64", "--stage_hidden", "32", "--stage_bottleneck", "16",
             "--local_crops", "2", "--no-cifar_stem"],
    "finetune": [],  # its data_path is the root holding train/ and val/
}


def tiny_args(data_path, output_dir, *extra, method="hpm"):
    """A run small enough for a CPU test: the method's cifar10 preset (ViT-Tiny/4 or a CIFAR-stem ResNet at
    32 px) with 1-block decoders or small heads, 2 epochs of 3 steps, batches of 8."""
    return ["--preset", "cifar10", "--data_path", str(data_path), "--output_dir", str(output_dir), *TINY[method],
            "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "8", "--micro_batch", "4", "--num_workers", "0",
            "--log_every", "1", *extra]


def write_own_checkpoint(output_dir, seed=0):
    """A checkpoint.pth of ours as hpm.py writes it (the cifar10 preset's ViT-Tiny/4 at 32 px, untrained).
    -> the model"""
    import training
    import hpm
    cfg = training.parse_config(hpm.Config, tiny_args("unused", output_dir, method="hpm"))
    torch.manual_seed(seed)
    model = hpm.build(cfg)
    os.makedirs(output_dir, exist_ok=True)
    training.save_checkpoint(cfg, "hpm", model, training.adamw(model, 1e-3, 0.05), 1, cpu_context())
    return model


@pytest.fixture(scope="package")
def teacher_files(tmp_path_factory):
    """{kind: path} of one teacher per layout: clip (open_clip with its config), openai (TorchScript, 192 wide:
    3 heads of 64, as every official tower of that width), timm, dino, own."""
    root = tmp_path_factory.mktemp("teachers")
    for folder in ("clip", "openai"):  # each beside its own open_clip_config.json, or none
        os.makedirs(root / folder)
    write_tiny_clip(str(root / "clip" / "clip.pt"))
    write_tiny_clip(str(root / "openai" / "openai.pt"), archive=True, width=192)  # heads from the official 64
    write_timm_vit(str(root / "timm.pth"))
    write_timm_vit(str(root / "dino.pth"), wrap=False)
    write_own_checkpoint(str(root / "own"))
    return {"clip": str(root / "clip" / "clip.pt"), "openai": str(root / "openai" / "openai.pt"),
            "timm": str(root / "timm.pth"), "dino": str(root / "dino.pth"), "own": str(root / "own" / "checkpoint.pth")}
