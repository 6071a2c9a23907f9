"""Frozen feature teachers (teachers.frozen_teacher) and the feature targets they feed: HPM's feature variant and
SemAIM*. The weight layouts are checked against the reference code that defines them (open_clip, timm), and the
weight files are read without running anything in them."""
import glob
import json
import os
import pickle
import shutil
import zipfile
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F

import common
import hpm
import semaim
import teachers
import training
from conftest import TINY, tiny_args, write_timm_vit, write_tiny_clip

# The tests write TorchScript archives and compare with torch.jit.load, both deprecated in torch 2.x.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


def renormalise(x, mean, std):
    """Images normalised with ImageNet's mean/std -> the same images normalised with (mean, std)."""
    view = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    pixels = x * view(common.IMAGENET_STD) + view(common.IMAGENET_MEAN)
    return (pixels - view(mean)) / view(std)


def images(batch=2, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def spy(monkeypatch, module, *names):
    """Wrap module.<name> functions so each call's result (and arguments) are recorded: {name: (result, args)}."""
    seen = {}
    for name in names:
        def wrapped(*args, _name=name, _f=getattr(module, name)):
            seen[_name] = (_f(*args), args)
            return seen[_name][0]
        monkeypatch.setattr(module, name, wrapped)
    return seen


def config(module, teacher, *extra):
    return training.parse_config(module.Config, tiny_args("unused", "unused", "--target", "features", "--teacher",
                                                        teacher, *extra, method=module.__name__))


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_clip_tower_equals_open_clip(quick_gelu, tmp_path):
    """Every token through ln_post and proj equals open_clip's image tower on the same random weights: its pooled
    output (the cls token) and its patch tokens times proj; the input re-normalised with CLIP's mean/std; the wrong
    activation gives other tokens (the file does not record it)."""
    path = str(tmp_path / "clip.pt")
    model = write_tiny_clip(path, quick_gelu=quick_gelu)
    act = "quickgelu" if quick_gelu else "gelu"
    teacher = teachers.frozen_teacher(path, 32, 4, clip_act=act)
    x = images()
    model.visual.output_tokens = True
    with torch.no_grad():
        pooled, patch_tokens = model.visual(renormalise(x, teachers.CLIP_MEAN, teachers.CLIP_STD))
    tokens = teacher(x)
    assert tokens.shape == (2, 1 + 64, 48) and teacher.embed_dim == 48 and teacher.grid == 8
    torch.testing.assert_close(tokens[:, 0], pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 1:], patch_tokens @ model.visual.proj.detach(), atol=1e-5, rtol=1e-5)
    other = teachers.frozen_teacher(path, 32, 4, clip_act="gelu" if quick_gelu else "quickgelu")
    assert (other(x) - tokens).abs().max() > 1e-3


def test_openai_archive_loads_every_visual_key(teacher_files, tmp_path):
    """OpenAI's layout (a TorchScript archive, fp16 weights, text tower and metadata alongside): every visual.* entry
    loads, none is missing or left over, weights become fp32; the tokens equal those of the same weights in fp32
    rounded to fp16 from an open_clip state dict. Neither file says its heads: 192 wide, 3 of 64 (HEAD_WIDTHS)."""
    archive = torch.jit.load(teacher_files["openai"]).state_dict()
    visual = {k.removeprefix("visual."): v for k, v in archive.items() if k.startswith("visual.")}
    teacher = teachers.frozen_teacher(teacher_files["openai"], 32, 4)
    loaded = teacher.nets[0].state_dict()
    assert loaded.keys() == visual.keys()
    for k, v in visual.items():
        assert v.dtype == torch.float16 and loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.float()), k
    state = write_tiny_clip(str(tmp_path / "clip.pt"), width=192, config=False).state_dict()  # the same weights
    torch.save({k: v.half().float() for k, v in state.items()}, tmp_path / "clip_fp16.pt")
    x = images()
    assert torch.equal(teacher(x), teachers.frozen_teacher(str(tmp_path / "clip_fp16.pt"), 32, 4)(x))
    with pytest.raises(SystemExit, match="QuickGELU"):
        teachers.frozen_teacher(teacher_files["openai"], 32, 4, clip_act="gelu")


