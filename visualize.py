"""visualize.py: what a method sees, masks and predicts, drawn from one of our checkpoints; or a run's logged curves.
One PNG grid, a row per image and a column per view, titled. Every map is computed by the method's own code (its mask
functions, the loss predictor, the position decoder, the orders, the attention and the searches) on the checkpoint's
weights, the model rebuilt from the config saved with them, at the last trained epoch's schedule.
Run: python visualize.py --checkpoint runs/hpm/checkpoint.pth --data_path cifar10/test [--num_images 8]
     python visualize.py --log runs/hpm/log.jsonl        (every logged curve against the step, a panel each)
Columns (heat maps run black, purple, pink, peach, white = low to high, each image's map scaled to its own range
unless said; grey: masked, or no value there):
  hpm      image | visible (the training step's mask) | reconstruction (visible patches + the decoder's) | predicted
           loss (the EMA loss predictor's score of every patch of the full image) | real loss (per masked patch) |
           hard (the masked patches mined as hard, red). MAE (--no-learning_loss): no predicted loss, no hard.
           Clips: the middle frame, the mask is tubes. Feature targets: no reconstruction.
  droppos  image | visible | position (visible patches whose position embedding was dropped: green = the decoder's
           cell is right, red = wrong) | error (its distance in cells, black 0 to white the grid's diagonal) |
           placed (kept patches at their cells, dropped ones at the predicted cells)
  semaim   image | semantic order (rank map, first = white) | the checkpoint's order if another (SAIM's stochastic,
           raster) | centre (the semantic centre patch) | prediction (every patch from the ones before it in the
           order, de-normalised with the blurred target's statistics; not for feature targets)
  mokd     image (the local crop's box in cyan) | local crop | ViT attention (teacher ViT, last block, cls row, the
           mean over heads; DINO's visualize_attention.py draws each head) | search in ViT (the CNN student's
           local-crop query in the ViT teacher's T-Head: each token's attention to it, first block) | search in CNN
           (the ViT's query, the CNN teacher)
  scfs     image (box) | local crop | search at stage k = 2, 3, 4 (scfs.feature_search of the local crop's pooled
           student feature over the teacher's stage-k map of the image)
Images: num_images of the folder, evenly spaced (so every class), centre-cropped as for evaluation; local
crops are drawn as the training's multi-crop draws them. The same --seed draws the same picture.
"""
import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont
from torchvision import transforms
from torchvision.transforms import functional as TF

import common
import droppos
import hpm
import mokd
import scfs
import semaim
import training
from common import fail


@dataclass
class Config:
    checkpoint: str = ""  # checkpoint.pth of hpm.py, droppos.py, semaim.py, mokd.py or scfs.py
    data_path: str = ""  # images to draw: an ImageFolder (cifar10/test), cifar10 (its test split), or clip folders
    num_images: int = 8  # rows: this many images, evenly spaced over the folder (fewer if it holds fewer)
    output: str = ""  # the PNG to write; default: visualize.png beside the checkpoint, curves.png beside the log
    log: str = ""  # a run's log.jsonl: draw its curves (losses, lr, the method's diagnostics) instead of a checkpoint
    cell: int = 64  # least side of a picture's cell in pixels: images are enlarged by a whole factor (nearest) to it
    seed: int = 0  # seeds the masks, orders and crops: the same seed draws the same picture
    device: str = "auto"  # auto (cuda if available), cpu, cuda or cuda:N

    limits: ClassVar[dict] = {"num_images": "[1, 256]", "cell": "[1, 1024]", "seed": "[0, 2147483647]"}


METHODS = {"hpm": hpm, "droppos": droppos, "semaim": semaim, "mokd": mokd, "scfs": scfs}  # by checkpoint["method"]

# --- colours and cells ------------------------------------------------------------------------------
GREY, RED, GREEN, CYAN = (torch.tensor(c) for c in ((.5, .5, .5), (1., 0., 0.), (0., .8, 0.), (0., 1., 1.)))
# Heat map anchors, low to high: black, purple, pink, peach, white. Every channel is non-decreasing, so a higher
# value is never darker in any channel (also after rounding to 8 bits).
HEAT = torch.tensor([[0., 0., 0.], [.35, .05, .45], [.8, .2, .5], [1., .6, .5], [1., 1., .85]])


