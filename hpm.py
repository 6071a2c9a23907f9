"""hpm.py: Hard Patches Mining (Wang et al., CVPR 2023; TPAMI extension): MAE plus a loss predictor, a
second decoder tower that learns which patches are hard to reconstruct (a pairwise ranking loss on the
per-patch reconstruction losses). An EMA copy of the model scores the full image and the predicted-
hardest patches are masked, a share that grows over training from 0 to half of the masked patches.
On clips (the TPAMI extension, --preset ssv2): VideoMAE's tube masking, the hardest tubes masked.
Paper: arXiv 2304.05919 (TPAMI: 2312.13714).  Run: torchrun --nproc_per_node=8 hpm.py --data_path /imagenet/train
Shapes: B batch, N patches, K kept (visible), M masked, D encoder width, Dd decoder width, P = patch*patch*3.
Clips: N = T' x S tubelets (T' time slices of S spatial locations); K and M count spatial locations (tubes),
so T'K tokens are visible; P = t*patch*patch*3; C teacher width (--target features).
To reuse: the model, hpm.py + common.py; the training program, + training.py; feature targets, + teachers.py."""
import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import Block, gather_tokens, patchify

try:  # the training program below needs training.py; the method section needs only common.py
    import training
    TrainConfig = training.TrainConfig
except ModuleNotFoundError:  # this file copied with common.py alone, to reuse the model: the program cannot run
    training, TrainConfig = None, object


