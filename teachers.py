"""teachers.py: frozen feature teachers, the targets of HPM's feature variant and SemAIM* (--target features).

A CLIP image tower (OpenAI's archives, open_clip state dicts), DINO / timm ViT state dicts and our own checkpoints
behind one FrozenTeacher that normalises its input as its training did and returns patch tokens on our grid; the
per-patch feature distance. Weight files are read as data, never run: torch.load(weights_only=True), a
.safetensors reader, and a TorchScript reader that rebuilds tensors only. Only the programs that train on
features import it.
"""
import collections
import json
import math
import os
import pickle
import re
import sys
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
    def __init__(self, patch_size, width, layers, heads, grid, out_dim, hidden, quick_gelu=True):
        super().__init__()
        self.patch_size, self.grid, self.embed_dim = patch_size, grid, out_dim  # as common.VisionTransformer's
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(1 + grid * grid, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        act = QuickGELU() if quick_gelu else nn.GELU()
        blocks = nn.ModuleList(CLIPBlock(width, heads, hidden, act) for _ in range(layers))
        self.transformer = nn.ModuleDict({"resblocks": blocks})
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


# --- Reading weight files as data: nothing in a --teacher file runs --------------------------------------
STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                  "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}  # the storage classes torch's pickles name, by element type
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
CONVERT = ("if you trust the file, turn it into a plain state dict once: python -c \"import torch; torch.save("
           "torch.jit.load('{path}', map_location='cpu').state_dict(), 'teacher.pth')\" and pass teacher.pth")


class ScriptObject:
    """Stands in for a TorchScript class (`__torch__.*`) while an archive's data.pkl is unpickled: keeps the state
    pickle hands it and runs nothing. torch.jit.load would instead run the class's own __setstate__, TorchScript code
    from the archive's code/ that can open and write files (PyTorch's docs: do not load untrusted archives)."""
    qualname = ""

    def __new__(cls, *args):
        obj = object.__new__(cls)
        obj.state = args
        return obj

    def __setstate__(self, state):  # pickle's BUILD: a module's attributes, a dict {name: value}
        self.state = state


class ArchiveUnpickler(pickle.Unpickler):
    """A TorchScript archive's data.pkl rebuilt from an allow-list: tensors (their bytes from data/<key>), ordered
    dicts, TorchScript's typed lists, and ScriptObject placeholders for its module classes; any other global
    stops the read, as torch.load(weights_only=True) does for ordinary checkpoints."""
    def __init__(self, file, read_storage):
        super().__init__(file)
        self.read_storage, self.classes = read_storage, {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"  # one placeholder type per class: it names the class, nothing more
            return self.classes.setdefault(qualname, type(name, (ScriptObject,), {"qualname": qualname}))
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):  # (storage, offset, size, stride, ...)
            return lambda storage, offset, size, stride, *unused: storage.as_strided(size, stride, offset)
        if (module, name) == ("collections", "OrderedDict"):  # a tensor's (empty) backward hooks
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist",
                                                      "build_tensorlist", "restore_type_tag"):
            return lambda value, *type_tag: value  # a list (or a value) with TorchScript's type tag
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):  # ("storage", dtype, key, device, numel): a flat tensor of data/<key>'s bytes
        kind, dtype, key, _, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"persistent id {kind}")
        return self.read_storage(str(key), dtype, numel)


def declared_tensors(archive, root):
    """{class: (its parameter names, its buffer names)} as the archive's code/ declares them (`__parameters__ =
    [...]`, `__buffers__ = [...]` under each `class X(Module):`), read as text: the tensors that are state-dict
    entries, the others being plain attributes. code/a/b.py holds the classes of module __torch__... a.b."""
    declared = {}
    for name in archive.namelist():
        if name.startswith(f"{root}code/") and name.endswith(".py"):
            module = name[len(f"{root}code/"):-3].replace("/", ".")
            text = archive.read(name).decode("utf-8", "replace")
            for cls, body in re.findall(r"^class (\w+)\(.*\):\n((?:[ \t].*\n?)*)", text, re.M):
                lists = [re.search(rf"^\s+__{kind}__ = \[(.*)\]", body, re.M) for kind in ("parameters", "buffers")]
                declared[f"{module}.{cls}"] = tuple(re.findall(r'"(\w+)"', m.group(1)) if m else [] for m in lists)
    return declared


