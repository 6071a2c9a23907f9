"""Tests of hpm.py: the invariants of HPM (arXiv 2304.05919) and its official code (models_mae_learn_loss.py,
engine_pretrain.py).
Tiny models only: 32 px images, patch 4 -> N = 64 patches, K = 16 visible, M = 48 masked."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import hpm
import training
from common import gather_tokens, patchify
from hpm import (HPM, absolute_loss, ema_momentum, hard_count, mask_order, order_to_mask,
                 predicted_loss, ranking_loss, reconstruction_loss)

IMG, PATCH, N, K = 32, 4, 64, 16
M = N - K
LATE = 0.95  # progress in the last of 10 epochs: n_hard = floor(48 * 0.5) = 24


def tiny_hpm(seed=0, **kw):
    torch.manual_seed(seed)
    encoder = common.VisionTransformer(IMG, PATCH, embed_dim=32, depth=2, num_heads=2)
    kw = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "epochs": 10, **kw}
    return HPM(encoder, **kw)


def hpm_196(epochs):
    """A 14x14 grid (56 px, patch 4) so that N = 196, K = 49, M = 147 as ViT-B/16 at 224 px."""
    torch.manual_seed(0)
    encoder = common.VisionTransformer(56, 4, embed_dim=16, depth=1, num_heads=2)
    return HPM(encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2, epochs=epochs)


def images(batch=4, seed=1):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def forward_losses(model, x, ids_keep, ids_masked):
    """The pieces of HPM.forward, built from the model's own methods, with L_rec and L_pred apart."""
    enc, k = model.encoder, ids_keep.shape[1]
    latent = enc.forward_tokens(gather_tokens(enc.embed_patches(x), ids_keep))
    tokens = model.decoder_tokens(latent, ids_keep, ids_masked)
    recon = model.decoder.head(model.decoder.features(tokens)[:, 1 + k:])
    patch_loss = reconstruction_loss(recon, gather_tokens(patchify(x, PATCH), ids_masked), model.norm_pix_loss)
    pred = predicted_loss(model.predictor, model.predictor.features(tokens))[:, 1 + k:]
    objective = ranking_loss if model.relative else absolute_loss
    return patch_loss.mean(), objective(pred, patch_loss.detach())


def spy_on_mask_order(monkeypatch):
    """Record the arguments and result of every mask_order call that HPM.forward makes."""
    calls = []

    def spy(batch, num_patches, device, scores=None, num_hard=0):
        ids = mask_order(batch, num_patches, device, scores, num_hard)
        calls.append({"scores": scores, "num_hard": num_hard, "ids": ids})
        return ids
    monkeypatch.setattr(hpm, "mask_order", spy)
    return calls


def mae_patchify(imgs, p):
    """MAE's models_mae.patchify, written out."""
    h = w = imgs.shape[2] // p
    x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * 3)


def mae_reference(model, x, ids_shuffle):
    """MAE's forward for the mask given by ids_shuffle (random_masking's ids_restore, unshuffled decoder,
    mask-weighted mean of per-patch MSE) and the official HPM loss predictor (full head, mean over P,
    ranking over the masked patches in raster order, BCE over untied ordered pairs). -> (L_rec, L_pred)"""
    enc, (B, n), k = model.encoder, ids_shuffle.shape, model.num_visible
    ids_restore = ids_shuffle.argsort(1)
    mask = torch.ones(B, n)
    mask[:, :k] = 0
    mask = torch.gather(mask, 1, ids_restore)  # 1 = masked, raster order
    h = enc.patch_embed(x) + enc.pos_embed[:, 1:]
    h = torch.gather(h, 1, ids_shuffle[:, :k, None].expand(-1, -1, h.shape[-1]))
    h = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(B, -1, -1), h], 1)
    for blk in enc.blocks:
        h = blk(h)
    d = model.decoder_embed(enc.norm(h))
    d_ = torch.cat([d[:, 1:], model.mask_token.repeat(B, n + 1 - d.shape[1], 1)], 1)
    d_ = torch.gather(d_, 1, ids_restore[..., None].expand(-1, -1, d.shape[-1]))
    d = torch.cat([d[:, :1], d_], 1) + model.decoder_pos_embed

    def tower(t, module):
        for blk in module.blocks:
            t = blk(t)
        return module.head(module.norm(t))[:, 1:]  # (B, N, P)

    target = mae_patchify(x, PATCH)
    if model.norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((tower(d, model.decoder) - target) ** 2).mean(-1)  # (B, N)
    loss_rec = (per_patch * mask).sum() / mask.sum()
    if model.predictor is None:
        return loss_rec, None
    q = tower(d, model.predictor).mean(-1)  # (B, N)
    sel = mask.bool()
    qm, lm = q[sel].view(B, -1), per_patch[sel].view(B, -1).detach()  # masked patches, raster order
    labels = (lm[:, None, :] > lm[:, :, None]).float()  # [b, i, j] = l_j > l_i
    valid = (lm[:, None, :] != lm[:, :, None]).float()
    terms = F.binary_cross_entropy_with_logits(qm[:, None, :] - qm[:, :, None], labels, reduction="none")
    return loss_rec, (terms * valid).sum() / valid.sum()