# --- config ---------------------------------------------------------------------------------------
@dataclass
class Config(TrainConfig):
    output_dir: str = "./runs/hpm"  # checkpoint.pth, log.jsonl, config.json; rerun to resume
    model: str = "vit_base"  # encoder: vit_tiny, vit_small, vit_base, vit_large (paper: ViT-B/16, ViT-L/16)
    input_size: int = 224  # image side in pixels
    patch_size: int = 16  # patch side; the grid is input_size // patch_size
    num_frames: int = 1  # frames per clip; 1 = images (the TPAMI video setting, VideoMAE's scripts: 16)
    tubelet_size: int = 1  # frames per tubelet of the space-time patch embedding (VideoMAE: 2); 1 for images
    sampling_rate: int = 4  # clips: every s-th frame of the video (VideoMAE's scripts: SSv2 2, Kinetics-400 4)
    drop_path: float = 0.0  # stochastic depth of the encoder (official models_mae_learn_loss.py: none)
    decoder_dim: int = 512  # width of both decoder towers (official models_mae_learn_loss.py: 512)
    decoder_depth: int = 8  # blocks in each tower; the predictor is as deep as the decoder (official: 8)
    decoder_heads: int = 16  # attention heads in the towers (official models_mae_learn_loss.py: 16)
    mask_ratio: float = 0.75  # share of masked patches (PRETRAIN.md: 0.75, 49 of 196 visible)
    norm_pix_loss: bool = False  # per-patch normalised pixel targets (released commands: off; MAE: on)
    learning_loss: bool = True  # loss predictor + hard patches mining; --no-learning_loss is plain MAE
    relative: bool = True  # pairwise ranking loss (PRETRAIN.md: --relative); --no-relative: z-scored MSE ablation
    hard_ratio_max: float = 0.5  # alpha_T, the final share of hard patches among masked ones (official generate_mask)
    target: str = "pixels"  # pixels (the paper) or features: a --teacher's tokens (upstream --learn_feature_loss)
    teacher: str = ""  # for features: OpenAI's CLIP .pt, an open_clip or DINO/timm ViT state dict, our checkpoint.pth
    clip_act: str = "quickgelu"  # a CLIP teacher's activation: quickgelu (OpenAI's) or gelu (open_clip GELU models)
    teacher_heads: int = 0  # teacher heads where its file states none; 0: from the file (docs/feature-targets.md)
    epochs: int = 200  # pretraining epochs (PRETRAIN.md: 200; scripts: 800)
    warmup_epochs: int = 40  # linear lr warmup (PRETRAIN.md)
    batch_size: int = 2048  # global batch, the paper's number (PRETRAIN.md: 32 x 8 GPUs x 8 accumulation)
    micro_batch: int = 64  # per-device batch (speed/memory only); if not given, the largest divisor of it up to this
    blr: float = 1.5e-4  # base lr; lr = blr * batch_size / 256 (PRETRAIN.md, upstream main_pretrain.py)
    min_lr: float = 0.0  # end of the cosine decay (upstream main_pretrain.py)
    weight_decay: float = 0.05  # AdamW, betas (0.9, 0.95); no decay on biases and norms (upstream main_pretrain.py)
    clip_grad: float = 5.0  # global grad-norm clip, on by default in the official loss scaler (util/misc.py); 0: none

    limits: ClassVar[dict] = {
        "input_size": "[1, 4096]", "patch_size": "[1, inf)", "num_frames": "[1, inf)", "tubelet_size": "[1, inf)",
        "sampling_rate": "[1, inf)", "drop_path": "[0, 1)", "decoder_dim": "[1, inf)",
        "decoder_depth": "[1, inf)", "decoder_heads": "[1, inf)", "mask_ratio": "(0, 1)", "hard_ratio_max": "[0, 1]",
        "warmup_epochs": "[0, 10000]", "blr": "(0, inf)", "min_lr": "[0, inf)", "weight_decay": "[0, inf)",
        "clip_grad": "[0, inf)", "teacher_heads": "[0, inf)"}
    presets: ClassVar[dict] = {
        # ViT-Tiny/4 at 32 px with a light decoder; learns in well under an hour on one GPU.
        "cifar10": dict(model="vit_tiny", input_size=32, patch_size=4, decoder_dim=128, decoder_depth=4,
                        decoder_heads=4, epochs=100, warmup_epochs=10, batch_size=512, micro_batch=256,
                        num_workers=8, output_dir="./runs/hpm_cifar10"),
        # The TPAMI video setting on VideoMAE's SSv2 recipe (scripts/ssv2/videomae_vit_base_patch16_224_tubemasking_
        # ratio_0.9_epoch_800/pretrain.sh and run_mae_pretraining.py): ViT-B, 16 frames x 224 px, 2 x 16 x 16 tubelets,
        # tube masking 0.9, decoder 384 x 4 (6 heads; modeling_pretrain.py), normalised tubelets, 32 x 64 GPUs,
        # blr 1.5e-4 (lr 1.2e-3), min_lr 1e-5 x 2048/256, warm-up 40 of 800 epochs (the script passes 801 to dodge
        # a crash in its last epoch: PRETRAIN.md), no gradient clipping. Kinetics-400: --sampling_rate 4. Not fixed
        # by the paper, so as for images: alpha_T = 0.5 of the masked tubes, the EMA ramp, the ranking loss's weight 1.
        "ssv2": dict(model="vit_base", input_size=224, patch_size=16, num_frames=16, tubelet_size=2, sampling_rate=2,
                     mask_ratio=0.9, decoder_dim=384, decoder_depth=4, decoder_heads=6, norm_pix_loss=True,
                     epochs=800, warmup_epochs=40, batch_size=2048, micro_batch=32, blr=1.5e-4, min_lr=8e-5,
                     clip_grad=0.0, output_dir="./runs/hpm_ssv2"),
        # CPU-sized clips: ViT-Tiny, 8 frames x 32 px, 2 x 4 x 4 tubelets (4 x 64 tokens), a light decoder.
        "video_tiny": dict(model="vit_tiny", input_size=32, patch_size=4, num_frames=8, tubelet_size=2,
                           sampling_rate=2, mask_ratio=0.9, decoder_dim=128, decoder_depth=2, decoder_heads=4,
                           norm_pix_loss=True, epochs=20, warmup_epochs=2, batch_size=32, blr=1.5e-3, clip_grad=0.0,
                           output_dir="./runs/hpm_video_tiny"),
    }


