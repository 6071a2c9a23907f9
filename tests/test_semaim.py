"""Tests of semaim.py: the invariants of SemAIM (arXiv 2312.10457) and its official code (models_semaim.py).
Tiny models only: 32 px images, patch 4 -> an 8 x 8 grid, N = 64 patches, T = 65 tokens, P = 48."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import training
from conftest import unpatchify
import semaim
from common import patchify
from semaim import SemAIM, gaussian_kernel, order_masks, order_ranks, order_scores, order_stats, pixel_targets

IMG, PATCH, G = 32, 4, 8
N, P = G * G, PATCH * PATCH * 3


def tiny_semaim(seed=0, depth=2, query_depth=2, img=IMG, **kw):
    torch.manual_seed(seed)
    encoder = common.VisionTransformer(img, PATCH, embed_dim=32, depth=depth, num_heads=2)
    return SemAIM(encoder, query_depth=query_depth, **kw)


def images(batch=4, seed=1, img=IMG):
    return torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(seed))


def grid_d2(centre, grid=G):
    """Squared grid distance of every patch to centre (B,), written out. -> (B, N)"""
    cell = torch.arange(grid * grid)
    return (cell // grid - centre[:, None] // grid) ** 2 + (cell % grid - centre[:, None] % grid) ** 2


def reference_predict(model, imgs, scores):
    """The forward written out as upstream computes it: fp32 additive -inf masks from raw scores (content s_j <= s_i,
    query s_j < s_i, cls row sees only cls, every row sees cls), explicit softmax attention, the query
    stream starting from the sin-cos table and cross-attending to the same layer's content output through
    the shared norm1, final norm + head on the query stream, cls slot dropped."""
    enc, B = model.encoder, imgs.shape[0]
    neg = torch.full((B, N, N), -math.inf)
    mask_h = torch.where(scores[:, :, None] < scores[:, None, :], neg, torch.zeros(B, N, N))
    mask_g = torch.where(scores[:, :, None] <= scores[:, None, :], neg, torch.zeros(B, N, N))

    def pad(m):
        m = torch.cat([torch.full((B, 1, N), -math.inf), m], 1)
        return torch.cat([torch.zeros(B, N + 1, 1), m], 2)[:, None]  # (B, 1, T, T)
    mask_h, mask_g = pad(mask_h), pad(mask_g)

    def attend(q, k, v, mask, heads):
        def split(t):
            return t.reshape(B, t.shape[1], heads, -1).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        a = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + mask
        return (a.softmax(-1) @ v).transpose(1, 2).reshape(B, -1, q.shape[1] * q.shape[-1])

    h = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(B, -1, -1),
                   enc.patch_embed(imgs) + enc.pos_embed[:, 1:]], 1)
    g = enc.pos_embed.expand(B, -1, -1)
    step = len(enc.blocks) // len(model.query_blocks)
    for i, blk in enumerate(enc.blocks):
        x = blk.norm1(h)
        q, k, v = blk.attn.qkv(x).chunk(3, dim=-1)
        h = h + blk.attn.proj(attend(q, k, v, mask_h, blk.attn.num_heads))
        h = h + blk.mlp(blk.norm2(h))
        if (i + 1) % step == 0:
            qb = model.query_blocks[i // step]
            a, c = qb.norm1(g), qb.norm1(h)
            g = g + qb.attn.proj(attend(qb.attn.q(a), qb.attn.k(c), qb.attn.v(c), mask_g, blk.attn.num_heads))
            g = g + qb.mlp(qb.norm2(g))
    return model.prediction_head(enc.norm(g))[:, 1:]


# --- the order -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", semaim.ORDERS)
@pytest.mark.parametrize("grid", [1, 3, 8, 14])
def test_order_is_a_bijection_for_any_grid(kind, grid):
    """Ranks are a permutation of 0..N-1 for every image, any grid size, every order."""
    B, n = 32, grid * grid
    centre = torch.randint(0, n, (B,))
    rank = order_ranks(order_scores(kind, B, grid, "cpu", centre))
    assert rank.shape == (B, n)
    assert torch.equal(rank.sort(1).values, torch.arange(n).expand(B, n))


def test_semantic_order_starts_at_the_cls_argmax_and_expands_by_distance():
    """The first patch is argmax_i cos(z_cls, z_i) of the unmasked normed features; d(i) < d(j)
    implies i before j; ties never happen: N distinct ranks."""
    model = tiny_semaim()
    x = images(8)
    with torch.no_grad():
        z = model.encoder(x)  # (B, T, D): no mask, final norm
        sim = F.normalize(z[:, 1:], dim=-1) @ F.normalize(z[:, 0], dim=-1)[..., None]  # (B, N, 1)
    centre = sim.squeeze(-1).argmax(1)
    rank = model.ranks(x)
    assert torch.equal((rank == 0).float().argmax(1), centre)
    d2 = grid_d2(centre)
    nearer = d2[:, :, None] < d2[:, None, :]  # [b, i, j]: i strictly nearer than j
    assert (rank[:, :, None] < rank[:, None, :])[nearer].all()


def test_equidistant_patches_come_in_uniformly_random_order():
    """Among the 4 neighbours at distance 1 of a fixed centre, each is first equally often."""
    torch.manual_seed(0)
    B, centre = 8000, 3 * G + 4
    rank = order_ranks(order_scores("semantic", B, G, "cpu", torch.full((B,), centre)))
    ring = torch.tensor([centre - G, centre - 1, centre + 1, centre + G])
    assert torch.equal(rank[:, centre], torch.zeros(B, dtype=torch.long))
    assert torch.equal(rank[:, ring].sort(1).values, torch.arange(1, 5).expand(B, 4))
    first = (rank[:, ring] == 1).float().mean(0)
    assert torch.allclose(first, torch.full((4,), 0.25), atol=0.03), first


def test_stochastic_order_is_a_uniform_permutation():
    """SAIM's order: all 4! orders of a 2 x 2 grid equally likely (chi-square, 23 dof)."""
    torch.manual_seed(0)
    B = 24000
    rank = order_ranks(order_scores("stochastic", B, 2, "cpu"))
    code = (rank * torch.tensor([1, 4, 16, 64])).sum(1)
    counts = torch.bincount(code, minlength=256).float()
    counts = counts[counts > 0]
    assert counts.numel() == 24
    chi2 = ((counts - B / 24) ** 2 / (B / 24)).sum()
    assert chi2 < 49.7  # 99.9th percentile of chi-square(23)


