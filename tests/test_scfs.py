"""Tests of scfs.py: the invariants of SCFS (arXiv 2212.06486) and its official code (main_scfs.py, models/scfs.py).
Tiny models only: ResNet-18 with the CIFAR stem, 2 global crops of 32 px (stage maps 16/8/4) and the
paper's 8 local crops at 16 px (maps 8/4/2), batch 2, narrow heads."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import scfs
import training
from conftest import cpu_context
from scfs import SCFS, StageHead, feature_search, search_loss

B, L, G, S = 2, 8, 32, 16  # batch per crop, local crops, global and local crop sides
V = 2 + L
MAPS = {2: G // 2, 3: G // 4, 4: G // 8}  # global-crop map side per stage (CIFAR stem: strides 2, 4, 8)


def tiny(seed=0, out_dim=512, **kw):
    torch.manual_seed(seed)
    encoder = common.resnet("resnet18", cifar_stem=True)
    kw = {"hidden_dim": 64, "bottleneck_dim": 32, "stage_bottleneck": 16, "stage_hidden": 32, "stage_dim": 256,
          "epochs": 10, "warmup_teacher_temp_epochs": 3, **kw}
    return SCFS(encoder, out_dim, **kw).train()


def crops(seed=1, batch=B, locals_=L):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, G, G, generator=g) for _ in range(2)] + \
           [torch.randn(batch, 3, S, S, generator=g) for _ in range(locals_)]


def capture(model):
    """Record the outputs of the DINO heads and of every stage head call (in call order)."""
    out = {"z_s": [], "z_t": [], "s": [[] for _ in model.stages], "t": [[] for _ in model.stages]}
    hooks = [model.student["head"].register_forward_hook(lambda m, i, o: out["z_s"].append(o)),
             model.teacher["head"].register_forward_hook(lambda m, i, o: out["z_t"].append(o))]
    for k in range(len(model.stages)):
        hooks.append(model.student["stage_heads"][k].register_forward_hook(lambda m, i, o, k=k: out["s"][k].append(o)))
        hooks.append(model.teacher["stage_heads"][k].register_forward_hook(lambda m, i, o, k=k: out["t"][k].append(o)))
    return out, hooks


def ce(teacher_logits, student_logits, center, tt, ts=0.1):
    """mean_b -sum_j softmax((t - c)/tt)_j log softmax(s/ts)_j, one (teacher, student) pair."""
    q = F.softmax((teacher_logits.float() - center) / tt, dim=-1)
    return -(q * F.log_softmax(student_logits.float() / ts, dim=-1)).sum(-1).mean()


def test_stage_heads_take_the_backbone_widths():
    """Heads follow the backbone (ResNet-18: 128/256/512; ResNet-50: 512/1024/2048, DINO head on 2048)."""
    model = tiny()
    assert [h.conv1.in_channels for h in model.student["stage_heads"]] == [128, 256, 512]
    torch.manual_seed(0)
    r50 = SCFS(common.resnet("resnet50"), out_dim=64, hidden_dim=32, bottleneck_dim=16, stage_bottleneck=8,
               stage_hidden=16, stage_dim=16)
    assert [h.conv1.in_channels for h in r50.student["stage_heads"]] == [512, 1024, 2048]
    assert r50.student["head"].mlp[0].in_features == 2048


def test_teacher_gets_no_gradient_every_student_parameter_does():
    """Teacher params frozen with grad None; every trainable student param
    gets a gradient (also the three stage heads)."""
    model = tiny()
    loss, _ = model(crops(), 0.0)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    trainable = [(n, p) for n, p in model.student.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for n, p in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "original0" in n)  # g frozen


def test_teacher_starts_as_student_and_ema_is_exact():
    """Teacher = student at init; after an update t' = m t + (1 - m) s over parameters, buffers kept."""
    model = tiny()
    s_state, t_state = model.student.state_dict(), model.teacher.state_dict()
    assert s_state.keys() == t_state.keys() and all(torch.equal(s_state[k], t_state[k]) for k in s_state)
    model(crops(), 0.0)  # moves BN running stats of both
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.teacher.parameters()]
    buffers = {k: v.clone() for k, v in model.teacher.named_buffers()}
    m = 0.99
    model.update_teacher(m)
    for t, t0, s in zip(model.teacher.parameters(), before, model.student.parameters()):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s, rtol=0, atol=1e-6)
    assert all(torch.equal(v, buffers[k]) for k, v in model.teacher.named_buffers())


