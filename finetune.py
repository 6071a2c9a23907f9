"""finetune.py: end-to-end fine-tuning for image classification, the headline metric of HPM, DropPos and SemAIM:
the ViT encoder of any of our checkpoints (or a fresh ViT) gets a linear head on its mean patch token and is
trained whole with MAE's recipe (official FINETUNE.md, main_finetune.py): layer-wise lr decay, AdamW, drop path,
RandAugment, random erasing, mixup / cutmix with label smoothing. Top-1 and top-5 on the validation set after
every epoch; the last and the best checkpoint are kept.
Run: torchrun --nproc_per_node=8 finetune.py --checkpoint runs/hpm/checkpoint.pth --data_path /imagenet
(data_path holds train/ and val/ ImageFolders). The last line printed is JSON with top1, top5 and best_top1.
Shapes: B batch, N patches, D width, C classes.
To reuse: copy this file, common.py and training.py."""
import dataclasses
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms
from torchvision.transforms import v2

import common
import training


# --- config ---------------------------------------------------------------------------------------
@dataclass
class Config(training.TrainConfig):
    data_path: str = ""  # root holding train/ and val/ (or test/) ImageFolders, or the word cifar10 (train / test)
    output_dir: str = "./runs/finetune"  # checkpoint.pth (last), checkpoint_best.pth, log.jsonl; rerun to resume
    checkpoint: str = ""  # checkpoint.pth of hpm, droppos, semaim or mokd (--encoder vit); empty: from scratch
    encoder: str = ""  # which encoder of a multi-encoder checkpoint (MOKD: vit); default: the only one
    model: str = "vit_base"  # vit_tiny|small|base|large; a --checkpoint brings its own (FINETUNE.md: ViT-B/16)
    input_size: int = 224  # image side in pixels; a checkpoint trained at another size gets its position table resized
    patch_size: int = 16  # patch side; a --checkpoint brings its own
    cls_token: bool = False  # classify the cls token after the final norm, not the mean patch token (MAE's flag)
    learn_pos_embed: bool = True  # train the position table, loaded from the checkpoint (MAE: yes; DropPos: fixed)
    drop_path: float = 0.1  # stochastic depth (FINETUNE.md: ViT-B 0.1, ViT-L 0.2)
    epochs: int = 100  # fine-tuning epochs (FINETUNE.md: ViT-B 100, ViT-L 50)
    warmup_epochs: int = 5  # linear lr warm-up (main_finetune.py)
    batch_size: int = 1024  # global batch (FINETUNE.md: 32 per GPU x 32 GPUs)
    blr: float = 5e-4  # base lr; lr = blr * batch_size / 256 (FINETUNE.md: ViT-B 5e-4, ViT-L 1e-3)
    min_lr: float = 1e-6  # end of the cosine decay (main_finetune.py)
    weight_decay: float = 0.05  # AdamW, betas (0.9, 0.999); none on 1-D parameters, cls token and position table
    layer_decay: float = 0.65  # lr of layer l is lr * layer_decay^(depth + 1 - l) (FINETUNE.md: ViT-B 0.65, ViT-L 0.75)
    clip_grad: float = 0.0  # global grad-norm clip; 0: off (main_finetune.py: off)
    smoothing: float = 0.1  # label smoothing (main_finetune.py)
    mixup: float = 0.8  # mixup alpha; 0: off (FINETUNE.md)
    cutmix: float = 1.0  # cutmix alpha; 0: off (FINETUNE.md)
    mixup_switch_prob: float = 0.5  # chance of cutmix rather than mixup for a batch when both are on (main_finetune.py)
    crop_scale: float = 0.08  # smallest area share of the random resized crop (timm's default, used by MAE)
    rand_ops: int = 2  # RandAugment operations per image; 0: off (main_finetune.py: rand-m9-mstd0.5-inc1)
    rand_magnitude: int = 9  # RandAugment magnitude out of 10 (timm's m9)
    reprob: float = 0.25  # random erasing probability, per-pixel normal noise (main_finetune.py)

    limits: ClassVar[dict] = {
        "input_size": "[1, 4096]", "patch_size": "[1, inf)", "drop_path": "[0, 1)", "warmup_epochs": "[0, 10000]",
        "blr": "(0, inf)", "min_lr": "[0, inf)", "weight_decay": "[0, inf)", "layer_decay": "(0, 1]",
        "clip_grad": "[0, inf)", "smoothing": "[0, 1)", "mixup": "[0, inf)", "cutmix": "[0, inf)",
        "mixup_switch_prob": "[0, 1]", "crop_scale": "(0, 1]", "rand_ops": "[0, 10]", "rand_magnitude": "[0, 10]",
        "reprob": "[0, 1]"}
    presets: ClassVar[dict] = {
        # ViT-Tiny/4 at 32 px, the size of our methods' cifar10 presets; our small-scale choice, not a paper's. Layer
        # decay 0.75 as MAE's for its deeper encoder (ViT-Tiny has ViT-B's 12 blocks but a 4x narrower width); crops
        # of at least 35 % of the image, since a 0.08 crop of a 32 px image is a 9 px blur.
        "cifar10": dict(model="vit_tiny", input_size=32, patch_size=4, epochs=100, warmup_epochs=5, batch_size=512,
                        micro_batch=256, blr=5e-4, layer_decay=0.75, crop_scale=0.35, num_workers=8,
                        output_dir="./runs/finetune_cifar10"),
    }


