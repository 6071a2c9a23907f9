"""Tests of the DINO machinery MOKD and SCFS share (scfs.py, with checked copies in mokd.py; ResNets, the position
table and EMA in common.py; clipping and checkpoints in training.py): ResNet features, position-table resizing,
multi-crop, the DINO head, the centred loss, centre, temperature and momentum schedules, EMA, per-tensor
clipping, last-layer freezing, several optimizers as one, multi-encoder checkpoints (values worked out by hand,
and against DINO's main_dino.py and utils.py)."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter

import common
import mokd
import scfs
import training
from conftest import cpu_context


# --- ResNet and ViT at two resolutions ---------------------------------------------------------------
def test_resnet_cifar_stem_and_features():
    """fc is Identity (pooled 512-d for resnet18); the CIFAR stem keeps 32 px at stride 1 until layer2;
    resnet_features gives the post-ReLU stage maps and their mean is the network's own pooled output."""
    torch.manual_seed(0)
    net = common.resnet("resnet18", cifar_stem=True).eval()
    assert isinstance(net.fc, nn.Identity) and isinstance(net.maxpool, nn.Identity)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    x = torch.randn(2, 3, 32, 32)
    m2, m4 = common.resnet_features(net, x, stages=(2, 4))
    assert m2.shape == (2, 128, 16, 16) and m4.shape == (2, 512, 4, 4) and m4.min() >= 0
    assert torch.allclose(m4.mean((2, 3)), net(x), atol=1e-6)
    assert common.resnet_features(common.resnet("resnet18"), torch.randn(1, 3, 64, 64))[0].shape == (1, 512, 2, 2)
    assert not any(k.startswith("fc.") for k in net.state_dict())
    with pytest.raises(SystemExit):
        common.resnet("vgg11")


def test_resize_pos_embed_and_vit_at_two_resolutions():
    """Same grid: the table itself; another grid: bicubic resize (a constant table stays constant);
    the ViT runs on 32 px and 16 px crops with 1 + 64 and 1 + 16 tokens."""
    pos = torch.randn(1, 64, 8)
    assert common.resize_pos_embed(pos, 8) is pos
    const = torch.full((1, 64, 8), 0.5)
    assert torch.allclose(common.resize_pos_embed(const, 4), torch.full((1, 16, 8), 0.5), atol=1e-6)
    # DINO's interpolate_pos_encoding (vision_transformer.py), written out: scale factor (g + 0.1) / G
    G, g = 8, 4
    dino = F.interpolate(pos.reshape(1, G, G, 8).permute(0, 3, 1, 2), scale_factor=((g + 0.1) / G, (g + 0.1) / G),
                         mode="bicubic").permute(0, 2, 3, 1).reshape(1, g * g, 8)
    assert torch.equal(common.resize_pos_embed(pos, g), dino)
    by_size = F.interpolate(pos.reshape(1, G, G, 8).permute(0, 3, 1, 2), size=(g, g), mode="bicubic")
    assert not torch.allclose(dino, by_size.permute(0, 2, 3, 1).reshape(1, g * g, 8), atol=1e-3)  # not the same
    vit = common.VisionTransformer(32, 4, 32, 1, 2)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 65, 32)
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 17, 32)


# --- Multi-crop data -----------------------------------------------------------------------------------
def test_multicrop_shapes_and_batches_of_crop_lists(image_root):
    """2 globals + n locals per image, normalised tensors; Batches yields V crop-major (B, 3, h, w) tensors."""
    crops = scfs.MultiCrop(32, 16, 3, (0.25, 1.0), (0.05, 0.25))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    out = crops(img)
    assert [tuple(c.shape) for c in out] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    dataset = common.image_dataset(str(image_root / "train"), crops)
    cfg = training.TrainConfig(batch_size=8, micro_batch=4, num_workers=0)
    batches = training.Batches(dataset, cfg, cpu_context())
    step = next(batches.epoch(0))
    assert len(step) == 2  # 8 images per step in micro-batches of 4
    first = next(iter(step))
    assert isinstance(first, list) and [tuple(c.shape) for c in first] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert batches.read == 4


def test_blur_radius_is_dinos_at_every_crop_size(monkeypatch):
    """p = 0 never blurs; p = 1 always does; the radius is U(0.1, 2) for global and local crops alike, as DINO's
    GaussianBlur (utils.py; mokd/scfs utils/preprocess.py) at 224 and 96 px; a CIFAR preset passes its own range."""
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert scfs.RandomBlur(0.0)(img) is img
    assert np.asarray(scfs.RandomBlur(1.0)(img)).std() < np.asarray(img).std()
    crops = scfs.MultiCrop(224, 96, 2)
    blurs = [t for c in (crops.global1, crops.global2, crops.local) for t in c.transforms
             if isinstance(t, scfs.RandomBlur)]
    assert [b.p for b in blurs] == [1.0, 0.1, 0.5] and all(b.radius == (0.1, 2.0) for b in blurs)
    radii = []
    monkeypatch.setattr(scfs.ImageFilter, "GaussianBlur", lambda r: radii.append(r) or ImageFilter.BLUR)
    torch.manual_seed(0)
    for _ in range(500):
        scfs.RandomBlur(1.0)(img)
    assert 0.1 <= min(radii) < 0.2 and 1.9 < max(radii) <= 2.0 and abs(np.mean(radii) - 1.05) < 0.1
    mokd_cifar = training.parse_config(mokd.Config, ["--preset", "cifar10"])
    assert (mokd_cifar.blur_radius_min, mokd_cifar.blur_radius_max) == pytest.approx((0.1 * 32 / 224, 2 * 32 / 224))


