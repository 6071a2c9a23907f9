"""scfs.py: Semantics-Consistent Feature Search (Song et al., ICCV 2023): DINO on a ResNet (EMA teacher on
the two global crops, student on all crops, centring + sharpening) plus a feature search at ResNet stages
2, 3 and 4. The student's pooled feature of each local crop is a query; its cosine similarity with every
location of the teacher's map of global crop 1 re-weights that map, and the re-weighted map, through a
small per-stage head, is the distillation target of that local crop (so a crop is pulled only towards
the regions of the other view that show the same thing).
Paper: arXiv 2212.06486.  Run: torchrun --nproc_per_node=8 scfs.py --data_path /imagenet/train
Shapes: B batch per crop, L local crops, V = 2 + L crops, C_k channels of stage k, H x W a stage map,
K out_dim of the DINO head, D out_dim of the stage heads.
To reuse: the model, scfs.py + common.py; the training program, + training.py."""
import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import ImageFilter
from torchvision import transforms

import common

try:  # the training program below needs training.py; the method section needs only common.py
    import training
    TrainConfig = training.TrainConfig
except ModuleNotFoundError:  # this file copied with common.py alone, to reuse the model: the program cannot run
    training, TrainConfig = None, object


# --- config ---------------------------------------------------------------------------------------
@dataclass
class Config(TrainConfig):
    output_dir: str = "./runs/scfs"  # checkpoint.pth, log.jsonl, config.json; rerun to resume
    model: str = "resnet50"  # torchvision ResNet, student and teacher (official README: resnet50; any depth works here)
    cifar_stem: bool = False  # 3x3 stride-1 first conv and no max-pool, for 32 px images
    input_size: int = 224  # side of the 2 global crops (upstream dino_augmentation.py: 224)
    local_size: int = 96  # side of the local crops (upstream dino_augmentation.py: 96)
    local_crops: int = 8  # number of local crops L (upstream main_scfs.py: 8)
    global_scale_min: float = 0.25  # global crops cover 0.25-1 of the image area (official README; code default .4)
    local_scale_min: float = 0.05  # local crops cover 0.05-0.25 of it (official README)
    local_scale_max: float = 0.25  # upper end of the local-crop scale (official README: 0.25; code default 0.4)
    blur_radius_min: float = 0.1  # Gaussian blur radius range in pixels, all crops (DINO utils.py: 0.1 to 2)
    blur_radius_max: float = 2.0  # its upper end
    search: bool = True  # the stage-wise feature search; --no-search is plain DINO, the paper's baseline
    out_dim: int = 65536  # DINO head output K (upstream main_scfs.py)
    hidden_dim: int = 2048  # DINO head MLP width (upstream models/scfs.py)
    bottleneck_dim: int = 256  # DINO head bottleneck before the weight-normed last layer (upstream models/scfs.py)
    norm_last_layer: bool = True  # last-layer magnitude fixed to 1 (upstream main_scfs.py)
    stage_bottleneck: int = 256  # width of the residual block in each stage head (upstream models/scfs.py: 256)
    stage_hidden: int = 2048  # BN-MLP width of each stage head (upstream models/scfs.py: 2048)
    stage_dim: int = 256  # stage head output D, softmax taken over it directly (upstream models/scfs.py: 256)
    student_temp: float = 0.1  # tau_s (upstream models/scfs.py)
    teacher_temp: float = 0.07  # tau_t after its warm-up (official README)
    warmup_teacher_temp: float = 0.04  # tau_t at epoch 0 (official README)
    warmup_teacher_temp_epochs: int = 50  # linear tau_t ramp, per epoch (official README: 50)
    center_momentum: float = 0.9  # all four centers (upstream models/scfs.py)
    momentum_teacher: float = 0.996  # EMA momentum, cosine to 1 per step (upstream main_scfs.py)
    epochs: int = 200  # pretraining epochs (official README: 200; 800 for the long run)
    warmup_epochs: int = 10  # linear lr warm-up (upstream main_scfs.py)
    batch_size: int = 256  # global batch (official README: 8 GPUs x 32)
    micro_batch: int = 32  # per-device batch (speed/memory only); if not given, the largest divisor of it up to this
    blr: float = 0.1  # SGD base lr; lr = blr * batch_size / 256 (official README)
    min_lr: float = 0.0048  # end of the cosine, absolute (official README)
    weight_decay: float = 1e-4  # SGD momentum 0.9; constant; none on biases and BN (official README, utils/utils.py)
    clip_grad: float = 3.0  # per-tensor gradient-norm clip, DINO style (upstream main_scfs.py)
    freeze_last_layer: int = 1  # epochs in which the DINO head's last layer is not updated (upstream main_scfs.py)

    limits: ClassVar[dict] = {
        "input_size": "[1, 4096]", "local_size": "[1, 4096]", "local_crops": "[1, inf)", "global_scale_min": "(0, 1]",
        "local_scale_min": "(0, 1]", "local_scale_max": "(0, 1]", "blur_radius_min": "[0, inf)",
        "blur_radius_max": "[0, inf)", "out_dim": "[1, inf)", "hidden_dim": "[1, inf)", "bottleneck_dim": "[1, inf)",
        "stage_bottleneck": "[1, inf)", "stage_hidden": "[1, inf)", "stage_dim": "[1, inf)",
        "student_temp": "(0, inf)", "teacher_temp": "(0, inf)", "warmup_teacher_temp": "(0, inf)",
        "warmup_teacher_temp_epochs": "[0, 10000]", "center_momentum": "[0, 1]", "momentum_teacher": "[0, 1]",
        "warmup_epochs": "[0, 10000]", "blr": "(0, inf)", "min_lr": "[0, inf)", "weight_decay": "[0, inf)",
        "clip_grad": "[0, inf)", "freeze_last_layer": "[0, 10000]"}
    presets: ClassVar[dict] = {
        # ResNet-18 with the CIFAR stem, 2 x 32 px + 6 x 16 px crops; maps 16/8/4 (globals), 8/4/2 (locals);
        # DINO's blur radii (0.1-2 px, meant for 224 px crops) scaled by 32 / 224.
        "cifar10": dict(model="resnet18", cifar_stem=True, input_size=32, local_size=16, local_crops=6,
                        out_dim=4096, stage_hidden=1024, epochs=100, warmup_epochs=10,
                        warmup_teacher_temp_epochs=30, batch_size=256, micro_batch=256, blr=0.3,
                        weight_decay=5e-4, num_workers=8, output_dir="./runs/scfs_cifar10",
                        blur_radius_min=0.1 * 32 / 224, blur_radius_max=2.0 * 32 / 224),
    }


