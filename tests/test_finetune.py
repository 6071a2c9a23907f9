"""finetune.py: layer-wise lr decay and weight-decay groups by hand, mixup / cutmix targets and images, loading every
ViT method's checkpoint, position-table resizing, a learning check, bitwise resume, torchrun with exact sharded
evaluation, one-line errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import droppos
import eval_linear
import finetune
import hpm
import mokd
import scfs
import semaim
import training
from conftest import ROOT, cpu_context, make_image_folder, tiny_args
from test_train import assert_equal_states, free_port


def tiny_classifier(num_classes=3, global_pool=True, depth=2):
    torch.manual_seed(0)
    return finetune.Classifier(common.VisionTransformer(32, 4, 32, depth, 2), num_classes, global_pool=global_pool,
                               mixup=0.0, cutmix=0.0)


def scales_and_decays(groups):
    """id(parameter) -> (lr_scale, weight_decay), checking that no parameter is in two groups."""
    out = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out
            out[id(p)] = (g["lr_scale"], g["weight_decay"])
    return out


# --- layer-wise lr decay and weight decay ------------------------------------------------------------
@pytest.mark.parametrize("global_pool", [True, False])
def test_layer_decay_scale_of_every_parameter(global_pool):
    """Depth 2, decay 0.5, so depth + 1 = 3 (MAE's lr_decay.py): patch embedding, cls token and position table at
    0.5^3, block 0 at 0.5^2, block 1 at 0.5, the final norm (cls-token mode) or fc_norm, and the head at 1.
    The schedule sets each group's lr to the step's lr times its scale."""
    model = tiny_classifier(global_pool=global_pool)
    model.encoder.pos_embed.requires_grad_(True)
    by_hand = {"cls_token": 0.125, "pos_embed": 0.125, "patch_embed.": 0.125, "blocks.0.": 0.25, "blocks.1.": 0.5,
               "norm.": 1.0, "fc_norm.": 1.0, "head.": 1.0}
    got = scales_and_decays(finetune.param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5))
    names = [n.removeprefix("encoder.") for n, _ in model.named_parameters()]
    assert ("fc_norm.weight" in names) == global_pool and ("norm.weight" in names) != global_pool  # MAE drops norm
    for name, p in model.named_parameters():
        short = name.removeprefix("encoder.")
        expected = next(v for k, v in by_hand.items() if short == k or short.startswith(k))
        assert got[id(p)][0] == expected, name
    assert len(got) == len(names)

    cfg = training.parse_config(finetune.Config, ["--layer_decay", "0.5", "--epochs", "2", "--warmup_epochs", "1",
                                                "--batch_size", "256", "--blr", "1e-3"])
    optimizer, schedule = finetune.make_optimizer(model, cfg, steps_per_epoch=4)
    lr = schedule(6)  # in the cosine: 1e-3 -> 1e-6 over steps 4..7
    assert lr == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    assert sorted({g["lr"] / lr for g in optimizer.param_groups}) == pytest.approx([0.125, 0.25, 0.5, 1.0])
    for g in optimizer.param_groups:
        assert g["lr"] == lr * g["lr_scale"] and optimizer.defaults["betas"] == (0.9, 0.999)


def test_weight_decay_groups():
    """Decay on matrices and kernels; none on biases, norms, the cls token and the position table (timm's
    no_weight_decay list, which MAE passes); a fixed position table is in no group at all."""
    model = tiny_classifier()
    for learn in (True, False):
        model.encoder.pos_embed.requires_grad_(learn)
        got = scales_and_decays(finetune.param_groups_lrd(model, weight_decay=0.05, layer_decay=0.75))
        for name, p in model.named_parameters():
            if not p.requires_grad:
                assert id(p) not in got and name == "encoder.pos_embed" and not learn
                continue
            no_decay = p.ndim == 1 or name in ("encoder.cls_token", "encoder.pos_embed")
            assert got[id(p)][1] == (0.0 if no_decay else 0.05), name
        decayed = {n for n, p in model.named_parameters() if p.requires_grad and got[id(p)][1] > 0}
        assert decayed == {n for n, p in model.named_parameters() if n.endswith("weight") and p.ndim == 2
                           or n == "encoder.patch_embed.proj.weight"}


# --- mixup / cutmix / label smoothing -------------------------------------------------------------------
def test_mixup_and_cutmix_targets_are_convex_combinations_of_one_hot_rows():
    """Each target row is lam * onehot(y_i) + (1 - lam) * onehot(y_partner), partner = the batch rolled by one,
    rows sum to 1; the mixup image is the same combination of the two images; the cutmix image takes a box from
    the partner whose area share is 1 - lam; label smoothing maps t to (1 - s) t + s / C; with both on, each
    batch is one of the two."""
    C, smoothing = 6, 0.1
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([3, 0, 5, 1, 4, 2])
    onehot = F.one_hot(labels, C).float()
    partner_images, partner_onehot = images.roll(1, 0), onehot.roll(1, 0)
    for kind, mixer in (("mixup", finetune.make_mixer(0.8, 0.0, 0.5, C)),
                        ("cutmix", finetune.make_mixer(0.0, 1.0, 0.5, C))):
        for seed in range(4):
            torch.manual_seed(seed)
            mixed, targets = finetune.mix_batch(images, labels, mixer, C, smoothing=0.0)
            torch.manual_seed(seed)
            _, smoothed = finetune.mix_batch(images, labels, mixer, C, smoothing=smoothing)
            lam = float(targets[0, labels[0]])
            assert 0 <= lam <= 1
            assert torch.allclose(targets, lam * onehot + (1 - lam) * partner_onehot)
            assert torch.allclose(targets.sum(1), torch.ones(6)) and torch.allclose(smoothed.sum(1), torch.ones(6))
            assert torch.allclose(smoothed, (1 - smoothing) * targets + smoothing / C)
            if kind == "mixup":
                assert torch.allclose(mixed, lam * images + (1 - lam) * partner_images, atol=1e-6)
            else:
                from_partner = (mixed == partner_images) & (mixed != images)
                assert torch.equal(mixed, torch.where(from_partner, partner_images, images))
                box = from_partner[0, 0]
                assert torch.equal(from_partner, box.expand_as(from_partner))  # one box for every image and channel
                rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
                if len(rows):  # a rectangle: every pixel between its first and last row and column
                    assert box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and box.sum() == len(rows) * len(cols)
                assert float(box.float().mean()) == pytest.approx(1 - lam)
    plain, targets = finetune.mix_batch(images, labels, None, C, smoothing=smoothing)
    assert plain is images and torch.allclose(targets, onehot * (1 - smoothing) + smoothing / C)
    both, kinds = finetune.make_mixer(0.8, 1.0, 0.5, C), set()
    for seed in range(40):
        torch.manual_seed(seed)
        mixed, _ = finetune.mix_batch(images, labels, both, C, smoothing=0.0)
        kinds.add("cutmix" if torch.equal(mixed, torch.where(mixed == images, images, partner_images)) else "mixup")
    assert kinds == {"mixup", "cutmix"}


# --- loading pre-trained encoders ---------------------------------------------------------------------
def vit_checkpoint(method, image_root, out):
    """A checkpoint of a method's tiny model whose weights all moved off their initialisation -> (path, its ViT)."""
    module = {"hpm": hpm, "droppos": droppos, "semaim": semaim, "mokd": mokd, "scfs": scfs}[method]
    cfg = training.parse_config(module.Config, tiny_args(image_root / "train", out, method=method))
    torch.manual_seed(1)
    model = module.build(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    os.makedirs(out, exist_ok=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    extra = {}
    if method == "mokd":
        extra["encoders"] = mokd.encoders(model, cfg)
    if method == "scfs":
        extra["encoders"] = {"cnn": (model.teacher["encoder"], {"model": cfg.model, "input_size": cfg.input_size,
                                                                "cifar_stem": cfg.cifar_stem})}
    training.save_checkpoint(cfg, method, model, optimizer, 1, cpu_context(), **extra)
    vit = model.teacher_vit.backbone if method == "mokd" else getattr(model, "encoder", None)
    return str(out / "checkpoint.pth"), vit


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, image_root):
    """method -> (path, its ViT), each checkpoint made once for this file (the DINO-style ones take seconds)."""
    made, root = {}, tmp_path_factory.mktemp("checkpoints")

    def get(method):
        if method not in made:
            made[method] = vit_checkpoint(method, image_root, root / method)
        return made[method]
    return get


@pytest.mark.parametrize("method", ["hpm", "droppos", "semaim", "mokd"])
def test_pretrained_checkpoint_loads_with_only_head_and_fc_norm_fresh(method, checkpoints):
    """Every encoder weight arrives unchanged (MOKD: its ViT teacher); the head (trunc-normal 2e-5, zero bias) and
    fc_norm (1, 0) are the only fresh parameters; the checkpoint's final norm is dropped (global pooling, as MAE)."""
    path, vit = checkpoints(method)
    args = ["--preset", "cifar10", "--checkpoint", path, "--model", "vit_small", "--patch_size", "16"]
    cfg = training.parse_config(finetune.Config, args + (["--encoder", "vit"] if method == "mokd" else []))
    pretrained, cfg, line = finetune.load_pretrained(cfg)
    assert (cfg.model, cfg.patch_size) == ("vit_tiny", vit.patch_size) and "not --model/--patch_size vit_small/16" in line
    torch.manual_seed(0)
    model = finetune.build(cfg, num_classes=10, pretrained=pretrained)
    source = vit.state_dict()
    state = {k.removeprefix("encoder."): v for k, v in model.state_dict().items()}
    assert set(state) - set(source) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert set(source) - set(state) == {"norm.weight", "norm.bias"}
    for k in set(state) & set(source):
        assert torch.equal(state[k], source[k]), k
    assert torch.equal(state["fc_norm.weight"], torch.ones(192))
    assert torch.equal(state["fc_norm.bias"], torch.zeros(192))
    assert state["head.weight"].shape == (10, 192) and 1e-5 < state["head.weight"].std() < 3e-5
    assert state["head.weight"].abs().max() < 2e-4 and torch.equal(state["head.bias"], torch.zeros(10))
    assert model.encoder.pos_embed.requires_grad  # MAE: a trained table, initialised from the checkpoint


def test_position_table_resize_keeps_cls_row_and_matches_hand_check(checkpoints):
    """2 x 2 -> 1 x 1 bicubic with clamped borders weighs each of the 4 cells (-0.09375 + 0.59375)^2 = 1/4: the mean;
    1 x 1 -> 3 x 3 copies the cell; the cls row is never touched; at the same grid the table is returned as is.
    A checkpoint at 32 px fine-tuned at 64 px gets its table resized by this rule."""
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 4, 8)
    small = finetune.interpolate_pos_embed(pos, 1)
    assert small.shape == (1, 2, 8) and torch.equal(small[:, 0], pos[:, 0])
    assert torch.allclose(small[0, 1], pos[0, 1:].mean(0), atol=1e-6)
    big = finetune.interpolate_pos_embed(small, 3)
    assert torch.equal(big[:, 0], pos[:, 0]) and torch.allclose(big[0, 1:], small[0, 1].expand(9, 8), atol=1e-6)
    assert finetune.interpolate_pos_embed(pos, 2) is pos

    path, vit = checkpoints("hpm")
    cfg = training.parse_config(finetune.Config, ["--preset", "cifar10", "--checkpoint", path, "--input_size", "64"])
    pretrained, cfg, line = finetune.load_pretrained(cfg)
    assert line.endswith("position table resized 8x8 -> 16x16")
    model = finetune.build(cfg, num_classes=2, pretrained=pretrained)
    assert model.encoder.pos_embed.shape == (1, 1 + 256, 192)
    assert torch.equal(model.encoder.pos_embed, finetune.interpolate_pos_embed(vit.pos_embed, 16))


# --- training end to end ----------------------------------------------------------------------------------
def colour_folders(root, classes=3, train=12, val=6):
    make_image_folder(str(root / "train"), classes=classes, per_class=train, seed=0)
    make_image_folder(str(root / "val"), classes=classes, per_class=val, seed=1)
    return root


def test_learns_classes_that_differ_in_colour(tmp_path, capsys):
    """From scratch, 15 steps of batch 8 on 3 classes of different mean colour: validation top-1 near 100 % and a
    validation loss below half of ln 3, the loss of the near-silent initial head (which may rank the three colours
    right by chance, so top-1 alone would not show learning)."""
    root = colour_folders(tmp_path / "data")
    cfg = training.parse_config(finetune.Config, tiny_args(root, tmp_path / "out", method="finetune") + [
        "--epochs", "5", "--warmup_epochs", "0", "--blr", "0.03", "--layer_decay", "1.0", "--drop_path", "0",
        "--mixup", "0", "--cutmix", "0", "--rand_ops", "0", "--reprob", "0", "--smoothing", "0", "--log_every", "5"])
    model = finetune.main(cfg)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] >= 94 and result["val_images"] == 18
    val = common.image_dataset(str(root / "val"), common.eval_transform(32))
    samples = [val[i] for i in range(len(val))]
    images, labels = torch.stack([x for x, _, _ in samples]), torch.tensor([y for _, y, _ in samples])
    with torch.no_grad():
        assert F.cross_entropy(model.eval().classify(images), labels) < 0.5 * math.log(3)