# --- Head ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head(norm_last_layer):
    """MLP -> L2-normalise -> weight-normed Linear without bias, g = 1 (so every weight row has norm 1),
    g frozen iff norm_last_layer; the weight-norm parameters are named *last_layer*; deepcopy works."""
    torch.manual_seed(0)
    head = scfs.DINOHead(16, 64, hidden_dim=32, bottleneck_dim=8, nlayers=3, norm_last_layer=norm_last_layer)
    names = dict(head.named_parameters())
    g = names["last_layer.parametrizations.weight.original0"]
    assert g.shape == (64, 1) and torch.equal(g, torch.ones(64, 1)) and g.requires_grad == (not norm_last_layer)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert head.last_layer.bias is None
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(64), atol=1e-6)
    x = torch.randn(5, 16)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    assert torch.allclose(head(x), z @ head.last_layer.weight.T, atol=1e-6)
    assert all(b.abs().sum() == 0 for n, b in names.items() if n.startswith("mlp") and n.endswith("bias"))
    twin = copy.deepcopy(head)
    assert torch.equal(twin(x), head(x))


# --- Loss, centre, schedules -------------------------------------------------------------------------------
def loop_dino_loss(student, teacher, center, ts, tt):
    """The official loop form: 2 teacher chunks x V student chunks, same-index pairs skipped."""
    V = student.shape[0] // (teacher.shape[0] // 2)
    q = torch.softmax((teacher - center) / tt, -1).chunk(2)
    lp = torch.log_softmax(student / ts, -1).chunk(V)
    terms = [(-q[i] * lp[v]).sum(-1).mean() for i in range(2) for v in range(V) if v != i]
    return sum(terms) / len(terms), len(terms)


def test_dino_loss_value_worked_by_hand():
    """K=2, B=1, V=3. Teacher: q0 = (.5, .5), q1 = (.75, .25). Student: p0 = p2 = (.5, .5), p1 = (.75, .25).
    Pairs (0,1): -(.5 ln .75 + .5 ln .25); (0,2), (1,0), (1,2): ln 2 each; mean of the 4."""
    ts, tt = 0.1, 0.04
    teacher = torch.tensor([[0.0, 0.0], [math.log(3) * tt, 0.0]])
    student = torch.tensor([[0.0, 0.0], [math.log(3) * ts, 0.0], [0.0, 0.0]])
    expected = (-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)) + 3 * math.log(2)) / 4  # 0.729107
    assert scfs.dino_loss(student, teacher, None, ts, tt).item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.729107, abs=1e-6)
    # the same-view pairs (0,0) and (1,1) are left out: including them would give another value
    assert (-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)) + 3 * math.log(2) + math.log(2)
            + -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))) / 6 != pytest.approx(expected)


def test_dino_loss_matches_the_loop_and_skips_same_views():
    """Random outputs: equals the official loop over 2V - 2 = 18 pairs (V = 10), with a centre; constant
    student outputs give ln K whatever the teacher; the teacher side gets no gradient."""
    g = torch.Generator().manual_seed(0)
    B, K, V = 3, 50, 10
    student = torch.randn(V * B, K, generator=g, requires_grad=True)
    teacher = torch.randn(2 * B, K, generator=g, requires_grad=True)
    center = torch.randn(1, K, generator=g)
    ours = scfs.dino_loss(student, teacher, center, 0.1, 0.05)
    ref, terms = loop_dino_loss(student, teacher, center, 0.1, 0.05)
    assert terms == 18 and ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    ours.backward()
    assert teacher.grad is None
    g_ours = student.grad.clone()
    student.grad = None
    ref.backward()
    assert torch.allclose(g_ours, student.grad, atol=1e-6)
    flat = scfs.dino_loss(torch.zeros(V * B, K), teacher.detach(), center, 0.1, 0.05)
    assert flat.item() == pytest.approx(math.log(K), rel=1e-6)


def test_center_update_is_an_ema_of_the_teacher_batch_mean():
    """c <- .9 c + .1 mean(rows): from 0, one update of rows (1, 3) and (3, 5) gives (.2, .4)."""
    c = scfs.DINOCenter(2)
    assert torch.equal(c.center, torch.zeros(1, 2))
    c.update(torch.tensor([[1.0, 3.0], [3.0, 5.0]]))
    assert torch.allclose(c.center, torch.tensor([[0.2, 0.4]]))
    c.update(torch.tensor([[0.0, 0.0]]))
    assert torch.allclose(c.center, torch.tensor([[0.18, 0.36]]))
    assert "center" in dict(c.named_buffers())