def open_clip_tokens(model, x):
    """open_clip's own tokens of its image tower, as our CLIP teacher returns them: the pooled cls token, then the
    patch tokens times proj, on the images re-normalised with CLIP's mean/std. -> (B, 1 + N, out)"""
    model.visual.output_tokens = True
    with torch.no_grad():
        pooled, patch_tokens = model.visual(renormalise(x, teachers.CLIP_MEAN, teachers.CLIP_STD))
        return torch.cat([pooled[:, None], patch_tokens @ model.visual.proj], dim=1)


def one_line_error(call):
    """The message of the SystemExit that call() raises, checked to be one `error: ...` line."""
    with pytest.raises(SystemExit) as e:
        call()
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("width,head_width", [(96, 32), (320, 80)])
def test_heads_come_from_the_config_beside_or_the_flag(width, head_width, tmp_path):
    """open_clip towers with heads other than 64 wide (3 of 32; 4 of 80, as ViT-H-14's) give open_clip's own tokens
    within 1e-5 with open_clip_config.json beside the weights, or with --teacher_heads; without either they stop with
    one line naming the width and the flag. width // 64 heads (1 and 5 here) would give other tokens, and a flag
    that contradicts the config stops."""
    heads = width // head_width
    with_config, bare = tmp_path / "hub" / "open_clip_pytorch_model.bin", tmp_path / "bare" / "clip.pt"
    for folder in (with_config.parent, bare.parent):
        folder.mkdir()
    model = write_tiny_clip(str(with_config), width=width, head_width=head_width)
    write_tiny_clip(str(bare), width=width, head_width=head_width, config=False)
    x = images()
    expected = open_clip_tokens(model, x)
    for path, flag in ((with_config, 0), (bare, heads), (with_config, heads)):
        teacher = teachers.frozen_teacher(str(path), 32, 4, heads=flag)
        assert teacher.nets[0].transformer["resblocks"][0].heads == heads and f"{heads} heads" in teacher.name
        torch.testing.assert_close(teacher(x), expected, atol=1e-5, rtol=1e-5)
    message = one_line_error(lambda: teachers.frozen_teacher(str(bare), 32, 4))
    assert f"width {width}" in message and "--teacher_heads N" in message
    wrong = teachers.frozen_teacher(str(bare), 32, 4, heads=width // 64)(x)
    assert (wrong - expected).abs().max() > 1e-3  # 0.013 and 0.074 here
    assert "contradicts" in one_line_error(lambda: teachers.frozen_teacher(str(with_config), 32, 4, heads=1))
    (tmp_path / "other").mkdir()  # a config that describes another tower than the weights beside it
    shutil.copy(with_config, tmp_path / "other" / "clip.pt")
    write_tiny_clip(str(tmp_path / "other" / "unused.pt"), width=64, head_width=32)
    assert "describes another tower" in one_line_error(
        lambda: teachers.frozen_teacher(str(tmp_path / "other" / "clip.pt"), 32, 4))


def test_head_width_table_agrees_with_open_clip_and_timm():
    """HEAD_WIDTHS, the head width assumed where a file does not say, is the one of every plain-ViT image tower in
    open_clip's model_configs and of timm's plain ViTs (Ti/S/B/L 64, huge 80, giant 88, gigantic 104) at that
    width, and lists no other width."""
    import open_clip
    import timm
    seen = set()
    for name in glob.glob(os.path.join(os.path.dirname(open_clip.__file__), "model_configs", "*.json")):
        with open(name) as f:
            vision = json.load(f).get("vision_cfg", {})
        if "timm_model_name" not in vision and isinstance(vision.get("layers", 12), int):
            width = vision.get("width", 768)  # open_clip's CLIPVisionCfg defaults
            assert teachers.HEAD_WIDTHS.get(width) == vision.get("head_width", 64), name
            seen.add(width)
    for name in ("tiny_patch16", "small_patch16", "base_patch16", "large_patch16", "huge_patch14", "giant_patch14",
                 "gigantic_patch14"):
        with torch.device("meta"):
            model = timm.create_model(f"vit_{name}_224")
        assert teachers.HEAD_WIDTHS[model.embed_dim] == model.embed_dim // model.blocks[0].attn.num_heads, name
        seen.add(model.embed_dim)
    assert seen == set(teachers.HEAD_WIDTHS)


def test_teacher_heads_flag_needs_a_teacher_file():
    """--teacher_heads without --target features and a teacher file (pixels, no --teacher, --teacher self) stops
    with one line."""
    cases = {hpm: [["--teacher_heads", "2"], ["--teacher_heads", "2", "--target", "features"]],
             semaim: [["--teacher_heads", "2"], ["--teacher_heads", "2", "--target", "features", "--teacher", "self"]]}
    for module, argss in cases.items():
        for args in argss:
            cfg = training.parse_config(module.Config, tiny_args("unused", "unused", *args, method=module.__name__))
            message = one_line_error(lambda: module.build(cfg))
            assert message.startswith("error: --teacher_heads 2 ") and "--target features --teacher FILE" in message


class SetsItselfUp(torch.nn.Module):
    """A module that pickles itself through its own __getstate__ / __setstate__ pair. Its __setstate__, TorchScript
    run by torch.jit.load, creates the file `marker` (torch.from_file with shared=True creates it)."""
    def __init__(self, marker: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 4))
        self.marker = marker
        self.probe = torch.zeros(1)

    def forward(self, x):
        return x @ self.weight.t()

    @torch.jit.export
    def __getstate__(self):
        return (self.weight, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]):
        self.weight = state[0]
        self.marker = state[1]
        self.training = state[2]
        self.probe = torch.from_file(self.marker, True, 1)