# --- method ---------------------------------------------------------------------------------------
NO_WEIGHT_DECAY = ("cls_token", "pos_embed")  # timm's VisionTransformer.no_weight_decay(), which MAE passes


def layer_id(name, depth):
    """The layer of an encoder parameter (timm's name) for lr decay, as MAE's util/lr_decay.py (from BEiT): patch
    embedding, cls token and position table are layer 0, block i is layer i + 1, everything after the blocks (final
    norm, fc_norm, head) is layer depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_lrd(model, weight_decay, layer_decay):
    """AdamW groups with layer-wise lr decay (MAE's param_groups_lrd): one group per (layer, decayed or not), with
    lr_scale = layer_decay ** (depth + 1 - layer); weight decay on matrices and kernels but not on 1-D parameters,
    the cls token and the position table. Frozen parameters are left out."""
    depth, groups = len(model.encoder.blocks), {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("encoder.")  # timm's names, as MAE's model has them
        decay = p.ndim > 1 and name not in NO_WEIGHT_DECAY
        layer = layer_id(name, depth)
        group = groups.setdefault((layer, decay), {"params": [], "lr_scale": layer_decay ** (depth + 1 - layer),
                                                   "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
    return list(groups.values())


def interpolate_pos_embed(pos_embed, grid):
    """(1, 1 + G*G, D) -> (1, 1 + grid*grid, D): the cls row kept, the G x G table resized bicubically to grid x grid
    (MAE's util/pos_embed.py interpolate_pos_embed, from DeiT: a resize by size, not DINO's scale-factor rule of
    common.resize_pos_embed). Unchanged if G = grid."""
    old = int(round(math.sqrt(pos_embed.shape[1] - 1)))
    if old == grid:
        return pos_embed
    table = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, G, G)
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)  # (1, D, grid, grid)
    return torch.cat([pos_embed[:, :1], table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def make_mixer(mixup, cutmix, switch_prob, num_classes):
    """MAE's batch mixing (timm's Mixup in 'batch' mode, applied to every batch): torchvision's MixUp (lam ~
    Beta(mixup, mixup)) or CutMix (a box of area 1 - lam, lam ~ Beta(cutmix, cutmix), lam corrected to the clipped
    box), the latter with probability switch_prob when both are on. Both draw from torch's CPU generator, so a resumed
    run mixes as an uninterrupted one. NOTE(official): timm pairs each image with the batch reversed (flip(0)),
    torchvision with the batch rolled by one (roll(1, 0)): either way a random partner in a shuffled batch.
    -> (images, labels) -> (mixed images, targets (B, C)), or None when both are off."""
    mixers = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
             ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    if len(mixers) == 2:
        return v2.RandomChoice(mixers, p=[1 - switch_prob, switch_prob])
    return mixers[0] if mixers else None


def mix_batch(images, labels, mixer, num_classes, smoothing):
    """-> (images (B, 3, H, W), targets (B, C)): the batch mixed by `mixer` (or not, if None) and its soft targets,
    lam * onehot(y_i) + (1 - lam) * onehot(y_partner), with label smoothing as timm's mixup_target (on-value
    1 - s + s / C, off-value s / C). Smoothing after mixing equals timm's smoothing before it: both are linear and
    every row sums to 1."""
    if mixer is not None:
        images, targets = mixer(images, labels)
    else:
        targets = F.one_hot(labels, num_classes).float()
    return images, targets * (1 - smoothing) + smoothing / num_classes


def soft_cross_entropy(logits, targets):
    """timm's SoftTargetCrossEntropy: mean over the batch of -sum_c target_c log softmax(logits)_c, in float32."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