# --- method ---------------------------------------------------------------------------------------
# DINO's pieces (Caron et al., ICCV 2021; dino main_dino.py, utils.py, vision_transformer.py): multi-crop,
# the projection head, the centred and sharpened cross-entropy, the teacher's temperature and momentum.
class RandomBlur:
    """PIL Gaussian blur with probability p and a radius drawn from U(radius): DINO's GaussianBlur (utils.py),
    U(0.1, 2) at every crop size, global and local alike."""
    def __init__(self, p, radius=(0.1, 2.0)):
        self.p, self.radius = p, radius

    def __call__(self, img):
        if float(torch.rand(())) >= self.p:
            return img
        low, high = self.radius
        return img.filter(ImageFilter.GaussianBlur(low + (high - low) * float(torch.rand(()))))


class MultiCrop:
    """DINO's multi-crop: PIL image -> [global 1 (blur p 1), global 2 (blur .1, solarize .2), locals (blur .5)].
    blur_radius: the range of the blur radius in pixels (DINO: 0.1-2 for 224 and 96 px crops alike)."""
    def __init__(self, global_size=224, local_size=96, local_crops=8, global_scale=(0.4, 1.0),
                 local_scale=(0.05, 0.4), blur_radius=(0.1, 2.0)):
        bicubic = transforms.InterpolationMode.BICUBIC
        colour = [transforms.RandomHorizontalFlip(0.5),
                  transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                  transforms.RandomGrayscale(0.2)]
        norm = [transforms.ToTensor(), transforms.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)]
        g_crop = transforms.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic)
        l_crop = transforms.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic)
        self.global1 = transforms.Compose([g_crop, *colour, RandomBlur(1.0, blur_radius), *norm])
        self.global2 = transforms.Compose([g_crop, *colour, RandomBlur(0.1, blur_radius),
                                           transforms.RandomSolarize(128, p=0.2), *norm])
        self.local = transforms.Compose([l_crop, *colour, RandomBlur(0.5, blur_radius), *norm])
        self.local_crops = local_crops

    def __call__(self, img):
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.local_crops)]


