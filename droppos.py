"""droppos.py: DropPos (Wang et al., NeurIPS 2023): pre-train a ViT by reconstructing dropped positions.
MAE-style masking keeps 25% of the patches; 75% of those get one shared learnable token in place of their
position embedding, and a decoder without position embeddings classifies every visible token over all N
grid positions. Targets are Gaussian-smoothed over the grid with a width that decays to 0, and each
token's loss is weighted by its similarity to [CLS] in a gradient-free pass over the full image.
Paper: arXiv 2309.03576.  Run: torchrun --nproc_per_node=8 droppos.py --data_path /imagenet/train
Shapes: B batch, N patches on a G x G grid, K visible, D encoder width, Dd decoder width.
To reuse: the model, droppos.py + common.py; the training program, + training.py."""
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import Block, gather_tokens

try:  # the training program below needs training.py; the method section needs only common.py
    import training
    TrainConfig = training.TrainConfig
except ModuleNotFoundError:  # this file copied with common.py alone, to reuse the model: the program cannot run
    training, TrainConfig = None, object


# --- config ---------------------------------------------------------------------------------------
@dataclass
class Config(TrainConfig):
    output_dir: str = "./runs/droppos"  # checkpoint.pth, log.jsonl, config.json; rerun to resume
    model: str = "vit_base"  # encoder: vit_tiny, vit_small, vit_base, vit_large (paper: ViT-B/16, ViT-L/16)
    input_size: int = 224  # image side in pixels
    patch_size: int = 16  # patch side; the grid is input_size // patch_size
    drop_path: float = 0.0  # stochastic depth of the encoder (keep 0: it would make the similarity pass random)
    decoder_dim: int = 512  # width of the position decoder (official models_DropPos_mae.py: 512)
    decoder_depth: int = 2  # blocks in the position decoder (the released scripts' dec512d2b)
    decoder_heads: int = 16  # attention heads in the decoder (official models_DropPos_mae.py: 16)
    mask_ratio: float = 0.75  # gamma, share of masked patches (scripts: 0.75, 49 of 196 visible)
    pos_mask_ratio: float = 0.75  # rho, share of visible patches whose PE is dropped (scripts: 0.75, 37 of 49)
    sigma: float = 1.0  # sigma0 of position smoothing (upstream --label_smoothing_sigma; scripts: 1)
    sigma_decay: bool = True  # sigma = sigma0 * (1 - epoch / epochs), set per epoch (scripts: on; engine_pretrain.py)
    attn_guide: bool = True  # attentive reconstruction: weight tokens by cls similarity (scripts: on)
    official_smoothing: bool = False  # upstream's released map (engine_pretrain.py): column-normalised, patch_size grid
    epochs: int = 800  # pretraining epochs (scripts: 800; the paper also reports 200)
    warmup_epochs: int = 10  # linear lr warmup (scripts: 10 for ViT-B, 40 for ViT-L)
    batch_size: int = 4096  # global batch: the paper's 64 GPUs x the scripts' 64 per GPU
    micro_batch: int = 64  # per-device batch (speed/memory only); if not given, the largest divisor of it up to this
    blr: float = 1.5e-4  # base lr; lr = blr * batch_size / 256 (scripts, upstream main_pretrain.py)
    min_lr: float = 0.0  # end of the cosine decay (upstream main_pretrain.py)
    weight_decay: float = 0.05  # AdamW, betas (0.9, 0.95); no decay on biases and norms (upstream main_pretrain.py)
    clip_grad: float = 5.0  # clip each parameter's gradient norm on its own, DINO-style (upstream utils.py); 0: off

    limits: ClassVar[dict] = {
        "input_size": "[1, 4096]", "patch_size": "[1, inf)", "drop_path": "[0, 1)", "decoder_dim": "[1, inf)",
        "decoder_depth": "[1, inf)", "decoder_heads": "[1, inf)", "mask_ratio": "(0, 1)", "pos_mask_ratio": "(0, 1)",
        "sigma": "[0, inf)", "warmup_epochs": "[0, 10000]", "blr": "(0, inf)", "min_lr": "[0, inf)",
        "weight_decay": "[0, inf)", "clip_grad": "[0, inf)"}
    presets: ClassVar[dict] = {
        # ViT-Tiny/4 at 32 px (8 x 8 grid: 16 visible, 4 keep their PE, 12 dropped), every ratio, sigma0
        # and tau as upstream (the small-scale setting itself is our choice).
        "cifar10": dict(model="vit_tiny", input_size=32, patch_size=4, decoder_dim=128, decoder_depth=2,
                        decoder_heads=4, epochs=100, warmup_epochs=10, batch_size=512, micro_batch=256,
                        num_workers=8, output_dir="./runs/droppos_cifar10"),
    }


