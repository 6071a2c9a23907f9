"""mokd.py: Multi-Mode Online Knowledge Distillation (Song et al., CVPR 2023): a CNN and a ViT trained
together from scratch, each a DINO student with its own EMA teacher and two heads (DINO's MLP head and a
3-block transformer head, the T-Head). Each model distils from its own teacher (self-distillation) and
from the other model's teacher (cross-distillation): on the MLP heads directly, on the T-Heads through a
feature search in which the other student's local-crop embedding joins this teacher's T-Head as a query.
Paper: arXiv 2304.06461.  Run: torchrun --nproc_per_node=8 mokd.py --data_path /imagenet/train
Shapes: B images, n local crops, V = 2 + n crops, K out_dim, D ViT width (= T-Head width of both), C CNN
channels, T spatial tokens of a crop (h*w for the CNN, N patches for the ViT).
To reuse: the model, mokd.py + common.py; the training program, + training.py."""
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
from common import Block

try:  # the training program below needs training.py; the method section needs only common.py
    import training
    TrainConfig = training.TrainConfig
except ModuleNotFoundError:  # this file copied with common.py alone, to reuse the model: the program cannot run
    training, TrainConfig = None, object


# --- config ---------------------------------------------------------------------------------------
@dataclass
class Config(TrainConfig):
    output_dir: str = "./runs/mokd"  # checkpoint.pth, log.jsonl, config.json; rerun to resume
    model: str = "vit_small"  # the ViT of the pair: vit_tiny, vit_small, vit_base (official README: ViT-S/16)
    cnn_model: str = "resnet50"  # the CNN of the pair, a torchvision ResNet name (official README: ResNet-50)
    cifar_stem: bool = False  # CNN stem for 32 px images: 3x3 stride-1 conv, no max-pool (ours, not upstream)
    input_size: int = 224  # global crop side (upstream dino_augmentation.py: 224)
    local_size: int = 96  # local crop side (upstream dino_augmentation.py: 96)
    patch_size: int = 16  # ViT patch side (official README: 16)
    local_crops: int = 8  # n local crops per image, at least 1: the search loss lives on them (official README: 8)
    global_scale_min: float = 0.25  # global crops: area (this, 1); locals: (local_scale_min, this) (official README)
    local_scale_min: float = 0.05  # lower area bound of the local crops (official README)
    blur_radius_min: float = 0.1  # Gaussian blur radius range in pixels, all crops (DINO utils.py: 0.1 to 2)
    blur_radius_max: float = 2.0  # its upper end
    drop_path: float = 0.1  # stochastic depth of the ViT student (official README: 0.1); its teacher uses 0
    out_dim: int = 65536  # K, outputs of every head (official README)
    hidden_dim: int = 2048  # MLP head width (upstream models/mokd.py)
    bottleneck_dim: int = 256  # MLP head bottleneck before the weight-normed last layer (upstream models/mokd.py)
    thead_depth: int = 3  # T-Head blocks (upstream main_mokd.py: 3)
    thead_heads: int = 6  # T-Head attention heads (6, hard-coded in upstream main_mokd.py; divides 192 and 384)
    norm_last_layer_cnn: bool = True  # freeze g of the CNN MLP head's last layer (main_mokd.py: True, hard-coded)
    norm_last_layer_vit: bool = False  # freeze g of the ViT MLP head's last layer (main_mokd.py: False, hard-coded)
    cross: bool = True  # cross-distillation; --no-cross (with --no-thead): two independent DINO runs
    thead: bool = True  # the T-Heads (self-distilled, and the search when --cross)
    lambda_cnn: float = 1.0  # lambda_c, weight of the CNN's cross terms (official README: 1.0)
    lambda_vit: float = 0.1  # lambda_t, weight of the ViT's cross terms (official README: 0.1)
    warmup_teacher_temp: float = 0.04  # teacher temperature at epoch 0 (official README: 0.04)
    teacher_temp: float = 0.07  # teacher temperature after its warmup (official README: 0.07)
    teacher_temp_epochs_cnn: int = 50  # warmup of the CNN's self terms L_sm, L_st (official README: 50)
    teacher_temp_epochs_vit: int = 30  # warmup of the other six terms (official README: 30; upstream main_mokd.py)
    student_temp: float = 0.1  # tau_s of every term (upstream models/mokd.py)
    center_momentum: float = 0.9  # centre EMA (upstream models/mokd.py)
    momentum_teacher: float = 0.996  # EMA momentum at step 0, cosine to 1 (official README, upstream main_mokd.py)
    epochs: int = 100  # pretraining epochs (official README: 100)
    warmup_epochs: int = 10  # linear lr warmup of both optimizers (official README)
    batch_size: int = 256  # global batch (official README: 16 GPUs x 16)
    micro_batch: int = 16  # per-device batch (speed/memory only); if not given, the largest divisor of it up to this
    blr_cnn: float = 0.1  # CNN SGD lr per 256 images (official README: 0.1); lr = blr * batch_size / 256
    blr_vit: float = 3e-4  # ViT AdamW lr per 256 images, also the CNN T-Head's (official README: 3e-4; main_mokd.py)
    min_lr_cnn: float = 0.0048  # end of the CNN's cosine lr (hard-coded in main_mokd.py)
    min_lr_vit: float = 1e-5  # end of the ViT's (and CNN T-Head's) cosine lr (hard-coded in main_mokd.py)
    weight_decay_cnn: float = 1e-4  # constant SGD weight decay of the CNN's matrices (hard-coded in main_mokd.py)
    weight_decay_vit: float = 0.04  # start of the ViT (and CNN T-Head) weight-decay cosine (hard-coded in main_mokd.py)
    weight_decay_vit_end: float = 0.4  # its end (hard-coded in main_mokd.py)
    clip_grad_cnn: float = 3.0  # per-tensor gradient clipping of the CNN (official README: 3); 0: off
    clip_grad_vit: float = 3.0  # per-tensor gradient clipping of the ViT (official README: 3); 0: off
    freeze_last_layer: int = 1  # epochs without updates of every *last_layer* parameter (official README: 1)

    limits: ClassVar[dict] = {
        "input_size": "[1, 4096]", "local_size": "[1, 4096]", "patch_size": "[1, inf)", "local_crops": "[1, inf)",
        "global_scale_min": "(0, 1]", "local_scale_min": "(0, 1]", "blur_radius_min": "[0, inf)",
        "blur_radius_max": "[0, inf)", "drop_path": "[0, 1)", "out_dim": "[1, inf)", "hidden_dim": "[1, inf)",
        "bottleneck_dim": "[1, inf)", "thead_depth": "[1, inf)", "thead_heads": "[1, inf)", "lambda_cnn": "[0, inf)",
        "lambda_vit": "[0, inf)", "warmup_teacher_temp": "(0, inf)", "teacher_temp": "(0, inf)",
        "teacher_temp_epochs_cnn": "[0, 10000]", "teacher_temp_epochs_vit": "[0, 10000]", "student_temp": "(0, inf)",
        "center_momentum": "[0, 1]", "momentum_teacher": "[0, 1]", "warmup_epochs": "[0, 10000]", "blr_cnn": "(0, inf)",
        "blr_vit": "(0, inf)", "min_lr_cnn": "[0, inf)", "min_lr_vit": "[0, inf)", "weight_decay_cnn": "[0, inf)",
        "weight_decay_vit": "[0, inf)", "weight_decay_vit_end": "[0, inf)", "clip_grad_cnn": "[0, inf)",
        "clip_grad_vit": "[0, inf)", "freeze_last_layer": "[0, 10000]"}
    presets: ClassVar[dict] = {
        # ResNet-18 (CIFAR stem) + ViT-Tiny/4 at 32 px, 6 local crops of 16 px, K = 4096 (our small-scale choice); DINO's blur
        # radii (0.1-2 px, meant for 224 px crops) scaled by 32 / 224.
        "cifar10": dict(model="vit_tiny", cnn_model="resnet18", cifar_stem=True, input_size=32, local_size=16,
                        patch_size=4, local_crops=6, out_dim=4096, hidden_dim=1024, epochs=100, batch_size=256,
                        micro_batch=128, num_workers=8, output_dir="./runs/mokd_cifar10",
                        blur_radius_min=0.1 * 32 / 224, blur_radius_max=2.0 * 32 / 224),
    }


