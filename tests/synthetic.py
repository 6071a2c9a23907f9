"""Synthetic data and tiny teacher files, for the tests and for trying the programs without a data set.
Plain functions (no pytest); from the repository root:
    python tests/synthetic.py images runs/tiny --split train,val   # 2 classes x 12 images of 32 px per split
    python tests/synthetic.py clips runs/clips/train --per_class 100   # moving squares, one class per direction
    python tests/synthetic.py clip-teacher runs/tiny_clip.pt   # a tiny CLIP (random weights; needs open_clip)
    python tests/synthetic.py timm-teacher runs/tiny_timm.pth   # a tiny timm ViT (random weights; needs timm)
"""
import argparse
import dataclasses
import os

import numpy as np
import torch
from PIL import Image


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


def parse(argv=None):
    """The command line below (also what the documentation's commands are checked against)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True)
    images = kinds.add_parser("images", help="class folders of random images (one mean colour per class)")
    images.add_argument("path")
    images.add_argument("--split", default="", help="comma-separated sub-folders to fill (train,val); none: path itself")
    images.add_argument("--classes", type=int, default=2)
    images.add_argument("--per_class", type=int, default=12)
    images.add_argument("--size", type=int, default=32)
    images.add_argument("--seed", type=int, default=0)
    clips = kinds.add_parser("clips", help="class folders of frame folders: a square moving down, left, right or up")
    clips.add_argument("path")
    clips.add_argument("--per_class", type=int, default=6)
    clips.add_argument("--frames", type=int, default=16)
    clips.add_argument("--size", type=int, default=32)
    clips.add_argument("--seed", type=int, default=0)
    clip = kinds.add_parser("clip-teacher", help="a tiny CLIP with random weights, open_clip's layout (needs open_clip)")
    clip.add_argument("path")
    clip.add_argument("--archive", action="store_true", help="OpenAI's TorchScript layout (ViT-B-16.pt) instead, 192 wide")
    clip.add_argument("--gelu", action="store_true", help="nn.GELU instead of QuickGELU (then pass --clip_act gelu)")
    vit = kinds.add_parser("timm-teacher", help="a tiny timm ViT with random weights (needs timm)")
    vit.add_argument("path")
    vit.add_argument("--bare", action="store_true", help="the backbone state dict alone, as DINO's files")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if os.path.dirname(args.path):
        os.makedirs(os.path.dirname(args.path), exist_ok=True)
    if args.kind == "images":
        for i, split in enumerate(args.split.split(",") if args.split else [""]):
            make_image_folder(os.path.join(args.path, split), args.classes, args.per_class, args.size, args.seed + i)
    elif args.kind == "clips":
        make_clip_folder(args.path, args.per_class, args.frames, args.size, args.seed)
    elif args.kind == "clip-teacher":
        # an archive has no config beside it: 192 wide, whose 3 heads of 64 every official tower of that width has
        write_tiny_clip(args.path, quick_gelu=not args.gelu, archive=args.archive, width=192 if args.archive else 128)
    else:
        write_timm_vit(args.path, wrap=not args.bare)
    print(args.path)


if __name__ == "__main__":
    main()