# --- method ---------------------------------------------------------------------------------------
def mask_order(batch, num_patches, device, scores=None, num_hard=0):
    """Per-image patch order whose first K entries are the visible patches (official generate_mask). The num_hard
    highest-scoring patches are always masked; of the remaining N - num_hard, a uniformly random set of
    K stays visible. NOTE(official): the official per-image numpy loop with a .cpu() per image, vectorised here:
    the same distribution, no host sync. num_hard = 0 is MAE's uniform random mask.
    scores: (B, N) teacher difficulty. -> ids (B, N)."""
    noise = torch.rand(batch, num_patches, device=device)  # in [0, 1): a uniform random order
    if num_hard > 0:
        hard = scores.topk(num_hard, dim=1).indices  # (B, num_hard)
        noise.scatter_(1, hard, 2.0)  # sorted after every other patch, so never among the first K
    return noise.argsort(dim=1)


def tube_ids(ids, time_grid, num_locations):
    """Spatial ids (B, k) -> the tokens of those locations in every time slice, slice by slice, (B, time_grid * k):
    VideoMAE's tube masking, one spatial mask tiled over time (masking_generator.py, TubeMaskingGenerator).
    One slice (images): the ids themselves."""
    offsets = torch.arange(time_grid, device=ids.device) * num_locations  # (T',)
    return (offsets[None, :, None] + ids[:, None, :]).flatten(1)


def visible_count(num_locations, mask_ratio, clips=False):
    """K: images keep int(N (1 - r)) patches (official models_mae_learn_loss.py); clips mask int(r S) locations per
    slice (VideoMAE's TubeMaskingGenerator). They differ at S = 196, r = 0.9: 19 vs 20 visible."""
    if clips:
        return num_locations - int(mask_ratio * num_locations)
    return int(num_locations * (1 - mask_ratio))


def order_to_mask(ids, num_visible):
    """ids (B, N) -> bool mask (B, N), True = hidden."""
    return torch.ones_like(ids, dtype=torch.bool).scatter_(1, ids[:, :num_visible], False)


def hard_count(num_masked, epoch, epochs, alpha_max=0.5):
    """n_hard = floor(M * alpha), alpha = alpha_max * (e + 1) / T, constant within an epoch (same float
    expression as the official generate_mask in models_mae_learn_loss.py, so the floor lands on the same integers)."""
    return int(num_masked * (float((epoch + 1) / epochs) * alpha_max))


def ema_momentum(epoch):
    """Teacher momentum, set per epoch: 0.999 rising linearly to 0.9999 at epoch 100 (official engine_pretrain.py)."""
    return 0.999 + epoch / 100 * (0.9999 - 0.999) if epoch < 100 else 0.9999


def reconstruction_loss(recon, target, norm_pix):
    """Per-patch MSE (B, M) against pixels, optionally normalised per patch (unbiased var, +1e-6)."""
    target = target.float()
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    return (recon.float() - target).pow(2).mean(-1)


# Copied from teachers.py: feature_distance
def feature_distance(pred, target):
    """|pred/|pred| - target/|target||^2 summed over channels (= 2 - 2 cos), in fp32: the per-token loss of both
    papers' feature targets (HPM models_mae_learn_feature_loss.py, SemAIM models_semaim.py). (..., C) -> (...)"""
    return (F.normalize(pred.float(), dim=-1) - F.normalize(target.float(), dim=-1)).pow(2).sum(-1)


def tubelet_targets(clips, patch, tubelet, normalize, mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD):
    """VideoMAE's targets (engine_for_pretraining.py): the pixels back in [0, 1], cut into tubelets laid out (frame,
    row, col, channel); normalize: every tubelet per channel over its t*p*p values, (x - mean) / (std + 1e-6),
    unbiased std (unlike MAE's per-patch rule over all values, eps inside the sqrt). (B, 3, T, H, W) -> (B, N, P)"""
    clips = clips.float() * clips.new_tensor(std).view(3, 1, 1, 1) + clips.new_tensor(mean).view(3, 1, 1, 1)
    x = patchify(clips, patch, tubelet)  # (B, N, t*p*p*3)
    if not normalize:
        return x
    x = x.view(*x.shape[:2], -1, 3)  # (B, N, t*p*p, 3)
    x = (x - x.mean(2, keepdim=True)) / (x.var(2, keepdim=True).sqrt() + 1e-6)
    return x.flatten(2)