# --- method ---------------------------------------------------------------------------------------
def random_masks(batch, num_patches, num_visible, num_keep_pos, device):
    """Patch mask, then PE drop (as upstream models_DropPos_mae.py), each from its own uniform noise and argsort.
    -> ids_keep (B, K): the visible patches' row-major indices, in a random order that carries no
    position; drop (B, K) bool: True where the token's PE is replaced by the mask token (K - num_keep_pos
    per image, a uniformly random subset of the visible tokens, independent of the patch mask)."""
    ids_keep = torch.rand(batch, num_patches, device=device).argsort(dim=1)[:, :num_visible]  # (B, K)
    ids_pos = torch.rand(batch, num_visible, device=device).argsort(dim=1)  # (B, K)
    drop = torch.ones(batch, num_visible, dtype=torch.bool, device=device)
    return ids_keep, drop.scatter_(1, ids_pos[:, :num_keep_pos], False)


def smoothing_map(grid, sigma, device=None, map_grid=0, column_norm=False):
    """Soft position targets S (N, N), N = grid**2: row i is the target of a token whose true cell is i.
    W[i, j] = exp(-((r_i - r_j)^2 + (c_i - c_j)^2) / sigma^2) with cell i = (i // n, i % n) on an n x n
    grid, n = map_grid or grid: the squared distance over sigma^2, as the official engine_pretrain.py.
    Each row is normalised to sum to 1, the paper's distribution w*. sigma = 0 is the identity.
    NOTE(official): upstream divides W by its row sums broadcast along the last axis, which normalises
    the columns (W is symmetric); rows then sum to 0.886..1.110 at sigma = 1: column_norm=True.
    NOTE(official): upstream builds the map on an (input_size // G)-grid, 16 x 16 at 224/16, and uses its
    first N rows and columns, so the smoothing mass lands on the wrong neighbours (engine_pretrain.py): map_grid=16.
    With column_norm the sums run over the whole n*n map, as upstream's."""
    n, N = map_grid or grid, grid * grid
    if n < grid:
        raise ValueError(f"a {n} x {n} smoothing map cannot index a {grid} x {grid} grid")
    if sigma == 0:
        return torch.eye(N, device=device)  # one-hot targets (exp(-d/0) would give 0/0 on the diagonal)
    cell = torch.arange(n * n, device=device)
    rows, cols = cell // n, cell % n
    dist2 = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2  # (n*n, n*n)
    w = torch.exp(-dist2.double() / sigma ** 2)  # float64 like upstream's math.exp; tiny sigma -> exact I
    s = w[:N, :N] / (w.sum(-1)[:N] if column_norm else w[:N, :N].sum(-1, keepdim=True))
    return s.float()  # (N, N)


def position_loss(logits, targets, weights):
    """Soft-target cross-entropy per token, weighted mean over the batch (as upstream):
    L = sum_bk w_bk CE_bk / sum_bk w_bk,  CE_bk = -sum_j targets_bkj log_softmax(logits_bk)_j.
    logits, targets (B, K, N); weights (B, K), zero for the tokens that kept their PE."""
    ce = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)  # (B, K)
    return (weights * ce).sum() / weights.sum()


