"""common.py: the models and the data that two or more of our methods use unchanged and that are no paper's idea.

ViT with timm's parameter names on one SDPA attention (also space-time, on clips), fixed sin-cos position
embeddings, patchify, torchvision ResNets with their stage outputs, MAE and VideoMAE augmentation, image-folder
and clip-folder loading with one-line errors. A method's model needs only this file; the training programs add
training.py (process setup, the batch stream and accumulation step, schedules, checkpoints, logging, config) and,
for feature targets, teachers.py.
Shapes: B batch, N patches (clips: tubelets), D width, P = patch*patch*3 (clips: tubelet*patch*patch*3).
"""
import importlib.util
import math
import os
import sys
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
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

    def weights(self, x, attn_mask=None):
        """The attention probabilities forward() applies to the values, (B, heads, T, T) in fp32, each row summing
        to 1 (SDPA does not return them; for visualisation: DINO's cls attention, MOKD's search)."""
        B, T, D = x.shape
        q, k, _ = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        logits = (q.float() @ k.float().transpose(-2, -1)) * (D // self.num_heads) ** -0.5  # SDPA's default scale
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        return logits.softmax(-1)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of a whole sample with probability p. The keep probability is a
    buffer (not saved), not a Python float, so torch.compile traces one graph for blocks of every rate: a float would
    be a constant of the graph, one recompile per block of a linearly rising rate (past dynamo's recompile limit,
    after which blocks run eagerly). Only `active` (p > 0) is a graph constant."""
    def __init__(self, p=0.0):
        super().__init__()
        self.register_buffer("keep_prob", torch.tensor(1.0), persistent=False)
        self.p = p

    @property
    def p(self):
        return self._p

    @p.setter
    def p(self, value):  # also settable later (MOKD's teacher: 0)
        self._p, self.active = float(value), value > 0
        self.keep_prob.fill_(1.0 - value)

    def forward(self, x):
        if not self.active or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(self.keep_prob)  # (B, 1, ...)
        return x * keep / self.keep_prob


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

    @torch.no_grad()
    def last_attention(self, imgs):
        """The last block's attention probabilities over [cls, patches], (B, heads, 1 + N, 1 + N): row 0 is the cls
        attention that DINO's visualize_attention.py draws (its get_last_selfattention)."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(imgs.shape[0], -1, -1)
        x = torch.cat([cls, self.embed_patches(imgs)], dim=1)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        return last.attn.weights(last.norm1(x))


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


# --- What the methods' modules share: progress -> epoch, EMA teachers ---------------------------------
def epoch_at(progress, epochs):
    """The epoch in progress at a point of training (progress = step / total steps in [0, 1)), for the schedules
    that papers set once per epoch; the 1e-6 absorbs float rounding of step / total_steps * epochs."""
    return min(int(progress * epochs + 1e-6), epochs - 1)


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- m teacher + (1 - m) student, parameters by order, buffers untouched (a lerp: equal stays equal)."""
    t, s = list(teacher.parameters()), list(student.parameters())
    assert len(t) == len(s), "teacher and student differ in structure"
    torch._foreach_lerp_(t, s, 1.0 - momentum)


# --- ResNet (MOKD's CNN, SCFS) ---------------------------------------------------------------------
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


SPLITS = ("train", "val", "test")


def check_not_a_root(path, holds_samples, of_root=False):
    """Stop when `path`, read as one split of class folders, is a level too high: its folders are exactly splits
    (train/, val/, test/: a data root, which ImageFolder would read as classes, mixing the splits), or none of them
    holds a sample directly and they hold folders (a folder of data sets). holds_samples(folder) -> bool.
    of_root: path is the train/ or val/ split a program found inside --data_path (finetune.py, eval_linear.py)."""
    folders = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not folders:
        return
    inside = [os.path.join(path, f) for f in folders]
    splits = set(folders) <= set(SPLITS)
    if not splits and (any(holds_samples(f) for f in inside)
                       or not any(e.is_dir() for f in inside for e in os.scandir(f))):
        return
    first = "train" if "train" in folders else folders[0]
    what = "the splits of a data set" if splits else "folders of folders"
    if not of_root:
        fix = f"pass --data_path {os.path.join(path, first)}"
    else:  # the program looked for its splits inside --data_path; this split is itself a data root, or deeper
        fix = f"pass --data_path {path}" if splits else "pass a --data_path whose train/ and val/ hold class folders"
    fail(f"{path} holds {', '.join(f + '/' for f in folders[:4])}{', ...' if len(folders) > 4 else ''} ({what}), not "
         f"class folders of samples: read as classes they would mix; {fix}")


def holds_images(folder):
    """Does the folder hold an image file itself (not in a sub-folder)? Stops at the first one."""
    return any(e.is_file() and e.name.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS)
               for e in os.scandir(folder))


def split_folders(path, kind="ImageFolders", purpose=""):
    """(path/train, path/val or else path/test) of a data root, for the programs that evaluate (finetune.py,
    eval_linear.py); one-line errors: no path, a split passed for the root (pass its parent), a split missing."""
    if not path:
        fail(f"no --data_path given; pass a folder holding train/ and val/ (or test/) {kind}")
    train = os.path.join(path, "train")
    val = next((os.path.join(path, d) for d in ("val", "test") if os.path.isdir(os.path.join(path, d))), None)
    if os.path.isdir(train) and val:
        return train, val
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.basename(os.path.abspath(path)) in SPLITS and os.path.isdir(os.path.join(parent, "train")):
        fail(f"--data_path {path} is one split of a data set; {purpose}pass the folder that holds train/ and val/: "
             f"--data_path {os.path.dirname(os.path.normpath(path)) or '.'}")
    missing = " and ".join(d for d, ok in (("train/", os.path.isdir(train)), ("val/ (or test/)", val)) if not ok)
    fail(f"--data_path {path} has no {missing} folder; {purpose}pass a folder holding train/ and val/ (or test/) {kind}")


def image_dataset(path, transform, data_root="./data", train=True, of_root=False):
    """An ImageFolder directory, or `cifar10` (torchvision's, downloaded into data_root); one-line errors, also for
    a data root or a folder of data sets passed as the folder of class folders (check_not_a_root)."""
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
    check_not_a_root(path, holds_images, of_root)
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
    ImageFolder's images: named once (with the frame at fault), replaced by the next video, counted. Sampled frames of
    different sizes are resized to the first one's (one warning per video), so one crop fits them all."""
    max_skips = 16
    reported = set()  # per process: unreadable videos, videos with frames of other sizes, 'short' (a video file)

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
            return self.same_size(path, [frames[i] for i in ids])
        from torchcodec.decoders import VideoDecoder  # checked by clip_dataset
        decoder = VideoDecoder(path)
        if len(decoder) < self.num_frames * self.rate and "short" not in self.reported:  # frame folders: clip_dataset
            self.reported.add("short")
            print(f"warning: {path} has {len(decoder)} frames, fewer than --num_frames {self.num_frames} x "
                  f"--sampling_rate {self.rate} = {self.num_frames * self.rate}: its clips may repeat frames "
                  "(VideoMAE's rule); other short video files are not named", file=sys.stderr)
        ids = clip_indices(len(decoder), self.num_frames, self.rate, self.start(len(decoder)))
        unique = sorted(set(ids))
        data = decoder.get_frames_at(unique).data  # (k, 3, H, W) uint8
        frames = {i: Image.fromarray(x.permute(1, 2, 0).numpy()) for i, x in zip(unique, data)}
        return [frames[i] for i in ids]

    def same_size(self, path, frames):
        """The frames, each resized to the first one's size if they differ (named once per video): the clip's crop
        is placed by the first frame's size, so a frame of another size would be cut elsewhere or padded black."""
        size = frames[0].size
        if all(f.size == size for f in frames):
            return frames
        if (path, "sizes") not in self.reported:
            self.reported.add((path, "sizes"))
            sizes = ", ".join(f"{w}x{h}" for w, h in sorted({f.size for f in frames}))
            print(f"warning: the frames of video {path} differ in size ({sizes}); each is resized to the first "
                  f"frame's {size[0]}x{size[1]}", file=sys.stderr)
        return [f if f.size == size else f.resize(size, Image.BILINEAR) for f in frames]

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


def holds_videos(folder):
    """Does the class folder hold a video itself: a video file, or a folder with frames in it? Stops at the first."""
    for e in os.scandir(folder):
        if e.is_file() and e.name.lower().endswith(VIDEO_EXTENSIONS):
            return True
        if e.is_dir() and any(f.name.lower().endswith(FRAME_EXTENSIONS) for f in os.scandir(e.path)):
            return True
    return False


def count_frames(folder):
    return sum(1 for e in os.scandir(folder) if e.name.lower().endswith(FRAME_EXTENSIONS))


def clip_dataset(path, transform, num_frames, sampling_rate, train=True, of_root=False):
    """A ClipFolder with one-line errors (no folder, a data root or a folder of data sets (check_not_a_root), no
    videos, video files without TorchCodec), and one line on the frame-folder videos shorter than a clip's span
    (num_frames x sampling_rate frames; counted here, on the first process; video files are named when read)."""
    if not path:
        fail("no --data_path given; pass a folder of class folders of videos (frame folders or video files)")
    if not os.path.isdir(path):
        fail(f"--data_path {path} is not a directory; pass a folder of class folders of videos")
    check_not_a_root(path, holds_videos, of_root)
    dataset = ClipFolder(path, transform, num_frames, sampling_rate, train)
    if not dataset.samples:
        fail(f"no videos found under {path}; clips need <path>/<class>/<video>/<frame>.jpg or "
             f"<path>/<class>/<video>{{{','.join(VIDEO_EXTENSIONS)}}}")
    files = [p for p, _ in dataset.samples if not os.path.isdir(p)]
    if files and importlib.util.find_spec("torchcodec") is None:
        fail(f"{path} holds video files (such as {files[0]}) and decoding them needs TorchCodec (torchvision no longer "
             "decodes video); pip install torchcodec, or extract the frames into <class>/<video>/<frame>.jpg")
    span = num_frames * sampling_rate
    if int(os.environ.get("RANK", 0)) == 0:
        short = [(n, p) for p, _ in dataset.samples if os.path.isdir(p) for n in [count_frames(p)] if n < span]
        if short:
            n, p = min(short)
            print(f"warning: {len(short)} of {len(dataset)} videos in {path} have fewer than --num_frames {num_frames} "
                  f"x --sampling_rate {sampling_rate} = {span} frames (the shortest, {p}, has {n}): their clips start "
                  "at the first frame and may repeat frames (VideoMAE's rule)", file=sys.stderr)
    return dataset


def subset(dataset, limit):
    """At most `limit` samples (0: all), evenly spaced, so every class of a sorted ImageFolder is kept."""
    if not limit or limit >= len(dataset):
        return dataset
    step = len(dataset) / limit
    return torch.utils.data.Subset(dataset, [int(i * step) for i in range(limit)])
