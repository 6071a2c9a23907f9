"""common.py: what two or more of our methods use unchanged and is not a paper's idea.

ViT with timm's parameter names on one SDPA attention (also space-time, on clips), fixed sin-cos position
embeddings, patchify, image-folder and clip-folder loading with one-line errors, MAE, VideoMAE and DINO
augmentation, distributed setup with guarded collectives, the gradient-accumulation step, per-step schedules,
AdamW parameter groups, DINO's head, loss and EMA, checkpoints that resume exactly, logging, and config parsing.
The contract with a training program is `TrainConfig` (at the end): the fields this file reads.
Shapes: B batch, N patches (clips: tubelets), D width, P = patch*patch*3 (clips: tubelet*patch*patch*3).
"""
import argparse
import dataclasses
import importlib.util
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
import warnings
import weakref
import zipfile
from contextlib import nullcontext
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageFilter
from torchvision import transforms
from tqdm import tqdm

_bars = weakref.WeakSet()  # our open progress bars, closed by fail()


def progress_bar(**kwargs):
    """A tqdm bar that fail() closes before its error line (else the bar redraws itself after it at exit)."""
    bar = tqdm(dynamic_ncols=True, **kwargs)
    _bars.add(bar)
    return bar


def fail(message):
    """Stop with one line `error: <what is wrong>; <what to do>` and exit status 1."""
    for bar in list(_bars):
        bar.close()
    raise SystemExit(f"error: {message}")


# --- Vision Transformer (timm's names: patch_embed.proj, cls_token, pos_embed, blocks.i.*, norm) ---
VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),  # (width, depth, heads) as timm's
             "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        """x: (B, T, D). attn_mask: bool, broadcastable to (B, heads, T, T), True = may attend."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, T, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of a whole sample with probability p."""
    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6, MLP ratio 4, qkv bias), as timm/MAE."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, attn_mask=None):
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def sincos_pos_embed(dim, grid, cls_token=True, time_grid=1):
    """Fixed 2-D sin-cos embedding (MAE's layout: first half encodes the column, second the row;
    sin then cos in each half), computed in float64 like MAE's numpy code. -> (1 + grid*grid, dim).
    Clips of time_grid > 1 slices: tokens in (time, row, col) order, each the 2-D table of its spatial location
    in the first 3/4 of the channels and a 1-D sin-cos of its time slice in the last quarter (sin then cos)
    -> (1 + time_grid*grid*grid, dim); one slice is the image table. NOTE(official): VideoMAE uses a 1-D
    table over the raster index of all tokens and has no cls slot (modeling_finetune.py,
    get_sinusoid_encoding_table); ours keeps the grid's structure and reduces to MAE's table for images."""
    if time_grid > 1:
        if dim % 16:
            fail(f"a width of {dim} cannot hold the space-time sin-cos table; pass widths that are multiples of 16")
        time_dim = dim // 4  # our split: few time slices (8 at the ssv2 preset), a 14 x 14 spatial grid
        space = sincos_pos_embed(dim - time_dim, grid, cls_token=False)  # (S, 3D/4)
        omega = 1.0 / 10000 ** (torch.arange(time_dim // 2, dtype=torch.float64) / (time_dim / 2))
        angles = torch.arange(time_grid, dtype=torch.float64)[:, None] * omega[None]  # (T, D/8)
        time = torch.cat([angles.sin(), angles.cos()], dim=1).float()  # (T, D/4)
        emb = torch.cat([space.repeat(time_grid, 1), time.repeat_interleave(grid * grid, dim=0)], dim=1)  # (T*S, D)
        return torch.cat([torch.zeros(1, dim), emb]) if cls_token else emb
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (cols.reshape(-1), rows.reshape(-1)):
        angles = coord[:, None] * omega[None]  # (N, dim/4)
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)  # (N, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb])
    return emb.float()


class PatchEmbed(nn.Module):
    """A linear map of each p x p patch (Conv2d); clips (tubelet_size > 0): of each t x p x p tubelet (Conv3d, as
    VideoMAE's modeling_finetune.py PatchEmbed), tokens in (time, row, col) order."""
    def __init__(self, patch_size, dim, tubelet_size=0):
        super().__init__()
        if tubelet_size:
            size = (tubelet_size, patch_size, patch_size)
            self.proj = nn.Conv3d(3, dim, size, size)
        else:
            self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, imgs):
        return self.proj(imgs).flatten(2).transpose(1, 2)  # (B, N, D)