def heat(values):
    """values in [0, 1], (...) -> colours (..., 3), piecewise linear through HEAT; NaN -> grey (no value)."""
    v = values.float().nan_to_num(0.0).clamp(0, 1) * (len(HEAT) - 1)
    i = v.floor().long().clamp(max=len(HEAT) - 2)
    t = (v - i).unsqueeze(-1)
    anchors = HEAT.to(values.device)
    rgb = anchors[i] * (1 - t) + anchors[i + 1] * t
    return torch.where(values.isnan().unsqueeze(-1), GREY.to(values.device), rgb)


def scaled(values):
    """Each row (B, S) to [0, 1] by its own min and max over the values that are not NaN (a constant row: 0)."""
    values = values.float()
    low = values.nan_to_num(math.inf).amin(1, keepdim=True)
    high = values.nan_to_num(-math.inf).amax(1, keepdim=True)
    return (values - low) / (high - low).clamp(min=1e-12)


def cell_map(values, size):
    """Per-cell values (B, g*g) in [0, 1] (NaN: none) -> heat-map image (B, 3, size, size), cells as blocks."""
    g = math.isqrt(values.shape[1])
    rgb = heat(values).view(-1, g, g, 3).permute(0, 3, 1, 2)  # (B, 3, g, g)
    return F.interpolate(rgb, size=(size, size), mode="nearest")


def cells(flags, size):
    """Per-cell bools (B, g*g) -> (B, 1, size, size), True over the flagged cells."""
    g = math.isqrt(flags.shape[1])
    return F.interpolate(flags.view(-1, 1, g, g).float(), size=(size, size), mode="nearest") > 0.5


def fill(image, where, colour, alpha=1.0):
    """image (B, 3, H, W) with the pixels under where (B, 1, H, W) blended towards colour (alpha 1: replaced)."""
    return torch.where(where, (1 - alpha) * image + alpha * colour.to(image.device).view(1, 3, 1, 1), image)


def pixels(x):
    """ImageNet-normalised images (B, 3, H, W) -> RGB in [0, 1]."""
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (common.IMAGENET_MEAN, common.IMAGENET_STD))
    return (x.float() * std + mean).clamp(0, 1)


def unpatchify(x, p, grid, tubelet=0):
    """The inverse of common.patchify: (B, N, p*p*3) -> (B, 3, H, W); clips (tubelet > 0): (B, N, t*p*p*3) ->
    (B, 3, T, H, W)."""
    B = x.shape[0]
    if tubelet:
        x = x.reshape(B, -1, grid, grid, tubelet, p, p, 3)  # (B, T', g, g, t, p, p, 3)
        return torch.einsum("bxhwtpqc->bcxthpwq", x).reshape(B, 3, -1, grid * p, grid * p)
    x = x.reshape(B, grid, grid, p, p, 3)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, 3, grid * p, grid * p)


def box_outline(image, boxes, colour=CYAN):
    """A 1-pixel outline of each image's box (top, left, height, width) in colour. image (B, 3, H, W)."""
    image = image.clone()
    for img, (top, left, h, w) in zip(image, boxes):
        for rows, cols in (((top, top + h - 1), slice(left, left + w)), (slice(top, top + h), (left, left + w - 1))):
            img[:, rows, cols] = colour.to(img.device).view(3, 1, 1)
    return image


def local_crops(imgs, scale, size):
    """One local crop of each image as the method's multi-crop draws them (RandomResizedCrop's box, torch's RNG;
    no colour jitter, blur or flip). -> crops (B, 3, size, size), boxes [(top, left, height, width)]"""
    boxes = [transforms.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for img in imgs]
    crops = [TF.resized_crop(img, *box, [size, size], interpolation=transforms.InterpolationMode.BICUBIC,
                             antialias=True) for img, box in zip(imgs, boxes)]
    return torch.stack(crops), boxes


