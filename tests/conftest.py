"""Shared fixtures: tiny image and clip folders made on the fly (the tests never need a real dataset)."""
import dataclasses
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def unpatchify(x, p):
    """(B, N, p*p*3) -> (B, 3, H, W): the inverse of common.patchify on a square grid (tests only)."""
    B, N, _ = x.shape
    g = int(round(N ** 0.5))
    return torch.einsum("bhwpqc->bchpwq", x.reshape(B, g, g, p, p, 3)).reshape(B, 3, g * p, g * p)


def cpu_context():
    """The Context of a single CPU process in float32 (what training.setup returns there), without its side effects."""
    import training
    return training.Context(0, 1, torch.device("cpu"), torch.float32, torch.amp.GradScaler("cpu", enabled=False))


def make_image_folder(root, classes=2, per_class=12, size=32, seed=0):
    """root/c{k}/{i}.jpg: random smooth-ish images, a different mean colour per class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"c{c}"), exist_ok=True)
        for i in range(per_class):
            base = rng.integers(0, 255, (size // 4, size // 4, 3)).astype(np.float32) * 0.5 + 60 * c
            img = np.kron(base, np.ones((4, 4, 1))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, f"c{c}", f"{i:03d}.jpg"))
    return root


DIRECTIONS = {"down": (0, 1), "left": (-1, 0), "right": (1, 0), "up": (0, -1)}  # (dx, dy) per class


def make_clip_folder(root, per_class=6, frames=16, size=32, seed=0, square=8):
    """root/<direction>/<video>/<frame>.jpg: a bright square moving across a static textured background, the
    class is its direction of motion (down, left, right, up), so telling classes apart needs the frames' order.
    The square travels 60 % of the free width at a constant speed from a random start."""
    rng = np.random.default_rng(seed)
    free = size - square
    travel = 0.6 * free
    for name, (dx, dy) in DIRECTIONS.items():
        for v in range(per_class):
            folder = os.path.join(root, name, f"video{v:03d}")
            os.makedirs(folder, exist_ok=True)
            base = rng.integers(0, 120, (size // 4, size // 4, 3)).astype(np.float32)
            background = np.kron(base, np.ones((4, 4, 1)))
            colour = rng.integers(160, 256, 3)
            along = rng.uniform(0, free - travel) + (travel if dx + dy < 0 else 0)  # start, moving back if negative
            across = rng.uniform(0, free)
            for f in range(frames):
                pos = along + (dx + dy) * travel * f / max(frames - 1, 1)
                x, y = (pos, across) if dx else (across, pos)
                img = background.copy()
                img[int(round(y)):int(round(y)) + square, int(round(x)):int(round(x)) + square] = colour
                frame = Image.fromarray(img.clip(0, 255).astype(np.uint8))
                frame.save(os.path.join(folder, f"{f:05d}.jpg"), quality=95)
    return root


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: more threads only add contention on a shared machine (restored afterwards);
    subprocesses get OMP_NUM_THREADS=1 instead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
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


# Teacher weight files in the layouts teachers.frozen_teacher reads (tests, and the README's Done-when runs):
#   python -c "import sys; sys.path.insert(0, 'tests'); import conftest; conftest.write_tiny_clip('tiny_clip.pt')"
def write_tiny_clip(path, quick_gelu=True, archive=False, seed=0, width=128, head_width=64, config=None):
    """A tiny CLIP with random weights (image tower: 32 px, patch 4, 2 blocks of `width` in heads of `head_width`,
    by default 2 heads of 64; 48-d tokens; a 1-block text tower), saved as open_clip's hub exports are: the plain
    state dict of open_clip's CLIP (visual.* and the text tower's keys) with open_clip_config.json beside it
    (config=False: without). archive=True saves it as OpenAI's ViT-B-16.pt is instead: a TorchScript archive of
    parameters only (as OpenAI's traced module: no head count), fp16 weights and OpenAI's metadata entries, no
    config beside; archive="scripted": open_clip's CLIP itself through torch.jit.script (its attention records its
    heads), fp32. -> the open_clip model (fp32, eval mode)"""
    import json
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=2, width=width, head_width=head_width, patch_size=4, image_size=32)
    text = CLIPTextCfg(context_length=8, vocab_size=64, width=64, heads=1, layers=1)
    model = CLIP(embed_dim=48, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    with torch.no_grad():  # open_clip initialises norms to (1, 0) and biases to 0: make every weight matter
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.eval()
    if config if config is not None else not archive:  # open_clip's push_to_hf_hub: {model_cfg, preprocess_cfg}
        model_cfg = dict(embed_dim=48, quick_gelu=quick_gelu, vision_cfg=dataclasses.asdict(vision),
                         text_cfg=dataclasses.asdict(text))
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": model_cfg, "preprocess_cfg": {"mean": OPENAI_DATASET_MEAN,
                                                                  "std": OPENAI_DATASET_STD}}, f)
    if archive == "scripted":
        torch.jit.script(model).save(path)
        return model
    state = model.state_dict()
    if not archive:
        torch.save(state, path)
        return model
    state = {k: v.half() for k, v in state.items()}
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(8), vocab_size=torch.tensor(64))
    root = torch.nn.Module()  # a module tree with exactly these names, scripted: a real TorchScript archive
    for name, value in state.items():
        *path_names, leaf = name.split(".")
        node = root
        for p in path_names:
            if p not in node._modules:
                node.add_module(p, torch.nn.Module())
            node = node._modules[p]
        node.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    torch.jit.script(root).save(path)
    return model


def write_timm_vit(path, wrap=True, seed=0):
    """timm's ViT-Tiny at 32 px, patch 4, 2 blocks (vit_tiny_patch16_224 with img_size=32, patch_size=4, depth=2,
    10 classes) with random weights, saved as timm / DeiT training checkpoints are ({"model": state dict}, with
    head.*); wrap=False: the bare backbone state dict, as DINO's dino_vitbase16_pretrain.pth. -> the timm model
    (eval mode)"""
    import timm
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10).eval()
    state = model.state_dict()
    torch.save({"model": state} if wrap else {k: v for k, v in state.items() if not k.startswith("head.")}, path)
    return model


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


@pytest.fixture(scope="session")
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