class VisionTransformer(nn.Module):
    """ViT encoder, no classifier; grid = img_size // patch_size; fixed sin-cos PE (no gradient, as MAE).
    num_frames > 1: a space-time ViT on clips (B, 3, T, H, W): tubelets of tubelet_size frames, time_grid =
    num_frames // tubelet_size slices of grid x grid tokens. num_frames = 1 is the image model, unchanged.
    NOTE(official): VideoMAE's encoder has no cls token; ours keeps it, so one ViT and one checkpoint layout
    (timm's) serve images and clips (VideoMAE fine-tunes on the mean of the patch tokens, which ignores it)."""
    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_path=0.0, num_frames=1, tubelet_size=1):
        super().__init__()
        if img_size % patch_size:
            fail(f"--input_size {img_size} is not a multiple of --patch_size {patch_size}; pick sizes that divide")
        if num_frames % tubelet_size:
            fail(f"--num_frames {num_frames} is not a multiple of --tubelet_size {tubelet_size}; "
                 "pick sizes that divide")
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.num_frames, self.tubelet_size, self.time_grid = num_frames, tubelet_size, num_frames // tubelet_size
        self.num_patches, self.embed_dim = self.time_grid * self.grid ** 2, embed_dim
        self.patch_embed = PatchEmbed(patch_size, embed_dim, tubelet_size if num_frames > 1 else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.grid, time_grid=self.time_grid)[None],
                                      requires_grad=False)
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def embed_patches(self, imgs):
        """(B, 3, H, W) -> patch tokens with their position embedding, (B, N, D); another image size
        gets the embedding resized to its grid (DINO's multi-crop: 96 px local crops). Clips (B, 3, T, H, W)
        -> (B, N, D), N = time_grid * grid * grid, at the model's own size only."""
        x = self.patch_embed(imgs)
        if imgs.ndim == 5:
            return x + self.pos_embed[:, 1:]
        return x + resize_pos_embed(self.pos_embed[:, 1:], imgs.shape[-1] // self.patch_size)

    def forward_tokens(self, tokens, attn_mask=None):
        """Prepend the cls token, run all blocks and the final norm. (B, T, D) -> (B, 1 + T, D)."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x)

    def forward(self, imgs):
        return self.forward_tokens(self.embed_patches(imgs))  # (B, 1 + N, D)


def resize_pos_embed(pos, grid):
    """(1, G*G, D) position table -> (1, grid*grid, D), unchanged if G = grid. DINO's rule (its and MOKD's
    vision_transformer.py, interpolate_pos_encoding): bicubic with the scale factor (grid + 0.1) / G. That samples
    at other points than a resize to the size grid x grid would (values differ by up to ~3e-2)."""
    old = int(round(math.sqrt(pos.shape[1])))
    if old == grid:
        return pos
    x = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, G, G)
    scale = (grid + 0.1) / old  # the + 0.1 makes floor(G * scale) = grid despite float rounding
    x = F.interpolate(x, scale_factor=(scale, scale), mode="bicubic", align_corners=False)  # (1, D, grid, grid)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)


def vit(name, img_size, patch_size, drop_path=0.0, num_frames=1, tubelet_size=1):
    if name not in VIT_SIZES:
        fail(f"unknown --model {name}; choose one of {', '.join(VIT_SIZES)}")
    width, depth, heads = VIT_SIZES[name]
    return VisionTransformer(img_size, patch_size, width, depth, heads, drop_path=drop_path, num_frames=num_frames,
                             tubelet_size=tubelet_size)


def init_mae_weights(module):
    """MAE's init: xavier Linear (patch conv viewed as one; its bias kept), zero bias, LN (1, 0), cls N(0, .02)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias) if m.bias is not None else None
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
        elif isinstance(m, VisionTransformer):
            nn.init.normal_(m.cls_token, std=0.02)