def test_resume_is_bitwise_identical(image_root, tmp_path, monkeypatch):
    """2 epochs straight == 1 epoch, crash right after its checkpoint, automatic resume, 1 epoch: identical weights,
    optimizer, evaluations, best top-1 and best checkpoint (every augmentation on: RandAugment, erasing, mixup /
    cutmix, drop path)."""
    def run(out):
        return finetune.main(training.parse_config(finetune.Config, tiny_args(image_root, tmp_path / out,
                                                                            method="finetune")))
    run("a")
    save = training.save_checkpoint

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # as if the job died right after the first epoch's checkpoint (before the best copy)

    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run("b")
    assert not os.path.exists(tmp_path / "b" / "checkpoint_best.pth")
    monkeypatch.undo()
    run("b")

    for name in ("checkpoint.pth", "checkpoint_best.pth"):
        a, b = (training.load_checkpoint(str(tmp_path / d / name), "finetune") for d in "ab")
        assert a["epoch"] == b["epoch"] and a["best_top1"] == b["best_top1"] and a["best_epoch"] == b["best_epoch"]
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k
        assert_equal_states(a["optimizer"], b["optimizer"])
        assert a["epoch"] == (2 if name == "checkpoint.pth" else a["best_epoch"])
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in "ab"]
    untimed = [[{k: v for k, v in r.items() if k not in ("img_per_s", "peak_mem_gib")} for r in log] for log in logs]
    assert untimed[0] == untimed[1]
    assert [r["step"] for r in logs[1] if "top1" in r] == [2, 5]  # an evaluation after each epoch's 3 steps