def read_torchscript(path, archive, root):
    """A TorchScript archive's state dict, read without running it: data.pkl through ArchiveUnpickler, then the
    module tree walked as torch's state_dict() walks it (each module's parameters, its buffers, then its
    submodules, keys joined with '.'), so the keys and their order are those of torch.jit.load(path).state_dict().
    -> (state dict, {dotted name: int/float/str attribute or a module's class}), e.g. an attention's num_heads."""
    order = f"{root}byteorder"  # absent before torch 2.1: little-endian
    if (archive.read(order).decode().strip() if order in archive.namelist() else "little") != sys.byteorder:
        fail(f"--teacher {path} stores its tensors in the other byte order; " + CONVERT.format(path=path))

    def read_storage(key, dtype, numel):
        data = bytearray(archive.read(f"{root}data/{key}"))
        flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        if flat.numel() != numel:
            raise ValueError(f"data/{key} holds {flat.numel()} elements, not {numel}")
        return flat

    top = ArchiveUnpickler(archive.open(f"{root}data.pkl"), read_storage).load()
    declared, state, facts = declared_tensors(archive, root), {}, {}

    def walk(obj, prefix):
        if not isinstance(obj.state, dict):  # the class pickled itself with its own __getstate__
            fail(f"--teacher {path} is a TorchScript archive whose {obj.qualname} restores itself with its own code "
                 "(__setstate__), which is not run here; " + CONVERT.format(path=path))
        if obj.qualname not in declared:
            raise ValueError(f"{obj.qualname} is not in code/")
        facts[prefix + "__class__"] = obj.qualname
        for group in declared[obj.qualname]:  # parameters, then buffers, in the order of the module's slots
            state.update((prefix + k, v) for k, v in obj.state.items() if k in group and torch.is_tensor(v))
        for k, v in obj.state.items():
            if isinstance(v, ScriptObject):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float, str)):
                facts[prefix + k] = v

    if not isinstance(top, ScriptObject):
        raise ValueError("data.pkl holds no module")
    walk(top, "")
    return state, facts


def read_safetensors(path):
    """A .safetensors file: 8 bytes of header length (little-endian), a JSON header {name: {dtype, shape,
    data_offsets}} and the tensors' bytes (the layout huggingface/safetensors' README gives); data only.
    -> state dict"""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data = bytearray(f.read())
    state = {}
    for name, t in header.items():
        if name != "__metadata__":
            (start, end), dtype = t["data_offsets"], SAFETENSORS_DTYPES[t["dtype"]]
            flat = torch.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start) \
                if end > start else torch.empty(0, dtype=dtype)
            state[name] = flat.view(t["shape"])
    return state


def read_weights(path):
    """What a weight file holds, read as data: nothing in it runs. A TorchScript archive (OpenAI's CLIP .pt) through
    read_torchscript, never torch.jit.load (which runs the archive's code); a .safetensors file through
    read_safetensors; anything else through torch.load(weights_only=True), which unpickles tensors and plain
    containers only. -> (state, facts): facts are a TorchScript archive's attributes (read_torchscript), else None."""
    # NOTE(official): both repositories torch.load the CLIP file, which for a TorchScript archive runs its code.
    if not os.path.isfile(path):
        fail(f"--teacher {path} is not a file; pass a CLIP, DINO/timm ViT or our checkpoint.pth "
             "(docs/feature-targets.md)")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
            return read_safetensors(path), None
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()  # TorchScript: <root>/constants.pkl, data.pkl, data/, code/
                roots = [n.removesuffix("constants.pkl") for n in names if re.fullmatch(r"[^/]+/constants.pkl", n)]
                if roots and f"{roots[0]}data.pkl" in names:
                    return read_torchscript(path, archive, roots[0])
        return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as e:
        fail(f"cannot read --teacher {path} ({type(e).__name__}: {' '.join(str(e).split())[:100]}); "
             "pass a state dict (torch.save or .safetensors), OpenAI's CLIP .pt or our checkpoint.pth (files that "
             "pickle Python objects are not read)")


