"""Invariant tests of mokd.py (MOKD, arXiv 2304.06461; official main_mokd.py): a tiny ResNet (one BasicBlock per stage, CIFAR stem)
paired with a 1-block ViT at 32 px, 2 global + 2 local crops of 16 px, K = 64."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import common
import mokd
import training
from conftest import cpu_context
from mokd import MOKD, THead

B, N_LOCAL, K = 2, 2, 64


def tiny_cnn():
    net = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    net.conv1, net.maxpool, net.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    return net


def tiny_mokd(seed=0, **kw):
    torch.manual_seed(seed)
    vit = common.VisionTransformer(32, 4, 32, 1, 2, drop_path=0.1)
    args = dict(out_dim=K, hidden_dim=32, bottleneck_dim=16, thead_depth=1, thead_heads=2, cnn_grid=4, epochs=10)
    return MOKD(tiny_cnn(), vit, **{**args, **kw}).train()


def crops(seed=1):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)]
            + [torch.randn(B, 3, 16, 16, generator=g) for _ in range(N_LOCAL)])


def tiny_cfg(*extra):
    return training.parse_config(mokd.Config, ["--preset", "cifar10", "--micro_batch", str(B), "--batch_size", str(B),
                                             "--local_crops", str(N_LOCAL), "--out_dim", str(K), "--hidden_dim", "32",
                                             "--bottleneck_dim", "16", "--thead_depth", "1", "--epochs", "10", *extra])


def student_params(model):
    return [(f"cnn.{n}", p) for n, p in model.cnn.named_parameters()] + \
           [(f"vit.{n}", p) for n, p in model.vit.named_parameters()]


# --- gradients ----------------------------------------------------------------------------------------
def test_teachers_get_no_gradient_and_every_student_parameter_does():
    """After backward every teacher parameter has requires_grad False and grad None; every trainable
    student parameter (both backbones, MLP heads, T-Heads) has a gradient."""
    model = tiny_mokd()
    loss, stats = model(crops(), 0.5)
    loss.backward()
    for t in (model.teacher_cnn, model.teacher_vit):
        assert all(not p.requires_grad and p.grad is None for p in t.parameters())
    missing = [n for n, p in student_params(model) if p.requires_grad and p.grad is None]
    assert not missing
    assert all(v.grad_fn is None and v.ndim == 0 for v in stats.values())


def test_no_gradient_crosses_between_the_models():
    """dL_cnn/d(ViT student) = 0 and dL_vit/d(CNN student) = 0, so one backward of the sum gives each
    model the gradients of its own total (what upstream's two backward passes compute)."""
    model = tiny_mokd()
    torch.manual_seed(5)
    losses, _, _ = model.losses(crops(), 0.5)
    vit = [p for p in model.vit.parameters() if p.requires_grad]
    cnn = [p for p in model.cnn.parameters() if p.requires_grad]
    assert all(g is None for g in torch.autograd.grad(losses["loss_cnn"], vit, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(losses["loss_vit"], cnn, retain_graph=True, allow_unused=True))
    separate = torch.autograd.grad(losses["loss_cnn"], cnn, retain_graph=True) + \
        torch.autograd.grad(losses["loss_vit"], vit, retain_graph=True)
    summed = torch.autograd.grad(losses["loss_cnn"] + losses["loss_vit"], cnn + vit)
    for a, b in zip(separate, summed):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_search_targets_and_queries_carry_no_gradient(monkeypatch):
    """The search targets (computed from the other student's query) have no graph; the student side
    of each search loss is the local-crop T-Head output (nB rows)."""
    seen = []
    real = mokd.search_loss

    def spy(student, target, ts, tt):
        seen.append((student.shape, student.requires_grad, target.requires_grad, target.grad_fn))
        return real(student, target, ts, tt)
    monkeypatch.setattr(mokd, "search_loss", spy)
    tiny_mokd()(crops(), 0.5)
    assert seen == [(torch.Size([N_LOCAL * B, K]), True, False, None)] * 2


# --- T-Head and the feature search -------------------------------------------------------------------------
def test_thead_query_is_dropped_from_the_mean_and_changes_the_output():
    """With a query the output has the shape it has without one; it equals last_layer(mean of the
    post-LN outputs at positions 1..T) and changes when the query changes."""
    torch.manual_seed(0)
    head = THead(32, K, grid=4, in_channels=8, depth=1, heads=2)
    tokens, pool = head.tokens(torch.randn(3, 8, 4, 4))
    assert tokens.shape == (3, 16, 32) and pool.shape == (3, 32)
    q1, q2 = torch.randn(3, 32), torch.randn(3, 32)
    out1, out2, plain = head(tokens, q1), head(tokens, q2), head(tokens)
    assert out1.shape == plain.shape == (3, K)
    assert not torch.allclose(out1, out2) and not torch.allclose(out1, plain)
    x = torch.cat([q1.unsqueeze(1), tokens], 1)
    for block in head.blocks:
        x = block(x)
    assert torch.allclose(out1, head.last_layer(head.norm(x)[:, 1:].mean(1)), atol=1e-6)
    # the CNN query is the mean of the 1x1 projection; local crops get the table resized to their grid
    assert head.tokens(torch.randn(2, 8, 2, 2))[0].shape == (2, 4, 32)


def test_thead_last_layer_has_trainable_g_and_no_l2_norm():
    """T-Head last layer g = 1 and trainable; input not L2-normalised (scaling the mean scales the logits)."""
    head = THead(32, K, grid=2, depth=1, heads=2)
    g = head.last_layer.parametrizations.weight.original0
    assert g.requires_grad and torch.equal(g, torch.ones(K, 1))
    z = torch.randn(5, 32)
    assert torch.allclose(head.last_layer(2 * z), 2 * head.last_layer(z), atol=1e-5)


def test_search_tiles_global_crop_1_crop_major():
    """The teacher search pairs row j*B + b (local crop j of image b) with global crop 1 of image b:
    equal queries for two local crops give equal rows; the rows follow image b's global crop 1."""
    model = tiny_mokd()
    c = crops()
    query = torch.randn(B, 32).repeat(N_LOCAL, 1)  # the same query for every local crop of image b
    _, _, search = MOKD.teacher(model.teacher_vit, torch.cat(c[:2]), query, N_LOCAL)
    assert search.shape == (N_LOCAL * B, K)
    assert torch.allclose(search[:B], search[B:], atol=1e-5)
    _, tokens, _ = model.teacher_vit.features(c[0])
    assert torch.allclose(search[:B], model.teacher_vit.thead(tokens, query[:B]), atol=1e-4)


# --- data flow -----------------------------------------------------------------------------------------
def test_teachers_see_only_global_crops_and_both_models_the_same_crops():
    """Teacher backbones get the 2B global crops only; students get all V crops; CNN and ViT students
    receive identical pixels."""
    model = tiny_mokd()
    seen = {}

    def hook(name):
        def record(module, args):
            seen.setdefault(name, []).append(args[0].detach().clone())
        return record
    for name, module in (("t_cnn", model.teacher_cnn.backbone.conv1), ("t_vit", model.teacher_vit.backbone.patch_embed),
                         ("s_cnn", model.cnn.backbone.conv1), ("s_vit", model.vit.backbone.patch_embed)):
        module.register_forward_pre_hook(hook(name))
    c = crops()
    model(c, 0.5)
    for t in ("t_cnn", "t_vit"):
        assert len(seen[t]) == 1 and torch.equal(seen[t][0], torch.cat(c[:2]))
    for s in ("s_cnn", "s_vit"):
        assert [x.shape[-1] for x in seen[s]] == [32, 16]
        assert torch.equal(seen[s][0], torch.cat(c[:2])) and torch.equal(seen[s][1], torch.cat(c[2:]))


def test_loss_wiring_temperatures_and_centres(monkeypatch):
    """Six centred losses, each on 2B teacher rows of global crops; the CNN's self
    terms at the 50-epoch warmup, every other term at the 30-epoch one; cross terms use the other model's
    teacher with that teacher's centre; the centres move after the losses (the loss saw the old centre)."""
    model = tiny_mokd(epochs=100)
    model.center_cnn_mlp.center.fill_(0.5)
    calls = []
    real = mokd.dino_loss

    def spy(student, teacher, center, ts, tt):
        calls.append((student.shape[0], teacher.shape[0], center.clone(), center.data_ptr(), ts, tt))
        return real(student, teacher, center, ts, tt)
    monkeypatch.setattr(mokd, "dino_loss", spy)
    model(crops(), 10 / 100)  # epoch 10
    tau50, tau30 = np.linspace(0.04, 0.07, 50)[10], np.linspace(0.04, 0.07, 30)[10]
    V = 2 + N_LOCAL
    assert [(c[0], c[1]) for c in calls] == [(V * B, 2 * B)] * 6
    ptr = {"cnn_mlp": model.center_cnn_mlp.center.data_ptr(), "vit_mlp": model.center_vit_mlp.center.data_ptr(),
           "cnn_th": model.center_cnn_thead.center.data_ptr(), "vit_th": model.center_vit_thead.center.data_ptr()}
    # order: sm_cnn, sm_vit, st_cnn, st_vit, cm_cnn (ViT teacher), cm_vit (CNN teacher)
    assert [c[3] for c in calls] == [ptr["cnn_mlp"], ptr["vit_mlp"], ptr["cnn_th"], ptr["vit_th"],
                                     ptr["vit_mlp"], ptr["cnn_mlp"]]
    assert [c[5] for c in calls] == pytest.approx([tau50, tau30, tau50, tau30, tau30, tau30])
    assert all(c[4] == 0.1 for c in calls)
    assert torch.all(calls[0][2] == 0.5) and torch.all(calls[5][2] == 0.5)  # the pre-update centre
    # after the step: c = .9 * .5 + .1 * mean of the CNN teacher's MLP outputs on the global crops
    t_mlp = MOKD.teacher(model.teacher_cnn, torch.cat(crops()[:2]), None, N_LOCAL)[0]
    assert torch.allclose(model.center_cnn_mlp.center, 0.45 + 0.1 * t_mlp.mean(0, keepdim=True), atol=1e-6)


def test_loss_at_constant_student_outputs_worked_by_hand():
    """With every student head output 0 (zeroed MLP output layers and T-Head final norms), p is uniform, so
    each of the 8 terms is ln K whatever the teacher: L_cnn = (2 + 2 * 1.0) ln K, L_vit = (2 + 2 * 0.1) ln K,
    total 6.2 ln 64 = 25.785075."""
    model = tiny_mokd()
    with torch.no_grad():
        for net in (model.cnn, model.vit):
            net.head.mlp[-1].weight.zero_(), net.head.mlp[-1].bias.zero_()
            net.thead.norm.weight.zero_(), net.thead.norm.bias.zero_()
    loss, stats = model(crops(), 0.5)
    assert loss.item() == pytest.approx(6.2 * math.log(64), rel=1e-5)
    assert 6.2 * math.log(64) == pytest.approx(25.785075, abs=1e-6)
    for k in ("sm", "st", "cm", "ct"):
        for side in ("cnn", "vit"):
            assert stats[f"loss_{k}_{side}"].item() == pytest.approx(math.log(64), rel=1e-5)
    assert stats["loss_cnn"].item() == pytest.approx(4 * math.log(64), rel=1e-5)
    assert stats["loss_vit"].item() == pytest.approx(2.2 * math.log(64), rel=1e-5)


def test_no_cross_no_thead_is_two_independent_dino_runs():
    """--no-cross --no-thead: only the two self-distillation MLP losses, no T-Heads, no search pass."""
    model = tiny_mokd(cross=False, thead=False)
    assert model.cnn.thead is None and model.vit.thead is None
    loss, stats = model(crops(), 0.5)
    assert set(k for k in stats if k.startswith("loss_")) == {"loss_sm_cnn", "loss_sm_vit", "loss_cnn", "loss_vit"}
    assert loss.item() == pytest.approx((stats["loss_sm_cnn"] + stats["loss_sm_vit"]).item(), rel=1e-6)
    only_self = tiny_mokd(cross=False)
    assert "loss_ct_cnn" not in only_self(crops(), 0.5)[1] and "loss_st_cnn" in only_self(crops(), 0.5)[1]


# --- training step -----------------------------------------------------------------------------------------
def run_step(model, cfg, progress=0.0):
    """One train_step at a point of training (cfg.epochs = 10: progress 0.1 is the start of epoch 1)."""
    opt, _ = mokd.make_optimizer(model, cfg, steps_per_epoch=1)
    mokd.set_schedules(opt, 0.1, 1e-3, 0.04)
    return mokd.train_step(model, opt, [crops()], progress, cfg, cpu_context()), opt


def test_ema_update_is_exact_and_starts_from_the_student():
    """Teacher == student at step 0; after a step with momentum m every teacher parameter (backbone,
    heads, T-Heads, weight_g) is m * old + (1 - m) * new student; teacher BN buffers are not averaged."""
    cfg = tiny_cfg()
    training.seed_all(0)
    model = mokd.build(cfg)
    for t, s in ((model.teacher_cnn, model.cnn), (model.teacher_vit, model.vit)):
        assert all(torch.equal(a, b) for a, b in zip(t.parameters(), s.parameters()))
    old = {n: p.clone() for n, p in model.named_parameters() if n.startswith("teacher")}
    bn_before = model.teacher_cnn.backbone.bn1.running_mean.clone()
    progress = 0.3
    run_step(model, cfg, progress=progress)
    m = mokd.teacher_momentum(progress, 0.996)
    for name, p in model.named_parameters():
        if name.startswith("teacher"):
            student = dict(model.named_parameters())[name.replace("teacher_", "", 1)]
            assert torch.allclose(p, m * old[name] + (1 - m) * student, atol=1e-6), name
    bn_student = model.cnn.backbone.bn1.running_mean
    assert not torch.equal(model.teacher_cnn.backbone.bn1.running_mean, bn_before)  # its own batch statistics
    assert not torch.allclose(model.teacher_cnn.backbone.bn1.running_mean, bn_student)


def test_momentum_schedule():
    """m(0) = .996, rising monotonically to 1 along DINO's cosine = cosine_schedule(.996, 1, T)[it]."""
    T = 50
    ours = [mokd.teacher_momentum(it / T, 0.996) for it in range(T)]
    assert ours[0] == pytest.approx(0.996) and np.all(np.diff(ours) > 0)
    assert np.allclose(ours, training.cosine_schedule(0.996, 1.0, T), atol=1e-12)


def test_last_layers_frozen_in_the_first_epoch():
    """In epoch 0 no *last_layer* parameter (MLP heads and T-Heads, both models) changes; from
    epoch 1 the trainable ones do; the CNN MLP head's g stays exactly 1."""
    cfg = tiny_cfg()
    for epoch, changes in ((0, False), (1, True)):
        training.seed_all(0)
        model = mokd.build(cfg)
        before = {n: p.clone() for n, p in student_params(model) if "last_layer" in n}
        assert len(before) == 8  # g, v of 2 MLP heads and 2 T-Heads
        run_step(model, cfg, progress=epoch / cfg.epochs)
        after = dict(student_params(model))
        for n, old in before.items():
            moved = not torch.equal(after[n], old)
            expected = changes and after[n].requires_grad
            assert moved == expected, (epoch, n)
        assert torch.equal(model.cnn.head.last_layer.parametrizations.weight.original0, torch.ones(cfg.out_dim, 1))
    assert model.vit.head.last_layer.parametrizations.weight.original0.requires_grad


def test_optimizer_groups():
    """CNN SGD (momentum .9) groups [matrices, wd 1e-4], [1-D, wd 0], [the whole T-Head, ViT lr and wd,
    1-D parameters decayed too]; ViT AdamW betas (.9, .999) [ndim >= 2 incl. pos_embed and g, wd], [1-D, 0];
    the frozen CNN MLP g is in no group."""
    cfg = tiny_cfg()
    training.seed_all(0)
    model = mokd.build(cfg)
    opt, _ = mokd.make_optimizer(model, cfg, steps_per_epoch=1)
    sgd, adamw = opt.optimizers
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.999)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    thead = ids(model.cnn.thead.parameters())
    assert ids(sgd.param_groups[2]["params"]) == thead
    assert any(p.ndim == 1 for p in sgd.param_groups[2]["params"])
    assert all(p.ndim >= 2 for p in sgd.param_groups[0]["params"])
    assert all(p.ndim < 2 for p in sgd.param_groups[1]["params"])
    frozen_g = model.cnn.head.last_layer.parametrizations.weight.original0
    assert id(frozen_g) not in ids(p for g in opt.param_groups for p in g["params"])
    assert id(model.vit.backbone.pos_embed) in ids(adamw.param_groups[0]["params"])
    mokd.set_schedules(opt, 0.3, 0.002, 0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.3, 0.002, 0.002, 0.002]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0, 0.1, 0.1, 0.0]