def test_teacher_momentum_schedule():
    """m = 1 - (1 - m0)(1 + cos(pi it / T)) / 2: 0.996 at the start, -> 1; common's per-step schedule."""
    T = 37
    ref = training.cosine_schedule(0.996, 1.0, T)
    assert scfs.teacher_momentum(0.0) == pytest.approx(0.996) and scfs.teacher_momentum(1.0) == pytest.approx(1.0)
    for it in (0, 5, 20, 36):
        assert scfs.teacher_momentum(it / T) == pytest.approx(ref[it], abs=1e-12)


def test_query_is_stop_grad(monkeypatch):
    """The search carries no gradient: a detached clone of the student's local maps as the query
    leaves every student gradient unchanged; the searched targets do not require grad."""
    def grads(model):
        loss, _ = model(crops(), 0.3)
        loss.backward()
        return [p.grad.clone() for p in model.student.parameters() if p.requires_grad]

    model = tiny()
    sim = feature_search(torch.rand(L * B, 8, 3, 3, requires_grad=True), torch.rand(B, 8, 5, 5))
    assert not sim.requires_grad
    out, _ = capture(model)
    ref = grads(model)
    assert all(not t[1].requires_grad for t in out["t"])  # the searched targets p_t_l
    model = tiny()
    original = scfs.feature_search
    monkeypatch.setattr(scfs, "feature_search", lambda q, v: original(q.detach().clone(), v))
    assert all(torch.equal(a, b) for a, b in zip(ref, grads(model)))


def spy_search(monkeypatch):
    calls = []
    original = scfs.feature_search

    def spy(local_maps, teacher_map):
        sim = original(local_maps, teacher_map)
        calls.append((local_maps, teacher_map, sim))
        return sim
    monkeypatch.setattr(scfs, "feature_search", spy)
    return calls


def test_similarity_maps_shape_values(monkeypatch):
    """A per stage is (L, B, H_k, W_k) at global resolution, the cosine between the pooled local
    feature and each teacher location, in [0, 1] for post-ReLU features, not normalised to sum 1."""
    calls = spy_search(monkeypatch)
    model = tiny()
    model(crops(), 0.0)
    assert len(calls) == 3
    for (local_maps, teacher_map, sim), k in zip(calls, (2, 3, 4)):
        assert sim.shape == (L, B, MAPS[k], MAPS[k])
        assert local_maps.shape[:2] == (L * B, teacher_map.shape[1]) and local_maps.shape[2] == MAPS[k] * S // G
        assert sim.min() >= 0 and sim.max() <= 1 + 1e-6
        assert not torch.allclose(sim.sum((2, 3)), torch.ones(L, B))
        query = local_maps.view(L, B, *local_maps.shape[1:]).mean((3, 4))  # (L, B, C)
        for i, b, h, w in [(0, 0, 0, 0), (L - 1, B - 1, MAPS[k] - 1, 1), (3, 1, 1, 0)]:
            cos = F.cosine_similarity(query[i, b], teacher_map[b, :, h, w], dim=0)
            torch.testing.assert_close(sim[i, b, h, w], cos, atol=1e-5, rtol=0)


