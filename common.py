"""common.py: what two or more of our five methods use unchanged and is not a paper's idea.

ViT with timm's parameter names on one SDPA attention, fixed 2-D sin-cos position embeddings,
patchify, image-folder loading with one-line errors, MAE augmentation, distributed setup with guarded
collectives, seeding, per-step schedules, AdamW parameter groups, checkpoints, logging, config parsing.
Shapes: B batch, N patches, D width, P = patch*patch*3.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import random
import re
import resource
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import ImageFilter
from torchvision import transforms
from tqdm import tqdm


def fail(message):
    """Stop with one line `error: <what is wrong>; <what to do>` and exit status 1."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()  # else a progress bar redraws itself after the error line at exit
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


def sincos_pos_embed(dim, grid, cls_token=True):
    """Fixed 2-D sin-cos embedding (MAE's layout: first half encodes the column, second the row;
    sin then cos in each half), computed in float64 like MAE's numpy code. -> (1 + grid*grid, dim)."""
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
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, imgs):
        return self.proj(imgs).flatten(2).transpose(1, 2)  # (B, N, D)


class VisionTransformer(nn.Module):
    """ViT encoder, no classifier; grid = img_size // patch_size; fixed sin-cos PE (no gradient, as MAE)."""
    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        if img_size % patch_size:
            fail(f"--input_size {img_size} is not a multiple of --patch_size {patch_size}; pick sizes that divide")
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.num_patches, self.embed_dim = self.grid ** 2, embed_dim
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.grid)[None], requires_grad=False)
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def embed_patches(self, imgs):
        """(B, 3, H, W) -> patch tokens with their position embedding, (B, N, D); another image size
        gets the embedding resized to its grid (DINO's multi-crop: 96 px local crops)."""
        x = self.patch_embed(imgs)
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
    """(1, G*G, D) position table -> (1, grid*grid, D), bicubic on the 2-D grid as DINO; unchanged if G = grid.
    NOTE(official): DINO scales by grid / G + 0.1 (a float-rounding guard); sizing by the grid is exact."""
    old = int(round(math.sqrt(pos.shape[1])))
    if old == grid:
        return pos
    x = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, G, G)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)


def vit(name, img_size, patch_size, drop_path=0.0):
    if name not in VIT_SIZES:
        fail(f"unknown --model {name}; choose one of {', '.join(VIT_SIZES)}")
    width, depth, heads = VIT_SIZES[name]
    return VisionTransformer(img_size, patch_size, width, depth, heads, drop_path=drop_path)


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


def patchify(imgs, p):
    """(B, 3, H, W) -> (B, N, p*p*3), each patch laid out (row, col, channel) as MAE."""
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


class DataError(Exception):
    """Raised inside a loader worker; the main process turns it into a one-line error."""


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder that skips unreadable images. An unreadable file is reported once by
    name and replaced by the next readable one; each sample also returns how many files it skipped,
    so the training loop can stop a run in which most images fail."""
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
        raise DataError(f"{self.max_skips} images in a row could not be read (the last: {path}); "
                        f"check the files under {self.root}")


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


class Batches:
    """Epoch-wise iteration over a training set: per-process micro-batches and the gradient accumulation
    that makes up the global batch, a fresh seeded shuffle and augmentation stream each epoch (so a
    resumed run sees the same images as an uninterrupted one), images moved to the device, and a count
    of unreadable files that stops the run once most files fail."""

    def __init__(self, dataset, cfg, ctx):
        self.accum = cfg.batch_size // (cfg.micro_batch * ctx.world)
        if self.accum < 1 or self.accum * cfg.micro_batch * ctx.world != cfg.batch_size:
            fail(f"--batch_size {cfg.batch_size} is not a multiple of --micro_batch {cfg.micro_batch} "
                 f"x {ctx.world} processes; change one of them")
        self.sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        self.generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            dataset, cfg.micro_batch, sampler=self.sampler, num_workers=cfg.num_workers, drop_last=True,
            pin_memory=ctx.device.type == "cuda", generator=self.generator)
        self.steps_per_epoch = len(self.loader) // self.accum
        if self.steps_per_epoch == 0:
            fail(f"{len(dataset)} images make no full batch of {cfg.batch_size}; lower --batch_size")
        self.seed, self.device, self.read, self.skipped = cfg.seed, ctx.device, 0, 0

    def epoch(self, epoch):
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(self.seed + 1000 * epoch)  # loader workers' augmentation seeds
        try:
            for images, _, skipped in self.loader:  # images: a tensor, or a list of crops (multi-crop)
                self.read += len(skipped)
                self.skipped += int(skipped.sum())  # a CPU tensor from the loader: no device sync
                if self.skipped > max(self.read, 8):  # more unreadable files than readable ones
                    fail(f"most images could not be read ({self.skipped} unreadable, {self.read} read); "
                         "check the dataset")
                if isinstance(images, (list, tuple)):  # crop-major: V tensors of (B, 3, h, w)
                    yield [x.to(self.device, non_blocking=True) for x in images]
                else:
                    yield images.to(self.device, non_blocking=True)
        except DataError as e:  # re-raised from a worker with a traceback: keep our sentence only
            fail(str(e).strip().splitlines()[-1].split("DataError: ")[-1])


# --- Distributed setup, seeding, precision ---------------------------------------------------------
@dataclasses.dataclass
class Context:
    """Where this process runs: rank, number of processes, device, autocast dtype."""
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    main = property(lambda self: self.rank == 0)

    def autocast(self):  # reduced-precision autocast, or nothing for float32
        return nullcontext() if self.dtype == torch.float32 else torch.autocast(self.device.type, dtype=self.dtype)


def setup(cfg):
    """torchrun's process group (nccl on CUDA, gloo on CPU) or none; device, dtype, seed + rank."""
    want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {cfg.device} but no GPU is visible; pass --device cpu")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(want)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not distributed():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in names:
        fail(f"unknown --dtype {cfg.dtype}; choose auto, float32, bfloat16 or float16")
    seed_all(cfg.seed + rank)
    return Context(rank, world, device, names[dtype_name])


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


