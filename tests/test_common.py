"""Tests of common.py: timm-compatible ViT, MAE's position embedding and patch layout, schedules,
parameter groups, attention masks, state export/import."""
import json
import math
import socket

import numpy as np
import pytest
import torch

import common
import training
from conftest import cpu_context, unpatchify
import hpm


def timm_vit_keys(dim, depth, patch, grid, mlp_ratio=4):
    """State-dict names and shapes of timm's VisionTransformer(num_classes=0, global_pool='token'),
    from timm's naming rules."""
    hidden = dim * mlp_ratio
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim),
            "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                     b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                     b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                     b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                     b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
                     b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,)})
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return keys


def mae_2d_sincos(embed_dim, grid_size, cls_token):
    """MAE's util/pos_embed.get_2d_sincos_pos_embed, re-implemented in numpy (float64 frequencies)."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def tiny_hpm(seed=0):
    torch.manual_seed(seed)
    return hpm.HPM(common.VisionTransformer(32, 4, 32, 2, 2), decoder_dim=32, decoder_depth=1, decoder_heads=2)


# --- ViT ------------------------------------------------------------------------------------------
def test_vit_state_dict_has_timm_names_and_shapes():
    """The encoder's state dict uses timm's ViT names and shapes (loads into timm strictly)."""
    vit = common.VisionTransformer(32, 4, 64, 2, 4)
    assert {k: tuple(v.shape) for k, v in vit.state_dict().items()} == timm_vit_keys(64, 2, 4, 8)


def test_vit_sizes_and_parameter_count_match_timm():
    """vit_* widths/depths/heads as timm's vit_*_patch16_224; vit_tiny/16 has timm's 5,524,416 params."""
    assert common.VIT_SIZES == {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),
                                "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}
    vit = common.vit("vit_tiny", 224, 16)
    assert sum(p.numel() for p in vit.parameters()) == 5_524_416  # timm 1.0, num_classes=0


def test_vit_pos_embed_fixed_and_cls_row_zero():
    """The encoder's 2-D sin-cos embedding is fixed (no gradient) with a zero cls slot."""
    vit = common.VisionTransformer(32, 4, 64, 2, 4)
    assert not vit.pos_embed.requires_grad
    assert torch.equal(vit.pos_embed[0], common.sincos_pos_embed(64, 8))
    assert torch.count_nonzero(vit.pos_embed[0, 0]) == 0


@pytest.mark.parametrize("dim,grid", [(32, 4), (64, 8), (768, 14)])
def test_sincos_pos_embed_matches_mae_numpy(dim, grid):
    """Fixed 2-D sin-cos = MAE's get_2d_sincos_pos_embed (first half columns, sin then cos)."""
    ours = common.sincos_pos_embed(dim, grid)
    ref = torch.from_numpy(mae_2d_sincos(dim, grid, cls_token=True)).float()
    assert ours.shape == (1 + grid * grid, dim) and ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    assert torch.count_nonzero(ours[0]) == 0
    no_cls = common.sincos_pos_embed(dim, grid, cls_token=False)
    assert torch.equal(no_cls, ours[1:])


def test_attention_bool_mask_true_means_may_attend():
    """Attention's boolean attn_mask (True = may attend) = softmax with -inf on masked keys."""
    torch.manual_seed(0)
    attn = common.Attention(16, 4)
    B, T, H, dh = 2, 7, 4, 4
    x = torch.randn(B, T, 16)
    allowed = torch.rand(B, 1, T, T) < 0.5
    allowed |= torch.eye(T, dtype=torch.bool)  # every query may attend to itself

    def explicit(mask):
        q, k, v = attn.qkv(x).view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) / math.sqrt(dh)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        out = logits.softmax(-1) @ v  # (B, H, T, dh)
        return attn.proj(out.transpose(1, 2).reshape(B, T, 16))
    with torch.no_grad():
        assert torch.allclose(attn(x, allowed), explicit(allowed), atol=1e-5)
        assert torch.allclose(attn(x), explicit(None), atol=1e-5)
        assert not torch.allclose(attn(x, allowed), attn(x), atol=1e-3)  # the mask matters


# --- patches --------------------------------------------------------------------------------------
def test_patchify_unpatchify_round_trip():
    """patchify is exactly inverted by MAE's unpatchify layout (and vice versa) for a square grid."""
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32)
    patches = common.patchify(imgs, 4)
    assert patches.shape == (2, 64, 48)
    assert torch.equal(unpatchify(patches, 4), imgs)
    other = torch.randn(2, 64, 48)
    assert torch.equal(common.patchify(unpatchify(other, 4), 4), other)