class Classifier(nn.Module):
    """A ViT encoder with a linear head, as MAE's models_vit.py. global_pool (MAE's default): the mean of the patch
    tokens through fc_norm (LayerNorm); the encoder's final norm is removed, as MAE deletes it (a checkpoint's norm
    is not loaded). Else the cls token after the final norm. `loss, stats = model((images, labels), progress)`
    trains (progress is not used); `model.classify(images)` -> logits (B, C)."""

    def __init__(self, encoder, num_classes, global_pool=True, mixup=0.8, cutmix=1.0, switch_prob=0.5,
                 smoothing=0.1):
        super().__init__()
        self.encoder, self.num_classes, self.global_pool, self.smoothing = encoder, num_classes, global_pool, smoothing
        if global_pool:
            encoder.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6) if global_pool else nn.Identity()
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # a near-silent head at the start (main_finetune.py)
        nn.init.zeros_(self.head.bias)
        self.mixer = make_mixer(mixup, cutmix, switch_prob, num_classes)

    def classify(self, images):
        tokens = self.encoder(images)  # (B, 1 + N, D); through the final norm only in cls-token mode
        feature = self.fc_norm(tokens[:, 1:].mean(1)) if self.global_pool else tokens[:, 0]  # (B, D)
        return self.head(feature)  # (B, C)

    def forward(self, batch, progress):
        images, labels = batch
        images, targets = mix_batch(images, labels, self.mixer, self.num_classes, self.smoothing)
        logits = self.classify(images)
        # train_top1: against the unmixed labels (a mixed image has two), on the device: no host sync
        return soft_cross_entropy(logits, targets), {"train_top1": (logits.argmax(1) == labels).float().mean() * 100}


# --- training -------------------------------------------------------------------------------------
def train_transform(size, crop_scale=0.08, rand_ops=2, rand_magnitude=9, reprob=0.25):
    """MAE's training augmentation (timm's create_transform in its util/datasets.py) from torchvision parts: random
    resized crop (bicubic), flip, RandAugment, normalise, random erasing with per-pixel normal noise (timm's 'pixel'
    mode: the same scale, ratio and noise). NOTE(official): torchvision's RandAugment is not timm's
    rand-m9-mstd0.5-inc1: every op is applied (timm: each with p 0.5), the magnitude is fixed (timm adds N(0, 0.5)
    noise), and the op set and ranges differ (no Invert / SolarizeAdd, an Identity op, posterize to 4 bits at m9
    where timm's increasing variant goes to 1). 11 magnitude bins make magnitude m the fraction m / 10 of each
    op's range, as timm's scale; the fill is the mean pixel, as timm's."""
    bicubic = transforms.InterpolationMode.BICUBIC
    steps = [transforms.RandomResizedCrop(size, scale=(crop_scale, 1.0), interpolation=bicubic),
             transforms.RandomHorizontalFlip()]
    if rand_ops:
        mean_pixel = [round(255 * m) for m in common.IMAGENET_MEAN]
        steps.append(transforms.RandAugment(num_ops=rand_ops, magnitude=rand_magnitude, num_magnitude_bins=11,
                                            interpolation=bicubic, fill=mean_pixel))
    steps += [transforms.ToTensor(), transforms.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)]
    if reprob > 0:  # NOTE(official): timm's RandomErasing in pixel mode; torchvision's with per-pixel noise is the same
        steps.append(transforms.RandomErasing(p=reprob, value="random"))
    return transforms.Compose(steps)