def patchify(imgs, p, tubelet=1):
    """(B, 3, H, W) -> (B, N, p*p*3), each patch laid out (row, col, channel) as MAE. Clips (B, 3, T, H, W) ->
    (B, N, t*p*p*3), t = tubelet: tubelets in (time, row, col) order, each laid out (frame, row, col, channel)
    as VideoMAE's rearrange '(t p0) (h p1) (w p2) -> (t h w) (p0 p1 p2 c)' (engine_for_pretraining.py)."""
    if imgs.ndim == 5:
        B, C, T, H, W = imgs.shape
        x = imgs.reshape(B, C, T // tubelet, tubelet, H // p, p, W // p, p)
        x = torch.einsum("bcxthpwq->bxhwtpqc", x)  # (B, T/t, H/p, W/p, t, p, p, C)
        return x.reshape(B, (T // tubelet) * (H // p) * (W // p), tubelet * p * p * C)
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def gather_tokens(x, ids):
    """x: (B, N, D), ids: (B, K) -> (B, K, D), the rows of x at ids."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# --- Data ------------------------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def mae_transform(size, scale=(0.2, 1.0)):
    """MAE pretraining augmentation: random resized crop (bicubic), horizontal flip, normalise."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(size):
    """Evaluation: resize + centre crop, normalise. The crop is 224/256 of the resized image up to 224 px and the
    whole image above (MAE util/datasets.py). NOTE(official): none below 112 px, where images such as CIFAR's
    already have the input size (MAE resizes a 32 px image to 36 and crops it back)."""
    resize = int(size * 256 / 224) if 112 <= size <= 224 else size
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder that skips unreadable images. An unreadable file is reported once by name and
    replaced by the next readable one; each sample also returns how many files it skipped, so the training
    loop can stop a run in which most images fail. After max_skips failures in a row the sample is a blank
    image whose count is -(index + 1): the main process names the file (no exception crosses from a worker)."""
    max_skips = 16
    reported = set()  # per process

    def __getitem__(self, index):
        for skipped in range(self.max_skips):
            path, label = self.samples[(index + skipped) % len(self.samples)]
            try:
                img = self.loader(path)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
                if path not in self.reported:
                    self.reported.add(path)
                    print(f"warning: skipping unreadable image {path} ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            return self.transform(img), label, skipped
        return self.transform(Image.new("RGB", (8, 8))), label, -(index + 1)


class CIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR-10 with the 'skipped' count of our ImageFolder (always 0: no files to fail)."""
    def __getitem__(self, i):
        return (*super().__getitem__(i), 0)


def image_dataset(path, transform, data_root="./data", train=True):
    """An ImageFolder directory, or `cifar10` (torchvision's, downloaded into data_root); one-line errors."""
    if path == "cifar10":
        try:
            return CIFAR10(data_root, train=train, transform=transform, download=True)
        except Exception as e:
            fail(f"could not get CIFAR-10 into {data_root} ({type(e).__name__}: {e}); download it where "
                 "there is internet, or pass an ImageFolder directory such as cifar10/train")
    if not path:
        fail("no --data_path given; pass an ImageFolder directory (one sub-folder per class) or cifar10")
    if not os.path.isdir(path):
        fail(f"--data_path {path} is not a directory; pass an ImageFolder directory (one sub-folder per class)")
    try:
        return ImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no image files
        fail(f"no images found under {path} ({str(e).splitlines()[0]}); an ImageFolder needs "
             "<path>/<class>/<image>.jpg")


# --- Clips: class folders of videos (frame folders or video files), VideoMAE's sampling and crop ---------
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


def clip_indices(video_frames, num_frames, sampling_rate, start):
    """The frame indices of one clip, as VideoMAE's loader (kinetics.py, VideoMAE._video_TSN_decord_batch_loader):
    start, start + s, ...; a step is taken only while it stays below the video's last frame, so a video shorter
    than num_frames * s repeats its last reachable frame."""
    ids, i = [], start
    for _ in range(num_frames):
        ids.append(i)
        if i + sampling_rate + 1 < video_frames:
            i += sampling_rate
    return ids


class MultiScaleCrop:
    """VideoMAE's pretraining crop (transforms.py, GroupMultiScaleCrop with scales 1, .875, .75, .66): crop sides
    are the scales times the short side (snapped to the output size within 3 px), width and height at most one
    scale apart; the crop sits at one of 13 fixed places (corners, centre, edge centres, quarter points) and is
    resized to size x size (bilinear). One crop for all frames of a clip; torch's RNG instead of `random`."""
    OFFSETS = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3))

    def __init__(self, size, scales=(1, .875, .75, .66), max_distort=1):
        self.size, self.scales, self.max_distort = size, scales, max_distort

    def params(self, width, height):
        """-> (crop width, crop height, left, top) for a frame of width x height."""
        sides = [int(min(width, height) * s) for s in self.scales]
        sides = [self.size if abs(x - self.size) < 3 else x for x in sides]
        pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= self.max_distort]
        crop_w, crop_h = pairs[int(torch.randint(len(pairs), ()))]
        x, y = self.OFFSETS[int(torch.randint(len(self.OFFSETS), ()))]
        return crop_w, crop_h, x * ((width - crop_w) // 4), y * ((height - crop_h) // 4)

    def __call__(self, frames):
        w, h, left, top = self.params(*frames[0].size)
        return [f.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BILINEAR) for f in frames]


class ClipTransform:
    """A clip's frames (T PIL images) -> (3, T, H, W): `crop` on all frames at once (one crop for the clip; None:
    none), then `frame_transform` (PIL -> normalised (3, H, W) tensor) on each frame."""
    def __init__(self, frame_transform, crop=None):
        self.frame_transform, self.crop = frame_transform, crop

    def __call__(self, frames):
        frames = self.crop(frames) if self.crop is not None else frames
        return torch.stack([self.frame_transform(f) for f in frames], dim=1)


def videomae_transform(size):
    """VideoMAE's pretraining augmentation (datasets.py, DataAugmentationForVideoMAE): multi-scale crop, no flip,
    ImageNet normalisation."""
    return ClipTransform(transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]),
                         MultiScaleCrop(size))