def test_raster_order_is_row_major():
    """Our `raster`: rank = raster index, the same for every image (upstream's `zigzag`)."""
    rank = order_ranks(order_scores("raster", 3, G, "cpu"))
    assert torch.equal(rank, torch.arange(N).expand(3, N))


def test_order_pass_builds_no_graph_uses_no_dropout_and_follows_the_current_weights():
    """No autograd graph; eval mode inside (drop-path would randomise it) with the mode restored;
    new weights give a new order."""
    model = tiny_semaim(drop_path=0.5)
    model.encoder.blocks[1].drop_path.p = 0.5  # common.vit would set these; here by hand
    model.train()
    x = images(8)
    centre = model.semantic_centre(x)
    assert not centre.requires_grad and centre.grad_fn is None
    assert model.training and model.encoder.training
    assert torch.equal(centre, model.semantic_centre(x))  # deterministic despite drop-path in train mode
    other = tiny_semaim(seed=5)
    assert not torch.equal(centre, other.semantic_centre(x))


def test_forward_recomputes_the_order_from_the_current_weights(monkeypatch):
    """Each forward calls the order pass (semantic) and skips it for stochastic/raster."""
    calls = []
    orig = SemAIM.semantic_centre
    monkeypatch.setattr(SemAIM, "semantic_centre", lambda self, x, t=None: calls.append(1) or orig(self, x, t))
    x = images(2)
    tiny_semaim()(x)
    tiny_semaim()(x)
    tiny_semaim(order="stochastic")(x)
    tiny_semaim(order="raster")(x)
    assert len(calls) == 2