def ranking_loss(pred, target):
    """Relative loss (as upstream): for every ordered pair (i, j) of masked patches of one image with
    target_i != target_j, binary cross-entropy of sigmoid(pred_j - pred_i) against [target_j > target_i];
    mean over all valid pairs of the batch, ties excluded. -log sigmoid(s*d) = softplus(-s*d).
    NOTE(official): models_mae_learn_loss.py computes log(sigmoid(d) + 1e-6). The two agree to ~4e-6 while the
    predictions are close (std <= 1), differ by ~2e-3 at std 3 and by ~1 at std 10: the 1e-6 floors a pair's
    loss at 13.8 and zeroes its gradient once it is badly wrong; softplus keeps the exact gradient sigmoid(d) - y.
    pred, target: (B, M); target must be detached."""
    pred, target = pred.float(), target.float()
    diff = pred.unsqueeze(1) - pred.unsqueeze(2)  # (B, M, M): [b, i, j] = pred_j - pred_i
    sign = torch.sign(target.unsqueeze(1) - target.unsqueeze(2))  # +1, -1, or 0 for ties and i == j
    valid = sign != 0
    return (F.softplus(-sign * diff) * valid).sum() / valid.sum().clamp(min=1)


def absolute_loss(pred, target):
    """Absolute ablation (official relative=False): MSE to the per-image z-scored target (unbiased var, +1e-6)."""
    target = target.float()
    z = (target - target.mean(1, keepdim=True)) / (target.var(1, keepdim=True) + 1e-6).sqrt()
    return (pred.float() - z).pow(2).mean()


@torch.no_grad()
def rank_correlation(a, b):
    """Diagnostic: mean over images of Spearman's rank correlation between a and b, (B, M)."""
    ra, rb = (x.argsort(1).argsort(1).float() for x in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp(min=1e-12)).mean()