class ClipFolder(torch.utils.data.Dataset):
    """Videos in class folders, root/<class>/<video>: a video is a folder of frames (sorted by name, read with PIL)
    or a video file (decoded with TorchCodec). A sample is num_frames frames sampling_rate apart (clip_indices) from
    a random start (VideoMAE's _sample_train_indices: uniform over the starts that fit, else 0), or from the centre
    with train=False, through `transform` -> (clip (3, T, H, W), label, skipped). Unreadable videos are skipped as
    ImageFolder's images: named once (with the frame at fault), replaced by the next video, counted."""
    max_skips = 16
    reported = set()  # per process

    def __init__(self, root, transform, num_frames, sampling_rate, train=True):
        self.root, self.transform, self.num_frames, self.rate, self.train = (
            root, transform, num_frames, sampling_rate, train)
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.samples = [(e.path, label) for label, c in enumerate(self.classes)
                        for e in sorted(os.scandir(os.path.join(root, c)), key=lambda e: e.name)
                        if e.is_dir() or e.name.lower().endswith(VIDEO_EXTENSIONS)]

    def __len__(self):
        return len(self.samples)

    def start(self, video_frames):
        last = max(video_frames - self.num_frames * self.rate, 0)  # the last start that fits, 0 if none does
        return int(torch.randint(last + 1, ())) if self.train else last // 2

    def read(self, path):
        """-> the clip's frames as PIL images; raises on an unreadable video or frame."""
        if os.path.isdir(path):
            names = sorted(f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTENSIONS))
            if not names:
                raise OSError("no frames in the folder")
            ids = clip_indices(len(names), self.num_frames, self.rate, self.start(len(names)))
            frames = {}
            for i in sorted(set(ids)):
                frame = os.path.join(path, names[i])
                try:
                    with Image.open(frame) as img:
                        frames[i] = img.convert("RGB")
                except Exception as e:
                    raise OSError(f"frame {frame}: {type(e).__name__}: {e}") from e
            return [frames[i] for i in ids]
        from torchcodec.decoders import VideoDecoder  # checked by clip_dataset
        decoder = VideoDecoder(path)
        ids = clip_indices(len(decoder), self.num_frames, self.rate, self.start(len(decoder)))
        unique = sorted(set(ids))
        data = decoder.get_frames_at(unique).data  # (k, 3, H, W) uint8
        frames = {i: Image.fromarray(x.permute(1, 2, 0).numpy()) for i, x in zip(unique, data)}
        return [frames[i] for i in ids]

    def __getitem__(self, index):
        for skipped in range(self.max_skips):
            path, label = self.samples[(index + skipped) % len(self.samples)]
            try:
                frames = self.read(path)
            except Exception as e:
                if path not in self.reported:
                    self.reported.add(path)
                    print(f"warning: skipping unreadable video {path} ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            return self.transform(frames), label, skipped
        return self.transform([Image.new("RGB", (8, 8))] * self.num_frames), label, -(index + 1)


def clip_dataset(path, transform, num_frames, sampling_rate, train=True):
    """A ClipFolder with one-line errors (no folder, no videos, video files without TorchCodec)."""
    if not path:
        fail("no --data_path given; pass a folder of class folders of videos (frame folders or video files)")
    if not os.path.isdir(path):
        fail(f"--data_path {path} is not a directory; pass a folder of class folders of videos")
    dataset = ClipFolder(path, transform, num_frames, sampling_rate, train)
    if not dataset.samples:
        fail(f"no videos found under {path}; clips need <path>/<class>/<video>/<frame>.jpg or "
             f"<path>/<class>/<video>{{{','.join(VIDEO_EXTENSIONS)}}}")
    files = [p for p, _ in dataset.samples if not os.path.isdir(p)]
    if files and importlib.util.find_spec("torchcodec") is None:
        fail(f"{path} holds video files (such as {files[0]}) and decoding them needs TorchCodec (torchvision no longer "
             "decodes video); pip install torchcodec, or extract the frames into <class>/<video>/<frame>.jpg")
    return dataset


def subset(dataset, limit):
    """At most `limit` samples (0: all), evenly spaced, so every class of a sorted ImageFolder is kept."""
    if not limit or limit >= len(dataset):
        return dataset
    step = len(dataset) / limit
    return torch.utils.data.Subset(dataset, [int(i * step) for i in range(limit)])


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
        dataset = subset(dataset, cfg.limit)
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
                fail(f"{ImageFolder.max_skips} files in a row could not be read (from {self.files[index][0]}); "
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


def compile_blocks(model):
    """Regional compilation: compile each transformer Block in place (one graph shared by all blocks,
    short compile times, parameter names unchanged). The method's own schedule and masking logic
    stays eager, so changing schedule values never trigger recompiles."""
    for m in model.modules():
        if isinstance(m, Block):
            m.compile()


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


def epoch_at(progress, epochs):
    """The epoch in progress at a point of training (progress = step / total steps in [0, 1)), for the schedules
    that papers set once per epoch; the 1e-6 absorbs float rounding of step / total_steps * epochs."""
    return min(int(progress * epochs + 1e-6), epochs - 1)


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


# --- DINO machinery (MOKD, SCFS): multi-crop, head, centred loss, EMA --------------------------------
def resnet(name, cifar_stem=False):
    """torchvision ResNet, fc = Identity (global-pooled features); cifar_stem: 3x3 stride-1 conv, no max-pool."""
    if not hasattr(torchvision.models, name) or not name.startswith(("resnet", "wide_resnet", "resnext")):
        fail(f"unknown --model {name}; use a torchvision ResNet name such as resnet18 or resnet50")
    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net.to(memory_format=torch.channels_last)  # see resnet_features


def resnet_features(net, x, stages=(4,)):
    """(B, 3, H, W) -> post-ReLU maps of net.layer{k}, k in stages (no hooks); pooled feature = map4.mean((2, 3))."""
    # channels-last (NHWC): oneDNN's CPU convolutions and batch norms run ~20 % faster on it than on NCHW
    x = x.contiguous(memory_format=torch.channels_last)
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    maps = []
    for k in range(1, max(stages) + 1):
        x = getattr(net, f"layer{k}")(x)
        if k in stages:
            maps.append(x)
    return maps


class RandomBlur:
    """PIL Gaussian blur with probability p and a radius drawn from U(radius): DINO's GaussianBlur (utils.py),
    U(0.1, 2) at every crop size, global and local alike."""
    def __init__(self, p, radius=(0.1, 2.0)):
        self.p, self.radius = p, radius

    def __call__(self, img):
        if float(torch.rand(())) >= self.p:
            return img
        low, high = self.radius
        return img.filter(ImageFilter.GaussianBlur(low + (high - low) * float(torch.rand(()))))


class MultiCrop:
    """DINO's multi-crop: PIL image -> [global 1 (blur p 1), global 2 (blur .1, solarize .2), locals (blur .5)].
    blur_radius: the range of the blur radius in pixels (DINO: 0.1-2 for 224 and 96 px crops alike)."""
    def __init__(self, global_size=224, local_size=96, local_crops=8, global_scale=(0.4, 1.0),
                 local_scale=(0.05, 0.4), blur_radius=(0.1, 2.0)):
        bicubic = transforms.InterpolationMode.BICUBIC
        colour = [transforms.RandomHorizontalFlip(0.5),
                  transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                  transforms.RandomGrayscale(0.2)]
        norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        g_crop = transforms.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic)
        l_crop = transforms.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic)
        self.global1 = transforms.Compose([g_crop, *colour, RandomBlur(1.0, blur_radius), *norm])
        self.global2 = transforms.Compose([g_crop, *colour, RandomBlur(0.1, blur_radius),
                                           transforms.RandomSolarize(128, p=0.2), *norm])
        self.local = transforms.Compose([l_crop, *colour, RandomBlur(0.5, blur_radius), *norm])
        self.local_crops = local_crops

    def __call__(self, img):
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.local_crops)]