def test_patchify_layout_is_raster_patches_of_row_col_channel():
    """Patch k = (row k // g, col k % g), its values laid out (row, col, channel) as MAE."""
    torch.manual_seed(0)
    p, g = 4, 8
    imgs = torch.randn(2, 3, p * g, p * g)
    patches = common.patchify(imgs, p)
    for k in (0, 1, g, 27, g * g - 1):
        r, c = divmod(k, g)
        assert torch.equal(patches[:, k, :3], imgs[:, :, r * p, c * p])  # first values: top-left pixel
        for i in range(p):
            for j in range(p):
                start = (i * p + j) * 3
                assert torch.equal(patches[:, k, start:start + 3], imgs[:, :, r * p + i, c * p + j])


def test_gather_tokens_picks_rows():
    """gather_tokens(x, ids)[b, k] = x[b, ids[b, k]]."""
    torch.manual_seed(0)
    x, ids = torch.randn(3, 10, 5), torch.randint(0, 10, (3, 4))
    expected = torch.stack([x[b, ids[b]] for b in range(3)])
    assert torch.equal(common.gather_tokens(x, ids), expected)


# --- optimisation ---------------------------------------------------------------------------------
def test_cosine_schedule_warmup_then_half_cosine():
    """Linear warmup from 0 to base, then half-cosine to final; midpoint = (base + final) / 2."""
    base, final, total, warm = 1.0, 0.1, 110, 10
    s = training.cosine_schedule(base, final, total, warm)
    assert s.shape == (total,) and s[0] == 0
    assert np.allclose(s[:warm], base * np.arange(warm) / warm)
    assert s[warm] == pytest.approx(base)
    assert np.all(np.diff(s[warm:]) <= 0)
    assert s[warm + (total - warm) // 2] == pytest.approx((base + final) / 2)
    assert abs(s[-1] - final) < 1e-3 and s[-1] >= final
    assert training.cosine_schedule(base, final, 50)[0] == base  # no warmup: starts at base (DINO)


def test_cosine_schedule_is_maes_per_iteration_rule():
    """Per iteration on the fractional epoch, as MAE's util/lr_sched.adjust_learning_rate."""
    lr, min_lr, epochs, warmup, steps = 2e-3, 1e-5, 10, 2, 7
    s = training.cosine_schedule(lr, min_lr, epochs * steps, warmup * steps)
    for step in range(epochs * steps):
        epoch = step / steps
        if epoch < warmup:
            expected = lr * epoch / warmup
        else:
            expected = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))
        assert s[step] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_param_groups_decay_iff_matrix_and_trainable():
    """Weight decay exactly on trainable params with ndim >= 2; frozen ones left out."""
    model = tiny_hpm()
    decay, no_decay = training.param_groups(model, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    params = list(model.parameters())
    assert ids(decay["params"]) == ids(p for p in params if p.requires_grad and p.ndim >= 2)
    assert ids(no_decay["params"]) == ids(p for p in params if p.requires_grad and p.ndim < 2)
    frozen = ids(p for p in params if not p.requires_grad)
    assert id(model.encoder.pos_embed) in frozen and ids(model.teacher.parameters()) <= frozen
    assert id(model.encoder.cls_token) in ids(decay["params"]) and id(model.mask_token) in ids(decay["params"])
    assert id(model.encoder.blocks[0].attn.qkv.bias) in ids(no_decay["params"])


# --- checkpoints ----------------------------------------------------------------------------------
def test_export_import_state_round_trip():
    """Exported keys drop the 'encoder.' prefix (timm's names at the top level) and
    import_state restores the model exactly."""
    model = tiny_hpm(seed=0)
    state = training.export_state(model)
    assert not any(k.startswith("encoder.") for k in state)
    expected = timm_vit_keys(32, 2, 4, 8)
    assert set(expected) <= set(state)
    enc = model.encoder.state_dict()
    assert all(torch.equal(state[k], enc[k]) for k in expected)
    assert set(state) - set(expected) == {k for k in model.state_dict() if not k.startswith("encoder.")}
    other = tiny_hpm(seed=1)
    assert not torch.equal(other.encoder.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)
    training.import_state(other, state)
    mine, theirs = model.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_import_state_mismatch_is_one_line_error():
    """Weights that do not fit stop with `error: ...; ...`, not a traceback."""
    state = training.export_state(tiny_hpm())
    state.pop("norm.weight")
    state["pos_embed"] = torch.zeros(1, 5, 32)
    for i in range(10):
        state[f"extra.{i}"] = torch.zeros(1)
    with pytest.raises(SystemExit) as e:
        training.import_state(tiny_hpm(), state)
    message = str(e.value)
    assert message.startswith("error: the checkpoint's weights do not fit this model: 1 missing (norm.weight); "
                              "10 unexpected (extra.0, extra.1, extra.2, ...); 1 of another shape (pos_embed (1, 5, 32) "
                              "here (1, 65, 32)); resume")
    assert "\n" not in message and len(message) < 400


def test_checkpoint_save_load_round_trip(tmp_path):
    """checkpoint.pth holds method, model, optimizer, next epoch; loads with weights_only."""
    model = tiny_hpm()
    optimizer = training.adamw(model, 1e-3, 0.05)
    path = str(tmp_path / "checkpoint.pth")
    training.save_checkpoint(hpm.Config(output_dir=str(tmp_path)), "hpm", model, optimizer, 3, cpu_context())
    ckpt = training.load_checkpoint(path, "hpm")
    assert ckpt["epoch"] == 3 and ckpt["config"]["epochs"] == hpm.Config().epochs
    assert ckpt["model"].keys() == training.export_state(model).keys()
    with pytest.raises(SystemExit, match="written by hpm.py, not mae.py"):
        training.load_checkpoint(path, "mae")


def test_collectives_are_noops_without_a_process_group():
    """A single process (no torchrun) has no process group: all_reduce_mean returns its input's values."""
    x = torch.tensor([1.0, 2.0])
    assert not training.distributed()
    assert torch.equal(training.all_reduce_mean(x), x)


# --- the logged numbers: means over micro-batches, steps and ranks ----------------------------------
class Echo(torch.nn.Module):
    """loss = w * batch (w = 1), so the loss of a micro-batch is its value and d loss / d w too."""
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, batch, progress):
        loss = self.w * batch
        return loss, {"double": 2 * batch}


