"""semaim.py: Semantic-Aware Autoregressive Image Modeling (Song, Zhang, Wang, AAAI 2024): SAIM's two-stream
autoregressive ViT over a permutation of patches, with a semantic order. Each step the current encoder embeds
the full image without gradient; the patch most cosine-similar to [CLS] is the semantic centre, and patches are
predicted outward by grid distance from it (ties at random). The content stream (the encoder) sees cls, the
earlier patches and itself; a query stream that starts from position embeddings only cross-attends to the
strictly earlier content and predicts Gaussian-blurred, per-patch normalised pixels of every patch (SemAIM*: a
frozen teacher's tokens, whose cls-patch similarity then also picks the centre).
Paper: arXiv 2312.10457.  Run: torchrun --nproc_per_node=8 semaim.py --data_path /imagenet/train
Shapes: B batch, N patches on a G x G grid, T = 1 + N tokens ([CLS] first), D width, P = patch*patch*3,
C teacher width (--target features).
To reuse: the model, semaim.py + common.py; the training program, + training.py; feature targets, + teachers.py."""
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import Block, patchify

try:  # the training program below needs training.py; the method section needs only common.py
    import training
    TrainConfig = training.TrainConfig
except ModuleNotFoundError:  # this file copied with common.py alone, to reuse the model: the program cannot run
    training, TrainConfig = None, object


# --- config ---------------------------------------------------------------------------------------
@dataclass
class Config(TrainConfig):
    output_dir: str = "./runs/semaim"  # checkpoint.pth, log.jsonl, config.json; rerun to resume
    model: str = "vit_base"  # encoder = content stream: vit_tiny ... vit_large (official README: aim_base)
    input_size: int = 224  # image side in pixels
    patch_size: int = 16  # patch side; the grid is input_size // patch_size
    drop_path: float = 0.0  # stochastic depth of both streams (official models_semaim.py: 0 in pretraining)
    query_depth: int = 12  # query-stream blocks, one after every depth // query_depth encoder blocks (official: 12)
    order: str = "semantic"  # semantic (SemAIM, upstream attention_center), stochastic (SAIM), raster (row-major)
    blur_kernel: int = 9  # side of the Gaussian blur of the pixel targets (none for features); 0: none (official: 9)
    blur_sigma: float = 1.0  # its standard deviation in pixels (official README: 1)
    norm_pix_loss: bool = True  # per-patch normalised pixel targets, unbiased var + 1e-6 (official README command: on)
    target: str = "pixels"  # pixels (SemAIM) or features: a --teacher's tokens, SemAIM* (upstream --predict_feature)
    teacher: str = ""  # for features: OpenAI's CLIP .pt, open_clip/DINO/timm state dict, our checkpoint.pth, or self
    clip_act: str = "quickgelu"  # a CLIP teacher's activation: quickgelu (OpenAI's) or gelu (open_clip GELU models)
    teacher_heads: int = 0  # teacher heads where its file states none; 0: from the file (docs/feature-targets.md)
    epochs: int = 800  # pretraining epochs (official README: 800; 400 also reported)
    warmup_epochs: int = 30  # linear lr warmup (official README)
    batch_size: int = 2048  # global batch, the paper's number (official README: 32 GPUs x 64)
    micro_batch: int = 64  # per-device batch (speed/memory only); if not given, the largest divisor of it up to this
    blr: float = 2e-4  # base lr; lr = blr * batch_size / 256 = 1.6e-3 (official README)
    min_lr: float = 0.0  # end of the cosine decay (upstream main_pretrain.py)
    weight_decay: float = 0.05  # AdamW, betas (0.9, 0.95); no decay on biases and norms (upstream main_pretrain.py)
    clip_grad: float = 3.0  # global grad-norm clip (official README command: 3.0); 0: none

    limits: ClassVar[dict] = {
        "input_size": "[1, 4096]", "patch_size": "[1, inf)", "drop_path": "[0, 1)", "query_depth": "[1, inf)",
        "blur_kernel": "[0, inf)", "blur_sigma": "(0, inf)", "warmup_epochs": "[0, 10000]", "blr": "(0, inf)",
        "min_lr": "[0, inf)", "weight_decay": "[0, inf)", "clip_grad": "[0, inf)", "teacher_heads": "[0, inf)"}
    presets: ClassVar[dict] = {
        # ViT-Tiny/4 at 32 px (8 x 8 grid), a query block after every encoder block as ViT-B; blur 9/1 kept
        # (it fades only a 1-2 pixel rim), everything else as the paper's recipe scaled to one GPU.
        "cifar10": dict(model="vit_tiny", input_size=32, patch_size=4, query_depth=12, epochs=100,
                        warmup_epochs=10, batch_size=512, micro_batch=256, num_workers=8,
                        output_dir="./runs/semaim_cifar10"),
    }