def datasets(cfg):
    """(training set with the training augmentation, validation set with resize + centre crop); one-line errors."""
    train_tf = train_transform(cfg.input_size, cfg.crop_scale, cfg.rand_ops, cfg.rand_magnitude, cfg.reprob)
    eval_tf = common.eval_transform(cfg.input_size)
    if cfg.data_path == "cifar10":
        return (common.image_dataset("cifar10", train_tf, cfg.data_root),
                common.image_dataset("cifar10", eval_tf, cfg.data_root, train=False))
    train_dir, val_dir = common.split_folders(cfg.data_path, "ImageFolders (or cifar10)", "fine-tuning trains on "
                                              "train/ and evaluates on val/ after every epoch: ")
    train_set = common.image_dataset(train_dir, train_tf, of_root=True)
    val_set = common.image_dataset(val_dir, eval_tf, of_root=True)
    if val_set.classes != train_set.classes:
        common.fail(f"{val_dir} has other classes than {train_dir} ({len(val_set.classes)} vs "
                    f"{len(train_set.classes)} folders, or other names); both need the same class folders")
    return train_set, val_set


def load_pretrained(cfg):
    """The ViT encoder of --checkpoint (any of our pre-training scripts; one-line errors otherwise), the config with
    that encoder's --model and --patch_size (the checkpoint decides; the saved config says what was trained), and a
    line that says where the weights come from. -> (encoder, cfg, line)"""
    encoder, ckpt, arch = training.load_encoder(cfg.checkpoint, cfg.encoder)
    if arch.get("num_frames", 1) > 1:
        common.fail(f"{cfg.checkpoint} holds a video encoder ({arch['num_frames']} frames per clip), and finetune.py "
                    "fine-tunes image classifiers only; evaluate it on clips with eval_linear.py (k-NN and linear "
                    "probe), or pass the checkpoint of a pre-training run on images")
    if arch["model"] not in common.VIT_SIZES:
        common.fail(f"{cfg.checkpoint} holds a {arch['model']} encoder, and fine-tuning takes ViT encoders (hpm.py, "
                    "droppos.py, semaim.py, mokd.py --encoder vit); evaluate ResNets (MOKD's cnn, SCFS) with "
                    "eval_linear.py (k-NN and linear probe)")
    flags = f"{cfg.model}/{cfg.patch_size}"
    cfg = dataclasses.replace(cfg, model=arch["model"], patch_size=arch["patch_size"])
    old, new = arch["input_size"] // arch["patch_size"], cfg.input_size // cfg.patch_size
    line = (f"{cfg.model}/{cfg.patch_size} at {arch['input_size']} px from {cfg.checkpoint} ({ckpt['method']}, epoch "
            f"{ckpt['epoch']}{f', encoder {cfg.encoder}' if cfg.encoder else ''})"
            + (f", not --model/--patch_size {flags}" if flags != f"{cfg.model}/{cfg.patch_size}" else "")
            + (f"; position table resized {old}x{old} -> {new}x{new}" if old != new else ""))
    return encoder, cfg, line


def build(cfg, num_classes=1000, pretrained=None):
    """The classifier of a config: a ViT at cfg.input_size with cfg.drop_path, MAE's initialisation, or the weights
    of `pretrained` (an encoder of the same model and patch size, its position table resized to this grid)."""
    encoder = common.vit(cfg.model, cfg.input_size, cfg.patch_size, cfg.drop_path)
    if pretrained is None:
        common.init_mae_weights(encoder)
    else:
        state = pretrained.state_dict()
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], encoder.grid)
        encoder.load_state_dict(state)
    # MAE fine-tunes timm's ViT, whose position table is a Parameter (loaded with the fixed sin-cos values); DropPos
    # keeps it fixed (its models_vit.py): --no-learn_pos_embed.
    encoder.pos_embed.requires_grad_(cfg.learn_pos_embed)
    return Classifier(encoder, num_classes, global_pool=not cfg.cls_token, mixup=cfg.mixup, cutmix=cfg.cutmix,
                      switch_prob=cfg.mixup_switch_prob, smoothing=cfg.smoothing)


def synthetic_batch(cfg, device):
    """Random images and labels of the training shape, for bench.py and the tests."""
    images = torch.randn(cfg.micro_batch, 3, cfg.input_size, cfg.input_size, device=device)
    return images, torch.randint(0, 1000, (cfg.micro_batch,), device=device)