# --- the methods: each returns [(title, (B, 3, H, W) in [0, 1])] --------------------------------------
def draw_hpm(model, imgs, cfg, progress):
    enc = model.encoder
    B, g, S, K = imgs.shape[0], enc.grid, enc.grid ** 2, model.num_visible
    M = S - K
    size = enc.grid * enc.patch_size
    num_hard = model.num_hard(progress)
    scores = model.teacher_scores(imgs) if model.teacher is not None else None  # (B, S), the full image
    ids = hpm.mask_order(B, S, imgs.device, scores, num_hard)  # (B, S): the training step's mask, the seed's first draw
    recon, loss, _, ids_masked = model.reconstruct(imgs, ids)  # (B, T'M, P or C), (B, T'M)
    mask = hpm.order_to_mask(ids, K)  # (B, S), True = hidden
    clips = imgs.ndim == 5
    frame = enc.num_frames // 2  # clips: the middle frame, in time slice frame // tubelet
    image = pixels(imgs[:, :, frame] if clips else imgs)
    title = f"frame {frame + 1}\nof {enc.num_frames}" if clips else "image"
    views = [(title, image), ("visible", fill(image, cells(mask, size), GREY))]
    if model.feature_teacher is None:  # pixel targets: paste the reconstruction into the visible patches
        if clips:
            target = hpm.tubelet_targets(imgs, enc.patch_size, enc.tubelet_size, normalize=False)  # (B, N, P), [0, 1]
            if model.norm_pix_loss:  # undo tubelet_targets' per-tubelet, per-channel normalisation
                t = hpm.gather_tokens(target, ids_masked).view(B, ids_masked.shape[1], -1, 3)
                r = recon.float().view_as(t)
                recon = (r * (t.var(2, keepdim=True).sqrt() + 1e-6) + t.mean(2, keepdim=True)).flatten(2)
        else:
            target = common.patchify(imgs.float(), enc.patch_size)  # (B, N, P), normalised pixels
            if model.norm_pix_loss:  # undo the per-patch normalisation of hpm.reconstruction_loss (MAE's demo)
                t = hpm.gather_tokens(target, ids_masked)
                recon = recon.float() * (t.var(-1, keepdim=True) + 1e-6).sqrt() + t.mean(-1, keepdim=True)
        full = target.scatter(1, ids_masked.unsqueeze(-1).expand(-1, -1, target.shape[-1]), recon.float())
        if clips:
            recon_image = unpatchify(full, enc.patch_size, g, enc.tubelet_size)[:, :, frame].clamp(0, 1)  # [0, 1]
        else:
            recon_image = pixels(unpatchify(full, enc.patch_size, g))
        views.append(("recon-\nstruction", recon_image))
    if scores is not None:
        views.append(("predicted\nloss", cell_map(scaled(scores), size)))
    s = frame // enc.tubelet_size if clips else 0  # this frame's time slice: tokens s*M..(s+1)*M of ids_masked
    real = torch.full((B, S), math.nan, device=imgs.device).scatter(1, ids[:, K:], loss[:, s * M:(s + 1) * M].float())
    views.append(("real\nloss", cell_map(scaled(real), size)))
    if model.teacher is not None:
        hard = torch.zeros(B, S, dtype=torch.bool, device=imgs.device)
        hard[:, S - num_hard:] = True  # mask_order sorts the num_hard mined patches last
        hard = torch.zeros_like(hard).scatter(1, ids, hard)  # order positions -> patches
        views.append((f"hard\n{num_hard} of {M}", fill(fill(image, cells(mask & ~hard, size), GREY),
                                                        cells(hard, size), RED, 0.5)))
    return views