def test_equal_direction_gives_the_teacher_map_back():
    """Teacher locations all along the query's direction -> A = 1 everywhere and S = V."""
    torch.manual_seed(0)
    C, H = 6, 5
    direction = torch.rand(1, C, 1, 1)
    teacher_map = torch.rand(B, 1, H, H) * direction  # positive multiples of one direction
    local_maps = torch.rand(L * B, 1, 3, 3) * direction
    sim = feature_search(local_maps, teacher_map)
    torch.testing.assert_close(sim, torch.ones(L, B, H, H))
    searched = (sim.unsqueeze(2) * teacher_map.unsqueeze(0)).flatten(0, 1)
    torch.testing.assert_close(searched, teacher_map.repeat(L, 1, 1, 1))


def test_head_on_weights_equals_head_on_searched_maps():
    """The conv1 shortcut of StageHead (the paper's S = A * V before the head) gives the head of the searched
    maps, in train mode (batch statistics over the L*B maps)."""
    torch.manual_seed(0)
    head = StageHead(12, 8, 16, 10).train()
    view1, sim = torch.rand(B, 12, 5, 5), torch.rand(L, B, 5, 5)
    searched = (sim.unsqueeze(2) * view1.unsqueeze(0)).flatten(0, 1)  # (L*B, C, H, W)
    torch.testing.assert_close(head(view1, weights=sim), head(searched), atol=1e-5, rtol=1e-4)


def test_searched_targets_from_view1_and_own_query(monkeypatch):
    """The teacher map searched is global crop 1's ([:B] of the teacher's global batch); crop i's
    target is computed from crop i's query (crop-major on both sides)."""
    calls = spy_search(monkeypatch)
    model = tiny()
    views = crops()
    model(views, 0.0)
    with torch.no_grad():
        t_maps = common.resnet_features(model.teacher["encoder"], torch.cat(views[:2]), (2, 3, 4))
        s_maps = common.resnet_features(model.student["encoder"], torch.cat(views[2:]), (2, 3, 4))
    for (local_maps, teacher_map, _), t, s in zip(calls, t_maps, s_maps):
        assert torch.equal(teacher_map, t[:B]) and torch.equal(local_maps, s)
    # crop i <-> query i: permuting the local crops permutes the targets (head in eval mode: rows independent)
    head = StageHead(12, 8, 16, 10).eval()
    view1, local_maps = torch.rand(B, 12, 5, 5), torch.rand(L * B, 12, 3, 3)
    targets = head(view1, weights=feature_search(local_maps, view1)).view(L, B, -1)
    perm = torch.randperm(L)
    permuted = local_maps.view(L, B, 12, 3, 3)[perm].flatten(0, 1)
    torch.testing.assert_close(head(view1, weights=feature_search(permuted, view1)).view(L, B, -1), targets[perm])
    i = 5
    own = feature_search(local_maps, view1)[i]  # (B, H, W)
    torch.testing.assert_close(targets[i], head(own.unsqueeze(1) * view1), atol=1e-5, rtol=1e-4)


def test_head_output_shapes_and_norms():
    """Stage heads -> (N, D) unit vectors; DINO head -> (N, K); last-layer rows of unit norm."""
    model = tiny()
    out, _ = capture(model)
    model(crops(), 0.0)
    assert out["z_s"][0].shape == (V * B, 512) and out["z_t"][0].shape == (2 * B, 512)
    for s, t in zip(out["s"], out["t"]):
        assert [o.shape for o in s] == [(2 * B, 256), (L * B, 256)]
        assert [o.shape for o in t] == [(2 * B, 256), (L * B, 256)]
        for o in s + t:
            torch.testing.assert_close(o.norm(dim=-1), torch.ones(len(o)))
    w = model.student["head"].last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(512))