def test_step_stats_and_gradients_are_means_over_micro_batches():
    """Two micro-batches with losses 1 and 3: the step's loss (and every stat) is their mean 2, not the last
    micro-batch's 3; the gradient is that of the mean loss."""
    model = Echo()
    stats = training.forward_backward(model, [torch.tensor(1.0), torch.tensor(3.0)], 0.0, cpu_context())
    assert stats["loss"].item() == 2.0 and stats["double"].item() == 4.0
    assert model.w.grad.item() == 2.0


def test_logger_logs_the_first_step_then_window_means(tmp_path):
    """log_every 2 over 3 steps: a record at step 0 (the first step is always logged), then at step 2 the mean of
    steps 1 and 2; log.jsonl holds exactly those; a restart at epoch 1 drops the records it will write again."""
    cfg = training.TrainConfig(output_dir=str(tmp_path), epochs=2, log_every=2, batch_size=4)
    log = training.Logger(cfg, cpu_context(), steps_per_epoch=3, start_epoch=0)
    for step, loss in enumerate([2.0, 4.0, 6.0, 8.0]):
        log.step(step, 0.1, {"loss": torch.tensor(loss)})
    log.close()
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [(r["step"], r["epoch"], r["loss"]) for r in records] == [(0, 0, 2.0), (2, 0, 5.0)]
    training.Logger(cfg, cpu_context(), steps_per_epoch=3, start_epoch=0).close()  # a fresh start over an old log
    assert (tmp_path / "log.jsonl").read_text() == ""


def _log_on_two_ranks(rank, path, port):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = training.Context(rank, 2, torch.device("cpu"), torch.float32, torch.amp.GradScaler("cpu", enabled=False))
    cfg = training.TrainConfig(output_dir=path, epochs=1, log_every=1, batch_size=4)
    log = training.Logger(cfg, ctx, steps_per_epoch=1, start_epoch=0)
    log.step(0, 0.1, {"loss": torch.tensor(float(rank + 1)), "acc": torch.tensor(float(10 * rank))})
    log.close()
    torch.distributed.destroy_process_group()


def test_logged_values_are_averaged_over_ranks(tmp_path):
    """Two processes with losses 1 and 2: rank 0 logs 1.5 (an all-reduce at log time), not its own 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_log_on_two_ranks, args=(str(tmp_path), port), nprocs=2)
    (record,) = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert record["loss"] == 1.5 and record["acc"] == 5.0