def test_train_step_clips_each_tensor_and_logs():
    """Per-tensor clipping to 3 (checked on the gradients it leaves, before the optimizer step)."""
    cfg = tiny_cfg()
    training.seed_all(0)
    model = mokd.build(cfg)
    loss, stats = model(crops(), 0.5)
    loss.backward()
    training.clip_per_tensor(model.cnn.parameters(), 3.0)
    assert all(p.grad.norm() <= 3.0 + 1e-4 for p in model.cnn.parameters() if p.grad is not None)
    model.zero_grad()
    stats, _ = run_step(model, cfg, progress=0.2)
    assert {"grad_norm", "grad_norm_cnn", "grad_norm_vit", "loss_cnn", "loss_vit"} <= set(stats)


def test_build_preset_and_synthetic_batch():
    """The cifar10 preset: ResNet-18 with the CIFAR stem (4 x 4 layer4 map = the CNN T-Head grid) + ViT-Tiny/4
    at 32 px; ViT position table learnable (DINO); the teacher ViT has no stochastic depth."""
    cfg = training.parse_config(mokd.Config, ["--preset", "cifar10"])
    assert (cfg.cnn_model, cfg.model, cfg.input_size, cfg.patch_size, cfg.cifar_stem) == (
        "resnet18", "vit_tiny", 32, 4, True)
    small = tiny_cfg()
    model = mokd.build(small)
    assert model.cnn.thead.pos_embed.shape == (1, 16, 192) and model.vit.thead.pos_embed.shape == (1, 64, 192)
    assert model.vit.backbone.pos_embed.requires_grad
    assert all(m.p == 0 for m in model.teacher_vit.modules() if isinstance(m, common.DropPath))
    assert max(m.p for m in model.vit.modules() if isinstance(m, common.DropPath)) == pytest.approx(0.1)
    batch = mokd.synthetic_batch(small, torch.device("cpu"))
    assert [tuple(x.shape) for x in batch] == [(B, 3, 32, 32)] * 2 + [(B, 3, 16, 16)] * N_LOCAL
    with pytest.raises(ValueError):
        model([batch[0], batch[1]], 0.0)