def draw_droppos(model, imgs, cfg, progress):
    enc = model.encoder
    B, g, N, p = imgs.shape[0], enc.grid, enc.num_patches, enc.patch_size
    size = g * p
    ids_keep, drop = droppos.random_masks(B, N, model.num_visible, model.num_keep_pos, imgs.device)  # (B, K) each
    logits = model.position_logits(imgs, ids_keep, drop)  # (B, K, N)
    pred, dist, _ = droppos.position_errors(logits, ids_keep, g)  # (B, K) each

    def on_grid(values, empty=False):  # per visible token (B, K) -> per cell (B, N) at its true cell
        return torch.full((B, N), empty, dtype=values.dtype, device=imgs.device).scatter(1, ids_keep, values)
    image = pixels(imgs)
    visible = fill(image, cells(~on_grid(torch.ones_like(drop)), size), GREY)
    right = on_grid(drop & (pred == ids_keep))
    wrong = on_grid(drop & (pred != ids_keep))
    error = on_grid(dist.masked_fill(~drop, math.nan), math.nan) / ((g - 1) * math.sqrt(2))  # 0 .. the diagonal
    src = common.gather_tokens(common.patchify(image, p), ids_keep)  # (B, K, P): the visible patches
    placed = GREY.to(imgs.device).repeat(p * p).expand(B, N + 1, -1).clone()  # (B, N + 1, P); row N: a bin
    for chosen, cell in ((~drop, ids_keep), (drop, pred)):  # kept patches at their cells, then dropped ones on top;
        # the tokens not chosen in a pass go to the bin
        placed.scatter_(1, torch.where(chosen, cell, N).unsqueeze(-1).expand_as(src), src)
    position = fill(fill(visible, cells(right, size), GREEN, 0.6), cells(wrong, size), RED, 0.6)
    return [("image", image), ("visible", visible), ("position\ngreen: right", position),
            ("error\n(cells)", cell_map(error, size)), ("placed at\npredicted", unpatchify(placed[:, :N], p, g))]


def draw_semaim(model, imgs, cfg, progress):
    enc = model.encoder
    B, g, N, p = imgs.shape[0], enc.grid, enc.num_patches, enc.patch_size
    size = g * p
    tokens = model.teacher_tokens(imgs)  # (B, T, C): SemAIM*'s targets, which also set its centre; None for pixels
    rank = model.ranks(imgs, tokens)  # (B, N): the checkpoint's order, as the training step draws it
    centre = model.semantic_centre(imgs, tokens)  # (B,)
    semantic = rank if model.order == "semantic" else semaim.order_ranks(
        semaim.order_scores("semantic", B, g, imgs.device, centre))
    image = pixels(imgs)
    views = [("image", image), ("semantic\norder", cell_map(1 - semantic / (N - 1), size))]
    if model.order != "semantic":
        views.append((f"{model.order}\norder", cell_map(1 - rank / (N - 1), size)))
    row, col = centre.div(g, rounding_mode="floor").tolist(), (centre % g).tolist()
    views.append(("centre", box_outline(image, [(r * p, c * p, p, p) for r, c in zip(row, col)])))
    if model.target == "pixels":
        pred = model.predict(imgs, rank).float()  # (B, N, P): each patch from the ones before it in the order
        if model.norm_pix_loss:  # undo semaim.pixel_targets' per-patch normalisation with the blurred patch's own
            target = semaim.pixel_targets(imgs, p, model.blur, norm_pix=False)
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        views.append(("prediction", pixels(unpatchify(pred, p, g))))
    return views


def draw_mokd(model, imgs, cfg, progress):
    vit = model.teacher_vit.backbone
    size = cfg.input_size
    local, boxes = local_crops(imgs, (cfg.local_scale_min, cfg.global_scale_min), cfg.local_size)
    views = [("image", box_outline(pixels(imgs), boxes)), ("local\ncrop", pixels(local))]
    attention = vit.last_attention(imgs)[:, :, 0, 1:].mean(1)  # (B, N): the cls row, mean over heads
    views.append(("ViT cls\nattention", cell_map(scaled(attention), size)))
    if model.cross and model.cnn.thead is not None:  # the search: the other student's local-crop query (MOKD.teacher)
        query_cnn, query_vit = model.cnn.features(local)[2], model.vit.features(local)[2]  # (B, D) each
        tokens_vit, tokens_cnn = model.teacher_vit.features(imgs)[1], model.teacher_cnn.features(imgs)[1]  # (B, T, D)
        in_vit = model.teacher_vit.thead.search_attention(tokens_vit, query_cnn)  # (B, N)
        in_cnn = model.teacher_cnn.thead.search_attention(tokens_cnn, query_vit)  # (B, h*w)
        views += [("search\nin ViT", cell_map(scaled(in_vit), size)),
                  ("search\nin CNN", cell_map(scaled(in_cnn), size))]
    return views


