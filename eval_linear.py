"""eval_linear.py: k-NN and linear-probe top-1 on the frozen encoder of any of our checkpoints.
Features are extracted once (ViT: cls token after the final norm; ResNet: global pool; a video ViT: the mean
of the patch tokens of one centre clip per video, VideoMAE's pooling), then
k-NN is DINO's weighted vote (k=20, T=0.07, cosine similarity) and the linear probe is MAE's head
(BatchNorm without affine + linear layer) trained with SGD on the cached features.
Run: python eval_linear.py --checkpoint runs/hpm/checkpoint.pth --data_path /imagenet  (train/ and val/)
     (a video checkpoint: data_path holds train/ and val/ folders of class folders of videos)
The last line printed is JSON with knn_top1 and linear_top1 (percent)."""
import json
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import training


@dataclass
class Config:
    checkpoint: str = ""  # checkpoint.pth written by hpm.py (or another of our training scripts)
    data_path: str = ""  # root holding train/ and val/ (or test/) ImageFolders (video checkpoints: clip folders)
    batch_size: int = 256  # images per forward pass during feature extraction
    num_workers: int = 8  # data loader processes; if not given, at most the CPU cores
    device: str = "auto"  # auto (cuda if available), cuda or cpu
    limit: int = 0  # use at most this many images per split, evenly spaced (0: all)
    knn_k: int = 20  # neighbours in the k-NN vote (DINO: 20)
    knn_temperature: float = 0.07  # temperature of the k-NN vote weights exp(sim / T) (DINO: 0.07)
    probe_epochs: int = 100  # linear-probe epochs over the cached features
    probe_lr: float = 0.1  # SGD lr (momentum 0.9, cosine decay, no weight decay), for batch 256
    seed: int = 0  # linear-probe initialisation and shuffling
    encoder: str = ""  # which encoder of a multi-encoder checkpoint (MOKD: cnn or vit); default: the only one

    limits: ClassVar[dict] = {"batch_size": "[1, inf)", "num_workers": "[0, 256]", "limit": "[0, inf)",
                              "knn_k": "[1, inf)", "knn_temperature": "(0, inf)", "probe_epochs": "[1, 10000]",
                              "probe_lr": "(0, inf)", "seed": "[0, 2147483647]"}


@torch.no_grad()
def extract(encoder, dataset, cfg, device, name="images", pool="cls"):
    """-> features (n, D) float32 and labels (n,), on the CPU. pool (ViT): cls, or mean of the patch tokens."""
    loader = torch.utils.data.DataLoader(dataset, cfg.batch_size, num_workers=cfg.num_workers)
    feats, labels = [], []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for images, y, _ in common.progress_bar(iterable=loader, desc=f"features of {name}", unit="batch", leave=False):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = encoder(images.to(device, non_blocking=True))
        if out.ndim == 3:  # ViT: cls token after the final norm, or the mean of the patch tokens
            out = out[:, 0] if pool == "cls" else out[:, 1:].mean(1)
        feats.append(out.float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_top1(train_x, train_y, test_x, test_y, k, temperature, num_classes):
    """DINO's weighted k-NN: the k most cosine-similar training features vote with exp(sim / T)."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    correct = 0
    for start in range(0, len(test_x), 1024):
        sim, idx = (test_x[start:start + 1024] @ train_x.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(idx), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[start:start + 1024]).sum().item()
    return 100.0 * correct / len(test_x)


def linear_top1(train_x, train_y, test_x, test_y, num_classes, cfg):
    """MAE's probe head, BatchNorm1d(affine=False) + Linear, trained on cached features."""
    torch.manual_seed(cfg.seed)
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6),
                         nn.Linear(train_x.shape[1], num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)  # as MAE's linear probe
    nn.init.zeros_(head[1].bias)
    batch = 256
    steps = cfg.probe_epochs * max(len(train_x) // batch, 1)
    opt = torch.optim.SGD(head.parameters(), lr=cfg.probe_lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    step = 0
    bar = common.progress_bar(total=steps, desc="linear probe", unit="step", leave=False)
    while step < steps:
        for idx in torch.randperm(len(train_x)).split(batch):
            if len(idx) < 2 or step >= steps:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
    bar.close()
    head.eval()
    with torch.no_grad():
        return 100.0 * (head(test_x).argmax(1) == test_y).float().mean().item()


def main(cfg):
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if not cfg.checkpoint:
        common.fail("no --checkpoint given; pass the checkpoint.pth of a training run")
    encoder, ckpt, arch = training.load_encoder(cfg.checkpoint, cfg.encoder)
    encoder.to(device)
    clips = arch.get("num_frames", 1) > 1
    folders = common.split_folders(cfg.data_path, "folders of class folders of videos" if clips else "ImageFolders")
    datasets, found = {}, []
    for name, path in zip(("train", "val"), folders):
        if clips:  # the centre clip of each video, each frame as an image
            dataset = common.clip_dataset(path, common.ClipTransform(common.eval_transform(arch["input_size"])),
                                          arch["num_frames"], ckpt["config"].get("sampling_rate", 1), train=False,
                                          of_root=True)
        else:
            dataset = common.image_dataset(path, common.eval_transform(arch["input_size"]), of_root=True)
        datasets[name] = common.subset(dataset, cfg.limit)
        limited = f"{len(datasets[name])} of " if len(datasets[name]) < len(dataset) else ""
        found.append(f"{name} {limited}{len(dataset)} {'clips' if clips else 'images'} in {len(dataset.classes)} "
                     f"classes")
        num_classes = len(dataset.classes)
    print(f"eval_linear: {arch['model']} from {cfg.checkpoint} ({ckpt['method']}, epoch {ckpt['epoch']}); "
          f"{', '.join(found)}{f' (--limit {cfg.limit})' if cfg.limit else ''}; {device}", file=sys.stderr)
    (train_x, train_y), (val_x, val_y) = (extract(encoder, datasets[name], cfg, device, name,
                                                  pool="mean" if clips else "cls") for name in ("train", "val"))
    k = min(cfg.knn_k, len(train_x))
    if k < cfg.knn_k:
        print(f"eval_linear: --knn_k {cfg.knn_k} is more than the {len(train_x)} training samples; the k-NN vote "
              f"uses all {k}", file=sys.stderr)
    result = {"checkpoint": cfg.checkpoint, "method": ckpt["method"], "epoch": ckpt["epoch"],
              "model": arch["model"], "train_images": len(train_x), "val_images": len(val_x), "knn_k": k,
              "knn_top1": knn_top1(train_x, train_y, val_x, val_y, k, cfg.knn_temperature, num_classes),
              "linear_top1": linear_top1(train_x, train_y, val_x, val_y, num_classes, cfg)}
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main(training.parse_config(Config))