class Tower(nn.Module):
    """One decoder tower of MAE: transformer blocks, a final norm, a linear head."""
    def __init__(self, dim, depth, heads, out_dim):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)

    def features(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def predicted_loss(tower, features):
    """The loss predictor's score per token: the mean of its P head outputs (as the official code does).
    NOTE(official): computed with the mean head row: the same value and gradients, no (B, T, P) tensor.
    -> (B, T)"""
    w, b = tower.head.weight, tower.head.bias
    return F.linear(features, w.mean(0, keepdim=True), b.mean(0, keepdim=True)).squeeze(-1)


class HPM(nn.Module):
    """MAE with a loss predictor and hard-patch masking. `loss, stats = model(images, progress)`.
    learning_loss=False is plain MAE (random masks, no predictor, no teacher). feature_teacher (a
    teachers.FrozenTeacher): targets are its tokens of the full image instead of pixels (official
    models_mae_learn_feature_loss.py); with learning_loss=False that is plain feature distillation."""

    def __init__(self, encoder, decoder_dim=512, decoder_depth=8, decoder_heads=16, mask_ratio=0.75,
                 norm_pix_loss=False, learning_loss=True, relative=True, hard_ratio_max=0.5, epochs=200,
                 feature_teacher=None):
        super().__init__()
        self.encoder, S = encoder, encoder.grid ** 2  # S spatial locations (= N for images)
        self.num_visible = visible_count(S, mask_ratio, clips=encoder.num_frames > 1)  # K
        self.num_masked = S - self.num_visible  # M
        self.norm_pix_loss, self.relative, self.hard_ratio_max, self.epochs = (
            norm_pix_loss, relative, hard_ratio_max, epochs)
        self.feature_teacher = feature_teacher  # holds no parameters: never trained, saved or re-initialised
        P = encoder.tubelet_size * encoder.patch_size ** 2 * 3
        # NOTE(official): upstream's feature head is Linear(512, 512), CLIP's width hard-coded (DINO's 768 fails);
        # here the teacher's width C.
        out_dim = feature_teacher.embed_dim if feature_teacher is not None else P
        # Decoder stem shared by both towers: embedding, mask token, fixed sin-cos positions (as upstream).
        # NOTE(official): on clips VideoMAE's decoder embedding has no bias and its mask token is drawn from a
        # normal truncated at +-0.02 (modeling_pretrain.py); we keep HPM's image decoder unchanged.
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", common.sincos_pos_embed(
            decoder_dim, encoder.grid, time_grid=encoder.time_grid)[None])
        self.decoder = Tower(decoder_dim, decoder_depth, decoder_heads, out_dim)  # reconstructs pixels or features
        # The predictor keeps its P-wide head, averaged, also for feature targets (as upstream).
        self.predictor = Tower(decoder_dim, decoder_depth, decoder_heads, P) if learning_loss else None
        # NOTE(official): VideoMAE leaves its Conv3d patch embedding at PyTorch's default init (modeling_pretrain.py
        # initialises Linear and LayerNorm only); MAE's xavier rule here for images and clips alike.
        common.init_mae_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)
        self.teacher = None
        if learning_loss:
            # EMA teacher: only what mask generation reads. NOTE(official): the official EMA copies the
            # whole model and runs the reconstruction tower too, then discards its output (engine_pretrain.py).
            parts = nn.ModuleDict({"encoder": encoder, "decoder_embed": self.decoder_embed,
                                   "predictor": self.predictor})
            self.teacher = copy.deepcopy(parts).requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # deterministic scores even with drop-path (timm's ModelEma is in eval mode)
        return self

    def num_hard(self, progress):
        if self.teacher is None:
            return 0
        return hard_count(self.num_masked, common.epoch_at(progress, self.epochs), self.epochs, self.hard_ratio_max)

    @torch.no_grad()
    def teacher_scores(self, imgs):
        """Teacher pass on the full, unmasked image or clip: predicted difficulty per spatial location, (B, S).
        Clips: the predictor scores every space-time token and a tube scores the mean over its time slices (the
        paper leaves the reduction open; the mean is our choice), so the hard set is a set of whole tubes."""
        t = self.teacher
        tokens = t["decoder_embed"](t["encoder"](imgs)) + self.decoder_pos_embed  # (B, 1 + N, Dd)
        scores = predicted_loss(t["predictor"], t["predictor"].features(tokens))[:, 1:].float()  # (B, N)
        return scores.view(scores.shape[0], self.encoder.time_grid, -1).mean(1)  # (B, S); images: unchanged

    def decoder_tokens(self, latent, ids_keep, ids_masked):
        """[cls, visible tokens, mask tokens], each with its position; visible first, then masked, in
        mask_order's order. NOTE(official): upstream unshuffles to raster order; attention is
        permutation-equivariant and the targets are gathered in the same order, so nothing changes but the gather.
        latent (B, 1 + K, D) -> (B, 1 + N, Dd)"""
        x = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        pos = self.decoder_pos_embed[:, 1:].expand(x.shape[0], -1, -1)  # (B, N, Dd)
        visible = x[:, 1:] + gather_tokens(pos, ids_keep)
        masked = self.mask_token + gather_tokens(pos, ids_masked)  # (B, M, Dd)
        return torch.cat([x[:, :1] + self.decoder_pos_embed[:, :1], visible, masked], dim=1)

    def pixel_targets(self, imgs):
        """What the decoder reconstructs at every token, (B, N, P): images MAE's patches (normalised later if
        norm_pix_loss), clips VideoMAE's tubelets (normalised here)."""
        if imgs.ndim == 5:
            return tubelet_targets(imgs, self.encoder.patch_size, self.encoder.tubelet_size, self.norm_pix_loss)
        return patchify(imgs, self.encoder.patch_size)

    def reconstruct(self, imgs, ids):
        """Encoder and both towers under the mask of a mask_order order ids (B, S). -> recon (B, T'M, P or C) and
        loss (B, T'M) of the masked tokens (in the order of ids_masked), the predictor's scores of them (B, T'M;
        None without a predictor), and ids_masked (B, T'M). forward's pass; visualize.py calls it too."""
        S, K, T = self.encoder.grid ** 2, self.num_visible, self.encoder.time_grid
        # Clips: the same spatial mask in every time slice (tubes); n_hard counts tubes (our reading of the paper).
        ids_keep, ids_masked = tube_ids(ids[:, :K], T, S), tube_ids(ids[:, K:], T, S)  # (B, T'K), (B, T'M)
        latent = self.encoder.forward_tokens(gather_tokens(self.encoder.embed_patches(imgs), ids_keep))
        tokens = self.decoder_tokens(latent, ids_keep, ids_masked)  # (B, 1 + N, Dd), fed to both towers
        recon = self.decoder.head(self.decoder.features(tokens)[:, 1 + T * K:])  # (B, T'M, P or C)
        patch_loss = self.patch_losses(imgs, recon, ids_masked)  # (B, T'M)
        pred = None
        if self.predictor is not None:
            # The predictor sees the same, non-detached tokens: its loss also trains the encoder (as upstream).
            pred = predicted_loss(self.predictor, self.predictor.features(tokens))[:, 1 + T * K:]  # (B, T'M)
        return recon, patch_loss, pred, ids_masked

    def forward(self, imgs, progress):
        num_hard = self.num_hard(progress)
        # NOTE(official): upstream runs the teacher pass even while n_hard = 0, when its output is unused
        scores = self.teacher_scores(imgs) if num_hard > 0 else None
        ids = mask_order(imgs.shape[0], self.encoder.grid ** 2, imgs.device, scores, num_hard)  # (B, S)
        _, patch_loss, pred, _ = self.reconstruct(imgs, ids)  # (B, T'M) each
        loss_rec = patch_loss.mean()  # = MAE's mask-weighted mean, M is the same for every image
        stats = {"loss_rec": loss_rec.detach()}
        if self.predictor is None:
            return loss_rec, stats
        target_loss = patch_loss.detach()  # ranking targets carry no gradient (as upstream)
        # Clips: the pairs are all T'M masked tokens of one clip, across time slices too (the paper does not say).
        loss_pred = ranking_loss(pred, target_loss) if self.relative else absolute_loss(pred, target_loss)
        stats.update(loss_pred=loss_pred.detach(), rank_corr=rank_correlation(pred, target_loss),
                     hard_ratio=torch.full((), num_hard / self.num_masked, device=imgs.device))
        return loss_rec + loss_pred, stats  # weight 1, as upstream

    def patch_losses(self, imgs, recon, ids_masked):
        """Per-patch loss of the masked patches, (B, M): MSE against their pixels (clips: tubelets), or 2 - 2 cos against the frozen
        teacher's tokens of the full image at their positions (official models_mae_learn_feature_loss.py)."""
        if self.feature_teacher is None:
            target = gather_tokens(self.pixel_targets(imgs), ids_masked)  # (B, M, P)
            return reconstruction_loss(recon, target, self.norm_pix_loss and imgs.ndim == 4)  # clips: normalised
        target = gather_tokens(self.feature_teacher(imgs)[:, 1:], ids_masked)  # (B, M, C), no gradient
        return feature_distance(recon, target)

    @torch.no_grad()
    def update_teacher(self, momentum):
        """teacher <- m * teacher + (1 - m) * student, after every optimizer step (official engine_pretrain.py)."""
        if self.teacher is not None:
            for name in ("encoder", "decoder_embed", "predictor"):
                common.ema_update(self.teacher[name], getattr(self, name), momentum)