class Mixed(torch.nn.Module):
    """Every kind of tensor a scripted module holds: parameters of several dtypes, one a transposed view, persistent
    and non-persistent buffers, a plain tensor attribute (no state-dict entry), nested containers, ints."""
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(4, 6)
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.LayerNorm(6), torch.nn.Linear(6, 6))
                                           for _ in range(2)])
        self.low = torch.nn.Parameter(torch.randn(5, 3).half())
        self.view = torch.nn.Parameter(torch.randn(3, 7).t())  # non-contiguous, its storage 21 long
        self.register_buffer("steps", torch.arange(4))
        self.register_buffer("scratch", torch.randn(2, dtype=torch.bfloat16), persistent=False)
        self.plain = torch.randn(2)
        self.count = 3

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.first(x)


def test_torchscript_reader_equals_torch_jit_load(tmp_path):
    """A scripted module holding every kind of tensor, read without running it: the keys of torch.jit.load's
    state_dict in its order, equal tensors of the same dtypes, shapes and strides; ints come back as facts."""
    torch.manual_seed(0)
    torch.jit.script(Mixed()).save(str(tmp_path / "mixed.pt"))
    state, facts = teachers.read_weights(str(tmp_path / "mixed.pt"))
    reference = torch.jit.load(str(tmp_path / "mixed.pt")).state_dict()
    assert list(state) == list(reference) and "plain" not in state and "view" in state
    for k, v in reference.items():
        assert state[k].dtype == v.dtype and state[k].stride() == v.stride() and torch.equal(state[k], v), k
    assert facts["count"] == 3 and facts["blocks.1.1.__class__"].endswith(".Linear")


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_scripted_clip_archive_is_read_without_running_it(quick_gelu, tmp_path):
    """open_clip's CLIP through torch.jit.script (3 heads of 32, no config beside it): read as data, its state dict
    is torch.jit.load's; the heads come from its attention and the activation from its blocks (the other --clip_act
    stops with one line, as does a contradicting --teacher_heads), and the tokens are open_clip's within 1e-5."""
    path = str(tmp_path / "scripted.pt")
    model = write_tiny_clip(path, quick_gelu=quick_gelu, archive="scripted", width=96, head_width=32)
    state, facts = teachers.read_weights(path)
    reference = torch.jit.load(path).state_dict()
    assert list(state) == list(reference) and all(torch.equal(state[k], v) for k, v in reference.items())
    assert facts["visual.transformer.resblocks.0.attn.num_heads"] == 3
    act, other = ("quickgelu", "gelu") if quick_gelu else ("gelu", "quickgelu")
    x = images()
    teacher = teachers.frozen_teacher(path, 32, 4, clip_act=act)
    torch.testing.assert_close(teacher(x), open_clip_tokens(model, x), atol=1e-5, rtol=1e-5)
    assert f"pass --clip_act {act}" in one_line_error(lambda: teachers.frozen_teacher(path, 32, 4, clip_act=other))
    assert "contradicts" in one_line_error(lambda: teachers.frozen_teacher(path, 32, 4, clip_act=act, heads=1))