def draw_scfs(model, imgs, cfg, progress):
    size = cfg.input_size
    local, boxes = local_crops(imgs, (cfg.local_scale_min, cfg.local_scale_max), cfg.local_size)
    views = [("image", box_outline(pixels(imgs), boxes)), ("local\ncrop", pixels(local))]
    stages = model.stages or (4,)  # --no-search (plain DINO): what a search at layer4 would find
    maps_t = common.resnet_features(model.teacher["encoder"], imgs, stages)  # [(B, C_k, H, W)]: the teacher's keys
    maps_l = common.resnet_features(model.student["encoder"], local, stages)  # [(B, C_k, h, w)]: the queries
    for k, keys, queries in zip(stages, maps_t, maps_l):
        similarity = scfs.feature_search(queries, keys)[0].flatten(1)  # (B, H*W), one local crop per image
        views.append((f"search\nstage {k}", cell_map(scaled(similarity), size)))
    return views


# --- the picture: a grid of cells under a row of titles -----------------------------------------------
PAD, TITLE_HEIGHT = 2, 26  # pixels between cells (white); the titles' strip


def text(image, xy, words, fill=(0, 0, 0)):
    """Write words on a PIL image with PIL's built-in font (no font file needed)."""
    ImageDraw.Draw(image).text(xy, words, fill=fill, font=ImageFont.load_default())


def picture(views, cell):
    """views [(title, (B, 3, h, w))] -> one image (3, TITLE_HEIGHT + B * (cell + PAD) + PAD, C * (cell + PAD) + PAD):
    image b's view c at row b, column c, each enlarged to cell x cell (nearest), titles above the columns."""
    tiles = torch.stack([F.interpolate(v.float().cpu(), size=(cell, cell), mode="nearest") for _, v in views], 1)
    grid = torchvision.utils.make_grid(tiles.flatten(0, 1), nrow=len(views), padding=PAD, pad_value=1.0)
    strip = Image.new("RGB", (grid.shape[-1], TITLE_HEIGHT), "white")
    for c, (title, _) in enumerate(views):
        text(strip, (PAD + c * (cell + PAD) + 1, 1), title)
    return torch.cat([TF.pil_to_tensor(strip).float() / 255, grid], dim=1)


# --- a run's curves: one panel per logged value against the step, drawn with torch -------------------
PANEL_W, PANEL_H, MARGIN, TITLE_ROW, PANELS_PER_ROW = 300, 150, 6, 14, 3
LINE, BLACK, FRAME = torch.tensor([0., .4, .8]), torch.tensor([0., 0., 0.]), torch.tensor([.8, .8, .8])
NOT_CURVES = {"step", "epoch", "img_per_s", "peak_mem_gib"}  # the x axis, and throughput and memory


def polyline(canvas, xs, ys, colour):
    """Set the pixels of the polyline through the points (xs, ys) (pixel coordinates, float tensors) in canvas
    (3, H, W) to colour: each segment sampled at one point per pixel of its longer side."""
    xs, ys = (v.repeat(2) if len(v) == 1 else v for v in (xs, ys))  # one point: a dot
    steps = torch.maximum((xs[1:] - xs[:-1]).abs(), (ys[1:] - ys[:-1]).abs()).ceil().long() + 1  # points per segment
    seg = torch.repeat_interleave(torch.arange(len(steps)), steps)  # the segment of each point
    t = (torch.arange(int(steps.sum())) - (steps.cumsum(0) - steps)[seg]) / (steps[seg] - 1).clamp(min=1)  # 0 .. 1
    x = (xs[seg] + t * (xs[seg + 1] - xs[seg])).round().long()
    y = (ys[seg] + t * (ys[seg + 1] - ys[seg])).round().long()
    canvas[:, y, x] = colour.view(3, 1)