# --- training -------------------------------------------------------------------------------------
def build(cfg):
    """The model of a config (used by main, bench.py and the tests)."""
    if cfg.num_frames == 1 and cfg.tubelet_size != 1:
        common.fail(f"--tubelet_size {cfg.tubelet_size} needs clips; pass --num_frames (a multiple of it), "
                    "or --tubelet_size 1 for images")
    encoder = common.vit(cfg.model, cfg.input_size, cfg.patch_size, cfg.drop_path, num_frames=cfg.num_frames,
                         tubelet_size=cfg.tubelet_size)
    S = encoder.grid ** 2
    num_visible = visible_count(S, cfg.mask_ratio, clips=cfg.num_frames > 1)
    if not 1 <= num_visible <= S - 2:
        common.fail(f"--mask_ratio {cfg.mask_ratio} leaves {num_visible} of {S} patches visible; "
                    "the encoder needs one and the ranking loss two masked ones: pass a ratio such as 0.75")
    return HPM(encoder, decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth, decoder_heads=cfg.decoder_heads,
               mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss, learning_loss=cfg.learning_loss,
               relative=cfg.relative, hard_ratio_max=cfg.hard_ratio_max, epochs=cfg.epochs,
               feature_teacher=feature_teacher(cfg))


def feature_teacher(cfg):
    """The frozen teacher of --target features, or None for pixel targets; the flags checked together."""
    if cfg.target == "features" and cfg.norm_pix_loss:
        common.fail("--norm_pix_loss normalises pixel targets; drop it with --target features")
    if cfg.target == "features" and cfg.num_frames > 1:  # our teachers are image models, as the papers'
        common.fail("--target features takes image teachers; clips train on pixels (VideoMAE's targets)")
    if cfg.teacher_heads and (cfg.target != "features" or not cfg.teacher):
        common.fail(f"--teacher_heads {cfg.teacher_heads} gives a teacher file's attention heads; it needs --target "
                    "features --teacher FILE: add them or drop it")
    if cfg.target == "pixels" and not cfg.teacher:
        return None
    teachers = training.optional("teachers", f"--target {cfg.target} --teacher {cfg.teacher}")  # pixels need none
    return teachers.target_teacher(cfg)