class DINOHead(nn.Module):
    """DINO's head: MLP, L2-normalise, weight-normed last layer (g = 1, frozen iff norm_last_layer)."""
    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, nlayers=3, norm_last_layer=True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i in range(nlayers):
            layers += [nn.Linear(dims[i], dims[i + 1])] + ([nn.GELU()] if i < nlayers - 1 else [])
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_normed_linear(bottleneck_dim, out_dim, trainable_g=not norm_last_layer)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def weight_normed_linear(in_dim, out_dim, trainable_g=True):
    """Linear(in_dim, out_dim, bias=False), weight = g v / |v| per row, g = 1. parametrizations.weight_norm:
    g, v = last_layer.parametrizations.weight.original0/1 (deepcopy works; the old weight_norm's does not)."""
    layer = torch.nn.utils.parametrizations.weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    g = layer.parametrizations.weight.original0
    g.data.fill_(1.0)
    g.requires_grad_(trainable_g)
    return layer


def dino_loss(student_out, teacher_out, center, student_temp, teacher_temp):
    """DINO's cross-entropy: mean over the pairs (teacher chunk i, student chunk v), v != i, of
    mean_b(-sum_k q log p); q = softmax((t - center) / teacher_temp) (no gradient), p = softmax(s / student_temp).
    student_out (V*B, K), teacher_out (2*B, K), both crop-major; center (1, K) or None. float32 scalar.
    NOTE(official): DINO loops over the 2V - 2 pairs; here they are summed at once as
    sum_i q_i . (sum_v log p_v) - sum_i q_i . log p_i (same value and gradient, fewer passes over (B, K))."""
    B = teacher_out.shape[0] // 2
    V = student_out.shape[0] // B
    t = teacher_out.detach().float()
    q = F.softmax((t - center if center is not None else t) / teacher_temp, dim=-1)  # (2B, K)
    logp = F.log_softmax(student_out.float() / student_temp, dim=-1)  # (VB, K)
    all_views = logp.view(V, B, -1).sum(0)  # (B, K)
    cross = (q.view(2, B, -1).sum(0) * all_views).sum() - (q * logp[:2 * B]).sum()
    return -cross / (B * (2 * V - 2))


class DINOCenter(nn.Module):
    """The running centre (buffer (1, K)) of a teacher's outputs, subtracted before its softmax."""
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, teacher_out, momentum=0.9):
        """c <- m c + (1 - m) mean of the rows of teacher_out (all processes' rows when distributed)."""
        batch_mean = teacher_out.float().mean(0, keepdim=True)  # (1, K)
        if dist.is_available() and dist.is_initialized():  # every process's rows (DINO's update_center)
            dist.all_reduce(batch_mean)
            batch_mean /= dist.get_world_size()
        self.center.mul_(momentum).add_(batch_mean, alpha=1 - momentum)


def teacher_temperature(epoch, warmup_temp, temp, warmup_epochs):
    """DINO's per-epoch teacher temperature: linspace(warmup_temp, temp, W)[epoch] for epoch < W, then temp."""
    if epoch < warmup_epochs:
        return float(np.linspace(warmup_temp, temp, warmup_epochs)[epoch])
    return float(temp)


def teacher_momentum(progress, base=0.996):
    """DINO's EMA momentum at a point of training (progress in [0, 1]): 1 - (1 - m0)(1 + cos(pi progress)) / 2."""
    return 1 - (1 - base) * (1 + math.cos(math.pi * progress)) / 2