def make_optimizer(model, cfg, steps_per_epoch):
    """AdamW with layer-wise lr decay and its per-step lr (MAE's: warm-up, then cosine, util/lr_sched.py);
    schedule(step) sets every group's lr to lr * lr_scale and returns the undecayed lr (the head's)."""
    lr = cfg.blr * cfg.batch_size / 256
    lrs = training.cosine_schedule(lr, cfg.min_lr, cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch)
    groups = param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)  # torch's default betas, as MAE's

    def schedule(step):
        for group in optimizer.param_groups:
            group["lr"] = float(lrs[step] * group["lr_scale"])
        return float(lrs[step])
    return optimizer, schedule


def train_step(ddp, optimizer, micro_batches, progress, cfg, ctx):
    """One optimizer step over a Step of (images, labels) micro-batches (also timed by bench.py): the mean loss,
    clipping only if asked (MAE fine-tunes without), AdamW with layer-wise lr. -> the step's stats."""
    model = training.unwrap(ddp)
    stats = training.forward_backward(ddp, micro_batches, progress, ctx)  # means over the micro-batches
    ctx.scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    if cfg.clip_grad > 0:
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
    else:
        stats["grad_norm"] = torch.nn.utils.get_total_norm([p.grad for p in params])
    training.optimizer_step(optimizer, ctx)
    return stats


@torch.no_grad()
def evaluate(model, dataset, cfg, ctx, desc="evaluation"):
    """{top1, top5 (percent), images} over the whole dataset. Each process classifies every world-th image from its
    rank on (disjoint shards, no padding) and the counts are summed over processes: the figures are exact.
    NOTE(official): MAE's --dist_eval uses a DistributedSampler, which pads the last shard with repeated images."""
    shard = torch.utils.data.Subset(dataset, range(ctx.rank, len(dataset), ctx.world))
    loader = torch.utils.data.DataLoader(shard, cfg.micro_batch, num_workers=cfg.num_workers,
                                         pin_memory=ctx.device.type == "cuda",
                                         generator=torch.Generator())  # its own: training's RNG stream stays as it was
    model.eval()
    counts = torch.zeros(3, dtype=torch.long, device=ctx.device)  # top-1 hits, top-5 hits, images
    k = min(5, model.num_classes)
    for images, labels, _ in common.progress_bar(iterable=loader, desc=desc, unit="batch", leave=False,
                                                 disable=not ctx.main):
        images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
        with ctx.autocast():
            logits = model.classify(images)  # (B, C)
        hits = logits.topk(k, dim=1).indices == labels[:, None]  # (B, k), at most one True per row
        counts[0] += hits[:, 0].sum()
        counts[1] += hits.any(1).sum()
        counts[2] += len(labels)
    if training.distributed():
        dist.all_reduce(counts)
    model.train()
    top1, top5 = (100.0 * counts[:2].double() / counts[2].clamp(min=1)).tolist()
    return {"top1": top1, "top5": top5, "images": int(counts[2])}


def keep_best(path, output_dir):
    """Copy the checkpoint at path to output_dir/checkpoint_best.pth (through a temporary file: never half-written).
    NOTE(official): MAE writes checkpoint-{epoch}.pth every epoch and marks none as best; here the last and the best."""
    best = os.path.join(output_dir, "checkpoint_best.pth")
    shutil.copyfile(path, best + ".tmp")
    os.replace(best + ".tmp", best)