def make_optimizer(model, cfg, steps_per_epoch):
    """MAE's AdamW and per-step lr (training.mae_optimizer); used by main and bench.py."""
    return training.mae_optimizer(model, cfg, steps_per_epoch)


def train_step(ddp, optimizer, micro_batches, progress, cfg, ctx):
    """One optimizer step (also timed by bench.py): the mean loss over the micro-batches, the global grad-norm
    clip (5, as upstream's loss scaler), AdamW, then the EMA teacher. -> the step's stats."""
    model = training.unwrap(ddp)
    stats = training.forward_backward(ddp, micro_batches, progress, ctx)  # means over the micro-batches
    ctx.scaler.unscale_(optimizer)
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad or float("inf"))
    training.optimizer_step(optimizer, ctx)
    model.update_teacher(ema_momentum(common.epoch_at(progress, cfg.epochs)))  # method-specific
    return stats


def main(cfg):
    ctx = training.setup(cfg)
    model = build(cfg).to(ctx.device)  # method-specific
    if cfg.num_frames > 1:  # method-specific: clips (the TPAMI video setting)
        dataset = common.clip_dataset(cfg.data_path, common.videomae_transform(cfg.input_size), cfg.num_frames,
                                      cfg.sampling_rate)
    else:
        dataset = common.image_dataset(cfg.data_path, common.mae_transform(cfg.input_size), cfg.data_root)
    batches = training.Batches(dataset, cfg, ctx)
    steps_per_epoch, total_steps = batches.steps_per_epoch, cfg.epochs * batches.steps_per_epoch
    optimizer, schedule = make_optimizer(model, cfg, steps_per_epoch)
    start_epoch = training.resume(cfg, "hpm", model, optimizer, ctx)
    if cfg.compile:
        training.compile_blocks(model)
    ddp = training.wrap_ddp(model, ctx)
    log = training.Logger(cfg, ctx, steps_per_epoch, start_epoch)
    log.run_line("hpm", model, batches, blr=cfg.blr)
    if model.feature_teacher is not None:  # method-specific
        log.info(f"hpm: targets are the tokens of {cfg.teacher}: {model.feature_teacher.name}")
    log.warmups(lr="warmup_epochs")

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        for it, micro_batches in enumerate(batches.epoch(epoch)):
            step = epoch * steps_per_epoch + it
            lr = schedule(step)
            stats = train_step(ddp, optimizer, micro_batches, step / total_steps, cfg, ctx)
            log.step(step, lr, stats)
        training.save_checkpoint(cfg, "hpm", model, optimizer, epoch + 1, ctx)
    log.close()
    return model


if __name__ == "__main__":
    if training is None:
        raise SystemExit("error: hpm.py's training program needs training.py beside it; copy it from the repository")
    main(training.parse_config(Config))