def test_teacher_files_never_run_code(tmp_path):
    """A TorchScript archive whose __setstate__ creates a file stops with one line that names the class and how to
    convert a trusted file, and the file is not created; torch.jit.load of the same archive creates it (the archive
    is live). A data.pkl or a torch.save pickle that would call os.mkdir stops with one line, nothing created."""
    marker = tmp_path / "marker"
    outer = torch.nn.Sequential(torch.nn.Linear(4, 4), SetsItselfUp(str(marker)))
    torch.jit.script(outer).save(str(tmp_path / "live.pt"))
    message = one_line_error(lambda: teachers.frozen_teacher(str(tmp_path / "live.pt"), 32, 4))
    assert not marker.exists()
    assert "SetsItselfUp" in message and "__setstate__" in message and "torch.jit.load(" in message
    torch.jit.load(str(tmp_path / "live.pt"))
    assert marker.exists()

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "made"),)
    with zipfile.ZipFile(tmp_path / "live.pt") as src, zipfile.ZipFile(tmp_path / "crafted.pt", "w") as dst:
        for item in src.infolist():  # the same archive with another data.pkl
            dst.writestr(item, pickle.dumps(Payload(), 2) if item.filename.endswith("/data.pkl") else src.read(item))
    torch.save({"weight": torch.zeros(1), "payload": Payload()}, tmp_path / "pickled.pt")
    for name in ("crafted.pt", "pickled.pt"):
        assert "cannot read" in one_line_error(lambda: teachers.frozen_teacher(str(tmp_path / name), 32, 4))
    assert not (tmp_path / "made").exists()


def test_safetensors_file_reads_as_safetensors_does(teacher_files, tmp_path):
    """open_clip's hub layout in .safetensors (open_clip_model.safetensors beside its config): read as the
    safetensors library reads it, every dtype and shape, and the same teacher as the torch.save file."""
    from safetensors.torch import load_file, save_file
    state = torch.load(teacher_files["clip"], weights_only=True)
    state.update(extra_bf16=torch.randn(2, 3, dtype=torch.bfloat16), extra_int=torch.arange(5),
                 extra_empty=torch.zeros(0))
    path = str(tmp_path / "open_clip_model.safetensors")
    save_file(state, path)
    shutil.copy(os.path.join(os.path.dirname(teacher_files["clip"]), "open_clip_config.json"), tmp_path)
    read, facts = teachers.read_weights(path)
    reference = load_file(path)
    assert facts is None and read.keys() == reference.keys()
    assert all(read[k].dtype == v.dtype and torch.equal(read[k], v) for k, v in reference.items())
    save_file({k: v for k, v in state.items() if not k.startswith("extra")}, path)
    x = images()
    reference = teachers.frozen_teacher(teacher_files["clip"], 32, 4)
    assert torch.equal(teachers.frozen_teacher(path, 32, 4)(x), reference(x))


@pytest.mark.parametrize("kind", ["timm", "dino"])
def test_timm_and_dino_layouts_equal_timm_forward_features(kind, tmp_path):
    """A timm checkpoint ({"model": ...} with head.*) and a bare DINO-style backbone state dict load into our ViT
    (3 heads for width 192: 64-d heads) and give timm's forward_features (final-normed tokens, cls first); ImageNet
    normalisation is kept."""
    path = str(tmp_path / f"{kind}.pth")
    model = write_timm_vit(path, wrap=kind == "timm")
    teacher = teachers.frozen_teacher(path, 32, 4)
    assert teacher.nets[0].blocks[0].attn.num_heads == 3 and teacher.embed_dim == 192
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model.forward_features(x), atol=1e-5, rtol=1e-5)


def test_own_checkpoint_teacher_is_its_encoder(teacher_files):
    """One of our checkpoints: the teacher is its encoder as eval_linear loads it (ImageNet normalisation kept);
    its config records the heads, so --teacher_heads must agree (ViT-Tiny: 3)."""
    encoder, _, _ = training.load_encoder(teacher_files["own"])
    teacher = teachers.frozen_teacher(teacher_files["own"], 32, 4, heads=3)
    x = images()
    with torch.no_grad():
        assert torch.equal(teacher(x), encoder(x))
    assert "contradicts" in one_line_error(lambda: teachers.frozen_teacher(teacher_files["own"], 32, 4, heads=2))