def brute_force_ranking(pred, target):
    """BCE of sigmoid(q_j - q_i) vs [l_j > l_i] over ordered pairs i != j of one image,
    ties skipped; -> (sum of terms, number of valid pairs)."""
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        q, t = pred[b].tolist(), target[b].tolist()
        for i in range(len(q)):
            for j in range(len(q)):
                if i == j or t[i] == t[j]:
                    continue
                y, s = float(t[j] > t[i]), 1 / (1 + math.exp(-(q[j] - q[i])))
                total -= y * math.log(s) + (1 - y) * math.log(1 - s)
                count += 1
    return total, count


TIED_TARGET = torch.tensor([[0.3, 0.1, 0.3, 0.7, 0.1, 0.2], [1.0, 2.0, 2.0, 2.0, 0.5, 3.0]])


# --- masks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_hard", [0, 1, 24, M])
def test_exact_visible_and_masked_counts(num_hard):
    """Each image has exactly K = int(N(1-r)) visible and N - K masked patches, for any n_hard."""
    torch.manual_seed(0)
    B = 128
    ids = mask_order(B, N, "cpu", torch.randn(B, N), num_hard)
    assert torch.equal(ids.sort(1).values, torch.arange(N).expand(B, N))  # a permutation per image
    mask = order_to_mask(ids, K)
    assert mask.dtype == torch.bool and (mask.sum(1) == N - K).all()
    assert not mask.gather(1, ids[:, :K]).any() and mask.gather(1, ids[:, K:]).all()  # first K visible


def test_visible_count_is_49_of_196_at_the_paper_scale():
    """K = floor(196 * 0.25) = 49 visible, M = 147 masked for a 14x14 grid at r = 0.75."""
    model = hpm_196(epochs=200)
    assert (model.num_visible, model.num_masked) == (49, 147)


@pytest.mark.parametrize("num_hard", [1, 24, M])
def test_top_scoring_patches_always_masked(num_hard):
    """The n_hard highest-scoring patches of each image are always masked."""
    torch.manual_seed(0)
    scores = torch.randn(512, N)
    mask = order_to_mask(mask_order(512, N, "cpu", scores, num_hard), K)
    assert mask.gather(1, scores.topk(num_hard, dim=1).indices).all()


def test_forward_masks_the_teachers_top_patches(monkeypatch):
    """Forward scores the full image with the teacher and hides its n_hard top patches."""
    model, x = tiny_hpm(), images()
    calls = spy_on_mask_order(monkeypatch)
    encoder_inputs = []
    forward_tokens = model.encoder.forward_tokens
    monkeypatch.setattr(model.encoder, "forward_tokens",
                        lambda tokens: encoder_inputs.append(tokens) or forward_tokens(tokens))
    _, stats = model(x, LATE)
    (call,) = calls
    assert call["num_hard"] == hard_count(M, 9, 10) == 24
    assert torch.equal(call["scores"], model.teacher_scores(x))
    hidden = order_to_mask(call["ids"], K)
    assert hidden.gather(1, call["scores"].topk(24, dim=1).indices).all()
    # the student encoder sees exactly the K visible patches of that mask
    (tokens,) = encoder_inputs
    assert torch.equal(tokens, gather_tokens(model.encoder.embed_patches(x), call["ids"][:, :K]))
    assert stats["hard_ratio"].item() == pytest.approx(24 / M)