# --- Attention heads: the one size the weights do not tell ------------------------------------------------
# q, k and v of all heads are one (3W, W) matrix, so a tower's weights load into any head count that divides its
# width W, and a wrong count gives other tokens without a word. Head width by width for every official tower our
# CLIP and ViT teachers load: open_clip's model_configs (OpenAI's and open_clip's ViT-S/M/B/B-plus/L 64, ViT-H-14 80,
# ViT-g-14 88, ViT-bigG-14 104, ViT-e-14 112) and timm's plain ViTs (Ti/S/B/L and DINO's S/B 64, huge 80, giant 88,
# gigantic 104) agree at every width they share. Other widths have no official answer.
HEAD_WIDTHS = {192: 64, 384: 64, 512: 64, 768: 64, 896: 64, 1024: 64, 1280: 80, 1408: 88, 1664: 104, 1792: 112}


def open_clip_heads(path, width, layers, patch):
    """The heads given by the open_clip_config.json beside `path` (open_clip's hub exports write one next to their
    weights: model_cfg.vision_cfg's width and head_width; open_clip's CLIPVisionCfg defaults, 768 and 64, where
    absent), or 0 without one; a one-line error if it describes another tower than the weights."""
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "open_clip_config.json")
    if not os.path.isfile(config):
        return 0
    try:
        with open(config) as f:
            vision = json.load(f)["model_cfg"]["vision_cfg"]
        said = (vision.get("width", 768), vision.get("layers", 12), vision.get("patch_size", 16))
        head_width = vision.get("head_width", 64)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        fail(f"cannot read {config} beside --teacher {path} ({type(e).__name__}); fix or remove it")
    if said != (width, layers, patch) or type(head_width) is not int or head_width < 1 or width % head_width:
        fail(f"{config} describes another tower (width, layers, patch {said}, head width {head_width}) than "
             f"--teacher {path} ({(width, layers, patch)}); move the weights into a folder of their own")
    return width // head_width