def wrap_ddp(model, ctx):
    """DistributedDataParallel when launched on several processes, else the model itself."""
    if ctx.world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, broadcast_buffers=False)


def compile_blocks(model):
    """Regional compilation: compile each transformer Block in place (one graph shared by all blocks,
    short compile times, parameter names unchanged). The method's own schedule and masking logic
    stays eager, so changing schedule values never trigger recompiles."""
    for m in model.modules():
        if isinstance(m, Block):
            m.compile()


# --- Optimisation ----------------------------------------------------------------------------------
def cosine_schedule(base, final, total_steps, warmup_steps=0):
    """Per-step values: linear warmup from 0, then half-cosine base -> final (MAE's rule; DINO's without warmup)."""
    steps = np.arange(total_steps, dtype=np.float64)
    warm = base * steps / max(warmup_steps, 1)
    t = (steps - warmup_steps) / max(total_steps - warmup_steps, 1)
    cos = final + (base - final) * 0.5 * (1 + np.cos(np.pi * t))
    return np.where(steps < warmup_steps, warm, cos)


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices and conv kernels (ndim >= 2), none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def adamw(model, lr, weight_decay, betas=(0.9, 0.95)):
    """Fused AdamW (a single kernel per step on CUDA, also available on CPU)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=True)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = float(lr)  # a plain float: numpy scalars would not pass torch.load(weights_only)


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
    """PIL Gaussian blur with probability p, radius U(0.1, 2) (DINO's at 224 px) scaled by size / 224."""
    def __init__(self, p, size):
        self.p, self.scale = p, size / 224

    def __call__(self, img):
        if float(torch.rand(())) >= self.p:
            return img
        radius = (0.1 + 1.9 * float(torch.rand(()))) * self.scale
        return img.filter(ImageFilter.GaussianBlur(radius))


class MultiCrop:
    """DINO's multi-crop: PIL image -> [global 1 (blur p 1), global 2 (blur .1, solarize .2), locals (blur .5)]."""
    def __init__(self, global_size=224, local_size=96, local_crops=8, global_scale=(0.4, 1.0),
                 local_scale=(0.05, 0.4)):
        bicubic = transforms.InterpolationMode.BICUBIC
        colour = [transforms.RandomHorizontalFlip(0.5),
                  transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                  transforms.RandomGrayscale(0.2)]
        norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        g_crop = transforms.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic)
        l_crop = transforms.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic)
        self.global1 = transforms.Compose([g_crop, *colour, RandomBlur(1.0, global_size), *norm])
        self.global2 = transforms.Compose([g_crop, *colour, RandomBlur(0.1, global_size),
                                           transforms.RandomSolarize(128, p=0.2), *norm])
        self.local = transforms.Compose([l_crop, *colour, RandomBlur(0.5, local_size), *norm])
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
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
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