# --- masks --------------------------------------------------------------------------------------------
def test_mask_rows_allow_k_plus_2_content_and_k_plus_1_query_keys():
    """Content row of the patch at order position k allows cls, the k earlier patches and
    itself; query row allows cls and the k earlier ones, not itself; cls rows only cls; every row cls."""
    torch.manual_seed(0)
    rank = order_ranks(order_scores("stochastic", 5, G, "cpu"))
    content, query = order_masks(rank)
    assert content.shape == query.shape == (5, 1, N + 1, N + 1) and content.dtype == torch.bool
    content, query = content[:, 0], query[:, 0]
    assert torch.equal(content[:, 1:].sum(-1), rank + 2)
    assert torch.equal(query[:, 1:].sum(-1), rank + 1)
    assert not query[:, 1:, 1:].diagonal(dim1=1, dim2=2).any()
    assert content[:, 1:, 1:].diagonal(dim1=1, dim2=2).all()
    for m in (content, query):
        assert m[:, :, 0].all()  # no empty row: SDPA never sees an all-False row
        assert not m[:, 0, 1:].any()
    earlier = rank[:, None, :] < rank[:, :, None]  # [b, i, j]: j before i
    assert torch.equal(query[:, 1:, 1:], earlier)
    assert torch.equal(content[:, 1:, 1:], earlier | torch.eye(N, dtype=torch.bool))


# --- the two streams --------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth,query_depth", [(2, 2), (4, 2)])
def test_forward_equals_the_written_out_two_stream_model(depth, query_depth):
    """The model against an explicit re-implementation with upstream's additive masks and attention (query
    block after every depth // query_depth encoder blocks)."""
    model = tiny_semaim(depth=depth, query_depth=query_depth)
    x = images(3)
    rank = model.ranks(x)
    with torch.no_grad():
        ours = model.predict(x, rank)
        ref = reference_predict(model, x, rank.float())
    assert ours.shape == (3, N, P)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_causality_prediction_k_ignores_patch_k_and_later():
    """With the order fixed, changing the patch at order position k leaves the predictions for
    positions 0..k bit-identical and changes every later one."""
    model = tiny_semaim()
    x = images(2)
    rank = model.ranks(x)
    k = 20
    y = patchify(x, PATCH)
    at_k = (rank == k).nonzero()[:, 1]  # (2,) the patch at position k of each image
    y[torch.arange(2), at_k] += torch.randn(2, P)
    x2 = unpatchify(y, PATCH)
    with torch.no_grad():
        a, b = model.predict(x, rank), model.predict(x2, rank)
    pos = rank  # (B, N): order position of each output
    same = (a == b).all(-1)  # (B, N)
    assert same[pos <= k].all()
    assert not same[pos > k].any()


def test_first_prediction_and_content_cls_do_not_depend_on_the_image():
    """The first patch's query sees only the content cls, which sees only itself."""
    model = tiny_semaim()
    x = images(2)
    rank = torch.stack([order_ranks(order_scores("stochastic", 1, G, "cpu"))[0]] * 2)  # one order, 2 images
    with torch.no_grad():
        pred = model.predict(x, rank)
        content, _ = order_masks(rank)
        h = model.encoder.forward_tokens(model.encoder.embed_patches(x), content)
    first = (rank[0] == 0).nonzero().item()
    assert torch.allclose(pred[0, first], pred[1, first], atol=1e-6, rtol=0)
    assert not torch.allclose(pred[0, rank[0] == 1], pred[1, rank[0] == 1])
    assert torch.allclose(h[0, 0], h[1, 0], atol=1e-6, rtol=0)


def test_first_prediction_is_a_constant_of_its_position():
    """Output i is raster patch i; the query stream starts from the fixed sin-cos table,
    so the first patch's prediction depends on where it is only, whatever the rest of the order."""
    model = tiny_semaim()
    x = images(3)
    scores = torch.rand(3, N)
    scores[:, 10] = -1  # patch 10 first in all three orders, the rest differs
    scores[2, 10], scores[2, 11] = 0.5, -1  # image 2: patch 11 first
    with torch.no_grad():
        pred = model.predict(x, order_ranks(scores))
    assert torch.allclose(pred[0, 10], pred[1, 10], atol=1e-6, rtol=0)
    assert not torch.allclose(pred[0, 10], pred[2, 11], atol=1e-3)