def attention_heads(path, kind, width, flag, stated=0, source=""):
    """The teacher's attention heads: what its files state (`source` names it), else --teacher_heads (`flag`), else
    the head width of the official towers of this width (HEAD_WIDTHS); one line where the flag contradicts the
    file, the heads do not divide the width, or nothing tells."""
    # NOTE(official): HPM's models_clip.py build_model takes width // 64 heads; that is right for OpenAI's ViT-B/L
    # but loads ViT-H/g/bigG (80, 88, 104-wide heads) strictly into the wrong heads, so the file's word comes first.
    if stated and flag and stated != flag:
        fail(f"--teacher_heads {flag} contradicts the {stated} heads {source} for --teacher {path}; "
             "drop --teacher_heads")
    heads = stated or flag or (width // HEAD_WIDTHS[width] if width in HEAD_WIDTHS else 0)
    if not heads:
        fail(f"--teacher {path} is a {kind} of width {width}, whose attention heads neither the file nor an official "
             "tower of that width tells; pass --teacher_heads N from its training config (N = width / head width)")
    if width % heads:
        fail(f"--teacher {path}: {heads} heads do not divide its width {width}; pass --teacher_heads N that does")
    return heads


def teacher_tower(path, state, facts, clip_act, heads=0):
    """frozen_teacher's CLIP and DINO/timm branches: the tower the keys name, with the file's weights loaded.
    facts: a TorchScript archive's attributes (read_weights), else None. heads: --teacher_heads, 0 = from the file.
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
            prefix = "visual." if "visual.conv1.weight" in state else ""
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            width, patch = state["conv1.weight"].shape[0], state["conv1.weight"].shape[-1]
            layers = sum(k.endswith(".ln_1.weight") for k in state)
            grid = math.isqrt(state["positional_embedding"].shape[0] - 1)
            hidden = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
            stated, source = 0, ""
            if facts is not None:  # a TorchScript archive: OpenAI's (QuickGELU) unless it records nn.GELU
                block = f"{prefix}transformer.resblocks.0."
                act = "gelu" if facts.get(f"{block}mlp.gelu.__class__", "").endswith(".GELU") else "quickgelu"
                if clip_act != act:
                    used = "nn.GELU" if act == "gelu" else "QuickGELU (as OpenAI trained CLIP)"
                    fail(f"--teacher {path} is a TorchScript CLIP whose blocks use {used}; pass --clip_act {act}")
                recorded = facts.get(f"{block}attn.num_heads")  # scripted towers record it, OpenAI's traced ones not
                if type(recorded) is int and recorded > 0:
                    stated, source = recorded, "its TorchScript attention records"
            if not stated:
                stated = open_clip_heads(path, width, layers, patch)
                source = "the open_clip_config.json beside it gives"
            heads = attention_heads(path, "CLIP tower", width, heads, stated, source)
            net = CLIPVisionTower(patch, width, layers, heads, grid, out_dim=state["proj"].shape[1], hidden=hidden,
                                  quick_gelu=clip_act == "quickgelu")
            mean, std = CLIP_MEAN, CLIP_STD
            name = f"CLIP ViT ({layers} x {width}, {heads} heads, {clip_act}{'' if facts is None else ', TorchScript'})"
        elif "patch_embed.proj.weight" in state and "cls_token" in state:
            kind = "DINO/timm ViT"
            state = {k: v for k, v in state.items() if not k.startswith("head.")}  # timm's classifier
            dim, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
            depth = sum(k.endswith(".norm1.weight") for k in state)
            grid = math.isqrt(state["pos_embed"].shape[1] - 1)
            mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
            heads = attention_heads(path, "DINO/timm ViT", dim, heads)
            net = common.VisionTransformer(grid * patch, patch, dim, depth, heads, mlp_ratio)
            mean, std = common.IMAGENET_MEAN, common.IMAGENET_STD
            name = f"DINO/timm ViT ({depth} x {dim}, {heads} heads)"
        else:
            fail(f"--teacher {path} is neither CLIP (visual.conv1.weight), a DINO/timm ViT (patch_embed.proj.weight) "
                 f"nor our checkpoint (its first keys: {', '.join(list(state)[:3])}); see docs/feature-targets.md")
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
        fail("--target features needs --teacher PATH: a CLIP, DINO/timm ViT or our checkpoint.pth "
             "(docs/feature-targets.md)" + (", or self (the model's own features)" if self_ok else ""))
    if self_ok and cfg.teacher == "self":
        return None
    return frozen_teacher(cfg.teacher, cfg.input_size, cfg.patch_size, cfg.clip_act, cfg.teacher_heads)


def frozen_teacher(path, input_size, patch_size, clip_act="quickgelu", heads=0):
    """The frozen teacher in a weight file, its format told by its keys (one-line errors otherwise):
    - CLIP's image tower: OpenAI's TorchScript archive (ViT-B-16.pt, read without running it), or an open_clip /
      plain state dict (torch.save or .safetensors) with its `visual.*` names. clip_act: quickgelu (OpenAI's weights)
      or gelu (open_clip models trained with nn.GELU; a state dict does not say which). CLIP's mean/std.
    - A DINO / timm ViT state dict (dino_vitbase16_pretrain.pth; `head.*` and a `model` / `state_dict` wrapper are
      dropped): loaded into our common.VisionTransformer, final-normed tokens. ImageNet mean/std (DINO's).
    - A checkpoint.pth of ours: its ViT encoder, as eval_linear.py loads it.
    Sizes come from the weights; the attention heads, which they do not tell, from the file (a scripted archive's
    attention, an open_clip_config.json beside it), else `heads` (--teacher_heads), else the official towers of that
    width (HEAD_WIDTHS), else a one-line error. The teacher's token grid must be the student's (input_size //
    patch_size), so token i targets patch i."""
    state, facts = read_weights(path)
    if isinstance(state, dict) and {"method", "model", "epoch", "config"} <= state.keys():  # ours
        vits = [n for n, e in (state.get("encoders") or {}).items()
                if isinstance(e, dict) and isinstance(e.get("arch"), dict) and e["arch"].get("model") in common.VIT_SIZES]
        del state
        net, _, arch = load_encoder(path, vits[0] if len(vits) == 1 else "")
        if not isinstance(net, common.VisionTransformer):
            fail(f"--teacher {path} holds a {arch['model']} encoder; feature targets need a ViT's patch tokens")
        attention_heads(path, "ViT", net.embed_dim, heads, net.blocks[0].attn.num_heads, "its config records")
        mean, std, name = common.IMAGENET_MEAN, common.IMAGENET_STD, f"our {arch['model']} checkpoint"
    else:
        net, mean, std, name = teacher_tower(path, state, facts, clip_act, heads)
    grid, patch = net.grid, net.patch_size
    if (grid, grid * patch) != (input_size // patch_size, input_size):
        fail(f"--teacher {path} has a {grid} x {grid} token grid ({grid * patch} px, patch {patch}), the student a "
             f"{input_size // patch_size} x {input_size // patch_size} grid ({input_size} px, patch {patch_size}); "
             "targets need the same grid: pick a teacher for this --input_size and grid")
    return FrozenTeacher(net, mean, std, f"{name}, {net.embed_dim}-d tokens")