def test_teacher_temperature_schedule():
    """linspace(.04, .07, W)[e] for e < W, then .07: W = 30 gives .04 at 0, .07 at 29 and 30,
    .04 + .03 * 15/29 at 15."""
    t = scfs.teacher_temperature
    assert t(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert t(29, 0.04, 0.07, 30) == pytest.approx(0.07) and t(30, 0.04, 0.07, 30) == 0.07
    assert t(15, 0.04, 0.07, 30) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert t(49, 0.04, 0.07, 50) == pytest.approx(0.07) and t(10, 0.04, 0.07, 0) == 0.07


def test_momentum_schedule_is_dinos_cosine():
    """m_it = 1 - (1 - .996)(1 + cos(pi it / T)) / 2: .996 at 0, rising monotonically towards 1."""
    T = 37
    m = training.cosine_schedule(0.996, 1.0, T)
    it = np.arange(T)
    assert np.allclose(m, 1 - (1 - 0.996) * (1 + np.cos(np.pi * it / T)) / 2, atol=1e-15)
    assert m[0] == pytest.approx(0.996) and np.all(np.diff(m) > 0) and m[-1] < 1


# --- EMA, clipping, freezing ------------------------------------------------------------------------------
def test_ema_update_exact_and_buffers_untouched():
    """Every parameter (frozen ones too) becomes m t + (1 - m) s; equal parameters stay bit-identical;
    buffers (BN running statistics) are not averaged."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = copy.deepcopy(student).requires_grad_(False)
    for p in student.parameters():
        p.data.add_(torch.randn_like(p))
    student[1].running_mean.fill_(7.0)
    old = [p.clone() for p in teacher.parameters()]
    common.ema_update(teacher, student, 0.9)
    for t, o, s in zip(teacher.parameters(), old, student.parameters()):
        assert torch.allclose(t, 0.9 * o + 0.1 * s, atol=1e-7)
    assert torch.equal(teacher[1].running_mean, torch.zeros(3))
    same = nn.Linear(3, 3)
    twin = copy.deepcopy(same)
    common.ema_update(twin, same, 0.996)
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), same.parameters()))


def test_clip_per_tensor_without_grads_and_below_the_limit():
    """No gradients: a zero norm; gradients below the limit are untouched bit for bit."""
    p = nn.Parameter(torch.zeros(3))
    assert training.clip_per_tensor([p], 3.0).item() == 0
    p.grad = torch.tensor([0.3, 0.4, 0.0])
    assert training.clip_per_tensor([p], 3.0).item() == pytest.approx(0.5)
    assert torch.equal(p.grad, torch.tensor([0.3, 0.4, 0.0]))


def test_cancel_last_layer():
    """Gradients of *last_layer* parameters are dropped while epoch < freeze_epochs, kept afterwards."""
    head = scfs.DINOHead(4, 6, 8, 4, norm_last_layer=False)
    head(torch.randn(2, 4)).sum().backward()
    scfs.cancel_last_layer(head, 1, 1)
    assert all(p.grad is not None for p in head.parameters())
    scfs.cancel_last_layer(head, 0, 1)
    assert all((p.grad is None) == ("last_layer" in n) for n, p in head.named_parameters())


# --- Multi-encoder checkpoints ----------------------------------------------------------------------------
def test_checkpoint_with_several_encoders(tmp_path):
    """encoders={name: (module, arch)} are stored under torchvision / timm names; eval_linear loads the one
    named by --encoder and stops with a one-line error listing the names when it is ambiguous."""
    torch.manual_seed(0)
    cnn, vit = common.resnet("resnet18", cifar_stem=True), common.vit("vit_tiny", 32, 4)
    model = nn.ModuleDict({"cnn": cnn, "vit": vit})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = training.TrainConfig(output_dir=str(tmp_path))
    path = str(tmp_path / "checkpoint.pth")
    encoders = {"cnn": (cnn, {"model": "resnet18", "input_size": 32, "cifar_stem": True}),
                "vit": (vit, {"model": "vit_tiny", "input_size": 32, "patch_size": 4})}
    training.save_checkpoint(cfg, "mokd", model, opt, 1, cpu_context(), encoders=encoders)
    for name, module in (("cnn", cnn), ("vit", vit)):
        encoder, ckpt, arch = training.load_encoder(path, name)
        assert arch == encoders[name][1]
        assert encoder.state_dict().keys() == module.state_dict().keys()
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in encoder.state_dict().items())
    with pytest.raises(SystemExit, match="cnn, vit; pick one with --encoder"):
        training.load_encoder(path)
    with pytest.raises(SystemExit, match="no encoder 'x'"):
        training.load_encoder(path, "x")