class DINOHead(nn.Module):
    """DINO's head: MLP, L2-normalise, weight-normed last layer (g = 1, frozen iff norm_last_layer)."""
    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, nlayers=3, norm_last_layer=True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i in range(nlayers):
            layers += [nn.Linear(dims[i], dims[i + 1])] + ([nn.GELU()] if i < nlayers - 1 else [])
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_normed_linear(bottleneck_dim, out_dim, trainable_g=not norm_last_layer)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def weight_normed_linear(in_dim, out_dim, trainable_g=True):
    """Linear(in_dim, out_dim, bias=False), weight = g v / |v| per row, g = 1. parametrizations.weight_norm:
    g, v = last_layer.parametrizations.weight.original0/1 (deepcopy works; the old weight_norm's does not)."""
    layer = torch.nn.utils.parametrizations.weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    g = layer.parametrizations.weight.original0
    g.data.fill_(1.0)
    g.requires_grad_(trainable_g)
    return layer


def dino_loss(student_out, teacher_out, center, student_temp, teacher_temp):
    """DINO's cross-entropy: mean over the pairs (teacher chunk i, student chunk v), v != i, of
    mean_b(-sum_k q log p); q = softmax((t - center) / teacher_temp) (no gradient), p = softmax(s / student_temp).
    student_out (V*B, K), teacher_out (2*B, K), both crop-major; center (1, K) or None. float32 scalar.
    NOTE(official): DINO loops over the 2V - 2 pairs; here they are summed at once as
    sum_i q_i . (sum_v log p_v) - sum_i q_i . log p_i (same value and gradient, fewer passes over (B, K))."""
    B = teacher_out.shape[0] // 2
    V = student_out.shape[0] // B
    t = teacher_out.detach().float()
    q = F.softmax((t - center if center is not None else t) / teacher_temp, dim=-1)  # (2B, K)
    logp = F.log_softmax(student_out.float() / student_temp, dim=-1)  # (VB, K)
    all_views = logp.view(V, B, -1).sum(0)  # (B, K)
    cross = (q.view(2, B, -1).sum(0) * all_views).sum() - (q * logp[:2 * B]).sum()
    return -cross / (B * (2 * V - 2))


class DINOCenter(nn.Module):
    """The running centre (buffer (1, K)) of a teacher's outputs, subtracted before its softmax."""
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, teacher_out, momentum=0.9):
        """c <- m c + (1 - m) mean of the rows of teacher_out (all processes' rows when distributed)."""
        batch_mean = all_reduce_mean(teacher_out.float().mean(0, keepdim=True))
        self.center.mul_(momentum).add_(batch_mean, alpha=1 - momentum)


def teacher_temperature(epoch, warmup_temp, temp, warmup_epochs):
    """DINO's per-epoch teacher temperature: linspace(warmup_temp, temp, W)[epoch] for epoch < W, then temp."""
    if epoch < warmup_epochs:
        return float(np.linspace(warmup_temp, temp, warmup_epochs)[epoch])
    return float(temp)


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- m teacher + (1 - m) student, parameters by order, buffers untouched (a lerp: equal stays equal)."""
    t, s = list(teacher.parameters()), list(student.parameters())
    assert len(t) == len(s), "teacher and student differ in structure"
    torch._foreach_lerp_(t, s, 1.0 - momentum)


def teacher_momentum(progress, base=0.996):
    """DINO's EMA momentum at a point of training (progress in [0, 1]): 1 - (1 - m0)(1 + cos(pi progress)) / 2."""
    return 1 - (1 - base) * (1 + math.cos(math.pi * progress)) / 2


@torch.no_grad()
def average_bn_stats(model):
    """Average BatchNorm running statistics over processes before a checkpoint (no-op in one process). On CUDA
    DINO-style methods use SyncBatchNorm (equal already); gloo on CPU has none, so each rank has its own."""
    if distributed():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(all_reduce_mean(m.running_mean))
                m.running_var.copy_(all_reduce_mean(m.running_var))


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