def span(values):
    """(low, high) of a tensor, widened where they are equal so that a constant curve has a range."""
    low, high = float(values.min()), float(values.max())
    if high == low:
        return low - (abs(low) * 0.05 or 1.0), high + (abs(high) * 0.05 or 1.0)
    return low, high


def curve_panel(name, steps, values):
    """One curve: axes (left, bottom), the polyline of values against steps, a title with the first, last, lowest and
    highest value and the step range. -> (3, PANEL_H, PANEL_W)"""
    canvas = torch.ones(3, PANEL_H, PANEL_W)
    left, right, top, bottom = MARGIN, PANEL_W - 1 - MARGIN, TITLE_ROW + 2, PANEL_H - 1 - TITLE_ROW
    polyline(canvas, torch.tensor([left, left, right], dtype=torch.float), torch.tensor([top, bottom, bottom],
             dtype=torch.float), BLACK)
    s, v = torch.tensor(steps, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
    (s0, s1), (v0, v1) = span(s), span(v)
    xs = left + 2 + (s - s0) / (s1 - s0) * (right - left - 2)
    ys = bottom - 2 - (v - v0) / (v1 - v0) * (bottom - top - 2)
    polyline(canvas, xs.float(), ys.float(), LINE)
    edge = torch.tensor([0, 0, PANEL_W - 1, PANEL_W - 1, 0], dtype=torch.float)
    polyline(canvas, edge, torch.tensor([0, PANEL_H - 1, PANEL_H - 1, 0, 0], dtype=torch.float), FRAME)  # the frame
    image = TF.to_pil_image(canvas)
    text(image, (MARGIN, 1), f"{name}: {values[0]:.4g} -> {values[-1]:.4g}  (min {min(values):.4g}, "
                             f"max {max(values):.4g})")
    text(image, (MARGIN, PANEL_H - TITLE_ROW + 1), f"step {min(steps)} .. {max(steps)}", fill=(90, 90, 90))
    return TF.pil_to_tensor(image).float() / 255


def read_curves(path):
    """log.jsonl -> {name: ([step], [value])} of every finite number logged with a step; names in the order of their
    first appearance, loss and lr first. One-line errors for a missing or malformed log."""
    if not os.path.isfile(path):
        fail(f"--log {path} does not exist; pass the log.jsonl in a run's --output_dir")
    curves = {"loss": ([], []), "lr": ([], [])}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"line {number} of {path} is not JSON ({e.msg}); pass a log.jsonl written by one of our scripts")
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            for name, value in record.items():
                if (name not in NOT_CURVES and isinstance(value, (int, float)) and not isinstance(value, bool)
                        and math.isfinite(value)):
                    curves.setdefault(name, ([], []))
                    curves[name][0].append(record["step"])
                    curves[name][1].append(value)
    curves = {name: c for name, c in curves.items() if c[0]}
    if not curves:
        fail(f"{path} logs no numbers against a step; pass the log.jsonl of a run that has trained a step")
    return curves


def draw_log(path):
    """-> the picture of every curve in the log, PANELS_PER_ROW panels a row, and the curves' names."""
    curves = read_curves(path)
    panels = torch.stack([curve_panel(name, *c) for name, c in curves.items()])
    return torchvision.utils.make_grid(panels, nrow=PANELS_PER_ROW, padding=PAD, pad_value=1.0), list(curves)


# --- checkpoints, images, main ------------------------------------------------------------------------
DRAW = {"hpm": draw_hpm, "droppos": draw_droppos, "semaim": draw_semaim, "mokd": draw_mokd, "scfs": draw_scfs}