# --- Two optimizers saved as one ----------------------------------------------------------
def two_optimizers(seed=0):
    torch.manual_seed(seed)
    a, b = nn.Linear(3, 2), nn.Linear(2, 2)
    opt = mokd.Optimizers(torch.optim.SGD([{"params": [a.weight]}, {"params": [a.bias]}], lr=0.1, momentum=0.9),
                          torch.optim.AdamW(b.parameters(), lr=0.01))
    return a, b, opt


def step(a, b, opt):
    opt.zero_grad()
    (a(torch.ones(1, 3)).sum() + b(torch.ones(1, 2)).pow(2).sum()).backward()
    for o in opt.optimizers:
        o.step()


def test_optimizers_state_dict_round_trip():
    """One state dict holding both optimizers' own; loading it into fresh optimizers and stepping gives the same
    weights as never stopping."""
    a, b, opt = two_optimizers()
    step(a, b, opt)
    sd = copy.deepcopy(opt.state_dict())  # as torch.save would: no tensors shared with opt
    assert set(sd) == {"cnn", "vit"} and sorted(sd["cnn"]["state"]) == [0, 1] and sorted(sd["vit"]["state"]) == [0, 1]
    a2, b2, opt2 = two_optimizers()
    a2.load_state_dict(a.state_dict())
    b2.load_state_dict(b.state_dict())
    opt2.load_state_dict(sd)
    step(a, b, opt)
    step(a2, b2, opt2)
    for x, y in zip([*a.parameters(), *b.parameters()], [*a2.parameters(), *b2.parameters()]):
        assert torch.equal(x, y)
    assert len(opt.param_groups) == 3