def cancel_last_layer(model, epoch, freeze_epochs):
    """DINO's freeze_last_layer: no gradient (so no step, no decay) for *last_layer* parameters while epoch < freeze."""
    if epoch < freeze_epochs:
        for name, p in model.named_parameters():
            if "last_layer" in name:
                p.grad = None


# --- Frozen feature teachers: the targets of HPM's feature variant and SemAIM* -----------------------
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI clip.py


class QuickGELU(nn.Module):
    """x sigmoid(1.702 x), the activation OpenAI trained CLIP with (clip/model.py)."""
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CLIPBlock(nn.Module):
    """CLIP's residual attention block under OpenAI's names (ln_1, attn.in_proj_weight/bias, attn.out_proj, ln_2,
    mlp.c_fc, mlp.c_proj), its nn.MultiheadAttention (fused q, k, v rows) computed on SDPA; LayerNorm eps 1e-5."""
    def __init__(self, dim, heads, hidden, act):
        super().__init__()
        self.heads, self.ln_1, self.ln_2 = heads, nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.Module()  # holds parameters only, under nn.MultiheadAttention's names
        self.attn.in_proj_weight = nn.Parameter(torch.zeros(3 * dim, dim))
        self.attn.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.attn.out_proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, hidden))
        self.mlp.add_module("gelu", act)
        self.mlp.add_module("c_proj", nn.Linear(hidden, dim))

    def forward(self, x):
        B, T, D = x.shape
        qkv = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias)  # (B, T, 3D): q, k, v
        q, k, v = qkv.view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
        x = x + self.attn.out_proj(a)
        return x + self.mlp(self.ln_2(x))