def test_hard_count_schedule_matches_the_official_one():
    """n_hard = floor(M*0.5*(e+1)/T); final 73 at M = 147; random only for epochs 0-1
    (T=200), 0-9 (T=800), 0-20 (T=1600)."""
    m = 196 - int(196 * (1 - 0.75))
    for epochs, last_random in [(200, 1), (800, 9), (1600, 20)]:
        counts = [hard_count(m, e, epochs) for e in range(epochs)]
        assert counts == [m * (e + 1) // (2 * epochs) for e in range(epochs)]  # exact rational floor
        assert counts[-1] == 73
        assert max(counts[:last_random + 1]) == 0 and counts[last_random + 1] == 1


@pytest.mark.parametrize("epochs,steps", [(200, 1), (200, 7), (10, 5004), (800, 3)])
def test_num_hard_is_the_epochs_value_throughout_the_epoch(epochs, steps):
    """num_hard(progress) = hard_count(M, e) for every iteration of epoch e."""
    model = hpm_196(epochs)
    for e in range(epochs):
        expected = hard_count(147, e, epochs)
        for it in sorted({0, 1 % steps, steps // 2, steps - 1}):
            assert model.num_hard((e * steps + it) / (epochs * steps)) == expected  # as main passes it
            assert model.num_hard((e + it / steps) / epochs) == expected
    assert model.num_hard(1.0) == 73


def test_no_teacher_pass_while_n_hard_is_zero(monkeypatch):
    """While n_hard = 0 the mask is purely random (no teacher scores are used)."""
    model = tiny_hpm(epochs=200)  # M = 48: n_hard(e=0) = floor(48 * 0.5 / 200) = 0
    calls = spy_on_mask_order(monkeypatch)
    model(images(), 0.0)
    assert calls[0]["num_hard"] == 0 and calls[0]["scores"] is None


@pytest.mark.parametrize("num_hard", [0, 24])
def test_non_hard_patches_visible_uniformly(num_hard):
    """Given the hard set, each other patch is visible w.p. K/(N - n_hard) and each pair w.p.
    K(K-1)/((N-n)(N-n-1)) (a uniform K-subset); n_hard = 0 gives MAE's uniform K/N."""
    torch.manual_seed(0)
    B = 20000
    scores = torch.randn(1, N).expand(B, N)  # the same hard set in every draw
    visible = ~order_to_mask(mask_order(B, N, "cpu", scores, num_hard), K)
    hard = scores[0].topk(num_hard).indices if num_hard else torch.empty(0, dtype=torch.long)
    rest = torch.tensor([i for i in range(N) if i not in set(hard.tolist())])
    assert not visible[:, hard].any()
    v = visible[:, rest].double()
    p = K / (N - num_hard)
    assert (v.mean(0) - p).abs().max() < 5 * math.sqrt(p * (1 - p) / B)  # 5 sigma per patch
    p2 = K * (K - 1) / ((N - num_hard) * (N - num_hard - 1))
    pairs = (v.T @ v / B)[~torch.eye(len(rest), dtype=torch.bool)]
    assert (pairs - p2).abs().max() < 6 * math.sqrt(p2 * (1 - p2) / B)  # 6 sigma over all pairs


def test_mask_does_not_depend_on_student_weights(monkeypatch):
    """Changing the student's weights leaves teacher scores and (same seed) the mask unchanged."""
    model, x = tiny_hpm(), images()
    calls = spy_on_mask_order(monkeypatch)
    scores = model.teacher_scores(x)
    torch.manual_seed(5)
    model(x, LATE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("teacher."):
                p.add_(torch.randn_like(p))
    assert torch.equal(model.teacher_scores(x), scores)
    torch.manual_seed(5)
    model(x, LATE)
    assert torch.equal(calls[0]["ids"], calls[1]["ids"])
    with torch.no_grad():  # the check can fail: the scores do follow the teacher's weights
        model.teacher["predictor"].blocks[0].mlp.fc1.weight.add_(1.0)
    assert not torch.allclose(model.teacher_scores(x), scores)


def test_teacher_scores_build_no_graph():
    """The teacher pass runs without autograd, even for inputs that require grad."""
    model = tiny_hpm()
    scores = model.teacher_scores(images().requires_grad_())
    assert scores.shape == (4, N) and not scores.requires_grad and scores.grad_fn is None
    assert not any(p.requires_grad for p in model.teacher.parameters())
    loss, _ = model(images(), LATE)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())


# --- ranking loss ----------------------------------------------------------------------------------
def test_ranking_loss_matches_brute_force_double_loop_with_ties():
    """Mean over untied ordered pairs of BCE(sigmoid(q_j - q_i), [l_j > l_i])."""
    pred = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    total, count = brute_force_ranking(pred, TIED_TARGET)
    assert count == 2 * 30 - 2 * 2 - 2 * 3  # ordered pairs less the tied ones: 2 pairs in image 0, 3 in image 1
    assert ranking_loss(pred, TIED_TARGET).item() == pytest.approx(total / count, abs=1e-6)


def test_ranking_loss_equals_unordered_pair_softplus_mean():
    """Each unordered pair counts twice with equal terms: L_pred = mean over untied i < j of
    softplus(-sign(l_j - l_i) (q_j - q_i))."""
    g = torch.Generator().manual_seed(1)
    for pred, target in [(torch.randn(2, 6, generator=g), TIED_TARGET),
                         (torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g))]:
        terms = []
        for b in range(pred.shape[0]):
            q, t = pred[b].tolist(), target[b].tolist()
            for i in range(len(q)):
                for j in range(i + 1, len(q)):
                    if t[i] != t[j]:
                        s = 1.0 if t[j] > t[i] else -1.0
                        terms.append(math.log1p(math.exp(-s * (q[j] - q[i]))))
        assert ranking_loss(pred, target).item() == pytest.approx(sum(terms) / len(terms), abs=1e-6)


def test_ranking_loss_invariant_to_per_image_shift_of_predictions():
    """Adding a constant to all predictions of one image leaves L_pred unchanged."""
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(3, 12, generator=g), torch.randn(3, 12, generator=g)
    shifted = pred + torch.tensor([[5.0], [-3.0], [0.25]])
    assert torch.allclose(ranking_loss(shifted, target), ranking_loss(pred, target), atol=1e-6)
    assert not torch.allclose(ranking_loss(2 * pred, target), ranking_loss(pred, target), atol=1e-3)


def test_ranking_loss_invariant_to_increasing_maps_of_targets():
    """Strictly increasing maps of the targets (shift, positive scale, exp, cube) change nothing."""
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(3, 12, generator=g), torch.rand(3, 12, generator=g) + 0.1
    base = ranking_loss(pred, target)
    for mapped in (target + 7.0, 3.5 * target, target.exp(), target ** 3, torch.log(target)):
        assert torch.equal(ranking_loss(pred, mapped), base)
    assert not torch.allclose(ranking_loss(pred, -target), base)  # a decreasing map does change it


def test_ranking_loss_is_ln2_for_constant_predictions():
    """Constant predictions (any constant per image) give ln 2 whatever the targets."""
    pred = torch.tensor([[0.7] * 6, [-2.0] * 6])
    assert ranking_loss(pred, TIED_TARGET).item() == pytest.approx(math.log(2), abs=1e-6)


def test_ranking_loss_tied_image_adds_nothing_to_numerator_or_denominator():
    """Ties contribute nothing and are not counted: an all-tied image leaves L_pred unchanged."""
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    with_tied = ranking_loss(torch.cat([pred, torch.randn(1, 8, generator=g)]),
                             torch.cat([target, torch.full((1, 8), 0.5)]))
    assert with_tied.item() == pytest.approx(ranking_loss(pred, target).item(), abs=1e-6)


def test_ranking_pairs_never_cross_images():
    """L_pred = per-image brute-force losses weighted by their valid-pair counts."""
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(3, 6, generator=g)
    target = torch.cat([TIED_TARGET, 10 + torch.randn(1, 6, generator=g)])  # far from the others
    per_image = [brute_force_ranking(pred[b:b + 1], target[b:b + 1]) for b in range(3)]
    expected = sum(t for t, _ in per_image) / sum(c for _, c in per_image)
    assert ranking_loss(pred, target).item() == pytest.approx(expected, abs=1e-6)


def test_ranking_loss_invariant_to_patch_order():
    """Permuting the masked patches (predictions and targets alike) changes nothing."""
    g = torch.Generator().manual_seed(6)
    pred, target = torch.randn(2, 10, generator=g), torch.randn(2, 10, generator=g)
    perm = torch.randperm(10, generator=g)
    assert torch.allclose(ranking_loss(pred[:, perm], target[:, perm]), ranking_loss(pred, target), atol=1e-6)


def test_absolute_loss_zscores_per_image_with_unbiased_variance():
    """MSE to the target z-scored per image (mean, unbiased var, +1e-6 in sqrt)."""
    pred = torch.tensor([[0.1, -0.2, 0.3, 0.0], [1.0, 0.5, -0.5, 0.2]])
    target = torch.tensor([[1.0, 2.0, 4.0, 7.0], [0.5, 0.5, 1.5, 3.5]])

    def hand(unbiased=True, per_image=True):
        rows = target.tolist() if per_image else [sum(target.tolist(), [])] * 2
        total = 0.0
        for b in range(2):
            ref = rows[b]
            mean = sum(ref) / len(ref)
            var = sum((v - mean) ** 2 for v in ref) / (len(ref) - 1 if unbiased else len(ref))
            for q, t in zip(pred[b].tolist(), target[b].tolist()):
                total += (q - (t - mean) / math.sqrt(var + 1e-6)) ** 2
        return total / pred.numel()
    assert absolute_loss(pred, target).item() == pytest.approx(hand(), abs=1e-6)
    assert abs(hand(unbiased=False) - hand()) > 1e-2 and abs(hand(per_image=False) - hand()) > 1e-2


# --- losses and gradients of the model -------------------------------------------------------------
def test_reconstruction_loss_norm_pix_uses_unbiased_variance():
    """Per patch (Y - mean) / sqrt(var + 1e-6) with the unbiased variance over P values."""
    g = torch.Generator().manual_seed(7)
    recon, target = torch.randn(2, 3, 12, generator=g), 3 * torch.randn(2, 3, 12, generator=g) + 1
    mean = target.mean(-1, keepdim=True)
    var = ((target - mean) ** 2).sum(-1, keepdim=True) / 11
    expected = ((recon - (target - mean) / (var + 1e-6).sqrt()) ** 2).mean(-1)
    assert torch.allclose(reconstruction_loss(recon, target, True), expected, atol=1e-6)
    assert torch.allclose(reconstruction_loss(recon, target, False), ((recon - target) ** 2).mean(-1))


def forward_and_its_mask(model, x, progress, seed):
    """model(x, progress) and the patch order its forward drew (same RNG state, same teacher scores)."""
    scores = model.teacher_scores(x)
    torch.manual_seed(seed)
    loss, stats = model(x, progress)
    torch.manual_seed(seed)
    return loss, stats, mask_order(x.shape[0], N, "cpu", scores, model.num_hard(progress))


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("progress", [0.0, LATE])
def test_losses_equal_mae_reference(norm_pix, progress):
    """L_rec = MAE's mask-weighted loss (same mask, same weights, norm-pix rule) and L_pred =
    the official ranking loss on those per-patch values, decoded in MAE's restored order."""
    model, x = tiny_hpm(norm_pix_loss=norm_pix), images()
    loss, stats, ids = forward_and_its_mask(model, x, progress, seed=11)
    ref_rec, ref_pred = mae_reference(model, x, ids)
    assert stats["loss_rec"].item() == pytest.approx(ref_rec.item(), rel=1e-5)
    assert stats["loss_pred"].item() == pytest.approx(ref_pred.item(), abs=1e-5)
    assert loss.item() == pytest.approx((ref_rec + ref_pred).item(), rel=1e-5)  # the ranking loss's weight is 1


@pytest.mark.parametrize("relative", [True, False])
def test_gradient_flow_between_towers(relative):
    """L_pred reaches encoder, decoder_embed, mask token, predictor but not the
    reconstruction tower; L_rec never reaches the predictor tower; forward's total matches both."""
    model, x = tiny_hpm(relative=relative), images()
    loss, _, ids = forward_and_its_mask(model, x, LATE, seed=3)
    loss_rec, loss_pred = forward_losses(model, x, ids[:, :K], ids[:, K:])
    assert torch.allclose(loss_rec + loss_pred, loss, atol=1e-6)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    g_rec = dict(zip(names, torch.autograd.grad(loss_rec, params, retain_graph=True, allow_unused=True)))
    g_pred = dict(zip(names, torch.autograd.grad(loss_pred, params, retain_graph=True, allow_unused=True)))

    def norm(g):
        return 0.0 if g is None else g.norm().item()
    assert all(norm(g_pred[n]) == 0 for n in names if n.startswith("decoder."))
    assert all(norm(g_rec[n]) == 0 for n in names if n.startswith("predictor."))
    for n in ("encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight", "encoder.norm.weight",
              "decoder_embed.weight", "mask_token", "predictor.head.weight"):
        assert norm(g_pred[n]) > 0, n
    loss.backward()  # the forward's own graph gives the same gradients as L_rec + L_pred apart
    for n, p in model.named_parameters():
        if p.requires_grad:
            expected = sum(g for g in (g_rec[n], g_pred[n]) if g is not None)
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7, msg=n)


def test_pred_loss_ignores_visible_predictor_outputs():
    """The loss has zero gradient w.r.t. predictor outputs at cls and visible positions."""
    model, x = tiny_hpm(), images()
    captured = {}

    def keep(module, inputs, out):
        out.retain_grad()
        captured["features"] = out
    model.predictor.norm.register_forward_hook(keep)  # the student's predictor only
    loss, _ = model(x, LATE)
    loss.backward()
    grad = captured["features"].grad  # (B, 1 + N, Dd), [cls, visible, masked]
    assert torch.count_nonzero(grad[:, :1 + K]) == 0
    assert (grad[:, 1 + K:].abs().sum(-1) > 0).all()


def test_decoder_token_order_changes_nothing():
    """Any order of visible and of masked tokens (targets alike) gives the same L_rec, L_pred
    and gradients within 1e-5 in fp32."""
    model, x = tiny_hpm(), images()
    torch.manual_seed(0)
    ids = mask_order(4, N, "cpu", model.teacher_scores(x), 24)
    keep, masked = ids[:, :K], ids[:, K:]
    shuffle = lambda t: t.gather(1, torch.rand(t.shape).argsort(1))  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for k, m in [(keep, masked), (keep.sort(1).values, masked.sort(1).values), (shuffle(keep), shuffle(masked))]:
        loss_rec, loss_pred = forward_losses(model, x, k, m)
        grads = torch.autograd.grad(loss_rec + loss_pred, params)
        results.append((loss_rec, loss_pred, grads))
    for loss_rec, loss_pred, grads in results[1:]:
        assert abs(loss_rec - results[0][0]) < 1e-5 and abs(loss_pred - results[0][1]) < 1e-5
        for g, g0 in zip(grads, results[0][2]):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-5)