@torch.no_grad()
def position_errors(logits, labels, grid):
    """Per token: the argmax cell (row-major), its L2 distance in cells from the true cell, and whether it is the
    true cell or one of its 8 neighbours. logits (B, K, N), labels (B, K) row-major cells -> (B, K) each."""
    pred = logits.argmax(-1)  # (B, K)
    dr, dc = (pred // grid - labels // grid).float(), (pred % grid - labels % grid).float()
    return pred, (dr ** 2 + dc ** 2).sqrt(), (dr.abs() <= 1) & (dc.abs() <= 1)


@torch.no_grad()
def position_metrics(logits, labels, drop, weights, grid):
    """Diagnostics of the argmax cell on the PE-dropped tokens, as detached scalars:
    acc_dropped (unweighted top-1), acc_weighted (upstream's acc1: weighted like the loss), grid_err
    (mean L2 distance in cells from the true cell), acc_within1 (argmax is the true cell or one of its 8
    neighbours). logits (B, K, N), labels (B, K) row-major cells, drop (B, K) bool, weights (B, K)."""
    pred, dist, near = position_errors(logits, labels, grid)  # (B, K) each
    d = drop.float()
    hit = (pred == labels).float()
    n = d.sum()
    return {"acc_dropped": (hit * d).sum() / n, "acc_weighted": (hit * weights).sum() / weights.sum(),
            "grid_err": (dist * d).sum() / n, "acc_within1": (near.float() * d).sum() / n}


class DropPos(nn.Module):
    """An encoder whose visible tokens partly lose their position, and a position decoder that puts them
    back. `loss, stats = model(images, progress)`."""

    def __init__(self, encoder, decoder_dim=512, decoder_depth=2, decoder_heads=16, mask_ratio=0.75,
                 pos_mask_ratio=0.75, sigma=1.0, sigma_decay=True, attn_guide=True, epochs=800,
                 official_smoothing=False, tau=0.1):
        super().__init__()
        self.encoder, N = encoder, encoder.num_patches
        self.num_visible = int(N * (1 - mask_ratio))  # K, as the official int(L * (1 - r))
        self.num_keep_pos = int(self.num_visible * (1 - pos_mask_ratio))  # int(12.25) = 12 of 49 keep their PE
        if self.num_keep_pos >= self.num_visible:
            raise ValueError(f"pos_mask_ratio {pos_mask_ratio} drops no position embedding; nothing to learn")
        self.sigma0, self.sigma_decay, self.attn_guide, self.epochs = sigma, sigma_decay, attn_guide, epochs
        self.tau = tau  # temperature of the cls-similarity softmax, hard-coded upstream (models_DropPos_mae.py)
        # Upstream as released: columns normalised, the map on an (input_size // G) = patch_size grid.
        self.column_norm = official_smoothing
        self.map_grid = encoder.patch_size if official_smoothing else encoder.grid
        if self.map_grid < encoder.grid:
            raise ValueError(f"official_smoothing needs patch_size >= grid ({encoder.patch_size} < {encoder.grid})")
        # The one shared token added in place of a dropped PE (as upstream), same vector for every token and image.
        self.mask_pos_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        # Position decoder: visible tokens only, no position embedding at all (as upstream); upstream's names.
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, N)  # logits over all N grid cells
        common.init_mae_weights(self)
        nn.init.normal_(self.mask_pos_token, std=0.02)

    def sigma(self, progress):
        """sigma_e = sigma0 * (1 - e / E), constant within epoch e (same float expression as the
        official engine_pretrain.py). Never 0 while training: the last epoch has sigma0 / E."""
        if not self.sigma_decay:
            return self.sigma0
        return (1 - common.epoch_at(progress, self.epochs) / float(self.epochs)) * self.sigma0

    @torch.no_grad()
    def attention_weights(self, imgs, ids_keep):
        """Attentive reconstruction (as upstream): the current encoder on the full image with all true PEs,
        a_j = softmax_j(cos(z_cls, z_j) / tau) over all N patches, gathered at the visible tokens and
        renormalised to sum to 1 per image. No gradient. -> (B, K)"""
        z = self.encoder(imgs).float()  # (B, 1 + N, D), after the final norm
        sim = F.cosine_similarity(z[:, :1], z[:, 1:], dim=-1)  # (B, N)
        a = torch.softmax(sim / self.tau, dim=-1).gather(1, ids_keep)  # (B, K)
        return a / a.sum(1, keepdim=True)

    def position_logits(self, imgs, ids_keep, drop):
        """Encoder on [CLS] + the K visible tokens, K_keep of them with their true PE and the others with
        mask_pos_token (as upstream); decoder without PE. -> logits (B, K, N) in the order of ids_keep."""
        enc = self.encoder
        x = gather_tokens(enc.patch_embed(imgs), ids_keep)  # (B, K, D), no PE yet
        pos = enc.pos_embed[0, 1:][ids_keep]  # (B, K, D); the table has requires_grad=False: no gradient
        # NOTE(official): upstream concatenates a [B, B*K_drop, D] block of mask tokens (sized with .item()
        # over the whole batch) and gathers it back into place; a `where` is the same sum (models_DropPos_mae.py).
        x = x + torch.where(drop.unsqueeze(-1), self.mask_pos_token, pos)
        latent = enc.forward_tokens(x)  # (B, 1 + K, D): [CLS] + PE row 0 (zeros) prepended, final norm
        h = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        for block in self.decoder_blocks:
            h = block(h)
        return self.decoder_pred(self.decoder_norm(h)[:, 1:])  # (B, K, N); the [CLS] output is dropped

    def forward(self, imgs, progress):
        B, grid = imgs.shape[0], self.encoder.grid
        ids_keep, drop = random_masks(B, self.encoder.num_patches, self.num_visible, self.num_keep_pos,
                                      imgs.device)
        weights = drop.float()  # (B, K): the loss is on PE-dropped tokens only (as upstream)
        if self.attn_guide:  # before the masked pass: its activations are freed before any are stored
            weights = weights * self.attention_weights(imgs, ids_keep)
        logits = self.position_logits(imgs, ids_keep, drop)  # (B, K, N)
        sigma = self.sigma(progress)
        # Labels are the visible patches' own row-major indices (as upstream): target rows of the map.
        targets = smoothing_map(grid, sigma, imgs.device, self.map_grid, self.column_norm)[ids_keep]  # (B, K, N)
        loss = position_loss(logits, targets, weights)
        stats = position_metrics(logits.detach(), ids_keep, drop, weights, grid)
        stats["sigma"] = torch.full((), sigma, device=imgs.device)
        return loss, stats


