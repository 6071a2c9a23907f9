"""teachers.py: frozen feature teachers, the targets of HPM's feature variant and SemAIM* (--target features).

A CLIP image tower (OpenAI's archives, open_clip state dicts), DINO / timm ViT state dicts and our own checkpoints
behind one FrozenTeacher that normalises its input as its training did and returns patch tokens on our grid; the
per-patch feature distance. Only the programs that train on features import it.
"""
import math
import os
import warnings
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import fail
from training import load_encoder, mismatch


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
        self.patch_size, self.grid, self.embed_dim = patch_size, grid, out_dim  # as common.VisionTransformer's
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
        m_in, s_in, m, s = (torch.tensor(v).view(1, 3, 1, 1) for v in (common.IMAGENET_MEAN, common.IMAGENET_STD, mean, std))
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
            net = common.VisionTransformer(grid * patch, patch, dim, depth, max(dim // 64, 1), mlp_ratio)
            mean, std, name = common.IMAGENET_MEAN, common.IMAGENET_STD, f"DINO/timm ViT ({depth} x {dim})"
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
      dropped): loaded into our common.VisionTransformer, final-normed tokens. ImageNet mean/std (DINO's).
    - A checkpoint.pth of ours: its ViT encoder, as eval_linear.py loads it.
    Sizes come from the weights; heads = width // 64 (64-d heads: the ViT convention and OpenAI's build_model).
    The teacher's token grid must be the student's (input_size // patch_size), so token i targets patch i."""
    state, archive = read_weights(path)
    if isinstance(state, dict) and {"method", "model", "epoch", "config"} <= state.keys():  # ours
        vits = [n for n, e in (state.get("encoders") or {}).items()
                if isinstance(e, dict) and isinstance(e.get("arch"), dict) and e["arch"].get("model") in common.VIT_SIZES]
        del state
        net, _, arch = load_encoder(path, vits[0] if len(vits) == 1 else "")
        if not isinstance(net, common.VisionTransformer):
            fail(f"--teacher {path} holds a {arch['model']} encoder; feature targets need a ViT's patch tokens")
        mean, std, name = common.IMAGENET_MEAN, common.IMAGENET_STD, f"our {arch['model']} checkpoint"
    else:
        net, mean, std, name = teacher_tower(path, state, archive, clip_act)
    grid, patch = net.grid, net.patch_size
    if (grid, grid * patch) != (input_size // patch_size, input_size):
        fail(f"--teacher {path} has a {grid} x {grid} token grid ({grid * patch} px, patch {patch}), the student a "
             f"{input_size // patch_size} x {input_size // patch_size} grid ({input_size} px, patch {patch_size}); "
             "targets need the same grid: pick a teacher for this --input_size and grid")
    return FrozenTeacher(net, mean, std, f"{name}, {net.embed_dim}-d tokens")