# --- method ---------------------------------------------------------------------------------------
ORDERS = ("semantic", "stochastic", "raster")


def order_scores(kind, batch, grid, device, centre=None):
    """Per-patch score, lower = predicted earlier (as upstream). semantic: squared grid distance to the centre
    (B,) plus U[0, 1): distances first, equidistant patches in uniformly random order; stochastic: U[0, 1)
    (SAIM); raster: the row-major index. -> (B, N) float64.
    NOTE(official): upstream scores sqrt(d^2) + 1e-3 U in fp32, where equidistant patches tie exactly in
    ~14 % of images (measured on upstream); integer d^2 + U in float64 orders the same way and never ties. Its `raster`
    is a 14-column snake; ours is plain row-major (upstream `zigzag`) and fits any grid."""
    N = grid * grid
    if kind == "raster":
        return torch.arange(N, device=device, dtype=torch.float64).expand(batch, N)
    noise = torch.rand(batch, N, device=device, dtype=torch.float64)
    if kind == "stochastic":
        return noise
    cell = torch.arange(N, device=device)
    d2 = (cell // grid - centre[:, None] // grid) ** 2 + (cell % grid - centre[:, None] % grid) ** 2  # (B, N)
    return d2 + noise  # noise < 1 never reorders different integer distances


def order_ranks(scores):
    """Position of every patch in the order (0 = predicted first), a bijection onto 0..N-1. (B, N)"""
    return scores.argsort(dim=1).argsort(dim=1)


def order_masks(rank):
    """Two-stream attention masks from ranks (as upstream), bool, True = may attend, (B, 1, T, T), T = 1 + N.
    content: patch i sees cls, itself and every earlier patch (k + 2 keys at order position k);
    query: cls and the strictly earlier patches (k + 1 keys). Both cls rows see cls only, and every row
    sees cls, so no row is empty. NOTE(official): upstream builds two fp32 additive -inf masks from the raw
    scores (tied scores see each other); ranks are tie-free and boolean masks take 1/4 of the memory."""
    r = F.pad(rank, (1, 0), value=-1)  # (B, T): cls ranks before every patch
    content = r[:, None, :] <= r[:, :, None]  # [b, i, j]: key j not after query i
    query = r[:, None, :] < r[:, :, None]
    query[:, :, 0] = True  # the cls row would be empty otherwise; its output is never used
    return content.unsqueeze(1), query.unsqueeze(1)


def gaussian_kernel(size, sigma):
    """size x size Gaussian, centre (size - 1) / 2, normalised to sum 1 (upstream GaussianConv2d, util/blocks.py)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) // 2
    k = torch.exp(-(x[:, None] ** 2 + x[None] ** 2) / (2 * sigma ** 2))
    return (k / k.sum()).float()


def pixel_targets(imgs, patch_size, kernel=None, norm_pix=True):
    """Blur each channel with zero padding (borders fade toward 0, as upstream), patchify, and
    normalise every patch by its mean and unbiased variance + 1e-6 (as upstream). (B, 3, H, W) -> (B, N, P) fp32."""
    imgs = imgs.float()
    if kernel is not None:
        imgs = F.conv2d(imgs, kernel.expand(3, 1, -1, -1), padding=kernel.shape[-1] // 2, groups=3)
    target = patchify(imgs, patch_size)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    return target


# Copied from teachers.py: feature_distance
def feature_distance(pred, target):
    """|pred/|pred| - target/|target||^2 summed over channels (= 2 - 2 cos), in fp32: the per-token loss of both
    papers' feature targets (HPM models_mae_learn_feature_loss.py, SemAIM models_semaim.py). (..., C) -> (...)"""
    return (F.normalize(pred.float(), dim=-1) - F.normalize(target.float(), dim=-1)).pow(2).sum(-1)


class CrossAttention(nn.Module):
    """Queries from the query stream, keys and values from the content stream of the same layer; three
    separate D x D projections with bias, as upstream (so xavier init treats each on its own)."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, g, h, attn_mask):
        """g, h: (B, T, D); attn_mask: bool (B, 1, T, T), True = may attend."""
        B, T, D = g.shape
        q, k, v = (lin(x).view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)
                   for lin, x in ((self.q, g), (self.k, h), (self.v, h)))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, T, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class QueryBlock(Block):
    """Query-stream block (as upstream): g <- g + Proj(MHA(LN1(g), LN1(h))); g <- g + MLP(LN2(g)). The same LN1
    normalises both streams; the stream never attends to itself. A Block subclass, so that
    training.compile_blocks compiles it too."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__(dim, num_heads, mlp_ratio, drop_path)
        self.attn = CrossAttention(dim, num_heads)

    def forward(self, g, h, attn_mask):
        g = g + self.drop_path(self.attn(self.norm1(g), self.norm1(h), attn_mask))
        return g + self.drop_path(self.mlp(self.norm2(g)))


class SemAIM(nn.Module):
    """Two-stream autoregressive image modeling in a semantic-aware (or stochastic, raster) order.
    `loss, stats = model(images, progress)`; progress is unused (no schedule belongs to the method).
    target="features" (SemAIM*): the targets are feature_teacher's tokens (a teachers.FrozenTeacher), or with
    feature_teacher=None the model's own no-grad unmasked tokens (upstream's `inference`)."""

    def __init__(self, encoder, query_depth=12, order="semantic", blur_kernel=9, blur_sigma=1.0,
                 norm_pix_loss=True, drop_path=0.0, target="pixels", feature_teacher=None):
        super().__init__()
        depth = len(encoder.blocks)
        if order not in ORDERS:
            raise ValueError(f"unknown order {order}; choose one of {', '.join(ORDERS)}")
        if not 0 < query_depth <= depth or depth % query_depth:
            raise ValueError(f"query_depth {query_depth} must divide the encoder depth {depth}")
        if target not in ("pixels", "features"):
            raise ValueError(f"unknown target {target}; choose pixels or features")
        self.encoder, self.order, self.norm_pix_loss, self.target = encoder, order, norm_pix_loss, target
        self.feature_teacher = feature_teacher  # holds no parameters: never trained, saved or re-initialised
        self.step = depth // query_depth  # a query block after every step-th encoder block (as upstream)
        D, heads = encoder.embed_dim, encoder.blocks[0].attn.num_heads
        rates = torch.linspace(0, drop_path, depth).tolist()[:query_depth]  # upstream's dpr[i] for query block i
        self.query_blocks = nn.ModuleList(QueryBlock(D, heads, drop_path=r) for r in rates)
        if target == "pixels":
            out = encoder.patch_size ** 2 * 3  # P
        else:  # NOTE(official): upstream hard-codes CLIP's 512 for clip, D otherwise; here the teacher's width C
            out = feature_teacher.embed_dim if feature_teacher is not None else D
        # Head = Linear(D, 4D)-GELU-Linear(4D, P or C) (upstream's MLP head), upstream's names.
        self.prediction_head = nn.Sequential(OrderedDict(
            fc1=nn.Linear(D, 4 * D), act=nn.GELU(), fc2=nn.Linear(4 * D, out)))
        # NOTE(official): upstream saves the blur kernel in the checkpoint; here it is a non-persistent buffer.
        # No blur for feature targets (as upstream).
        blur = blur_kernel > 0 and target == "pixels"
        kernel = gaussian_kernel(blur_kernel, blur_sigma)[None, None] if blur else None
        self.register_buffer("blur", kernel, persistent=False)  # (1, 1, k, k) or None
        common.init_mae_weights(self)  # xavier Linear incl. each of q/k/v, zero bias, LN (1, 0), cls N(0, .02)

    @torch.no_grad()
    def own_tokens(self, imgs):
        """The current encoder on the full image, no mask, no gradient, eval mode (drop-path off), final norm.
        NOTE(official): upstream runs this in fp32 outside autocast for the order (inside it for `inference`
        targets) and runs the last block twice (once only to read attention maps that the cls mode never uses);
        here one plain pass in the step's precision (fp32 on CPU). -> (B, T, D)"""
        training = self.encoder.training
        self.encoder.eval()
        z = self.encoder(imgs)
        self.encoder.train(training)
        return z

    @torch.no_grad()
    def semantic_centre(self, imgs, tokens=None):
        """The patch whose token is most cosine-similar to [CLS] (upstream's cls mode; its softmax, or min-max
        scaling for a teacher, does not move the arg-max), in `tokens` (a teacher's, (B, T, C)) or else in the
        current encoder's own unmasked pass. -> (B,) row-major patch index"""
        z = (tokens if tokens is not None else self.own_tokens(imgs)).float()  # (B, T, D or C)
        return F.cosine_similarity(z[:, :1], z[:, 1:], dim=-1).argmax(dim=1)

    def ranks(self, imgs, tokens=None):
        """Order position of every patch for this step, from the current weights or the teacher's tokens (as
        upstream). -> (B, N)"""
        centre = self.semantic_centre(imgs, tokens) if self.order == "semantic" else None
        scores = order_scores(self.order, imgs.shape[0], self.encoder.grid, imgs.device, centre)
        return order_ranks(scores)

    def teacher_tokens(self, imgs):
        """Feature targets of this step, (B, T, C), no gradient: the frozen teacher's tokens of the full image, or
        the model's own (upstream's `inference`); None for pixel targets."""
        if self.target == "pixels":
            return None
        return self.feature_teacher(imgs) if self.feature_teacher is not None else self.own_tokens(imgs)

    def predict(self, imgs, rank):
        """Both streams under the masks of `rank`; tokens stay in raster order (as upstream). -> (B, N, P)"""
        enc = self.encoder
        allow_content, allow_query = order_masks(rank)  # (B, 1, T, T) each
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(imgs.shape[0], -1, -1)
        h = torch.cat([cls, enc.embed_patches(imgs)], dim=1)  # (B, T, D) content stream
        g = enc.pos_embed.expand(imgs.shape[0], -1, -1)  # (B, T, D) query stream: fixed positions only
        for i, block in enumerate(enc.blocks):
            h = block(h, allow_content)
            if (i + 1) % self.step == 0:  # the query block reads this block's output (as upstream)
                g = self.query_blocks[i // self.step](g, h, allow_query)
        # The final norm is the encoder's (upstream's single `norm`): trained on the query stream only, used on
        # content features for the order and the linear probe. NOTE(official): upstream runs norm
        # and head on the cls slot too and then drops it; here it is dropped first (same predictions).
        return self.prediction_head(enc.norm(g[:, 1:]))  # (B, N, P)

    def forward(self, imgs, progress=None):
        tokens = self.teacher_tokens(imgs)  # (B, T, C) or None; a teacher's also set the order (upstream)
        rank = self.ranks(imgs, tokens)  # (B, N); before the masked pass, so its activations are freed first
        pred = self.predict(imgs, rank)  # (B, N, P or C)
        if tokens is not None:  # 2 - 2 cos per patch, every patch, equal weight (upstream forward_feature_loss)
            return feature_distance(pred, tokens[:, 1:]).mean(), order_stats(rank, self.encoder.grid)
        # NOTE(official): upstream blurs and normalises under fp16 autocast; here always fp32 (our precision
        # convention: pixel normalisation in fp32), so the targets do not depend on --dtype.
        with torch.no_grad(), torch.autocast(imgs.device.type, enabled=False):
            target = pixel_targets(imgs, self.encoder.patch_size, self.blur, self.norm_pix_loss)  # (B, N, P)
        loss = (pred.float() - target).pow(2).mean()  # every patch, the first too, equal weight (as upstream)
        return loss, order_stats(rank, self.encoder.grid)


@torch.no_grad()
def order_stats(rank, grid):
    """Diagnostics of the first patch of the order (the semantic centre): centre_dist, its mean Euclidean
    distance in cells from the image centre (uniformly random centres: ~0.38 G); centre_border, the share
    of centres on the outermost ring of patches (uniform: 4 (G - 1) / G^2)."""
    first = (rank == 0).float().argmax(dim=1)  # (B,)
    r, c, mid = first // grid, first % grid, (grid - 1) / 2
    dist = ((r - mid) ** 2 + (c - mid) ** 2).float().sqrt()
    border = (r == 0) | (c == 0) | (r == grid - 1) | (c == grid - 1)
    return {"centre_dist": dist.mean(), "centre_border": border.float().mean()}


def uniform_centre_dist(grid):
    """Reference for the centre_dist diagnostic: its mean over all cells of the grid."""
    mid = (grid - 1) / 2
    return sum(math.hypot(r - mid, c - mid) for r in range(grid) for c in range(grid)) / grid ** 2


# --- training -------------------------------------------------------------------------------------
def build(cfg):
    """The model of a config (used by main, bench.py and the tests)."""
    encoder = common.vit(cfg.model, cfg.input_size, cfg.patch_size, cfg.drop_path)
    if cfg.order not in ORDERS:
        common.fail(f"unknown --order {cfg.order}; choose one of {', '.join(ORDERS)}")
    if len(encoder.blocks) % cfg.query_depth:
        common.fail(f"--query_depth {cfg.query_depth} does not divide the {len(encoder.blocks)} blocks of "
                    f"{cfg.model}; pick a divisor such as {len(encoder.blocks)}")
    if cfg.blur_kernel > 0 and cfg.blur_kernel % 2 == 0:
        common.fail(f"--blur_kernel {cfg.blur_kernel}: the kernel needs an odd side; pass e.g. 9, or 0 for no blur")
    return SemAIM(encoder, query_depth=cfg.query_depth, order=cfg.order, blur_kernel=cfg.blur_kernel,
                  blur_sigma=cfg.blur_sigma, norm_pix_loss=cfg.norm_pix_loss, drop_path=cfg.drop_path,
                  target=cfg.target, feature_teacher=feature_teacher(cfg))


def feature_teacher(cfg):
    """The frozen teacher of --target features (None for pixels and for --teacher self: the model's own features)."""
    if cfg.teacher_heads and (cfg.target != "features" or cfg.teacher in ("", "self")):
        common.fail(f"--teacher_heads {cfg.teacher_heads} gives a teacher file's attention heads; it needs --target "
                    "features --teacher FILE: add them or drop it")
    if cfg.target == "pixels" and not cfg.teacher:
        return None
    teachers = training.optional("teachers", f"--target {cfg.target} --teacher {cfg.teacher}")  # pixels need none
    return teachers.target_teacher(cfg, self_ok=True)


def make_optimizer(model, cfg, steps_per_epoch):
    """MAE's AdamW and per-step lr (training.mae_optimizer); used by main and bench.py."""
    return training.mae_optimizer(model, cfg, steps_per_epoch)


def train_step(ddp, optimizer, micro_batches, progress, cfg, ctx):
    """One optimizer step (also timed by bench.py): the mean loss over the micro-batches, the global grad-norm
    clip (3, the official README command), AdamW. -> the step's stats."""
    model = training.unwrap(ddp)
    stats = training.forward_backward(ddp, micro_batches, progress, ctx)  # means over the micro-batches
    ctx.scaler.unscale_(optimizer)
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad or float("inf"))  # 0: off
    training.optimizer_step(optimizer, ctx)
    return stats


def main(cfg):
    ctx = training.setup(cfg)
    model = build(cfg).to(ctx.device)  # method-specific
    dataset = common.image_dataset(cfg.data_path, common.mae_transform(cfg.input_size), cfg.data_root)
    batches = training.Batches(dataset, cfg, ctx)
    steps_per_epoch, total_steps = batches.steps_per_epoch, cfg.epochs * batches.steps_per_epoch
    optimizer, schedule = make_optimizer(model, cfg, steps_per_epoch)
    start_epoch = training.resume(cfg, "semaim", model, optimizer, ctx)
    if cfg.compile:
        training.compile_blocks(model)  # encoder blocks and query blocks (QueryBlock is a Block)
    ddp = training.wrap_ddp(model, ctx)
    log = training.Logger(cfg, ctx, steps_per_epoch, start_epoch)
    log.run_line("semaim", model, batches, blr=cfg.blr)
    grid = model.encoder.grid  # method-specific
    log.info(f"semaim: {cfg.order} order over a {grid} x {grid} grid; {cfg.query_depth} query blocks, one "
             f"after every {model.step} encoder block(s); uniform centres would give centre_dist "
             f"{uniform_centre_dist(grid):.2f}, centre_border {4 * (grid - 1) / grid ** 2:.2f}")
    if cfg.target == "features":
        teacher = model.feature_teacher.name if model.feature_teacher is not None else "its own unmasked features"
        centres = " and semantic centres" if cfg.order == "semantic" else ""
        log.info(f"semaim: SemAIM*, targets{centres} from {cfg.teacher}: {teacher}")
    log.warmups(lr="warmup_epochs")

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        for it, micro_batches in enumerate(batches.epoch(epoch)):
            step = epoch * steps_per_epoch + it
            lr = schedule(step)
            stats = train_step(ddp, optimizer, micro_batches, step / total_steps, cfg, ctx)
            log.step(step, lr, stats)
        training.save_checkpoint(cfg, "semaim", model, optimizer, epoch + 1, ctx)
    log.close()
    return model


if __name__ == "__main__":
    if training is None:
        raise SystemExit("error: semaim.py's training program needs training.py beside it; copy it from the repository")
    main(training.parse_config(Config))