def stage_channels(net, stage):
    """C_k of a torchvision ResNet's layer{stage} output (BasicBlock: 64 * 2^(k-1); Bottleneck: 4x that).
    NOTE(official): the official heads hard-code ResNet-50 widths 512/1024/2048 (models/scfs.py)."""
    return 64 * 2 ** (stage - 1) * type(net.layer4[-1]).expansion


class StageHead(nn.Module):
    """Per-stage 'shallow' head (as upstream): residual bottleneck (1x1 C->Db, 3x3, 1x1 Db->C, BN each, bias-free
    convs, + input, ReLU), global average pool, Linear-BN-ReLU-Linear-BN, L2 normalisation.
    (N, C, H, W) -> (N, D). Default PyTorch init, as the official."""

    def __init__(self, channels, bottleneck=256, hidden=2048, out_dim=256):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, bottleneck, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(bottleneck)
        self.conv2 = nn.Conv2d(bottleneck, bottleneck, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck)
        self.conv3 = nn.Conv2d(bottleneck, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out_dim), nn.BatchNorm1d(out_dim))

    def forward(self, x, weights=None):
        """weights (L, B, H, W): x (B, C, H, W) is a map to re-weight by each of the L similarity maps first,
        giving L*B outputs, crop-major. conv1 is a 1x1 convolution without bias, linear at each location,
        so conv1(A * x) = A * conv1(x): it runs once on the B maps instead of on the L*B re-weighted ones
        (same values up to rounding). NOTE(official): the official convolves the L*B re-weighted maps."""
        if weights is None:
            h = self.conv1(x)
        else:
            h = (weights.unsqueeze(2) * self.conv1(x).unsqueeze(0)).flatten(0, 1)  # (L*B, Db, H, W)
            x = (weights.unsqueeze(2) * x.unsqueeze(0)).flatten(0, 1)  # the searched maps S, (L*B, C, H, W)
        h = F.relu(self.bn1(h), inplace=True)
        h = F.relu(self.bn2(self.conv2(h)), inplace=True)
        h = F.relu(self.bn3(self.conv3(h)) + x)
        # NOTE(official): mean over (H, W) instead of AdaptiveAvgPool + .squeeze(), which breaks at batch 1
        return F.normalize(self.mlp(h.mean((2, 3))), dim=-1)  # (N, D)


@torch.no_grad()
def feature_search(local_maps, teacher_map):
    """Similarity maps of the search (upstream TeacherWrapper): the pooled, L2-normalised student feature of each local
    crop (the query, stop-grad) against the channel-normalised teacher map of global crop 1 at every
    location; plain cosine, no softmax or temperature, in [0, 1] for post-ReLU features.
    local_maps (L*B, C, h, w) crop-major, teacher_map (B, C, H, W) -> (L, B, H, W)."""
    B, C = teacher_map.shape[:2]
    query = F.normalize(local_maps.detach().float().mean((2, 3)), dim=1).view(-1, B, C)  # (L, B, C)
    keys = F.normalize(teacher_map.float(), dim=1)  # (B, C, H, W)
    # NOTE(official): one einsum over all L crops instead of a loop over crops that concatenates as it goes
    return torch.einsum("lbc,bchw->lbhw", query, keys).to(teacher_map.dtype)


def search_loss(student_local, teacher_local, student_temp, teacher_temp):
    """L_l^k (upstream DINOShallowLoss): crop i of the student against the target searched with crop i's own query, no
    centring. Both (L*B, D) crop-major; mean over crops of batch means = mean over all rows."""
    targets = F.softmax(teacher_local.float() / teacher_temp, dim=-1)
    return -(targets * F.log_softmax(student_local.float() / student_temp, dim=-1)).sum(-1).mean()