def test_torchrun_two_processes_evaluate_exactly(tmp_path):
    """2 processes on CPU (gloo): identical weights on both ranks, and the logged top-1 / top-5 over 15 validation
    images (8 on rank 0, 7 on rank 1, no padding) equal one process's evaluation of the final weights."""
    root = tmp_path / "data"
    make_image_folder(str(root / "train"), classes=3, per_class=8, seed=0)
    make_image_folder(str(root / "val"), classes=3, per_class=5, seed=1)
    out = tmp_path / "ddp"
    args = tiny_args(root, out, "--epochs", "1", method="finetune")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", os.path.join(ROOT, "tests", "ddp_run.py"),
           "finetune", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    s0, s1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log if "top1" not in r] == [0, 1, 2]  # 24 images / (2 ranks x 4) = 3 steps
    evaluation = next(r for r in log if "top1" in r)
    cfg = training.parse_config(finetune.Config, args)
    train_set, val_set = finetune.datasets(cfg)
    model = finetune.build(cfg, num_classes=3)
    model.load_state_dict(s0)
    assert evaluation["images"] == 15  # every image once
    result = finetune.evaluate(model, val_set, cfg, cpu_context())
    assert (evaluation["top1"], evaluation["top5"]) == (result["top1"], result["top5"])
    assert json.loads(p.stdout.strip().splitlines()[-1])["val_images"] == 15