def test_teacher_is_frozen_unsaved_and_moves_with_the_model(teacher_files):
    """The teacher gets no gradient, stays in eval mode under model.train(), is absent from parameters() and the
    state dict (so from the checkpoint and the optimizer), is not re-initialised by the model's init, follows
    .to() / .double(), and runs under the step's autocast."""
    cfg = config(hpm, teacher_files["timm"])
    reference = teachers.frozen_teacher(teacher_files["timm"], 32, 4)
    model = hpm.build(cfg).train()
    net = model.feature_teacher.nets[0]
    assert not any(m.training for m in net.modules())
    assert {id(p) for p in net.parameters()}.isdisjoint(id(p) for p in model.parameters())
    pixels = training.parse_config(hpm.Config, tiny_args("unused", "unused", method="hpm"))
    assert model.state_dict().keys() == hpm.build(pixels).state_dict().keys()  # only the head's shape differs
    x = images(4)
    assert torch.equal(model.feature_teacher(x), reference(x))  # the model's init left the weights alone
    loss, _ = model(x, 0.5)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # its matmuls run in bf16: close, not equal
        low = model.feature_teacher(x).float()
    assert not torch.equal(low, reference(x)) and torch.allclose(low, reference(x), atol=0.1)
    model.double()
    assert all(p.dtype == torch.float64 for p in net.parameters())
    assert model.feature_teacher.shift.dtype == torch.float64


def test_feature_distance_is_two_minus_two_cosine():
    """0 when the prediction is the target times a positive scale, 4 when opposite, 2 when orthogonal, summed over
    channels per token."""
    target = torch.randn(3, 5, 16)
    assert torch.allclose(teachers.feature_distance(target * 7.5, target), torch.zeros(3, 5), atol=1e-6)
    assert torch.allclose(teachers.feature_distance(-0.1 * target, target), torch.full((3, 5), 4.0))
    e = torch.eye(2)
    assert teachers.feature_distance(e[:1], e[1:]).item() == pytest.approx(2.0)
    cos = F.cosine_similarity(target[0], target[1], dim=-1)
    assert torch.allclose(teachers.feature_distance(target[0], target[1]), 2 - 2 * cos, atol=1e-5)


@pytest.mark.parametrize("kind,width", [("clip", 48), ("timm", 192), ("own", 192)])
def test_head_width_follows_the_teacher(kind, width, teacher_files):
    """The reconstruction head outputs the teacher's width (CLIP: its projection, 48 here); HPM's loss predictor
    keeps its P-wide head (averaged, as upstream); SemAIM* with --teacher self predicts the encoder's width."""
    model = hpm.build(config(hpm, teacher_files[kind], *TINY["hpm"]))
    assert model.decoder.head.out_features == width and model.predictor.head.out_features == 4 * 4 * 3
    model = semaim.build(config(semaim, teacher_files[kind], *TINY["semaim"]))
    assert model.prediction_head.fc2.out_features == width and model.blur is None
    assert semaim.build(config(semaim, "self", *TINY["semaim"])).prediction_head.fc2.out_features == 192


def test_grid_mismatch_names_both_grids(teacher_files):
    """A teacher whose token grid differs from the student's stops with one line naming both grids."""
    with pytest.raises(SystemExit) as e:
        teachers.frozen_teacher(teacher_files["clip"], 32, 8)
    assert str(e.value).startswith("error:") and "8 x 8" in str(e.value) and "4 x 4" in str(e.value)
    with pytest.raises(SystemExit) as e:  # same grid, another image size: the teacher would see other patches
        teachers.frozen_teacher(teacher_files["timm"], 64, 8)
    assert "8 x 8 token grid (32 px, patch 4)" in str(e.value)