class SCFS(nn.Module):
    """DINO with stage-wise semantics-consistent feature search. `loss, stats = model(crops, progress)`,
    crops = [global 1, global 2, local 1..L], each (B, 3, h, w). search=False is plain DINO.
    NOTE(official): no box generator and no RoIAlign layers: the official builds them and passes them
    around but never calls them in its training step (main_scfs.py, models/scfs.py)."""

    def __init__(self, encoder, out_dim=65536, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True,
                 search=True, stages=(2, 3, 4), stage_bottleneck=256, stage_hidden=2048, stage_dim=256,
                 student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=50,
                 center_momentum=0.9, epochs=200):
        super().__init__()
        self.stages = tuple(sorted(stages)) if search else ()  # stages with a search and a head
        self.taps = tuple(sorted(set(self.stages) | {4}))  # maps read from the encoder; layer4 gives the pool
        head = DINOHead(stage_channels(encoder, 4), out_dim, hidden_dim, bottleneck_dim,
                        norm_last_layer=norm_last_layer)
        stage_heads = nn.ModuleList(StageHead(stage_channels(encoder, k), stage_bottleneck, stage_hidden,
                                              stage_dim) for k in self.stages)
        stage_heads.to(memory_format=torch.channels_last)  # like the encoder's maps (common.resnet_features)
        self.student = nn.ModuleDict({"encoder": encoder, "head": head, "stage_heads": stage_heads})
        # Teacher: a copy, no gradients, updated by EMA of parameters only; it stays in train mode, so its
        # BatchNorms use batch statistics (as upstream).
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        # NOTE(official): centers are buffers of the model, so a resume restores all four (upstream forgets c_4)
        self.center = DINOCenter(out_dim)  # c of L_d
        self.stage_centers = nn.ModuleList(DINOCenter(stage_dim) for _ in stage_heads)  # c_k
        self.student_temp, self.center_momentum, self.epochs = student_temp, center_momentum, epochs
        self.teacher_temp_args = (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)

    def teacher_temp(self, progress):
        """tau_t, set per epoch: linear warmup_teacher_temp -> teacher_temp over the warm-up epochs (as upstream)."""
        return teacher_temperature(common.epoch_at(progress, self.epochs), *self.teacher_temp_args)

    def forward(self, crops, progress):
        B = crops[0].shape[0]
        student, teacher, ts = self.student, self.teacher, self.student_temp
        tt = self.teacher_temp(progress)
        # Student: globals and locals in two calls, so BatchNorm normalises each resolution on its own
        # (as upstream and DINO's multi-crop wrapper).
        maps_g = common.resnet_features(student["encoder"], torch.cat(crops[:2]), self.taps)  # [(2B, C_k, H, W)]
        maps_l = common.resnet_features(student["encoder"], torch.cat(crops[2:]), self.taps)  # [(LB, C_k, h, w)]
        z_s = student["head"](torch.cat([maps_g[-1].mean((2, 3)), maps_l[-1].mean((2, 3))]))  # (V*B, K); no BN
        # NOTE(official): the teacher pass runs under no_grad (upstream: outside it, but nothing in it
        # requires grad), and the student's DINO head runs once on all crops (no BatchNorm in it).
        with torch.no_grad():  # the teacher sees the 2 global crops only
            maps_t = common.resnet_features(teacher["encoder"], torch.cat(crops[:2]), self.taps)
            z_t = teacher["head"](maps_t[-1].mean((2, 3)))  # (2B, K)
        loss_dino = dino_loss(z_s, z_t, self.center.center, ts, tt)  # 2 x (V - 1) pairs (as upstream)
        stats = {"loss_dino": loss_dino.detach(), "teacher_temp": torch.full((), tt, device=z_s.device)}
        loss, loss_global, loss_search, similarity = loss_dino, 0.0, 0.0, 0.0
        for i, (head_s, head_t) in enumerate(zip(student["stage_heads"], teacher["stage_heads"])):
            k = self.taps.index(self.stages[i])
            p_s_g, p_s_l = head_s(maps_g[k]), head_s(maps_l[k])  # (2B, D), (LB, D)
            with torch.no_grad():
                view1 = maps_t[k][:B]  # keys and values: teacher map of global crop 1 only (as upstream)
                sim = feature_search(maps_l[k], view1)  # (L, B, H, W)
                p_t_g = head_t(maps_t[k])  # (2B, D)
                p_t_l = head_t(view1, weights=sim)  # searched targets, (LB, D); own BN call (as upstream)
            # L_g^k: cross-view and centred, i.e. DINO's loss over the 2 global crops: 2 pairs, 1/2 each
            stage_global = dino_loss(p_s_g, p_t_g, self.stage_centers[i].center, ts, tt)
            stage_search = search_loss(p_s_l, p_t_l, ts, tt)  # L_l^k: L same-index pairs, uncentred
            loss = loss + 0.5 * (stage_global + stage_search)  # L = L_d + sum_k (L_g^k + L_l^k) / 2 (main_scfs.py)
            loss_global, loss_search = loss_global + stage_global.detach(), loss_search + stage_search.detach()
            similarity = similarity + sim.float().mean()
            # after the loss: the loss used the previous center; global teacher outputs only (as upstream)
            self.stage_centers[i].update(p_t_g, self.center_momentum)
        self.center.update(z_t, self.center_momentum)
        if self.stages:
            n = len(self.stages)
            stats.update(loss_stage_global=loss_global / n, loss_search=loss_search / n, search_sim=similarity / n)
        return loss, stats

    @torch.no_grad()
    def update_teacher(self, momentum):
        """teacher <- m * teacher + (1 - m) * student over parameters, after each optimizer step (as upstream)."""
        common.ema_update(self.teacher, self.student, momentum)