def load_model(path, device):
    """The model of one of our pre-training checkpoints, rebuilt by its method's build() from the saved config, with
    the saved weights, in eval mode. -> (model, config, checkpoint)"""
    ckpt = training.load_checkpoint(path)
    method = ckpt["method"]
    if method not in METHODS:
        fail(f"{path} is a checkpoint of {method}.py, and visualize.py draws the pre-training methods "
             f"({', '.join(METHODS)}); pass a checkpoint.pth of one of them")
    module = METHODS[method]
    names = {f.name for f in dataclasses.fields(module.Config)}
    cfg = module.Config(**{k: v for k, v in ckpt["config"].items() if k in names})  # missing fields: defaults
    model = module.build(cfg)
    own = model.state_dict()
    state = {(k if k in own else f"encoder.{k}"): v for k, v in ckpt["model"].items()}  # training.export_state's
    problem = training.mismatch(own, state)
    if problem:
        fail(f"the weights in {path} do not fit the {method} model its config describes ({problem}); it was written "
             f"by another version of {method}.py")
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, ckpt


def load_images(cfg, data_path, count):
    """count images (clips for a video checkpoint) evenly spaced over data_path, as evaluation reads them (resize and
    centre crop; the centre clip of each video). -> (B, 3, H, W) or (B, 3, T, H, W)"""
    frame = common.eval_transform(cfg.input_size)
    if getattr(cfg, "num_frames", 1) > 1:
        dataset = common.clip_dataset(data_path, common.ClipTransform(frame), cfg.num_frames, cfg.sampling_rate,
                                      train=False)
    else:
        dataset = common.image_dataset(data_path, frame, train=False)
    chosen = common.subset(dataset, count)
    samples = [chosen[i] for i in range(len(chosen))]
    if any(skipped < 0 for _, _, skipped in samples):
        fail(f"too many files under {data_path} could not be read; check the data set")
    return torch.stack([x for x, _, _ in samples])


def device_of(name):
    want = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", want):
        fail(f"unknown --device {name}; choose auto, cpu, cuda or cuda:N")
    if want.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {name} but no GPU is visible; pass --device cpu")
    return torch.device(want)


def draw_checkpoint(cfg):
    """-> the picture, its column titles, and a name for the kind of run (mae for HPM without a predictor, saim for
    SemAIM with the stochastic order)."""
    device = device_of(cfg.device)
    if not cfg.data_path:
        fail("no --data_path given; pass a folder of images to draw (an ImageFolder such as cifar10/test)")
    model, mcfg, ckpt = load_model(cfg.checkpoint, device)
    imgs = load_images(mcfg, cfg.data_path, cfg.num_images).to(device)
    progress = max(ckpt["epoch"] - 1, 0) / mcfg.epochs  # the schedules (HPM's hard share) of the last trained epoch
    torch.manual_seed(cfg.seed)  # the masks, orders and crops are the first draws after this
    with torch.no_grad():
        views = DRAW[ckpt["method"]](model, imgs, mcfg, progress)
    cell = mcfg.input_size * math.ceil(cfg.cell / mcfg.input_size)
    kind = {("hpm", False): "mae", ("semaim", "stochastic"): "saim"}.get(
        (ckpt["method"], getattr(mcfg, "learning_loss", getattr(mcfg, "order", None))), ckpt["method"])
    return picture(views, cell), [title for title, _ in views], kind


def main(cfg):
    start = time.perf_counter()
    if bool(cfg.checkpoint) == bool(cfg.log):
        fail("pass --checkpoint (what a method sees, masks and predicts) or --log (a run's curves), one of them")
    if cfg.log:
        image, titles = draw_log(cfg.log)
        kind, output = "curves", cfg.output or os.path.join(os.path.dirname(cfg.log), "curves.png")
    else:
        image, titles, kind = draw_checkpoint(cfg)
        output = cfg.output or os.path.join(os.path.dirname(cfg.checkpoint), "visualize.png")
    try:
        torchvision.utils.save_image(image, output)
    except (OSError, ValueError) as e:  # no such folder, no permission; ValueError: not an image file name
        fail(f"cannot write {output} ({getattr(e, 'strerror', None) or e}); pass an --output .png in a folder you "
             "can write to")
    names = ", ".join(t.replace("-\n", "").replace("\n", " ") for t in titles)
    print(f"visualize: {kind}: {names} -> {output} ({image.shape[2]} x {image.shape[1]} px, "
          f"{time.perf_counter() - start:.1f} s)")
    return {"output": output, "titles": titles, "kind": kind}


if __name__ == "__main__":
    main(training.parse_config(Config))
