"""Tests of droppos.py: the invariants of DropPos (arXiv 2309.03576) and its official code (models_DropPos_mae.py,
engine_pretrain.py).
Tiny models only: 32 px images, patch 4 -> an 8 x 8 grid, N = 64 patches, K = 16 visible, of which 4 keep
their position embedding and 12 get the mask token. tests/test_train.py runs its training program."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import droppos
import training
from common import gather_tokens
from droppos import (DropPos, position_loss, position_metrics, random_masks,
                     smoothing_map)

IMG, PATCH, G = 32, 4, 8
N, K, KEEP = G * G, 16, 4
DROP = K - KEEP


def tiny_droppos(seed=0, img=IMG, patch=PATCH, **kw):
    torch.manual_seed(seed)
    encoder = common.VisionTransformer(img, patch, embed_dim=32, depth=2, num_heads=2)
    kw = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "epochs": 10, **kw}
    return DropPos(encoder, **kw)


def images(batch=4, seed=1, size=IMG):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def spy_on_masks(monkeypatch):
    """Record (ids_keep, drop) of every random_masks call that DropPos.forward makes."""
    calls = []

    def spy(*args):
        out = random_masks(*args)
        calls.append(out)
        return out
    monkeypatch.setattr(droppos, "random_masks", spy)
    return calls


def upstream_map(num_cells, sigma, rows=False):
    """Upstream's smoothing map, written out as loops: an n x n grid, n = sqrt(num_cells),
    exp(-squared distance / sigma^2), divided by the row-sum vector broadcast over the last axis
    (rows=True: each row divided by its own sum, the paper's normalisation)."""
    if sigma == 0:
        return torch.eye(num_cells)
    n = int(math.isqrt(num_cells))
    w = torch.tensor([[math.exp(-((i // n - j // n) ** 2 + (i % n - j % n) ** 2) / sigma ** 2)
                       for j in range(num_cells)] for i in range(num_cells)], dtype=torch.float64)
    return (w / w.sum(-1, keepdim=True) if rows else w / w.sum(-1)).float()


def upstream_loss(model, x, ids_keep, drop, smooth):
    """The official forward and loss for the given masks: PEs assigned by gather, concatenation of the
    mask tokens and a restoring gather; the similarity pass; labels_smooth rows of `smooth`, first N
    columns; loss and acc1 weighted by mask_pos * attn, divided by their sum. -> (loss, acc1)"""
    enc, (B, k), n = model.encoder, ids_keep.shape, model.encoder.num_patches
    n_drop = int(drop[0].sum())
    ids_shuffle_pos = drop.long().argsort(dim=1, stable=True)  # the kept tokens first, then the dropped ones
    ids_restore_pos = ids_shuffle_pos.argsort(1)
    pos_vis = gather_tokens(enc.pos_embed[:, 1:].repeat(B, 1, 1), ids_keep)
    pos = gather_tokens(pos_vis, ids_shuffle_pos[:, :k - n_drop])
    pos = torch.cat([pos, model.mask_pos_token.repeat(B, n_drop, 1)], 1)
    pos = gather_tokens(pos, ids_restore_pos)
    h = gather_tokens(enc.patch_embed(x), ids_keep) + pos
    h = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(B, -1, -1), h], 1)
    for blk in enc.blocks:
        h = blk(h)
    h = model.decoder_embed(enc.norm(h))
    for blk in model.decoder_blocks:
        h = blk(h)
    pred = model.decoder_pred(model.decoder_norm(h))[:, 1:]
    with torch.no_grad():
        z = enc(x)
        attn = F.softmax(F.cosine_similarity(z[:, :1], z[:, 1:], dim=-1) / 0.1, dim=-1).gather(1, ids_keep)
        attn = attn / attn.sum(-1, keepdim=True)
    labels_smooth = smooth[:, :n][ids_keep]  # rows at the labels, first N columns
    weight = drop.float() * attn
    loss = ((-labels_smooth * F.log_softmax(pred, -1)).sum(-1) * weight).sum() / weight.sum()
    acc1 = ((pred.argmax(-1) == ids_keep) * weight).sum() / weight.sum()
    return loss, acc1


# --- masks and position dropping -------------------------------------------------------------------
def test_exact_visible_kept_and_dropped_counts():
    """K = int(N(1-gamma)) distinct visible patches per image, exactly int(K(1-rho)) keep their PE."""
    torch.manual_seed(0)
    ids_keep, drop = random_masks(256, N, K, KEEP, "cpu")
    assert ids_keep.shape == drop.shape == (256, K) and drop.dtype == torch.bool
    assert (ids_keep.sort(1).values.diff(dim=1) > 0).all() and ids_keep.min() >= 0 and ids_keep.max() < N
    assert (drop.sum(1) == DROP).all()
    model = tiny_droppos()
    assert (model.num_visible, model.num_keep_pos) == (K, KEEP)
    big = DropPos(common.VisionTransformer(56, 4, 16, 1, 2), 16, 1, 2)  # 14 x 14 grid as ViT-B/16 at 224
    assert (big.num_visible, big.num_keep_pos, big.num_visible - big.num_keep_pos) == (49, 12, 37)


def test_encoder_sees_true_pe_on_kept_and_mask_token_on_dropped_tokens(monkeypatch):
    """Each encoder input token is its patch embedding plus either its own PE (K_keep of
    them) or the one shared mask_pos_token (K_drop of them); nothing for the masked patches. The
    similarity pass sees all N patches with their true PEs."""
    model, x = tiny_droppos(), images()
    calls = spy_on_masks(monkeypatch)
    inputs = []
    forward_tokens = model.encoder.forward_tokens
    monkeypatch.setattr(model.encoder, "forward_tokens", lambda t: inputs.append(t) or forward_tokens(t))
    model(x, 0.5)
    (ids_keep, drop), (full, tokens) = calls[0], inputs  # the similarity pass first, on the full image
    assert torch.equal(full, model.encoder.embed_patches(x)) and tokens.shape == (4, K, 32)
    added = tokens - gather_tokens(model.encoder.patch_embed(x), ids_keep)
    true_pe = model.encoder.pos_embed[0, 1:][ids_keep]
    is_pe = torch.isclose(added, true_pe, atol=1e-6).all(-1)
    is_token = torch.isclose(added, model.mask_pos_token.expand_as(added), atol=1e-6).all(-1)
    assert torch.equal(is_token, drop) and torch.equal(is_pe, ~drop)


def test_pe_drop_is_a_uniform_subset_independent_of_the_patch_mask():
    """Every cell is visible w.p. K/N and visible-and-dropped w.p. K_drop/N; which visible tokens
    lose their PE does not depend on their place in the visible order."""
    torch.manual_seed(0)
    B = 20000
    ids_keep, drop = random_masks(B, N, K, KEEP, "cpu")
    visible = torch.zeros(B, N).scatter_(1, ids_keep, 1.0)
    dropped = torch.zeros(B, N).scatter_(1, ids_keep, drop.float())
    for freq, p in ((visible.mean(0), K / N), (dropped.mean(0), DROP / N)):
        assert (freq - p).abs().max() < 5 * math.sqrt(p * (1 - p) / B)
    p = DROP / K
    assert (drop.float().mean(0) - p).abs().max() < 5 * math.sqrt(p * (1 - p) / B)


def test_decoder_has_no_position_embedding_and_predicts_all_cells():
    """No decoder PE; logits (B, K, N) over all N cells; [CLS] gets PE row 0 = zeros."""
    model = tiny_droppos()
    assert not [n for n in dict(model.named_parameters()) | dict(model.named_buffers())
                if "pos" in n and n not in ("encoder.pos_embed", "mask_pos_token")]
    assert torch.count_nonzero(model.encoder.pos_embed[0, 0]) == 0
    ids_keep, drop = random_masks(4, N, K, KEEP, "cpu")
    assert model.position_logits(images(), ids_keep, drop).shape == (4, K, N)


# --- position smoothing and its schedule ------------------------------------------------------------
@pytest.mark.parametrize("grid", [3, 8, 14])
def test_smoothing_map_is_the_identity_at_sigma_zero(grid):
    """S(0) = I exactly; a tiny sigma (1/800, the last of 800 epochs) underflows to I, no NaN."""
    for sigma in (0.0, 1 / 800):
        s = smoothing_map(grid, sigma)
        assert torch.equal(s, torch.eye(grid * grid))
    assert torch.equal(smoothing_map(grid, 1 / 800, map_grid=16, column_norm=True), torch.eye(grid * grid))


def test_smoothing_map_values_at_sigma_one_by_hand():
    """W = exp(-d^2 / sigma^2) on a 3 x 3 grid, each row divided by its sum (ours)."""
    e = math.exp
    s = smoothing_map(3, 1.0)
    centre = 1 + 4 * e(-1) + 4 * e(-2)  # itself, 4 edge neighbours at d^2 = 1, 4 corners at d^2 = 2
    assert s[4, 4].item() == pytest.approx(1 / centre, abs=1e-6)
    assert s[4, 1].item() == pytest.approx(e(-1) / centre, abs=1e-6)
    assert s[4, 0].item() == pytest.approx(e(-2) / centre, abs=1e-6)
    corner = 1 + 2 * e(-1) + e(-2) + 2 * e(-4) + 2 * e(-5) + e(-8)
    for j, d2 in enumerate([0, 1, 4, 1, 2, 5, 4, 5, 8]):
        assert s[0, j].item() == pytest.approx(e(-d2) / corner, abs=1e-6)


def test_smoothing_map_rows_sum_to_one_with_the_peak_on_the_diagonal():
    """Rows sum to 1; on 14 x 14 at sigma 1: S[c,c] = 0.3182 and 0.1171 to the
    4 neighbours at c = (7,7), S[0,0] = 0.5203; each row's maximum on the diagonal."""
    for sigma in (1.0, 0.5, 0.3):
        s = smoothing_map(14, sigma)
        assert torch.allclose(s.sum(1), torch.ones(196), atol=1e-6)
        assert torch.equal(s.argmax(1), torch.arange(196))
    s, c = smoothing_map(14, 1.0), 7 * 14 + 7
    assert s[c, c].item() == pytest.approx(0.3182, abs=1e-4) and s[0, 0].item() == pytest.approx(0.5203, abs=1e-4)
    for nb in (c - 1, c + 1, c - 14, c + 14):
        assert s[c, nb].item() == pytest.approx(0.1171, abs=1e-4)


def test_official_smoothing_map_as_released():
    """Upstream's columns sum to 1 and rows to 0.886..1.110 on 14 x 14; the released 16-grid
    map puts its 0.1171 neighbours of (7,7) on cells (7,6), (7,8), (6,5), (8,9), and 0.151 of (0,13) on
    (1,0); its row slices sum to 0.659 (label 195)..1.110. Both equal upstream's loop formula."""
    col = smoothing_map(14, 1.0, column_norm=True)
    assert torch.allclose(col, upstream_map(196, 1.0), atol=1e-6)
    assert torch.allclose(col.sum(0), torch.ones(196), atol=1e-5)
    assert col.sum(1).min().item() == pytest.approx(0.886, abs=1e-3)
    assert col.sum(1).max().item() == pytest.approx(1.110, abs=1e-3)
    released = smoothing_map(14, 1.0, map_grid=16, column_norm=True)
    assert torch.allclose(released, upstream_map(256, 1.0)[:196, :196], atol=1e-6)
    cell = lambda r, c: 14 * r + c  # noqa: E731
    row = released[cell(7, 7)]
    assert row[cell(7, 7)].item() == pytest.approx(0.3182, abs=1e-4)
    assert {i for i in range(196) if abs(row[i] - 0.1171) < 1e-4} == {cell(7, 6), cell(7, 8), cell(6, 5), cell(8, 9)}
    assert released[cell(0, 13), cell(1, 0)].item() == pytest.approx(0.151, abs=1e-3)
    sums = released.sum(1)
    assert sums.argmin().item() == 195 and sums.min().item() == pytest.approx(0.659, abs=1e-3)
    assert sums.max().item() == pytest.approx(1.110, abs=1e-3)
    with pytest.raises(ValueError):
        smoothing_map(8, 1.0, map_grid=4)  # upstream's formula at 32/4: out of range


@pytest.mark.parametrize("epochs,steps", [(10, 1), (10, 7), (800, 3)])
def test_sigma_schedule(epochs, steps):
    """sigma_e = sigma0 (1 - e/E), constant within epoch e, non-increasing, sigma_0 = sigma0,
    sigma_{E-1} = sigma0/E > 0; without decay it stays sigma0."""
    model = tiny_droppos(epochs=epochs)
    values = []
    for e in range(epochs):
        expected = (1 - e / float(epochs)) * 1.0
        for it in sorted({0, 1 % steps, steps // 2, steps - 1}):
            assert model.sigma((e * steps + it) / (epochs * steps)) == expected  # as main passes it
        values.append(expected)
    assert values[0] == 1.0 and values[-1] == pytest.approx(1 / epochs) and values[-1] > 0
    assert all(a >= b for a, b in zip(values, values[1:])) and model.sigma(1.0) == values[-1]
    assert tiny_droppos(epochs=epochs, sigma=0.7, sigma_decay=False).sigma(0.9) == 0.7


# --- loss, gradients, attentive weights -------------------------------------------------------------
def test_loss_is_ln_n_at_uniform_logits_and_sigma_zero():
    """All-equal logits and one-hot targets give ln N whatever the weights; through the model too."""
    targets = torch.eye(N)[torch.randint(N, (3, K))]
    for weights in (torch.ones(3, K), torch.rand(3, K) * (torch.rand(3, K) > 0.5)):
        weights[0, 0] = 1.0
        loss = position_loss(torch.full((3, K, N), 0.3), targets, weights)
        assert loss.item() == pytest.approx(math.log(N), abs=1e-5)
    model = tiny_droppos(sigma=0.0)
    with torch.no_grad():
        model.decoder_pred.weight.zero_()
        model.decoder_pred.bias.fill_(2.0)
    loss, stats = model(images(), 0.3)
    assert loss.item() == pytest.approx(math.log(N), abs=1e-5) and stats["sigma"].item() == 0.0


def test_loss_equals_cross_entropy_over_dropped_tokens_at_sigma_zero(monkeypatch):
    """sigma = 0 and attn_guide off: L = F.cross_entropy averaged over the PE-dropped tokens."""
    model, x = tiny_droppos(sigma=0.0, attn_guide=False), images()
    calls = spy_on_masks(monkeypatch)
    torch.manual_seed(3)
    loss, _ = model(x, 0.5)
    (ids_keep, drop), = calls
    logits = model.position_logits(x, ids_keep, drop)
    assert loss.item() == pytest.approx(F.cross_entropy(logits[drop], ids_keep[drop]).item(), rel=1e-5)


@pytest.mark.parametrize("official", [False, True])
def test_loss_and_acc1_equal_the_upstream_computation(official, monkeypatch):
    """Forward's loss and weighted accuracy equal upstream's gather-cat-restore forward with
    the similarity weights and the smoothing map: the released one (official_smoothing, a 48 px / patch 8
    model so the 8 x 8 map covers the 6 x 6 grid) or ours (rows normalised, on the 6 x 6 grid)."""
    model, x = tiny_droppos(img=48, patch=8, official_smoothing=official), images(size=48)
    calls = spy_on_masks(monkeypatch)
    progress = 0.05  # epoch 0 of 10: sigma = 1, the most smoothing
    loss, stats = model(x, progress)
    (ids_keep, drop), = calls
    # upstream: (input_size // token_size) ** 2 cells, columns normalised; ours: the 6 x 6 grid, rows
    smooth = upstream_map((48 // 6) ** 2, 1.0) if official else upstream_map(36, 1.0, rows=True)
    ref_loss, ref_acc = upstream_loss(model, x, ids_keep, drop, smooth)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert stats["acc_weighted"].item() == pytest.approx(ref_acc.item(), abs=1e-6)


def test_no_gradient_from_tokens_that_kept_their_pe(monkeypatch):
    """The logits of tokens that kept their PE (and of [CLS]) get zero gradient; changing them
    changes neither the loss nor the gradient of the others."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, K, N, generator=g, requires_grad=True)
    targets = smoothing_map(G, 1.0)[torch.randint(N, (3, K), generator=g)]
    _, drop = random_masks(3, N, K, KEEP, "cpu")
    weights = drop.float() * torch.rand(3, K, generator=g)
    loss = position_loss(logits, targets, weights)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.count_nonzero(grad[~drop]) == 0 and (grad[drop].abs().sum(-1) > 0).all()
    changed = logits.detach().clone()
    changed[~drop] = torch.randn(int((~drop).sum()), N, generator=g) * 10
    changed.requires_grad_()
    loss2 = position_loss(changed, targets, weights)
    (grad2,) = torch.autograd.grad(loss2, changed)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6) and torch.allclose(grad2, grad, atol=1e-7)
    # through the model: the decoder outputs of kept tokens get no gradient
    model, x = tiny_droppos(), images()
    calls = spy_on_masks(monkeypatch)
    captured = {}

    def keep(module, inputs, out):
        out.retain_grad()
        captured["logits"] = out
    model.decoder_pred.register_forward_hook(keep)
    loss, _ = model(x, 0.5)
    loss.backward()
    (_, drop), grad = calls[0], captured["logits"].grad
    assert torch.count_nonzero(grad[~drop]) == 0 and (grad[drop].abs().sum(-1) > 0).all()


def test_attention_weights_are_a_gradient_free_distribution_over_visible_tokens():
    """Positive, sum to 1 per image, no grad path even for inputs with grad; softmax over all N
    of cos(cls, patch)/0.1 of the full-image pass, gathered and renormalised; mask-independent."""
    model, x = tiny_droppos(), images()
    ids_keep, _ = random_masks(4, N, K, KEEP, "cpu")
    a = model.attention_weights(x.clone().requires_grad_(), ids_keep)
    assert a.shape == (4, K) and (a > 0).all() and not a.requires_grad and a.grad_fn is None
    assert torch.allclose(a.sum(1), torch.ones(4), atol=1e-6)
    z = model.encoder(x)
    full = torch.softmax(F.cosine_similarity(z[:, :1], z[:, 1:], dim=-1) / 0.1, dim=-1)  # (B, N)
    assert torch.allclose(model.attention_weights(x, torch.arange(N).expand(4, N)), full, atol=1e-6)
    ref = full.gather(1, ids_keep)
    assert torch.allclose(a, ref / ref.sum(1, keepdim=True), atol=1e-6)


def test_pe_table_gets_no_gradient_everything_else_does():
    """After backward the PE table has no gradient; mask_pos_token, cls_token, patch embed,
    encoder and decoder all have nonzero gradients."""
    model = tiny_droppos()
    loss, _ = model(images(), 0.5)
    loss.backward()
    assert not model.encoder.pos_embed.requires_grad and model.encoder.pos_embed.grad is None
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.norm() > 0, n
    assert {"mask_pos_token", "encoder.cls_token", "encoder.patch_embed.proj.weight", "decoder_pred.weight",
            "decoder_blocks.0.attn.qkv.weight"} <= {n for n, p in model.named_parameters() if p.requires_grad}


# --- leaks, determinism, diagnostics ----------------------------------------------------------------
def test_constant_image_gives_identical_logits_for_all_dropped_tokens(monkeypatch):
    """On a constant image every PE-dropped token gets the same logits, so at most one
    of them per image can be right (unweighted accuracy <= 1/K_drop)."""
    model = tiny_droppos()
    x = torch.full((4, 3, IMG, IMG), 0.7)
    calls = spy_on_masks(monkeypatch)
    _, stats = model(x, 0.5)
    ids_keep, drop = calls[0]
    logits = model.position_logits(x, ids_keep, drop)
    dropped = logits[drop].view(4, DROP, N)
    assert torch.allclose(dropped, dropped[:, :1].expand_as(dropped), atol=1e-5)
    kept = logits[~drop].view(4, KEEP, N)
    assert not torch.allclose(kept, kept[:, :1].expand_as(kept), atol=1e-3)  # their PE does tell them apart
    assert stats["acc_dropped"].item() <= 1 / DROP + 1e-6


def test_permuting_the_visible_tokens_permutes_the_logits():
    """The token order carries no position: permuting the encoder input (and the labels and drop
    flags with it) permutes each token's logits and leaves the loss unchanged."""
    model, x = tiny_droppos(), images()
    ids_keep, drop = random_masks(4, N, K, KEEP, "cpu")
    logits = model.position_logits(x, ids_keep, drop)
    perm = torch.rand(4, K).argsort(1)
    logits_p = model.position_logits(x, ids_keep.gather(1, perm), drop.gather(1, perm))
    assert torch.allclose(logits_p, logits.gather(1, perm[..., None].expand(-1, -1, N)), atol=1e-5)
    targets, weights = smoothing_map(G, 0.5)[ids_keep], drop.float()
    loss = position_loss(logits, targets, weights)
    loss_p = position_loss(logits_p, targets.gather(1, perm[..., None].expand(-1, -1, N)), weights.gather(1, perm))
    assert loss_p.item() == pytest.approx(loss.item(), abs=1e-5)


def test_step_is_deterministic_given_the_rng_state():
    """The same seed gives the same loss and statistics bit for bit."""
    model, x = tiny_droppos(), images()
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        results.append(model(x, 0.5))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(v, results[1][1][k]) for k, v in results[0][1].items())


def test_position_metrics_by_hand():
    """Accuracy 1 with zero grid error for one-hot logits at the labels; a fixed offset of
    (0, +1), (+1, +1) and (+2, +2) cells gives errors 1, sqrt 2, sqrt 8 and within-1 1, 1, 0; only
    PE-dropped tokens count for the unweighted metrics; random logits are near chance 1/N."""
    labels = torch.tensor([[G * 2 + 2, G * 3 + 3, G * 4 + 1, 5]])  # cells (2,2), (3,3), (4,1), (0,5)
    drop = torch.tensor([[True, True, True, False]])
    w = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    m = position_metrics(F.one_hot(labels, N).float(), labels, drop, w, G)
    assert [m[k].item() for k in ("acc_dropped", "acc_weighted", "grid_err", "acc_within1")] == [1, 1, 0, 1]
    pred = torch.tensor([[G * 2 + 3, G * 4 + 4, G * 6 + 3, 5]])
    m = position_metrics(F.one_hot(pred, N).float(), labels, drop, w, G)
    assert m["acc_dropped"].item() == 0 and m["acc_weighted"].item() == 0
    assert m["grid_err"].item() == pytest.approx((1 + math.sqrt(2) + math.sqrt(8)) / 3, abs=1e-6)
    assert m["acc_within1"].item() == pytest.approx(2 / 3)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(N, (500, K), generator=g)
    m = position_metrics(torch.randn(500, K, N, generator=g), labels, torch.ones(500, K, dtype=torch.bool),
                         torch.ones(500, K), G)
    assert abs(m["acc_dropped"].item() - 1 / N) < 5 * math.sqrt(1 / N / (500 * K))


def test_forward_stats_are_detached_scalars():
    """The module contract: `loss, stats = model(images, progress)`, stats detached 0-d tensors."""
    loss, stats = tiny_droppos()(images(), 0.5)
    assert loss.ndim == 0 and loss.requires_grad
    assert set(stats) == {"acc_dropped", "acc_weighted", "grid_err", "acc_within1", "sigma"}
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())
    assert stats["sigma"].item() == 0.5


def test_clip_per_tensor_is_dinos_rule():
    """Each gradient on its own: g * clip / (|g| + 1e-6) where that factor is below 1, else
    untouched bit for bit; returns the global norm before clipping."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((4, 5), (7,), (3, 3))]
    grads = [torch.randn(4, 5, generator=g) * 10, torch.randn(7, generator=g) * 0.1, torch.randn(3, 3, generator=g) * 3]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    total = training.clip_per_tensor(params, 5.0)
    assert total.item() == pytest.approx(torch.cat([gr.flatten() for gr in grads]).norm().item(), rel=1e-6)
    for p, gr in zip(params, grads):
        coef = 5.0 / (gr.norm() + 1e-6)
        expected = gr * coef if coef < 1 else gr
        assert torch.allclose(p.grad, expected, rtol=1e-6) and p.grad.norm() <= 5.0 + 1e-4
    assert torch.equal(params[1].grad, grads[1])


def test_build_and_preset():
    """The cifar10 preset keeps every ratio (16 visible, 12 dropped on 8 x 8); --official_smoothing
    is refused where upstream's map is smaller than the grid."""
    cfg = training.parse_config(droppos.Config, ["--preset", "cifar10"])
    model = droppos.build(cfg)
    assert (model.encoder.grid, model.num_visible, model.num_keep_pos) == (8, 16, 4)
    assert (model.sigma0, model.attn_guide, model.tau, model.map_grid, model.column_norm) == (1.0, True, 0.1, 8, False)
    with pytest.raises(SystemExit, match="error: --official_smoothing"):
        droppos.build(training.parse_config(droppos.Config, ["--preset", "cifar10", "--official_smoothing"]))
    defaults = training.parse_config(droppos.Config, [])
    assert (defaults.epochs, defaults.warmup_epochs, defaults.batch_size, defaults.decoder_depth) == (800, 10, 4096, 2)


def train_positions(images, steps=60):
    """A small DropPos trained on `images()` batches; -> its position metrics on a fresh batch."""
    torch.manual_seed(0)
    model = DropPos(common.VisionTransformer(32, 4, 64, 2, 2), 64, 1, 2, epochs=1)
    optimizer = torch.optim.AdamW(model.parameters(), 2e-3)
    for _ in range(steps):
        loss, _ = model(images(), 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return model(images(), 0.0)[1]


def test_positions_are_learned_from_content_and_only_from_content():
    """End to end: when every patch's content gives away its cell (a colour ramp across the image), the
    PE-dropped tokens' cells are learned within 60 steps (within-one-cell accuracy far above its chance
    of ~0.11 on an 8 x 8 grid); on pure noise nothing can be learned, so the same run stays at chance
    (a leak through token order, labels or the decoder would show up here)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    ramp = torch.stack([ys, xs, ys * xs])  # (3, 32, 32): the position is in the pixels
    learned = train_positions(lambda: ramp + 0.3 * torch.randn(32, 3, 32, 32))
    chance = train_positions(lambda: torch.randn(32, 3, 32, 32))
    assert learned["acc_within1"] > 0.6 and learned["grid_err"] < 1.5 and learned["acc_dropped"] > 0.15
    assert chance["acc_within1"] < 0.3 and chance["grid_err"] > 3.0 and chance["acc_dropped"] < 0.06