# --- targets and loss -----------------------------------------------------------------------------------
def test_blur_kernel_sums_to_one_and_is_upstreams_gaussian():
    """9 x 9, sigma 1, centre 4, normalised to 1."""
    k = gaussian_kernel(9, 1.0)
    assert k.shape == (9, 9) and torch.isclose(k.sum(), torch.tensor(1.0), atol=1e-6)
    pos = torch.stack(torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij"), -1).float()
    ref = torch.exp(-((pos - 4) ** 2).sum(-1) / 2)
    assert torch.allclose(k, ref / ref.sum(), atol=1e-7)
    assert k.argmax() == 40 and torch.equal(k, k.T) and torch.equal(k, k.flip(0))


def test_blur_keeps_a_constant_image_constant_inside_and_fades_the_border():
    """Zero padding: constant inside (>= 4 px from the border), corner ~0.49 x."""
    img = torch.full((1, 3, IMG, IMG), 2.0)
    k = gaussian_kernel(9, 1.0)[None, None]
    blurred = F.conv2d(img, k.expand(3, 1, -1, -1), padding=4, groups=3)
    assert torch.allclose(blurred[..., 4:-4, 4:-4], img[..., 4:-4, 4:-4], atol=1e-5)
    assert abs(blurred[0, 0, 0, 0].item() / 2.0 - 0.489) < 0.005
    target = pixel_targets(img, PATCH, k, norm_pix=False)
    assert torch.allclose(target, patchify(blurred, PATCH))


def test_targets_are_per_patch_normalised_with_unbiased_variance():
    """(t - mean) / sqrt(var_unbiased + 1e-6) over each patch's P values."""
    x = images(2)
    k = gaussian_kernel(9, 1.0)[None, None]
    t = pixel_targets(x, PATCH, k, norm_pix=True)
    raw = pixel_targets(x, PATCH, k, norm_pix=False)
    ref = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, unbiased=True, keepdim=True) + 1e-6) ** 0.5
    assert torch.allclose(t, ref, atol=1e-6)
    assert torch.allclose(t.mean(-1), torch.zeros(2, N), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(2, N), atol=1e-4)


def test_loss_is_the_mse_over_all_patches_and_near_one_at_init(monkeypatch):
    """~1-1.3 at initialisation with norm-pix targets; a zero prediction gives (P-1)/P; every patch,
    the first one too, weighs the same."""
    model = tiny_semaim()
    x = images(4)
    loss, _ = model(x, 0.0)
    assert 0.9 < loss.item() < 1.5
    target = pixel_targets(x, PATCH, model.blur, True)
    monkeypatch.setattr(model, "predict", lambda imgs, rank: torch.zeros(4, N, P))
    zero_loss, _ = model(x, 0.0)
    assert abs(zero_loss.item() - (P - 1) / P) < 1e-4  # less by var / (var + 1e-6)
    monkeypatch.setattr(model, "predict", lambda imgs, rank: target * 0.5)
    half_loss, _ = model(x, 0.0)
    assert torch.isclose(half_loss, (0.5 * target).pow(2).mean(), atol=1e-6)