# --- bad input ------------------------------------------------------------------------------------------------
def one_line_error(args):
    with pytest.raises(SystemExit) as e:
        finetune.main(training.parse_config(finetune.Config, args))
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_bad_input_gives_one_line_errors(image_root, checkpoints, tmp_path):
    """A ResNet checkpoint (SCFS, MOKD's cnn), a multi-encoder checkpoint without --encoder, a foreign file, a data
    folder without val/: one line `error: ...`, before any training."""
    base = tiny_args(image_root, tmp_path / "out", method="finetune")
    scfs_path, _ = checkpoints("scfs")
    assert "eval_linear.py" in one_line_error(base + ["--checkpoint", scfs_path])  # a ResNet
    mokd_path, _ = checkpoints("mokd")
    assert "--encoder" in one_line_error(base + ["--checkpoint", mokd_path])  # cnn or vit?
    assert "eval_linear.py" in one_line_error(base + ["--checkpoint", mokd_path, "--encoder", "cnn"])
    torch.save({"state_dict": {}}, tmp_path / "foreign.pth")
    assert "not a checkpoint of ours" in one_line_error(base + ["--checkpoint", str(tmp_path / "foreign.pth")])
    (tmp_path / "no_val").mkdir()
    make_image_folder(str(tmp_path / "no_val" / "train"))
    no_val = tiny_args(tmp_path / "no_val", tmp_path / "out2", method="finetune")
    assert "val/" in one_line_error(no_val)
    assert not os.path.exists(tmp_path / "out2" / "checkpoint.pth")  # stopped before any training
    # as a user runs it: one line on stderr, no traceback
    p = subprocess.run([sys.executable, os.path.join(ROOT, "finetune.py"), *map(str, no_val)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and lines[-1].startswith("error: --data_path") and "Traceback" not in p.stderr


def test_a_video_checkpoint_and_a_fine_tuned_one_are_refused_with_what_to_pass(image_root, tmp_path):
    """A clip encoder (hpm.py --num_frames 4): finetune.py fine-tunes images only, one line. A checkpoint that
    finetune.py wrote: a fine-tuned classifier, for eval_linear.py and finetune.py alike, naming the pre-training
    checkpoint it started from."""
    clip_cfg = training.parse_config(hpm.Config, tiny_args(image_root / "train", tmp_path / "clip", "--num_frames", "4",
                                                         "--tubelet_size", "2"))
    os.makedirs(clip_cfg.output_dir)
    model = hpm.build(clip_cfg)
    training.save_checkpoint(clip_cfg, "hpm", model, training.adamw(model, 1e-3, 0.05), 1, cpu_context())
    base = tiny_args(image_root, tmp_path / "out", method="finetune")
    message = one_line_error(base + ["--checkpoint", str(tmp_path / "clip" / "checkpoint.pth")])
    assert "video encoder (4 frames per clip)" in message and "fine-tunes image classifiers only" in message
    tuned = tmp_path / "tuned.pth"
    torch.save({"method": "finetune", "model": {}, "epoch": 3, "config": {"checkpoint": "runs/hpm/checkpoint.pth"}},
               tuned)
    message = one_line_error(base + ["--checkpoint", str(tuned)])
    assert "is a fine-tuned classifier" in message and message.endswith("instead: runs/hpm/checkpoint.pth")
    with pytest.raises(SystemExit, match="^error: .* is a fine-tuned classifier"):
        eval_linear.main(training.parse_config(eval_linear.Config, [
            "--checkpoint", str(tuned), "--data_path", str(image_root), "--num_workers", "0"]))


def test_a_kill_in_the_last_best_copy_is_healed_by_any_rerun(image_root, tmp_path, monkeypatch, capsys):
    """--limit 16 of 24 images, 1 epoch, killed while copying the (best) last checkpoint to checkpoint_best.pth: the
    rerun of the finished run restores it before saying there is nothing to train (exit 0), and removes the torn
    copy; a longer rerun trains on, and its start line and final JSON count the 16 images it trains on."""
    args = tiny_args(image_root, tmp_path, "--limit", "16", "--epochs", "1", method="finetune")
    keep_best = finetune.keep_best

    def torn_copy(path, output_dir):
        (tmp_path / "checkpoint_best.pth.tmp").write_bytes(b"torn")
        raise KeyboardInterrupt
    monkeypatch.setattr(finetune, "keep_best", torn_copy)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(training.parse_config(finetune.Config, args))
    monkeypatch.setattr(finetune, "keep_best", keep_best)
    assert not (tmp_path / "checkpoint_best.pth").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        finetune.main(training.parse_config(finetune.Config, args))
    err = capsys.readouterr().err
    assert e.value.code == 0 and "nothing to train" in err
    assert err.index("checkpoint_best.pth restored") < err.index("nothing to train")
    best, last = (training.load_checkpoint(str(tmp_path / n), "finetune") for n in ("checkpoint_best.pth",
                                                                                   "checkpoint.pth"))
    assert best["epoch"] == best["best_epoch"] == 1 and all(torch.equal(best["model"][k], v)
                                                             for k, v in last["model"].items())
    assert not (tmp_path / "checkpoint_best.pth.tmp").exists()
    finetune.main(training.parse_config(finetune.Config, [*args, "--epochs", "2"]))
    out = capsys.readouterr().out
    assert "finetune: 16 of 24 images in 2 classes (--limit 16); " in out
    assert json.loads(out.strip().splitlines()[-1])["train_images"] == 16