# --- training -------------------------------------------------------------------------------------
@torch.no_grad()
def average_bn_stats(model):
    """Average BatchNorm running statistics over processes before a checkpoint (no-op in one process). On CUDA
    DINO-style methods use SyncBatchNorm (equal already); gloo on CPU has none, so each rank has its own."""
    if training.distributed():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(training.all_reduce_mean(m.running_mean))
                m.running_var.copy_(training.all_reduce_mean(m.running_var))


def cancel_last_layer(model, epoch, freeze_epochs):
    """DINO's freeze_last_layer: no gradient (so no step, no decay) for *last_layer* parameters while epoch < freeze."""
    if epoch < freeze_epochs:
        for name, p in model.named_parameters():
            if "last_layer" in name:
                p.grad = None


def build(cfg):
    """The model of a config (used by main, bench.py and the tests)."""
    encoder = common.resnet(cfg.model, cifar_stem=cfg.cifar_stem)
    if not cfg.local_scale_min < cfg.local_scale_max <= 1 or cfg.blur_radius_min > cfg.blur_radius_max:
        common.fail(f"the ranges --local_scale_min {cfg.local_scale_min} < --local_scale_max {cfg.local_scale_max} "
                    f"and --blur_radius_min {cfg.blur_radius_min} <= --blur_radius_max {cfg.blur_radius_max} must hold")
    return SCFS(encoder, out_dim=cfg.out_dim, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
                norm_last_layer=cfg.norm_last_layer, search=cfg.search, stages=(2, 3, 4),
                stage_bottleneck=cfg.stage_bottleneck, stage_hidden=cfg.stage_hidden, stage_dim=cfg.stage_dim,
                student_temp=cfg.student_temp, teacher_temp=cfg.teacher_temp,
                warmup_teacher_temp=cfg.warmup_teacher_temp, warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
                center_momentum=cfg.center_momentum, epochs=cfg.epochs)


def make_optimizer(model, cfg, steps_per_epoch):
    """SGD, momentum 0.9; weight decay on conv/linear weights only, none on biases and BN; frozen parameters
    (teacher, fixed last-layer magnitude) left out (as upstream). schedule(step) sets that step's lr (upstream utils/utils.py cosine_scheduler:
    linspace warm-up to lr, then a half-cosine towards min_lr that never quite reaches it) and returns it.
    NOTE(official): weight decay is a constant, not a per-step schedule (upstream's runs 1e-4 -> 1e-4)."""
    lr = cfg.blr * cfg.batch_size / 256
    lrs = training.cosine_schedule(lr, cfg.min_lr, cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch,
                                   dino_warmup=True)
    optimizer = torch.optim.SGD(training.param_groups(model, cfg.weight_decay), lr=lr, momentum=0.9)
    return optimizer, lambda step: training.set_lr(optimizer, lrs[step])