class CLIPVisionTower(nn.Module):
    """CLIP's image tower under OpenAI's names (conv1, class_embedding, positional_embedding, ln_pre,
    transformer.resblocks.i, ln_post, proj; open_clip uses the same). Returns every token through ln_post and
    proj, as both papers' teachers do (upstream engine_pretrain.py forward_features_clip). -> (B, 1 + N, out)"""
    def __init__(self, patch_size, width, layers, grid, out_dim, hidden, quick_gelu=True):
        super().__init__()
        self.patch_size, self.grid, self.embed_dim = patch_size, grid, out_dim  # as VisionTransformer's
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(1 + grid * grid, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        act = QuickGELU() if quick_gelu else nn.GELU()
        blocks = nn.ModuleList(CLIPBlock(width, max(width // 64, 1), hidden, act) for _ in range(layers))
        self.transformer = nn.ModuleDict({"resblocks": blocks})  # OpenAI's build_model: heads = width // 64
        self.proj = nn.Parameter(torch.zeros(width, out_dim))

    def forward(self, imgs):
        x = self.conv1(imgs).flatten(2).transpose(1, 2)  # (B, N, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)  # (B, 1 + N, W)
        for block in self.transformer["resblocks"]:
            x = block(x)
        return self.ln_post(x) @ self.proj  # (B, 1 + N, out)


class FrozenTeacher(nn.Module):
    """A frozen network behind its own input normalisation: takes images as our loaders give them (ImageNet
    mean/std), re-normalises them for the network (CLIP: CLIP's mean/std), returns its tokens (B, 1 + N, C), cls
    first, without gradient. The network is held outside the module tree (a plain list): it is in no parameters(),
    state_dict(), train(), init or DDP of the model that holds the teacher, so it is never trained or saved (the
    config records its path) and stays in eval mode; _apply passes .to(device) / .float() on to it.
    NOTE(official): HPM's and SemAIM's engine_pretrain.py feed CLIP the ImageNet-normalised batch; here CLIP
    gets the normalisation it was trained with."""
    def __init__(self, net, mean, std, name):
        super().__init__()
        self.nets = [net.eval().requires_grad_(False)]
        self.grid, self.patch_size, self.embed_dim, self.name = net.grid, net.patch_size, net.embed_dim, name
        m_in, s_in, m, s = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD, mean, std))
        # (x s_in + m_in - m) / s: undo the loader's normalisation, apply the teacher's, as one affine map
        self.register_buffer("scale", s_in / s, persistent=False)
        self.register_buffer("shift", (m_in - m) / s, persistent=False)

    def _apply(self, fn, recurse=True):
        self.nets[0]._apply(fn, recurse)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def forward(self, imgs):
        return self.nets[0](imgs * self.scale + self.shift)


def feature_distance(pred, target):
    """|pred/|pred| - target/|target||^2 summed over channels (= 2 - 2 cos), in fp32: the per-token loss of both
    papers' feature targets (HPM models_mae_learn_feature_loss.py, SemAIM models_semaim.py). (..., C) -> (...)"""
    return (F.normalize(pred.float(), dim=-1) - F.normalize(target.float(), dim=-1)).pow(2).sum(-1)


def read_weights(path):
    """What a weight file holds, and whether it was a TorchScript archive (OpenAI's CLIP .pt: its state dict, read
    with torch.jit.load, which builds TorchScript values only); anything else goes through
    torch.load(weights_only=True), which unpickles no Python objects."""
    if not os.path.isfile(path):
        fail(f"--teacher {path} is not a file; pass a CLIP, DINO/timm ViT or our checkpoint.pth (README: teachers)")
    try:
        names = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else []
        if any(n.endswith("/constants.pkl") for n in names):  # TorchScript: torch.load(weights_only) refuses it
            with warnings.catch_warnings():  # torch.jit is deprecated, but the only reader of OpenAI's file
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(path, map_location="cpu").state_dict(), True
        return torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as e:
        fail(f"cannot read --teacher {path} ({type(e).__name__}); pass a state dict saved with torch.save, OpenAI's "
             "CLIP .pt or our checkpoint.pth (files that pickle Python objects are not read)")


def teacher_tower(path, state, archive, clip_act):
    """frozen_teacher's CLIP and DINO/timm branches: the tower the keys name, with the file's weights loaded.
    -> (net, mean, std, description)"""
    for key in ("state_dict", "model"):  # training-checkpoint wrappers (timm, DeiT)
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        fail(f"--teacher {path} holds no state dict; pass a CLIP, DINO/timm ViT or our checkpoint.pth")
    state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}  # saved from DDP
    try:
        if "visual.conv1.weight" in state or "conv1.weight" in state and "class_embedding" in state:
            kind = "CLIP"
            state = {k.removeprefix("visual."): v for k, v in state.items()
                     if k.startswith("visual.") or "visual.conv1.weight" not in state}
            if archive and clip_act != "quickgelu":
                fail(f"--teacher {path} is OpenAI's CLIP, trained with QuickGELU; drop --clip_act {clip_act}")
            width, patch = state["conv1.weight"].shape[0], state["conv1.weight"].shape[-1]
            layers = sum(k.endswith(".ln_1.weight") for k in state)
            grid = math.isqrt(state["positional_embedding"].shape[0] - 1)
            hidden = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
            net = CLIPVisionTower(patch, width, layers, grid, out_dim=state["proj"].shape[1], hidden=hidden,
                                  quick_gelu=clip_act == "quickgelu")
            mean, std = CLIP_MEAN, CLIP_STD
            name = f"CLIP ViT ({layers} x {width}, {clip_act}{', OpenAI archive' if archive else ''})"
        elif "patch_embed.proj.weight" in state and "cls_token" in state:
            kind = "DINO/timm ViT"
            state = {k: v for k, v in state.items() if not k.startswith("head.")}  # timm's classifier
            dim, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
            depth = sum(k.endswith(".norm1.weight") for k in state)
            grid = math.isqrt(state["pos_embed"].shape[1] - 1)
            mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
            net = VisionTransformer(grid * patch, patch, dim, depth, max(dim // 64, 1), mlp_ratio)
            mean, std, name = IMAGENET_MEAN, IMAGENET_STD, f"DINO/timm ViT ({depth} x {dim})"
        else:
            fail(f"--teacher {path} is neither CLIP (visual.conv1.weight), a DINO/timm ViT (patch_embed.proj.weight) "
                 f"nor our checkpoint (its first keys: {', '.join(list(state)[:3])}); README: teachers")
    except (KeyError, IndexError) as e:
        fail(f"--teacher {path} looks like a {kind} but lacks {e}; pass a standard checkpoint")
    problem = mismatch(net.state_dict(), state)
    if problem:
        fail(f"--teacher {path} does not fit a {kind} tower ({problem}); pass a standard checkpoint")
    net.load_state_dict(state)
    return net, mean, std, name


def target_teacher(cfg, self_ok=False):
    """The frozen teacher of --target features from cfg.teacher, or None for pixel targets (and for --teacher self
    where self_ok: the model's own features); --target, --teacher and --clip_act checked together."""
    if cfg.target not in ("pixels", "features") or cfg.clip_act not in ("quickgelu", "gelu"):
        fail(f"unknown --target {cfg.target} or --clip_act {cfg.clip_act}; choose pixels or features, "
             "and quickgelu or gelu")
    if cfg.target == "pixels":
        if cfg.teacher:
            fail(f"--teacher {cfg.teacher} is read only with --target features; add it or drop --teacher")
        return None
    if not cfg.teacher:
        fail("--target features needs --teacher PATH: a CLIP, DINO/timm ViT or our checkpoint.pth (README)"
             + (", or self (the model's own features)" if self_ok else ""))
    if self_ok and cfg.teacher == "self":
        return None
    return frozen_teacher(cfg.teacher, cfg.input_size, cfg.patch_size, cfg.clip_act)


def frozen_teacher(path, input_size, patch_size, clip_act="quickgelu"):
    """The frozen teacher in a weight file, its format told by its keys (one-line errors otherwise):
    - CLIP's image tower: OpenAI's TorchScript archive (ViT-B-16.pt), or an open_clip / plain state dict with its
      `visual.*` names. clip_act: quickgelu (OpenAI's weights) or gelu (open_clip models trained with nn.GELU;
      the file does not say which). CLIP's mean/std.
    - A DINO / timm ViT state dict (dino_vitbase16_pretrain.pth; `head.*` and a `model` / `state_dict` wrapper are
      dropped): loaded into our VisionTransformer, final-normed tokens. ImageNet mean/std (DINO's).
    - A checkpoint.pth of ours: its ViT encoder, as eval_linear.py loads it.
    Sizes come from the weights; heads = width // 64 (64-d heads: the ViT convention and OpenAI's build_model).
    The teacher's token grid must be the student's (input_size // patch_size), so token i targets patch i."""
    state, archive = read_weights(path)
    if isinstance(state, dict) and {"method", "model", "epoch", "config"} <= state.keys():  # ours
        vits = [n for n, e in (state.get("encoders") or {}).items()
                if isinstance(e, dict) and isinstance(e.get("arch"), dict) and e["arch"].get("model") in VIT_SIZES]
        del state
        net, _, arch = load_encoder(path, vits[0] if len(vits) == 1 else "")
        if not isinstance(net, VisionTransformer):
            fail(f"--teacher {path} holds a {arch['model']} encoder; feature targets need a ViT's patch tokens")
        mean, std, name = IMAGENET_MEAN, IMAGENET_STD, f"our {arch['model']} checkpoint"
    else:
        net, mean, std, name = teacher_tower(path, state, archive, clip_act)
    grid, patch = net.grid, net.patch_size
    if (grid, grid * patch) != (input_size // patch_size, input_size):
        fail(f"--teacher {path} has a {grid} x {grid} token grid ({grid * patch} px, patch {patch}), the student a "
             f"{input_size // patch_size} x {input_size // patch_size} grid ({input_size} px, patch {patch_size}); "
             "targets need the same grid: pick a teacher for this --input_size and grid")
    return FrozenTeacher(net, mean, std, f"{name}, {net.embed_dim}-d tokens")


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
    saved several (MOKD: cnn, vit), else the one stored at the top level of its model, built from its config.
    -> (encoder in eval mode, ckpt, arch); arch = {model, input_size, patch_size, num_frames, tubelet_size (ViT;
    num_frames > 1: a clip model) / cifar_stem (ResNet)}."""
    ckpt = load_checkpoint(path)
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
    vit_arch = isinstance(arch["model"], str) and arch["model"] in VIT_SIZES
    sizes_ok = isinstance(arch.get("input_size"), int) and (not vit_arch or isinstance(arch.get("patch_size"), int))
    frames, tubelet = arch.get("num_frames", 1), arch.get("tubelet_size", 1)
    sizes_ok = (sizes_ok and isinstance(frames, int) and isinstance(tubelet, int) and 1 <= tubelet <= frames
                and frames % tubelet == 0)
    if not sizes_ok or not (vit_arch or hasattr(torchvision.models, str(arch["model"]))):
        fail(f"{path} names no encoder we can build (model {arch['model']!r}, input size {arch.get('input_size')!r}); "
             "pass a checkpoint written by one of our training scripts")
    if vit_arch:
        encoder = vit(arch["model"], arch["input_size"], arch["patch_size"], num_frames=frames, tubelet_size=tubelet)
    else:
        encoder = resnet(arch["model"], arch.get("cifar_stem", False))
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

    def run_line(self, name, model, accum, **blrs):
        """One line on the run: trainable parameters, each lr = blr x batch / 256 (blr=, or one per model:
        blr_cnn=, blr_vit=), processes x micro-batches, steps per epoch, device and dtype."""
        cfg, ctx = self.cfg, self.ctx
        params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        lrs = ", ".join(f"{k[1:]} {b * cfg.batch_size / 256:.3g} = {k} {b:g} x {cfg.batch_size} / 256"
                        for k, b in blrs.items())
        self.info(f"{name}: {params:.1f}M trainable params; {lrs}; {ctx.world} process(es) x {accum} micro-batch(es) "
                  f"of {cfg.micro_batch}; {self.steps_per_epoch} steps/epoch; {ctx.device}, {ctx.dtype}")

    def warmups(self, **epochs):
        """One line naming the warm-ups (name=epochs) longer than the run: they are cut off at its end."""
        cut = [f"{name.replace('_', ' ')} ({e} epochs)" for name, e in epochs.items() if e > self.epochs]
        if cut:
            self.info(f"warm-up longer than the {self.epochs}-epoch run, cut off at its end: {', '.join(cut)}")

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
@dataclasses.dataclass
class TrainConfig:
    """The settings this file reads (setup, Batches, Logger, save_checkpoint, resume). Every training program's
    Config extends it, redeclaring a field where its own default differs (the paper's epochs and batch size)."""
    data_path: str = ""  # ImageFolder of training images (one sub-folder per class), or the word cifar10
    data_root: str = "./data"  # where --data_path cifar10 is downloaded to
    output_dir: str = "./output"  # checkpoint.pth, log.jsonl, config.json; rerun the same command to resume
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
    limits: ClassVar[dict] = {"limit": "[0, inf)", "epochs": "[1, inf)", "batch_size": "[1, inf)", "micro_batch": "[1, inf)",
                              "num_workers": "[0, inf)", "seed": "[0, 2147483647]", "log_every": "[1, inf)"}
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
    flags win; every numeric field is checked against the ranges in `limits`. For a TrainConfig, a micro-batch
    or worker count not given on the command line follows the batch size and the cores (torchrun's WORLD_SIZE
    and LOCAL_WORLD_SIZE are read here): the default is a cap, an explicit value is kept and checked."""
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
        if "num_workers" not in given:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            values["num_workers"] = min(values["num_workers"], max(cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1))
    return cls(**values)