def test_bad_teacher_files_are_one_line_errors(teacher_files, tmp_path):
    """Missing file, a file that is no weight file, weights of no known layout, a half CLIP, a bad flag
    combination: each one line `error: ...`."""
    (tmp_path / "notes.txt").write_text("not weights")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    state = torch.load(teacher_files["clip"], weights_only=True)
    torch.save({k: v for k, v in state.items() if "resblocks.1." not in k or "visual" not in k or "ln_2" in k},
               tmp_path / "half.pt")
    cases = {str(tmp_path / "missing.pt"): "is not a file", str(tmp_path / "notes.txt"): "cannot read",
             str(tmp_path / "other.pth"): "is neither CLIP", str(tmp_path / "half.pt"): "does not fit a CLIP"}
    for path, message in cases.items():
        with pytest.raises(SystemExit) as e:
            teachers.frozen_teacher(path, 32, 4, heads=2)  # half.pt has no config beside it
        assert str(e.value).startswith("error:") and message in str(e.value) and "\n" not in str(e.value)
    for module in (hpm, semaim):
        for args in (["--target", "features"], ["--teacher", teacher_files["clip"]], ["--target", "feature"]):
            cfg = training.parse_config(module.Config, tiny_args("unused", "unused", *args, method=module.__name__))
            with pytest.raises(SystemExit, match="^error: "):
                module.build(cfg)


def test_hpm_ranking_targets_are_the_per_patch_feature_losses(teacher_files, monkeypatch):
    """HPM with feature targets: the ranking targets are, patch by patch, 2 - 2 cos between the reconstruction
    and the teacher's token of the full image at that masked position, and their mean is loss_rec."""
    model = hpm.build(config(hpm, teacher_files["clip"], *TINY["hpm"]))
    seen = spy(monkeypatch, hpm, "mask_order", "ranking_loss")
    model.decoder.head.register_forward_hook(lambda m, i, out: seen.setdefault("recon", out))
    x = images(4)
    torch.manual_seed(0)
    _, stats = model(x, 0.9)
    ids_masked = seen["mask_order"][0][:, model.num_visible:]
    full = model.feature_teacher.nets[0](renormalise(x, teachers.CLIP_MEAN, teachers.CLIP_STD))[:, 1:]  # (B, N, C)
    target = full[torch.arange(4)[:, None], ids_masked]  # (B, M, C)
    recon = seen["recon"].detach()
    expected = ((recon / recon.norm(dim=-1, keepdim=True) - target / target.norm(dim=-1, keepdim=True)) ** 2).sum(-1)
    torch.testing.assert_close(seen["ranking_loss"][1][1], expected, atol=1e-5, rtol=1e-5)  # (pred, target)
    assert stats["loss_rec"].item() == pytest.approx(expected.mean().item(), abs=1e-5)



@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_semaim_star_order_and_targets_come_from_the_teacher(kind, teacher_files, monkeypatch):
    """SemAIM*: the first patch of the order is the teacher's most cls-similar patch, the student's unmasked pass
    is skipped (the order does not change with the student's weights), and the loss is the mean over all patches
    of 2 - 2 cos to the teacher's tokens."""
    model = semaim.build(config(semaim, teacher_files[kind], *TINY["semaim"]))
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))  # the unmasked pass calls encoder.forward
    seen = spy(monkeypatch, semaim, "order_masks")
    preds = []
    model.prediction_head.register_forward_hook(lambda m, i, out: preds.append(out.detach()))
    x = images(4)
    loss, _ = model(x)
    tokens = model.feature_teacher(x)
    centre = F.cosine_similarity(tokens[:, :1], tokens[:, 1:], dim=-1).argmax(1)
    first = (seen["order_masks"][1][0] == 0).float().argmax(1)  # the patch of rank 0
    assert torch.equal(first, centre) and not calls
    expected = (F.normalize(preds[0], dim=-1) - F.normalize(tokens[:, 1:], dim=-1)).pow(2).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    with torch.no_grad():  # other student weights, the same order
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    model(x)
    assert torch.equal((seen["order_masks"][1][0] == 0).float().argmax(1), centre)


def test_semaim_self_targets_are_the_own_unmasked_features(teacher_files):
    """--teacher self (upstream's `inference`): one unmasked no-grad pass of the current encoder gives both the order's
    centre and the targets; the loss is 2 - 2 cos to its patch tokens."""
    model = semaim.build(config(semaim, "self", *TINY["semaim"]))
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    preds = []
    model.prediction_head.register_forward_hook(lambda m, i, out: preds.append(out))
    x = images(4)
    loss, _ = model(x)
    assert len(calls) == 1  # targets and centre share the pass
    own = model.own_tokens(x)
    expected = teachers.feature_distance(preds[0].detach(), own[:, 1:]).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