# --- method ---------------------------------------------------------------------------------------
# DINO's pieces (Caron et al., ICCV 2021; dino main_dino.py, utils.py, vision_transformer.py): multi-crop,
# the projection head, the centred and sharpened cross-entropy, the teacher's temperature and momentum.
# Copied from scfs.py: RandomBlur
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


# Copied from scfs.py: MultiCrop
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


# Copied from scfs.py: DINOHead
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


# Copied from scfs.py: weight_normed_linear
def weight_normed_linear(in_dim, out_dim, trainable_g=True):
    """Linear(in_dim, out_dim, bias=False), weight = g v / |v| per row, g = 1. parametrizations.weight_norm:
    g, v = last_layer.parametrizations.weight.original0/1 (deepcopy works; the old weight_norm's does not)."""
    layer = torch.nn.utils.parametrizations.weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    g = layer.parametrizations.weight.original0
    g.data.fill_(1.0)
    g.requires_grad_(trainable_g)
    return layer


# Copied from scfs.py: dino_loss
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


# Copied from scfs.py: DINOCenter
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


# Copied from scfs.py: teacher_temperature
def teacher_temperature(epoch, warmup_temp, temp, warmup_epochs):
    """DINO's per-epoch teacher temperature: linspace(warmup_temp, temp, W)[epoch] for epoch < W, then temp."""
    if epoch < warmup_epochs:
        return float(np.linspace(warmup_temp, temp, warmup_epochs)[epoch])
    return float(temp)