def test_predicted_loss_is_mean_of_head_outputs():
    """Predictor score per token = mean of its P head outputs (value and gradients)."""
    torch.manual_seed(0)
    tower = hpm.Tower(16, 1, 2, 48)
    feats = torch.randn(2, 5, 16, requires_grad=True)
    fast, full = predicted_loss(tower, feats), tower.head(feats).mean(-1)
    assert fast.shape == (2, 5) and torch.allclose(fast, full, atol=1e-6)
    weights = torch.randn(2, 5)
    inputs = (tower.head.weight, tower.head.bias, feats)
    for a, b in zip(torch.autograd.grad((fast * weights).sum(), inputs),
                    torch.autograd.grad((full * weights).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_layer_norms_use_eps_1e6():
    """Every LayerNorm (encoder, both towers) has eps 1e-6 as MAE/timm."""
    norms = [m for m in tiny_hpm().modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * (2 * 2 + 1) + 3 * (2 * 1 + 1)  # 2 encoders (student, teacher) + 3 towers
    assert all(m.eps == 1e-6 for m in norms)


# --- EMA teacher ------------------------------------------------------------------------------------
def test_teacher_is_an_exact_independent_copy_at_init():
    """The teacher equals the student's encoder, decoder_embed and predictor bit for bit,
    in its own storage."""
    model = tiny_hpm()
    student = model.state_dict()
    teacher = model.teacher.state_dict()
    assert set(teacher) == {k for k in student if k.split(".")[0] in ("encoder", "decoder_embed", "predictor")}
    for k, v in teacher.items():
        assert torch.equal(v, student[k]) and v.data_ptr() != student[k].data_ptr(), k


def test_ema_update_after_one_optimizer_step():
    """After one AdamW step, teacher = m * teacher0 + (1 - m) * student1 with m = m(0) = 0.999;
    the fixed pos_embed stays bit-identical; the teacher is not in the optimizer."""
    model, x = tiny_hpm(), images()
    teacher0 = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    optimizer = training.adamw(model, 1e-2, 0.05)
    assert not {id(p) for p in model.teacher.parameters()} & {
        id(p) for group in optimizer.param_groups for p in group["params"]}
    loss, _ = model(x, LATE)
    loss.backward()
    optimizer.step()
    m = ema_momentum(0)
    assert m == 0.999
    model.update_teacher(m)
    student = model.state_dict()
    for k, v in model.teacher.state_dict().items():
        if k == "encoder.pos_embed":
            assert torch.equal(v, teacher0[k]) and torch.equal(v, student[k])
        else:
            torch.testing.assert_close(v, m * teacher0[k] + (1 - m) * student[k], rtol=1e-6, atol=1e-7)
    assert not torch.equal(model.teacher.state_dict()["predictor.head.weight"], teacher0["predictor.head.weight"])


def test_ema_momentum_schedule():
    """m(e) = 0.999 + (e/100) * 0.0009 for e < 100, then 0.9999."""
    assert ema_momentum(0) == 0.999
    assert ema_momentum(50) == pytest.approx(0.99945, abs=1e-12)
    assert ema_momentum(99) == pytest.approx(0.999 + 0.99 * 0.0009, abs=1e-12)
    assert ema_momentum(100) == ema_momentum(150) == 0.9999
    values = [ema_momentum(e) for e in range(120)]
    assert all(a < b for a, b in zip(values[:100], values[1:101]))


# --- the MAE baseline and the config ---------------------------------------------------------------
def test_learning_loss_off_is_plain_mae():
    """learning_loss=False is MAE: no predictor, no teacher, random masks, only loss_rec."""
    model, x = tiny_hpm(learning_loss=False), images()
    assert model.predictor is None and model.teacher is None
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"encoder", "decoder_embed", "mask_token",
                                                                      "decoder"}
    assert model.num_hard(0.0) == model.num_hard(LATE) == model.num_hard(1.0) == 0
    torch.manual_seed(2)
    loss, stats = model(x, LATE)
    assert set(stats) == {"loss_rec"} and torch.equal(loss.detach(), stats["loss_rec"])
    torch.manual_seed(2)
    ref_rec, _ = mae_reference(model, x, mask_order(4, N, "cpu"))
    assert loss.item() == pytest.approx(ref_rec.item(), rel=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.update_teacher(0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_build_wires_config_and_towers_of_equal_depth():
    """build(cfg) gives the configured encoder and two separate towers of the decoder's depth."""
    cfg = training.parse_config(hpm.Config, [
        "--model", "vit_tiny", "--input_size", "32", "--patch_size", "4", "--decoder_dim", "32",
        "--decoder_depth", "2", "--decoder_heads", "2", "--mask_ratio", "0.6", "--epochs", "3", "--no-relative"])
    model = hpm.build(cfg)
    assert (model.encoder.embed_dim, len(model.encoder.blocks), model.encoder.num_patches) == (192, 12, 64)
    assert (model.num_visible, model.epochs, model.relative) == (int(64 * 0.4), 3, False)
    assert len(model.decoder.blocks) == len(model.predictor.blocks) == 2
    dec, pred = model.decoder.state_dict(), model.predictor.state_dict()
    assert {k: v.shape for k, v in dec.items()} == {k: v.shape for k, v in pred.items()}
    assert not {v.data_ptr() for v in dec.values()} & {v.data_ptr() for v in pred.values()}


def test_teacher_scores_are_deterministic_in_train_mode():
    """The EMA teacher stays in eval mode (no drop-path noise, no RNG use) while the student trains."""
    torch.manual_seed(0)
    m = HPM(common.VisionTransformer(32, 4, 32, 2, 2, drop_path=0.5), decoder_dim=32, decoder_depth=1,
            decoder_heads=2)
    m.train()
    x = torch.randn(4, 3, 32, 32)
    assert m.encoder.training and not m.teacher.training
    assert torch.equal(m.teacher_scores(x), m.teacher_scores(x))