def test_losses_count_pairs_centre_and_weigh_as_the_paper():
    """Recomputed from the head outputs with explicit loops: L_d averages the 2 V - 2 =
    18 (teacher global a, student crop v != a) pairs, centred; L_g^k pairs teacher 1 with student 2 and
    teacher 2 with student 1 (halves), centred with c_k; L_l^k averages the L same-index pairs, uncentred;
    L = L_d + sum_k (L_g^k + L_l^k) / 2; the loss uses the centers from before the step."""
    model = tiny()
    torch.manual_seed(5)
    model.center.center.normal_()
    for c in model.stage_centers:
        c.center.normal_()
    centers = [model.center.center.clone()] + [c.center.clone() for c in model.stage_centers]
    out, _ = capture(model)
    progress = 0.15  # epoch 1 of 10: tau_t = 0.055 (ramp 0.04 -> 0.07 over 3 epochs)
    loss, stats = model(crops(), progress)
    tt = 0.055
    z_s, z_t = out["z_s"][0].chunk(V), out["z_t"][0].chunk(2)
    pairs = [(a, v) for a in range(2) for v in range(V) if v != a]
    assert len(pairs) == 18
    loss_d = sum(ce(z_t[a], z_s[v], centers[0], tt) for a, v in pairs) / len(pairs)
    torch.testing.assert_close(stats["loss_dino"], loss_d.detach())
    total, globals_, searches = loss_d, [], []
    for k in range(3):
        (s_g, s_l), (t_g, t_l), c = out["s"][k], out["t"][k], centers[1 + k]
        s_g, t_g, s_l, t_l = s_g.chunk(2), t_g.chunk(2), s_l.chunk(L), t_l.chunk(L)
        loss_g = 0.5 * (ce(t_g[0], s_g[1], c, tt) + ce(t_g[1], s_g[0], c, tt))
        loss_l = sum(ce(t_l[i], s_l[i], 0.0, tt) for i in range(L)) / L
        total = total + 0.5 * (loss_g + loss_l)
        globals_.append(loss_g.detach())
        searches.append(loss_l.detach())
    torch.testing.assert_close(loss, total)
    torch.testing.assert_close(stats["loss_stage_global"], sum(globals_) / 3)
    torch.testing.assert_close(stats["loss_search"], sum(searches) / 3)
    assert stats["teacher_temp"] == pytest.approx(tt)


def test_search_loss_is_uncentred_same_index_mean():
    """L_l^k = (1/L) sum_i CE(t_i, s_i); another crop's target changes only its own term."""
    torch.manual_seed(0)
    s, t = torch.randn(L * B, 7), torch.randn(L * B, 7)
    ref = sum(ce(t.chunk(L)[i], s.chunk(L)[i], 0.0, 0.04) for i in range(L)) / L
    torch.testing.assert_close(search_loss(s, t, 0.1, 0.04), ref)


@pytest.mark.parametrize("out_dim, expected", [(512, 33 * math.log(2)), (65536, 40 * math.log(2))])
def test_total_at_uniform_student_outputs(out_dim, expected):
    """All student outputs constant -> each CE = ln(dim) whatever the targets:
    L = ln K + 3 ln 256 (paper: ln 65536 + 3 ln 256 = 40 ln 2; K = 512: 33 ln 2)."""
    model = tiny(out_dim=out_dim)
    heads = [model.student["head"], *model.student["stage_heads"]]
    for h in heads:
        h.register_forward_hook(lambda m, i, o: o * 0 + 0.5)  # constant logits, still in the graph
    loss, _ = model(crops(), 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_centers_move_with_teacher_global_outputs_only():
    """c, c_k start at 0; after a step c = 0.1 mean(z_t), c_k = 0.1 mean(p_t_g[k]) over the 2B
    global rows; the searched targets (the teacher head's second call) do not enter."""
    model = tiny()
    assert all(not c.center.any() for c in [model.center, *model.stage_centers])
    out, _ = capture(model)
    model(crops(), 0.0)
    torch.testing.assert_close(model.center.center, 0.1 * out["z_t"][0].mean(0, keepdim=True))
    for c, (t_g, t_l) in zip(model.stage_centers, out["t"]):
        assert len(t_g) == 2 * B
        torch.testing.assert_close(c.center, 0.1 * t_g.mean(0, keepdim=True))


def test_teacher_sees_only_the_two_global_crops():
    """The teacher encoder runs once on the 2B global crops; the student twice (globals, locals)."""
    model = tiny()
    seen = {"student": [], "teacher": []}
    for name in seen:
        conv1 = getattr(model, name)["encoder"].conv1
        conv1.register_forward_hook(lambda m, i, o, n=name: seen[n].append(tuple(i[0].shape)))
    model(crops(), 0.0)
    assert seen["teacher"] == [(2 * B, 3, G, G)]
    assert seen["student"] == [(2 * B, 3, G, G), (L * B, 3, S, S)]


def test_schedules():
    """tau_t 0.04 at epoch 0, 0.07 at epoch 49 and after; lr 0 at step 0, base at the last warm-up
    step and the first cosine step, approaching (not reaching) min_lr at the end."""
    model = tiny(epochs=200, warmup_teacher_temp_epochs=50)
    temps = {e: model.teacher_temp(e / 200) for e in (0, 1, 49, 50, 199)}
    assert temps[0] == pytest.approx(0.04) and temps[1] == pytest.approx(0.04 + 0.03 / 49)
    assert temps[49] == pytest.approx(0.07) and temps[50] == temps[199] == pytest.approx(0.07)
    assert model.teacher_temp(0.999999) == pytest.approx(0.07)
    lrs = training.cosine_schedule(0.1, 0.0048, 200, 20, dino_warmup=True)  # what scfs.make_optimizer uses
    assert lrs[0] == 0 and lrs[19] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.1)
    assert np.all(np.diff(lrs[:20]) > 0) and np.all(np.diff(lrs[20:]) < 0)
    assert 0.0048 < lrs[-1] < 0.0049