# Copied from scfs.py: teacher_momentum
def teacher_momentum(progress, base=0.996):
    """DINO's EMA momentum at a point of training (progress in [0, 1]): 1 - (1 - m0)(1 + cos(pi progress)) / 2."""
    return 1 - (1 - base) * (1 + math.cos(math.pi * progress)) / 2


def search_loss(student_out, target, student_temp, teacher_temp):
    """Cross-search loss (upstream CTSearchLoss): mean over rows of -sum_k softmax(t / tau_t) log softmax(s / tau_s),
    rows paired one to one, no centring, no view skipping. student_out, target: (n*B, K)."""
    q = F.softmax(target.detach().float() / teacher_temp, dim=-1)
    return -(q * F.log_softmax(student_out.float() / student_temp, dim=-1)).sum(-1).mean()


def init_trunc_normal(module):
    """DINO's init: Linear weights trunc-normal std .02, zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias) if m.bias is not None else None
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class THead(nn.Module):
    """Transformer head on spatial tokens (as upstream): [query +] tokens + learnable pos-embed -> blocks -> LN
    -> the query position dropped -> mean over tokens -> weight-normed Linear(D, K), g = 1 and trainable,
    no L2-normalisation before it. in_channels > 0: a 1x1 conv first (the CNN's C -> D)."""

    def __init__(self, dim, out_dim, grid, in_channels=0, depth=3, heads=6):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 1) if in_channels else None  # PyTorch's default init, as upstream
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        init_trunc_normal(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.last_layer = weight_normed_linear(dim, out_dim, trainable_g=True)  # v: default init

    def tokens(self, x):
        """CNN map (B, C, h, w) or ViT patch tokens (B, T, D) -> tokens with positions (B, T, D), and for the
        CNN the mean of its projected map (B, D), the CNN's search query (as upstream models/mokd.py)."""
        pool = None
        if self.proj is not None:
            x = self.proj(x)  # (B, D, h, w)
            pool = x.mean((2, 3))
            x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        return x + common.resize_pos_embed(self.pos_embed, int(round(math.sqrt(x.shape[1])))), pool

    def pooled(self, tokens, query=None):
        """tokens (R, T, D), query (R, D) or None -> (R, D), before the last layer. With a query, every token
        also attends to it (joint attention over 1 + T tokens); its own output is dropped, so it acts only
        as a key/value."""
        x = tokens if query is None else torch.cat([query.unsqueeze(1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if query is not None:
            x = x[:, 1:]  # the query position is not part of the pooled mean (as upstream)
        return x.mean(1)

    def forward(self, tokens, query=None):  # (R, T, D) -> (R, K)
        return self.last_layer(self.pooled(tokens, query))

    @torch.no_grad()
    def search_attention(self, tokens, query):
        """Where the search finds the query: the first block's attention of every token to the prepended query,
        the mean over heads (each token's share of attention on the query), as the query enters the head.
        For visualisation. tokens (R, T, D), query (R, D) -> (R, T)"""
        x = torch.cat([query.unsqueeze(1), tokens], dim=1)  # (R, 1 + T, D), as pooled() builds it
        first = self.blocks[0]
        return first.attn.weights(first.norm1(x))[:, :, 1:, 0].mean(1)


class Net(nn.Module):
    """One network of the pair: backbone (torchvision ResNet or our ViT), MLP head, T-Head (or None)."""

    def __init__(self, backbone, head, thead):
        super().__init__()
        self.backbone, self.head, self.thead = backbone, head, thead
        self.is_vit = isinstance(backbone, common.VisionTransformer)

    def features(self, x):
        """(R, 3, H, W) -> pooled feature for the MLP head, T-Head tokens (or None), query (R, D).
        CNN: layer4 map, pooled = its mean, query = the T-Head projection's mean. ViT: CLS and patch
        tokens after the final LN, query = CLS."""
        if self.is_vit:
            out = self.backbone(x)  # (R, 1 + N, D)
            pooled, query = out[:, 0], out[:, 0]
            tokens = self.thead.tokens(out[:, 1:])[0] if self.thead is not None else None
        else:
            fmap = common.resnet_features(self.backbone, x)[0]  # (R, C, h, w)
            pooled = fmap.mean((2, 3))
            tokens, query = self.thead.tokens(fmap) if self.thead is not None else (None, None)
        return pooled, tokens, query


class MOKD(nn.Module):
    """Two students (CNN, ViT), their EMA teachers, four centres. `loss, stats = model(crops, progress)`;
    crops: list of V tensors, crop-major, [global 1, global 2, local 1..n]."""

    def __init__(self, cnn, vit, out_dim=65536, hidden_dim=2048, bottleneck_dim=256, thead_depth=3,
                 thead_heads=6, cnn_grid=7, norm_last_layer_cnn=True, norm_last_layer_vit=False, cross=True,
                 thead=True, lambda_cnn=1.0, lambda_vit=0.1, warmup_teacher_temp=0.04, teacher_temp=0.07,
                 teacher_temp_epochs_cnn=50, teacher_temp_epochs_vit=30, student_temp=0.1, center_momentum=0.9,
                 epochs=100):
        super().__init__()
        dim, channels = vit.embed_dim, cnn.inplanes  # T-Heads have the ViT's width on both sides (as upstream)
        self.cnn = Net(cnn, DINOHead(channels, out_dim, hidden_dim, bottleneck_dim, 3, norm_last_layer_cnn),
                       THead(dim, out_dim, cnn_grid, channels, thead_depth, thead_heads) if thead else None)
        # NOTE(official): the ViT T-Head grid is hard-coded 14 there (main_mokd.py); here the ViT's grid (14 at 224/16).
        self.vit = Net(vit, DINOHead(dim, out_dim, hidden_dim, bottleneck_dim, 3, norm_last_layer_vit),
                       THead(dim, out_dim, vit.grid, 0, thead_depth, thead_heads) if thead else None)
        # Teachers start as copies of the students; the ViT teacher has no stochastic depth (as upstream main_mokd.py).
        # NOTE(official): the teacher heads there are built with norm_last_layer=True; frozen anyway, same values.
        self.teacher_cnn = copy.deepcopy(self.cnn).requires_grad_(False)
        self.teacher_vit = copy.deepcopy(self.vit).requires_grad_(False)
        for m in self.teacher_vit.modules():
            if isinstance(m, common.DropPath):
                m.p = 0.0
        # Centres, one per centred loss. NOTE(official): L_cm_cnn's centre sees the same teacher rows with the
        # same momentum as L_sm_vit's (and L_cm_vit's as L_sm_cnn's), so they are always equal:
        # the cross terms use those two, which saves two buffers and two all-reduces.
        self.center_cnn_mlp, self.center_vit_mlp = DINOCenter(out_dim), DINOCenter(out_dim)
        self.center_cnn_thead = DINOCenter(out_dim) if thead else None
        self.center_vit_thead = DINOCenter(out_dim) if thead else None
        self.cross, self.lambda_cnn, self.lambda_vit = cross, lambda_cnn, lambda_vit
        self.temps = (warmup_teacher_temp, teacher_temp, teacher_temp_epochs_cnn, teacher_temp_epochs_vit)
        self.student_temp, self.center_momentum, self.epochs = student_temp, center_momentum, epochs

    def teacher_temperatures(self, progress):
        """Per-epoch teacher temperatures (tau_cnn for the CNN's self terms, tau_vit for the others; as upstream)."""
        epoch = common.epoch_at(progress, self.epochs)
        warm, temp, w_cnn, w_vit = self.temps
        return (teacher_temperature(epoch, warm, temp, w_cnn),
                teacher_temperature(epoch, warm, temp, w_vit))

    @staticmethod
    def student(net, globals_, locals_):
        """All V crops, the two resolutions through the backbone separately (as upstream). -> MLP outputs (VB, K),
        T-Head outputs (VB, K) and (nB, K) (locals only), the local-crop queries (nB, D)."""
        g_pooled, g_tokens, _ = net.features(globals_)
        l_pooled, l_tokens, l_query = net.features(locals_)
        mlp = net.head(torch.cat([g_pooled, l_pooled]))  # one head pass over (VB, .)
        if net.thead is None:
            return mlp, None, None, None
        # one last-layer pass over both resolutions (one weight-norm evaluation, one (VB, D) x (D, K) product)
        thead = net.thead.last_layer(torch.cat([net.thead.pooled(g_tokens), net.thead.pooled(l_tokens)]))
        return mlp, thead, thead[globals_.shape[0]:], l_query

    @staticmethod
    @torch.no_grad()  # NOTE(official): upstream runs it with autograd on (no graph, as nothing needs grad)
    def teacher(net, globals_, query, n):
        """Global crops only, as upstream. -> MLP (2B, K), T-Head (2B, K), search (nB, K) or None. The search:
        global crop 1's tokens tiled n times (row j*B + b = local crop j of image b), the other student's
        detached local-crop query prepended (as upstream models/mokd.py)."""
        pooled, tokens, _ = net.features(globals_)
        mlp = net.head(pooled)
        if net.thead is None:
            return mlp, None, None
        th_pooled = [net.thead.pooled(tokens)]  # (2B, D)
        if query is not None:
            B = tokens.shape[0] // 2
            th_pooled.append(net.thead.pooled(tokens[:B].repeat(n, 1, 1), query.detach()))  # (nB, D)
        out = net.thead.last_layer(torch.cat(th_pooled))  # one last-layer pass for both
        return mlp, out[:tokens.shape[0]], (out[tokens.shape[0]:] if query is not None else None)

    def losses(self, crops, progress):
        """Every loss term (graph-attached tensors), the two totals, the teacher temperatures; updates the centres."""
        n, ts = len(crops) - 2, self.student_temp
        if n < 1:
            raise ValueError("MOKD needs at least one local crop (the search loss is built on them)")
        tau_cnn, tau_vit = self.teacher_temperatures(progress)
        globals_, locals_ = torch.cat(crops[:2]), torch.cat(crops[2:])  # (2B, 3, H, W), (nB, 3, h, w)
        cnn_mlp, cnn_thead, cnn_thead_local, cnn_query = self.student(self.cnn, globals_, locals_)
        vit_mlp, vit_thead, vit_thead_local, vit_query = self.student(self.vit, globals_, locals_)
        search = self.cross and self.cnn.thead is not None
        # Every teacher output below is computed without a graph and every query is detached, so L_cnn does
        # not depend on any ViT student parameter and L_vit on no CNN one: one backward of their
        # sum gives each model exactly the gradients of its own total (tests/test_mokd.py checks it).
        target_cnn_mlp, target_cnn_thead, target_cnn_search = self.teacher(
            self.teacher_cnn, globals_, vit_query if search else None, n)
        target_vit_mlp, target_vit_thead, target_vit_search = self.teacher(
            self.teacher_vit, globals_, cnn_query if search else None, n)

        c_cnn, c_vit = self.center_cnn_mlp.center, self.center_vit_mlp.center
        losses = {"loss_sm_cnn": dino_loss(cnn_mlp, target_cnn_mlp, c_cnn, ts, tau_cnn),
                  "loss_sm_vit": dino_loss(vit_mlp, target_vit_mlp, c_vit, ts, tau_vit)}
        if cnn_thead is not None:
            losses["loss_st_cnn"] = dino_loss(cnn_thead, target_cnn_thead, self.center_cnn_thead.center, ts,
                                              tau_cnn)
            losses["loss_st_vit"] = dino_loss(vit_thead, target_vit_thead, self.center_vit_thead.center, ts,
                                              tau_vit)
        if self.cross:  # the other model's teacher, with its own centre, at the ViT warmup (as upstream main_mokd.py)
            losses["loss_cm_cnn"] = dino_loss(cnn_mlp, target_vit_mlp, c_vit, ts, tau_vit)
            losses["loss_cm_vit"] = dino_loss(vit_mlp, target_cnn_mlp, c_cnn, ts, tau_vit)
        if search:
            losses["loss_ct_cnn"] = search_loss(cnn_thead_local, target_vit_search, ts, tau_vit)
            losses["loss_ct_vit"] = search_loss(vit_thead_local, target_cnn_search, ts, tau_vit)
        # Centres move after the losses (step k uses step k-1's centre) on teacher global outputs only (as upstream).
        # NOTE(official): with gradient accumulation (upstream has none) they move once per micro-batch.
        for center, out in ((self.center_cnn_mlp, target_cnn_mlp), (self.center_vit_mlp, target_vit_mlp),
                            (self.center_cnn_thead, target_cnn_thead), (self.center_vit_thead, target_vit_thead)):
            if center is not None:
                center.update(out, self.center_momentum)

        def total(side, lam):  # L = L_sm + L_st + lambda (L_cm + L_ct) (as upstream); absent terms count 0
            get = lambda term: losses.get(f"loss_{term}_{side}", 0.0)  # noqa: E731
            return get("sm") + get("st") + lam * (get("cm") + get("ct"))
        # NOTE(official): upstream logs only L_sm as "loss_cnn"/"loss_vit"; here every term and both totals.
        losses.update(loss_cnn=total("cnn", self.lambda_cnn), loss_vit=total("vit", self.lambda_vit))
        return losses, tau_cnn, tau_vit

    def forward(self, crops, progress):
        losses, tau_cnn, tau_vit = self.losses(crops, progress)
        stats = {k: v.detach() for k, v in losses.items()}
        device = crops[0].device
        stats.update(teacher_temp_cnn=torch.full((), tau_cnn, device=device),
                     teacher_temp_vit=torch.full((), tau_vit, device=device))
        return losses["loss_cnn"] + losses["loss_vit"], stats

    @torch.no_grad()
    def update_teacher(self, momentum):
        """Both teachers <- m teacher + (1 - m) student over all parameters (T-Heads and weight_g too, as upstream)."""
        common.ema_update(self.teacher_cnn, self.cnn, momentum)
        common.ema_update(self.teacher_vit, self.vit, momentum)


# --- training -------------------------------------------------------------------------------------
# Copied from scfs.py: average_bn_stats
@torch.no_grad()
def average_bn_stats(model):
    """Average BatchNorm running statistics over processes before a checkpoint (no-op in one process). On CUDA
    DINO-style methods use SyncBatchNorm (equal already); gloo on CPU has none, so each rank has its own."""
    if training.distributed():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(training.all_reduce_mean(m.running_mean))
                m.running_var.copy_(training.all_reduce_mean(m.running_var))


# Copied from scfs.py: cancel_last_layer
def cancel_last_layer(model, epoch, freeze_epochs):
    """DINO's freeze_last_layer: no gradient (so no step, no decay) for *last_layer* parameters while epoch < freeze."""
    if epoch < freeze_epochs:
        for name, p in model.named_parameters():
            if "last_layer" in name:
                p.grad = None


def build(cfg):
    """The model of a config (used by main, bench.py and the tests)."""
    vit = common.vit(cfg.model, cfg.input_size, cfg.patch_size, cfg.drop_path)
    # DINO's ViT: learnable position table (trunc-normal) and trunc-normal Linear init (upstream vision_transformer.py).
    init_trunc_normal(vit)
    vit.pos_embed.requires_grad_(True)
    nn.init.trunc_normal_(vit.pos_embed, std=0.02)
    nn.init.trunc_normal_(vit.cls_token, std=0.02)
    cnn = common.resnet(cfg.cnn_model, cfg.cifar_stem)
    # NOTE(official): the CNN T-Head grid is input_size // 32 there; here it is the real layer4 map size,
    # so a CIFAR stem (stride 8) gets its 4 x 4 tokens their own positions.
    cnn_grid = cfg.input_size // (8 if cfg.cifar_stem else 32)
    if cnn_grid < 1 or cfg.local_size < cfg.patch_size:
        common.fail(f"--input_size {cfg.input_size} / --local_size {cfg.local_size} leave no CNN map or no ViT patch; "
                    "use larger crops (or --cifar_stem)")
    if vit.embed_dim % cfg.thead_heads:
        common.fail(f"--thead_heads {cfg.thead_heads} does not divide the ViT width {vit.embed_dim}; pass e.g. 6")
    if cfg.local_scale_min >= cfg.global_scale_min or cfg.blur_radius_min > cfg.blur_radius_max:
        common.fail(f"the ranges --local_scale_min {cfg.local_scale_min} < --global_scale_min {cfg.global_scale_min} "
                    f"and --blur_radius_min {cfg.blur_radius_min} <= --blur_radius_max {cfg.blur_radius_max} must hold")
    return MOKD(cnn, vit, out_dim=cfg.out_dim, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
                thead_depth=cfg.thead_depth, thead_heads=cfg.thead_heads, cnn_grid=cnn_grid,
                norm_last_layer_cnn=cfg.norm_last_layer_cnn, norm_last_layer_vit=cfg.norm_last_layer_vit,
                cross=cfg.cross, thead=cfg.thead, lambda_cnn=cfg.lambda_cnn, lambda_vit=cfg.lambda_vit,
                warmup_teacher_temp=cfg.warmup_teacher_temp, teacher_temp=cfg.teacher_temp,
                teacher_temp_epochs_cnn=cfg.teacher_temp_epochs_cnn, teacher_temp_epochs_vit=cfg.teacher_temp_epochs_vit,
                student_temp=cfg.student_temp, center_momentum=cfg.center_momentum, epochs=cfg.epochs)


class Optimizers:
    """The CNN's SGD and the ViT's AdamW stepped, zeroed and saved together (one checkpoint entry)."""
    def __init__(self, cnn, vit):
        self.cnn, self.vit = cnn, vit
        self.optimizers = (cnn, vit)

    param_groups = property(lambda self: self.cnn.param_groups + self.vit.param_groups)

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"cnn": self.cnn.state_dict(), "vit": self.vit.state_dict()}

    def load_state_dict(self, state_dict):
        self.cnn.load_state_dict(state_dict["cnn"])
        self.vit.load_state_dict(state_dict["vit"])


def make_optimizer(model, cfg, steps_per_epoch):
    """SGD (momentum .9) for the CNN, AdamW (betas .9/.999) for the ViT, with the upstream groups (main_mokd.py):
    CNN [matrices (wd), 1-D (no wd), T-Head (ViT lr and wd schedules, everything decayed)], ViT [matrices
    (wd), 1-D (no wd)]. Frozen parameters (the CNN MLP head's g) are left out. Returns the optimizers and
    schedule(step), which sets both lrs (DINO's cosine_scheduler: linspace warm-up, then cosine) and the ViT's
    weight decay (cosine from weight_decay_vit to weight_decay_vit_end) for that step and returns the CNN's lr.
    NOTE(official): upstream hard-codes wd, final lrs, norm_last_layer and AdamW for the ViT and ignores the
    flags that name them (main_mokd.py); here each has a flag whose default is the hard-coded value."""
    thead = [p for n, p in model.cnn.named_parameters() if n.startswith("thead.") and p.requires_grad]
    rest = [p for n, p in model.cnn.named_parameters() if not n.startswith("thead.") and p.requires_grad]
    sgd = torch.optim.SGD([{"params": [p for p in rest if p.ndim >= 2], "weight_decay": cfg.weight_decay_cnn},
                           {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
                           {"params": thead, "weight_decay": cfg.weight_decay_vit}], lr=0.0, momentum=0.9)
    adamw = training.adamw(model.vit, 0.0, cfg.weight_decay_vit, betas=(0.9, 0.999))
    optimizer = Optimizers(sgd, adamw)
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    lrs_cnn = training.cosine_schedule(cfg.blr_cnn * cfg.batch_size / 256, cfg.min_lr_cnn, total, warmup, dino_warmup=True)
    lrs_vit = training.cosine_schedule(cfg.blr_vit * cfg.batch_size / 256, cfg.min_lr_vit, total, warmup, dino_warmup=True)
    wds_vit = training.cosine_schedule(cfg.weight_decay_vit, cfg.weight_decay_vit_end, total)

    def schedule(step):
        set_schedules(optimizer, lrs_cnn[step], lrs_vit[step], wds_vit[step])
        return float(lrs_cnn[step])
    return optimizer, schedule


def set_schedules(optimizer, lr_cnn, lr_vit, wd_vit):
    """Per-step lr and weight decay of the 5 groups; the CNN T-Head follows the ViT (as upstream main_mokd.py)."""
    for group, lr in zip(optimizer.cnn.param_groups, (lr_cnn, lr_cnn, lr_vit)):
        group["lr"] = float(lr)
    optimizer.cnn.param_groups[2]["weight_decay"] = float(wd_vit)
    for group in optimizer.vit.param_groups:
        group["lr"] = float(lr_vit)
    optimizer.vit.param_groups[0]["weight_decay"] = float(wd_vit)


def synthetic_batch(cfg, device):
    """Random crops of the real multi-crop shapes, for bench.py."""
    g = [torch.randn(cfg.micro_batch, 3, cfg.input_size, cfg.input_size, device=device) for _ in range(2)]
    return g + [torch.randn(cfg.micro_batch, 3, cfg.local_size, cfg.local_size, device=device)
                for _ in range(cfg.local_crops)]


def train_step(ddp, optimizer, micro_batches, progress, cfg, ctx):
    """One optimizer step of both models over a Step of micro-batches (also timed by bench.py). -> the step's stats.
    NOTE(official): one backward of L_cnn + L_vit (one scaler) instead of two: no cross term carries a gradient
    to the other model (see MOKD.losses), so the gradients are the same."""
    model = training.unwrap(ddp)
    stats = training.forward_backward(ddp, micro_batches, progress, ctx)  # means over the micro-batches
    for opt in optimizer.optimizers:  # method-specific from here on
        ctx.scaler.unscale_(opt)
    norm_cnn = training.clip_per_tensor(model.cnn.parameters(), cfg.clip_grad_cnn)
    norm_vit = training.clip_per_tensor(model.vit.parameters(), cfg.clip_grad_vit)
    stats.update(grad_norm_cnn=norm_cnn, grad_norm_vit=norm_vit, grad_norm=torch.hypot(norm_cnn, norm_vit))
    cancel_last_layer(model, common.epoch_at(progress, cfg.epochs), cfg.freeze_last_layer)  # both head kinds
    for opt in optimizer.optimizers:
        ctx.scaler.step(opt)
    ctx.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    model.update_teacher(teacher_momentum(progress, cfg.momentum_teacher))
    return stats


def encoders(model, cfg):
    """The teachers' backbones (what upstream evaluates, its README) under torchvision / timm names."""
    return {"cnn": (model.teacher_cnn.backbone, {"model": cfg.cnn_model, "input_size": cfg.input_size,
                                                 "cifar_stem": cfg.cifar_stem}),
            "vit": (model.teacher_vit.backbone, {"model": cfg.model, "input_size": cfg.input_size,
                                                 "patch_size": cfg.patch_size})}


def main(cfg):
    ctx = training.setup(cfg)
    model = build(cfg).to(ctx.device)  # method-specific
    if ctx.world > 1 and ctx.device.type == "cuda":  # upstream's SyncBN (gloo on CPU has none)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    crops = MultiCrop(cfg.input_size, cfg.local_size, cfg.local_crops, (cfg.global_scale_min, 1.0),
                      (cfg.local_scale_min, cfg.global_scale_min), (cfg.blur_radius_min, cfg.blur_radius_max))
    dataset = common.image_dataset(cfg.data_path, crops, cfg.data_root)
    batches = training.Batches(dataset, cfg, ctx)
    steps_per_epoch, total_steps = batches.steps_per_epoch, cfg.epochs * batches.steps_per_epoch
    optimizer, schedule = make_optimizer(model, cfg, steps_per_epoch)
    start_epoch = training.resume(cfg, "mokd", model, optimizer, ctx)
    if cfg.compile:
        training.compile_blocks(model)
    ddp = training.wrap_ddp(model, ctx)
    log = training.Logger(cfg, ctx, steps_per_epoch, start_epoch)
    log.run_line("mokd", model, batches, blr_cnn=cfg.blr_cnn, blr_vit=cfg.blr_vit)
    log.warmups(lr="warmup_epochs", cnn_teacher_temperature="teacher_temp_epochs_cnn",
                vit_teacher_temperature="teacher_temp_epochs_vit", last_layer_freeze="freeze_last_layer")

    for epoch in range(start_epoch, cfg.epochs):
        model.train()  # teachers too: their BN uses batch statistics, as upstream
        for it, micro_batches in enumerate(batches.epoch(epoch)):
            step = epoch * steps_per_epoch + it
            lr = schedule(step)  # method-specific: both lrs and the ViT's weight decay
            stats = train_step(ddp, optimizer, micro_batches, step / total_steps, cfg, ctx)
            log.step(step, lr, stats)
        # NOTE(official): SyncBN everywhere there; gloo (CPU) has none, so CPU ranks keep their own BN statistics
        average_bn_stats(model)
        training.save_checkpoint(cfg, "mokd", model, optimizer, epoch + 1, ctx, encoders=encoders(model, cfg))
    log.close()
    return model


if __name__ == "__main__":
    if training is None:
        raise SystemExit("error: mokd.py's training program needs training.py beside it; copy it from the repository")
    main(training.parse_config(Config))