def test_gradients_reach_query_blocks_head_and_encoder_but_not_the_position_embedding():
    """Every trainable parameter gets a gradient; the fixed position table gets none."""
    model = tiny_semaim()
    loss, _ = model(images(2), 0.0)
    loss.backward()
    assert model.encoder.pos_embed.grad is None and not model.encoder.pos_embed.requires_grad
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_forward_and_backward_on_cpu(monkeypatch):
    """The GPU path's precision (bf16 autocast) runs and stays finite; targets and loss in fp32."""
    model = tiny_semaim()
    x = images(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = model(x, 0.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    monkeypatch.setattr(model, "predict", lambda imgs, rank: torch.zeros(2, N, P))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zero_loss, _ = model(x, 0.0)
    target = pixel_targets(x, PATCH, model.blur, True)  # fp32, outside autocast
    assert torch.allclose(zero_loss, target.pow(2).mean(), atol=1e-7, rtol=0)  # bf16 blur would differ by ~1e-3


# --- stats, wiring, checkpoints ---------------------------------------------------------------------------
def test_order_stats_by_hand():
    """centre_dist / centre_border of the first patch: raster starts at the corner, (3.5^2 * 2)^0.5."""
    rank = order_ranks(order_scores("raster", 2, G, "cpu"))
    s = order_stats(rank, G)
    assert math.isclose(s["centre_dist"].item(), math.hypot(3.5, 3.5), rel_tol=1e-6)
    assert s["centre_border"].item() == 1.0
    centre = torch.tensor([3 * G + 3, 4 * G + 5])  # inner cells
    s = order_stats(order_ranks(order_scores("semantic", 2, G, "cpu", centre)), G)
    assert s["centre_border"].item() == 0.0
    assert math.isclose(s["centre_dist"].item(), (math.hypot(.5, .5) + math.hypot(.5, 1.5)) / 2, rel_tol=1e-6)
    assert abs(semaim.uniform_centre_dist(14) - 0.3826 * 14) < 0.3


@pytest.mark.parametrize("kind", semaim.ORDERS)
@pytest.mark.parametrize("img", [20, 36])
def test_every_order_trains_on_odd_grids(kind, img):
    """Orders are grid-generic (5 x 5, 9 x 9): finite loss, detached scalar stats."""
    model = tiny_semaim(order=kind, img=img)
    loss, stats = model(images(2, img=img), 0.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert set(stats) == {"centre_dist", "centre_border"}
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())


def test_a_few_steps_on_one_batch_lower_the_loss():
    model = tiny_semaim(order="raster")  # fixed order: the loss change is the fit only
    opt = training.adamw(model, 3e-3, 0.05)
    x = images(4)
    losses = []
    for _ in range(15):
        loss, _ = model(x, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # noise images: ~1.16 -> ~0.95 in 15 steps


def test_init_and_parameter_names():
    """Upstream's names (query_blocks.i.attn.{q,k,v,proj}, prediction_head.fc1/fc2), xavier on each
    of q/k/v, zero biases, fixed sin-cos PE; the blur kernel is not saved; the exported state holds the
    encoder at the top level and loads strictly into a plain ViT."""
    model = tiny_semaim()
    names = set(model.state_dict())
    assert {"query_blocks.1.attn.q.weight", "query_blocks.1.attn.v.bias", "prediction_head.fc2.weight",
            "encoder.norm.weight"} <= names
    assert not any("blur" in n or "query_blocks.0.attn.qkv" in n for n in names)
    w = model.query_blocks[0].attn.k.weight
    assert w.abs().max() <= math.sqrt(6 / 64) and w.abs().max() > 0.8 * math.sqrt(6 / 64)
    assert model.query_blocks[0].attn.q.bias.abs().sum() == 0
    assert torch.equal(model.encoder.pos_embed[0], common.sincos_pos_embed(32, G))
    state = training.export_state(model)
    vit = common.VisionTransformer(IMG, PATCH, embed_dim=32, depth=2, num_heads=2)
    vit.load_state_dict({k: state[k] for k in vit.state_dict()})
    for k, v in vit.state_dict().items():
        assert torch.equal(v, model.encoder.state_dict()[k])


def test_build_preset_and_bad_flags():
    cfg = training.parse_config(semaim.Config, ["--preset", "cifar10", "--query_depth", "6"])
    model = semaim.build(cfg)
    assert (model.encoder.grid, len(model.query_blocks), model.step, model.order) == (8, 6, 2, "semantic")
    default = training.parse_config(semaim.Config, [])
    assert (default.blr, default.batch_size, default.clip_grad, default.warmup_epochs, default.norm_pix_loss,
            default.blur_kernel, default.blur_sigma, default.order) == (2e-4, 2048, 3.0, 30, True, 9, 1.0, "semantic")
    for flags, word in ((["--query_depth", "5"], "--query_depth"), (["--order", "snake"], "--order"),
                        (["--blur_kernel", "8"], "--blur_kernel")):
        with pytest.raises(SystemExit) as e:
            semaim.build(training.parse_config(semaim.Config, ["--preset", "cifar10", *flags]))
        assert str(e.value).startswith("error: ") and word in str(e.value)
    assert semaim.build(training.parse_config(semaim.Config, ["--preset", "cifar10", "--blur_kernel", "0"])).blur is None