def test_optimizer_groups_and_frozen_last_layer():
    """SGD momentum 0.9; weight decay only on ndim >= 2 weights; teacher and the fixed g left
    out; last_layer not updated in epoch 0 (freeze_last_layer 1), updated in epoch 1."""
    cfg = training.parse_config(scfs.Config, ["--preset", "cifar10", "--micro_batch", str(B), "--batch_size",
                                            str(B), "--local_crops", str(L), "--device", "cpu"])
    model = tiny()
    opt, schedule = scfs.make_optimizer(model, cfg, steps_per_epoch=1)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.student.parameters() if p.requires_grad}
    ctx = cpu_context()
    batch = crops()
    last = model.student["head"].last_layer.parametrizations.weight.original1
    conv = model.student["encoder"].conv1.weight
    for epoch, moves in ((0, False), (1, True)):
        training.set_lr(opt, 0.1)
        w, c = last.detach().clone(), conv.detach().clone()
        scfs.train_step(model, opt, [batch], epoch / cfg.epochs, cfg, ctx)
        assert torch.equal(last, w) != moves and not torch.equal(conv, c)


def test_no_search_is_plain_dino():
    """--no-search: no stage heads, centers or search; the loss is L_d alone (the paper's DINO baseline)."""
    model = tiny(search=False)
    assert len(model.student["stage_heads"]) == 0 and len(model.stage_centers) == 0
    loss, stats = model(crops(), 0.0)
    assert torch.equal(loss.detach(), stats["loss_dino"]) and set(stats) == {"loss_dino", "teacher_temp"}


def test_config_preset_and_synthetic_batch(capsys):
    """The cifar10 preset builds ResNet-18 with the CIFAR stem; synthetic_batch has the crop shapes;
    --help renders every field's comment."""
    with pytest.raises(SystemExit) as e:
        training.parse_config(scfs.Config, ["--help"])
    assert e.value.code == 0 and "--no-search" in capsys.readouterr().out
    cfg = training.parse_config(scfs.Config, ["--preset", "cifar10", "--batch_size", "3"])
    assert (cfg.model, cfg.cifar_stem, cfg.input_size, cfg.local_size) == ("resnet18", True, 32, 16)
    shapes = [tuple(x.shape) for x in scfs.synthetic_batch(cfg, "cpu")]
    assert shapes == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * cfg.local_crops
    default = training.parse_config(scfs.Config, [])
    assert (default.model, default.out_dim, default.local_crops, default.batch_size) == ("resnet50", 65536, 8, 256)