# --- training -------------------------------------------------------------------------------------
def build(cfg):
    """The model of a config (used by main, bench.py and the tests)."""
    encoder = common.vit(cfg.model, cfg.input_size, cfg.patch_size, cfg.drop_path)
    num_visible = int(encoder.num_patches * (1 - cfg.mask_ratio))
    if num_visible < 1 or int(num_visible * (1 - cfg.pos_mask_ratio)) >= num_visible:
        common.fail(f"--mask_ratio {cfg.mask_ratio} --pos_mask_ratio {cfg.pos_mask_ratio} leave {num_visible} visible "
                    f"patches of {encoder.num_patches}, none without its position; lower the ratios (paper: 0.75, 0.75)")
    if cfg.official_smoothing and cfg.patch_size < encoder.grid:
        common.fail(f"--official_smoothing builds upstream's {cfg.patch_size} x {cfg.patch_size} map, too small for "
                    f"the {encoder.grid} x {encoder.grid} grid (upstream crashes too); drop the flag")
    return DropPos(encoder, decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                   decoder_heads=cfg.decoder_heads, mask_ratio=cfg.mask_ratio, pos_mask_ratio=cfg.pos_mask_ratio,
                   sigma=cfg.sigma, sigma_decay=cfg.sigma_decay, attn_guide=cfg.attn_guide, epochs=cfg.epochs,
                   official_smoothing=cfg.official_smoothing)


def make_optimizer(model, cfg, steps_per_epoch):
    """MAE's AdamW and per-step lr (training.mae_optimizer); used by main and bench.py."""
    return training.mae_optimizer(model, cfg, steps_per_epoch)


def train_step(ddp, optimizer, micro_batches, progress, cfg, ctx):
    """One optimizer step (also timed by bench.py): the mean loss over the micro-batches, DINO-style clipping of
    each parameter's gradient on its own, AdamW. -> the step's stats."""
    model = training.unwrap(ddp)
    stats = training.forward_backward(ddp, micro_batches, progress, ctx)  # means over the micro-batches
    ctx.scaler.unscale_(optimizer)
    stats["grad_norm"] = training.clip_per_tensor(model.parameters(), cfg.clip_grad)  # method-specific
    training.optimizer_step(optimizer, ctx)
    return stats


def main(cfg):
    ctx = training.setup(cfg)
    model = build(cfg).to(ctx.device)  # method-specific
    dataset = common.image_dataset(cfg.data_path, common.mae_transform(cfg.input_size), cfg.data_root)
    batches = training.Batches(dataset, cfg, ctx)
    steps_per_epoch, total_steps = batches.steps_per_epoch, cfg.epochs * batches.steps_per_epoch
    optimizer, schedule = make_optimizer(model, cfg, steps_per_epoch)
    start_epoch = training.resume(cfg, "droppos", model, optimizer, ctx)
    if cfg.compile:
        training.compile_blocks(model)
    ddp = training.wrap_ddp(model, ctx)
    log = training.Logger(cfg, ctx, steps_per_epoch, start_epoch)
    log.run_line("droppos", model, batches, blr=cfg.blr)
    log.info(f"droppos: {model.num_visible} of {model.encoder.num_patches} patches visible, "  # method-specific
             f"{model.num_visible - model.num_keep_pos} of them without their position")
    log.warmups(lr="warmup_epochs")

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        for it, micro_batches in enumerate(batches.epoch(epoch)):
            step = epoch * steps_per_epoch + it
            lr = schedule(step)
            stats = train_step(ddp, optimizer, micro_batches, step / total_steps, cfg, ctx)
            log.step(step, lr, stats)
        training.save_checkpoint(cfg, "droppos", model, optimizer, epoch + 1, ctx)
    log.close()
    return model


if __name__ == "__main__":
    if training is None:
        raise SystemExit("error: droppos.py's training program needs training.py beside it; copy it from the repository")
    main(training.parse_config(Config))