def epoch_of(path):
    """(epoch, best_top1, best_epoch) of a fine-tuning checkpoint (mmap: the weights are not read), or None if it is
    not one (training.resume then says what is wrong)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not (isinstance(ckpt, dict) and ckpt.get("method") == "finetune" and isinstance(ckpt.get("epoch"), int)):
        return None
    return ckpt["epoch"], ckpt.get("best_top1"), ckpt.get("best_epoch")


def resume_best(cfg, ctx):
    """(best top-1, the epoch count of its checkpoint) of the run being resumed, or (None, None). Called before
    anything else reads the checkpoint, on every rerun (a finished one too): if the checkpoint is the best one and
    checkpoint_best.pth is not that epoch's, it is copied again (a run killed between writing the checkpoint and
    copying it, even in its last epoch); a best checkpoint of an earlier epoch that is gone cannot be rebuilt, and
    one line says so."""
    path = cfg.resume or os.path.join(cfg.output_dir, "checkpoint.pth")
    resumed = epoch_of(path) if os.path.isfile(path) else None
    if resumed is None:
        return None, None
    epoch, best_top1, best_epoch = resumed
    best = os.path.join(cfg.output_dir, "checkpoint_best.pth")
    if ctx.main and best_epoch is not None:
        if os.path.exists(best + ".tmp"):  # a copy killed mid-write
            os.remove(best + ".tmp")
        have = epoch_of(best) if os.path.isfile(best) else None
        ours = os.path.samefile(os.path.dirname(os.path.abspath(path)), cfg.output_dir)  # not --resume from elsewhere
        if best_epoch == epoch and (have is None or have[0] != epoch):
            keep_best(path, cfg.output_dir)
            print(f"{best} restored: the best top-1 ({best_top1:.2f}) is the last checkpoint's, epoch {epoch}",
                  file=sys.stderr)
        elif ours and (have is None or have[0] != best_epoch):
            print(f"warning: {best} (epoch {best_epoch}, top-1 {best_top1:.2f}) is missing or another epoch's, and "
                  "only the last checkpoint is kept: it cannot be rebuilt", file=sys.stderr)
    return best_top1, best_epoch


def main(cfg):
    ctx = training.setup(cfg)
    train_set, val_set = datasets(cfg)  # method-specific: labelled training and validation sets
    pretrained, source = None, "from scratch"
    if cfg.checkpoint:
        pretrained, cfg, source = load_pretrained(cfg)  # method-specific
    model = build(cfg, len(train_set.classes), pretrained).to(ctx.device)
    batches = training.Batches(train_set, cfg, ctx, labels=True)
    steps_per_epoch, total_steps = batches.steps_per_epoch, cfg.epochs * batches.steps_per_epoch
    optimizer, schedule = make_optimizer(model, cfg, steps_per_epoch)
    best_top1, best_epoch = resume_best(cfg, ctx)  # method-specific: before resume, which stops a finished run
    start_epoch = training.resume(cfg, "finetune", model, optimizer, ctx)
    if cfg.compile:
        training.compile_blocks(model)
    ddp = training.wrap_ddp(model, ctx)
    log = training.Logger(cfg, ctx, steps_per_epoch, start_epoch)
    log.run_line("finetune", model, batches, blr=cfg.blr)
    log.info(f"finetune: {source}; {len(val_set)} validation images; layer decay {cfg.layer_decay} (the first "
             f"block at {cfg.layer_decay ** len(model.encoder.blocks):.2g} x the lr)")  # method-specific
    if pretrained is None and cfg.layer_decay < 1:
        log.info(f"finetune: training from scratch with --layer_decay {cfg.layer_decay}: the lower blocks barely "
                 "move; --layer_decay 1.0 is the usual choice from scratch")
    log.warmups(lr="warmup_epochs")

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        for it, micro_batches in enumerate(batches.epoch(epoch)):
            step = epoch * steps_per_epoch + it
            lr = schedule(step)
            stats = train_step(ddp, optimizer, micro_batches, step / total_steps, cfg, ctx)
            log.step(step, lr, stats)
        result = evaluate(model, val_set, cfg, ctx, f"evaluation {epoch + 1}/{cfg.epochs}")  # method-specific
        if best_top1 is None or result["top1"] > best_top1:
            best_top1, best_epoch = result["top1"], epoch + 1
        log.record(step=(epoch + 1) * steps_per_epoch - 1, epoch=epoch, **result, best_top1=best_top1)
        training.save_checkpoint(cfg, "finetune", model, optimizer, epoch + 1, ctx, extra={
            "top1": result["top1"], "top5": result["top5"], "best_top1": best_top1, "best_epoch": best_epoch})
        if best_epoch == epoch + 1 and ctx.main:
            keep_best(os.path.join(cfg.output_dir, "checkpoint.pth"), cfg.output_dir)
    log.close()
    if ctx.main:
        print(json.dumps({"top1": round(result["top1"], 2), "top5": round(result["top5"], 2),
                          "best_top1": round(best_top1, 2), "best_epoch": best_epoch,
                          "epochs": cfg.epochs, "checkpoint": cfg.checkpoint, "encoder": cfg.encoder,
                          "model": cfg.model, "patch_size": cfg.patch_size, "input_size": cfg.input_size,
                          "train_images": batches.size, "val_images": len(val_set)}), flush=True)
    return model


if __name__ == "__main__":
    main(training.parse_config(Config))