def synthetic_batch(cfg, device):
    """Random crops of the real shapes, for bench.py: 2 globals then the locals, each (B, 3, h, w)."""
    sizes = [cfg.input_size] * 2 + [cfg.local_size] * cfg.local_crops
    return [torch.randn(cfg.micro_batch, 3, s, s, device=device) for s in sizes]


def compiled_regions(model):
    """What --compile compiles: the four ResNet stages and the stage heads of student and teacher."""
    return [m for net in (model.student, model.teacher)
            for m in [getattr(net["encoder"], f"layer{k}") for k in range(1, 5)] + list(net["stage_heads"])]


def train_step(ddp, optimizer, micro_batches, progress, cfg, ctx):
    """One optimizer step over a Step of micro-batches (also timed by bench.py). -> the step's stats."""
    model = training.unwrap(ddp)
    stats = training.forward_backward(ddp, micro_batches, progress, ctx)  # means over the micro-batches
    ctx.scaler.unscale_(optimizer)
    stats["grad_norm"] = training.clip_per_tensor(model.parameters(), cfg.clip_grad)  # method-specific
    cancel_last_layer(model, common.epoch_at(progress, cfg.epochs), cfg.freeze_last_layer)  # method-specific
    training.optimizer_step(optimizer, ctx)
    model.update_teacher(teacher_momentum(progress, cfg.momentum_teacher))  # method-specific
    return stats


def main(cfg):
    ctx = training.setup(cfg)
    model = build(cfg).to(ctx.device)  # method-specific
    if ctx.world > 1 and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN over the global batch, as the official
    transform = MultiCrop(cfg.input_size, cfg.local_size, cfg.local_crops, (cfg.global_scale_min, 1.0),
                          (cfg.local_scale_min, cfg.local_scale_max),
                          (cfg.blur_radius_min, cfg.blur_radius_max))  # method-specific
    dataset = common.image_dataset(cfg.data_path, transform, cfg.data_root)
    batches = training.Batches(dataset, cfg, ctx)
    steps_per_epoch, total_steps = batches.steps_per_epoch, cfg.epochs * batches.steps_per_epoch
    optimizer, schedule = make_optimizer(model, cfg, steps_per_epoch)  # method-specific
    start_epoch = training.resume(cfg, "scfs", model, optimizer, ctx)
    if cfg.compile:
        training.compile_modules(compiled_regions(model))  # method-specific: ResNet stages and stage heads
    ddp = training.wrap_ddp(model, ctx)
    log = training.Logger(cfg, ctx, steps_per_epoch, start_epoch)
    log.run_line("scfs", model, batches, blr=cfg.blr)
    log.info(f"scfs: {cfg.model}, 2 x {cfg.input_size} px + {cfg.local_crops} x {cfg.local_size} px crops; "
             f"feature search at stages {model.stages or 'none (plain DINO)'}")  # method-specific
    log.warmups(lr="warmup_epochs", teacher_temperature="warmup_teacher_temp_epochs",
                last_layer_freeze="freeze_last_layer")
    arch = {"model": cfg.model, "input_size": cfg.input_size, "cifar_stem": cfg.cifar_stem}

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        for it, micro_batches in enumerate(batches.epoch(epoch)):
            step = epoch * steps_per_epoch + it
            lr = schedule(step)
            stats = train_step(ddp, optimizer, micro_batches, step / total_steps, cfg, ctx)
            log.step(step, lr, stats)
        # NOTE(official): SyncBN everywhere there; gloo (CPU) has none, so CPU ranks keep their own BN statistics
        average_bn_stats(model)
        training.save_checkpoint(cfg, "scfs", model, optimizer, epoch + 1, ctx,
                                 encoders={"cnn": (model.teacher["encoder"], arch)})
    log.close()
    return model


if __name__ == "__main__":
    if training is None:
        raise SystemExit("error: scfs.py's training program needs training.py beside it; copy it from the repository")
    main(training.parse_config(Config))