def import_state(model, state, encoder="encoder"):
    """Inverse of export_state: put the encoder's prefix back, then load strictly."""
    own = set(model.state_dict())
    state = {(k if k in own else f"{encoder}.{k}"): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        fail(f"the checkpoint's weights do not fit this model ({str(e).splitlines()[1].strip()}); "
             "resume with the same --model/--input_size/--patch_size, or use a fresh --output_dir")


def save_checkpoint(path, method, model, optimizer, epoch, cfg, scaler=None, encoders=None):
    """Rank 0 writes {method, model, optimizer, epoch (the next one), config, rng (one per rank)}; encoders
    {name: (module, arch)} adds encoders[name] = {arch, state} (torchvision / timm names) for eval_linear."""
    rngs = [rng_state()]
    if distributed():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state())
    if not distributed() or dist.get_rank() == 0:
        state = {"method": method, "model": export_state(model), "optimizer": optimizer.state_dict(),
                 "epoch": epoch, "config": dataclasses.asdict(cfg), "rng": rngs,
                 "scaler": scaler.state_dict() if scaler is not None else None}
        if encoders:
            state["encoders"] = {k: {"arch": arch, "state": m.state_dict()} for k, (m, arch) in encoders.items()}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # a crash mid-write never leaves a half-written checkpoint
    if distributed():
        dist.barrier()


def load_checkpoint(path, method=None):
    """Load safely (weights_only: a checkpoint cannot run code) and check it came from `method`."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist; check the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); it is damaged or was not written by "
             "one of our training scripts")
    if not isinstance(ckpt, dict) or "method" not in ckpt or "model" not in ckpt:
        fail(f"{path} is not a checkpoint of ours (no 'method'/'model' entries); pass a checkpoint.pth "
             "written by one of our training scripts")
    if method is not None and ckpt["method"] != method:
        fail(f"{path} was written by {ckpt['method']}.py, not {method}.py; "
             "use a fresh --output_dir or the matching script")
    return ckpt


def resume(cfg, method, model, optimizer, ctx, scaler=None):
    """Auto-resume from --resume or output_dir/checkpoint.pth; returns the epoch to start from."""
    path = cfg.resume or os.path.join(cfg.output_dir, "checkpoint.pth")
    if not cfg.resume and not os.path.exists(path):
        return 0
    ckpt = load_checkpoint(path, method)
    import_state(model, ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt["rng"]
    if len(rngs) == ctx.world:
        set_rng_state(rngs[ctx.rank])
    else:  # another world size: a fresh, distinct stream per rank
        seed_all(cfg.seed + ctx.rank + 7919 * ckpt["epoch"])
    if ctx.main:
        print(f"resumed from {path}: epoch {ckpt['epoch']} of {cfg.epochs}", file=sys.stderr)
    return ckpt["epoch"]  # NOTE(official): the next epoch itself; the official code adds 1 again


# --- Logging ---------------------------------------------------------------------------------------
def peak_memory_gib(device):
    """Peak GPU memory allocated on CUDA; peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


class Logger:
    """Rank 0: tqdm bar, log line + output_dir/log.jsonl every log_every steps (the only .item())."""

    def __init__(self, cfg, ctx, total_steps, start_step, images_per_step):
        self.ctx, self.every, self.images_per_step = ctx, cfg.log_every, images_per_step
        self.path = os.path.join(cfg.output_dir, "log.jsonl")
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not ctx.main, dynamic_ncols=True)
        if ctx.main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=1)

    def info(self, message):
        if self.ctx.main:
            self.bar.write(message)

    def step(self, step, epoch, lr, loss, stats):
        self.bar.update(1)
        for k, v in {"loss": loss, **stats}.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1
        if self.count < self.every and step + 1 < self.bar.total:
            return
        values = {k: v.item() / self.count for k, v in self.sums.items()}  # the one host sync
        if not math.isfinite(values["loss"]):
            fail(f"the loss became {values['loss']} within steps {step + 1 - self.count}..{step}; "
                 "lower --blr or check the data")
        seconds = time.perf_counter() - self.t0
        record = {"step": step, "epoch": epoch, "lr": lr, **values, "peak_mem_gib": peak_memory_gib(self.ctx.device),
                  "img_per_s": self.count * self.images_per_step / seconds}
        if self.ctx.main:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
            self.bar.write(f"epoch {epoch} step {step}: " + " ".join(
                f"{k} {v:.4g}" for k, v in record.items() if k not in ("step", "epoch")))
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()

    def close(self):
        self.bar.close()


# --- Config: a dataclass becomes --flags; its field comments become --help -------------------------
def parse_config(cls, argv=None):
    """Fields of `cls` become --flags (bools: --no-x); --preset loads new defaults, explicit flags win."""
    source = inspect.getsource(cls)
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, flags=re.M))
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = getattr(cls, "presets", {})
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="a recipe sized for a smaller setting")
    for f in dataclasses.fields(cls):
        kind = type(f.default)
        extra = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        parser.add_argument(f"--{f.name}", default=None, help=f"{comments.get(f.name, '')} (default: {f.default})",
                            **extra)
    args = vars(parser.parse_args(argv))
    values = dict(presets.get(args.pop("preset", None), {}))
    values.update({k: v for k, v in args.items() if v is not None})
    return cls(**values)
