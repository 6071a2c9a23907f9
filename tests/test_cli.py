"""What a user meets at the command line, for every training script: short runs with the presets' own
warm-ups, every numeric flag at 0 and -1, presets that follow --batch_size, --help that shows the preset,
malformed checkpoints, and resumes that check what they resume. In-process where possible (fast)."""
import dataclasses
import json
import os
import re

import pytest
import torch

import bench
import common
import droppos
import eval_linear
import finetune
import hpm
import mokd
import scfs
import semaim
import training
from conftest import TINY, cpu_context, make_image_folder, tiny_args

SCRIPTS = {"hpm": hpm, "droppos": droppos, "semaim": semaim, "mokd": mokd, "scfs": scfs, "finetune": finetune}


def error_of(call):
    """The one-line error a call stops with (SystemExit from common.fail), or None if it returns."""
    try:
        call()
    except SystemExit as e:
        message = str(e.code)
        assert message.startswith("error: ") and "\n" not in message, message
        return message
    return None


# --- short runs: warm-ups longer than the run are cut off at its end ----------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_one_epoch_with_the_presets_own_warmup(name, image_root, tmp_path, capsys):
    """--preset cifar10 --epochs 1 with the preset's 10 warm-up epochs (once a crash): 3 steps, the lr rising at
    every step and never reaching its peak, DINO-style schedules still in their warm-up, one line saying so."""
    module = SCRIPTS[name]
    data = image_root if name == "finetune" else image_root / "train"  # fine-tuning reads train/ and val/
    args = ["--preset", "cifar10", "--data_path", str(data), "--output_dir", str(tmp_path),
            *TINY[name], "--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--log_every", "1"]
    cfg = training.parse_config(module.Config, args)
    assert cfg.warmup_epochs > 1 and cfg.micro_batch == 8  # the preset's warm-up; the micro-batch follows the batch
    module.main(cfg)
    log = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if "lr" in r]  # steps (finetune: evaluations too)
    lrs = [r["lr"] for r in log]
    assert [r["step"] for r in log] == [0, 1, 2] and lrs[0] == 0 and lrs[0] < lrs[1] < lrs[2]
    peak = (cfg.blr_cnn if name == "mokd" else cfg.blr) * cfg.batch_size / 256
    assert lrs[2] < peak * 3 / (3 * cfg.warmup_epochs) + 1e-12  # 3 of the 3 x warmup_epochs warm-up steps
    out = capsys.readouterr().out
    assert out.count(f"warm-up longer than the 1-epoch run, cut off at its end: lr ({cfg.warmup_epochs} epochs)") == 1
    # the line ends with the flags that switch each cut-off warm-up off: real fields, each longer than the run
    hint = re.search(r"for a quick check without it pass ((?:--\w+ 0 ?)+)$", out, flags=re.M)
    flags = re.findall(r"--(\w+) 0", hint.group(1))
    assert flags[0] == "warmup_epochs" and all(getattr(cfg, f) > cfg.epochs for f in flags)
    assert out.count(f"{name}: 24 images in 2 classes; ") == 1  # the start line: what it found
    if name in ("mokd", "scfs"):  # teacher temperature at its epoch-0 value
        assert all(r.get("teacher_temp", r.get("teacher_temp_cnn")) == pytest.approx(0.04) for r in log)


@pytest.mark.parametrize("cap,micro", [(8, 8), (16, 12), (32, 24)])
def test_fewer_images_than_one_batch_train_one_smaller_step(cap, micro, image_root, tmp_path, capsys):
    """24 images, --batch_size 32: each epoch is one step of all 24, in as few equal micro-batches as the
    --micro_batch cap allows (3 x 8, 2 x 12, 1 x 24), the lr linearly scaled to 24, and the config records it."""
    batch = 24
    cfg = training.parse_config(hpm.Config, tiny_args(image_root / "train", tmp_path, "--batch_size", "32",
                                                    "--micro_batch", str(cap), "--warmup_epochs", "0"))
    hpm.main(cfg)
    assert f"24 images make no full batch of --batch_size 32: each epoch is one step of 24 (1 process(es) x " \
        f"{batch // micro} micro-batch(es) of {micro}), the lr scaled to it" in capsys.readouterr().err
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == [0, 1]  # 2 epochs of one step
    assert log[0]["lr"] == pytest.approx(cfg.blr * batch / 256)
    assert json.load(open(tmp_path / "config.json"))["batch_size"] == batch


@pytest.mark.parametrize("name", SCRIPTS)
def test_batch_not_divisible_and_zero_epochs(name):
    module = SCRIPTS[name]
    message = error_of(lambda: training.parse_config(module.Config, ["--batch_size", "10", "--micro_batch", "4"]))
    assert message.startswith("error: --batch_size 10 is not a multiple of --micro_batch 4 x 1 process(es)")
    assert error_of(lambda: training.parse_config(module.Config, ["--epochs", "0"])) == (
        "error: --epochs 0 is out of range; pass a value in [1, 10000]")


def test_resuming_a_finished_run_says_so_and_exits_0(image_root, tmp_path, capsys):
    hpm.main(training.parse_config(hpm.Config, tiny_args(image_root / "train", tmp_path, "--epochs", "1")))
    before = os.path.getmtime(tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit) as e:
        hpm.main(training.parse_config(hpm.Config, tiny_args(image_root / "train", tmp_path, "--epochs", "1")))
    assert e.value.code == 0 and "has already trained 1 epoch and --epochs is 1: nothing to train" in \
        capsys.readouterr().err
    assert os.path.getmtime(tmp_path / "checkpoint.pth") == before


# --- every numeric field at 0 and -1: one tiny step, or one error line ----------------------------------------
class Reads:
    """A config that records which fields are read."""
    def __init__(self, cfg):
        self.cfg, self.names = cfg, set()

    def __getattr__(self, name):
        self.names.add(name)
        return getattr(self.cfg, name)


def numeric_fields(config):
    return [f.name for f in dataclasses.fields(config)
            if isinstance(f.default, (int, float)) and not isinstance(f.default, bool)]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_numeric_flag_at_0_and_minus_1(name, tmp_path):
    """Each value either trains one tiny step with a finite loss or stops with `error: ...` (never a traceback)."""
    module = SCRIPTS[name]
    base = ["--preset", "cifar10", *TINY[name], "--batch_size", "4", "--output_dir", str(tmp_path)]
    if name in ("mokd", "scfs"):
        base += ["--batch_size", "2"]

    def one_step(cfg):
        training.seed_all(0)
        model = module.build(cfg)
        optimizer, schedule = module.make_optimizer(model, cfg, steps_per_epoch=2)
        schedule(1)
        batch = bench.synthetic_batch(module, cfg, torch.device("cpu"))
        stats = module.train_step(model, optimizer, [batch], 0.5, cfg, cpu_context())
        assert torch.isfinite(stats["loss"])

    read = Reads(training.parse_config(module.Config, base))
    one_step(read)  # which fields a step reads at all: the others cannot break one
    outcomes = {}
    for field in numeric_fields(module.Config):
        for value in ("0", "-1"):
            try:
                cfg = training.parse_config(module.Config, [*base, f"--{field}", value])
            except SystemExit as e:
                message = str(e.code)
                assert message.startswith(f"error: --{field} {value}") and "\n" not in message, (field, message)
                outcomes[field, value] = "error"
                continue
            if field in read.names:
                outcomes[field, value] = "error" if error_of(lambda: one_step(cfg)) else "step"
    assert "step" in outcomes.values() and "error" in outcomes.values()


def test_every_numeric_field_has_a_range():
    """A new numeric flag without a range would pass unchecked: parse_config refuses it."""
    for module in SCRIPTS.values():
        limits = {}
        for klass in reversed(module.Config.__mro__):
            limits.update(vars(klass).get("limits", {}))
        assert set(numeric_fields(module.Config)) <= set(limits), module.__name__


HUGE = ("epochs", "num_workers", "input_size", "local_size", "rand_ops", "probe_epochs")


@pytest.mark.parametrize("name", [*SCRIPTS, "eval_linear"])
def test_huge_values_are_one_line_errors(name):
    """1e9 epochs (a 7 GiB schedule), workers (a fork storm), pixels (an allocation traceback), RandAugment ops (a
    silent hang): refused when parsed, with the bound. bench.py parses the same configs. Every epoch count (warm-ups,
    teacher-temperature ramps, last-layer freeze) has a finite bound too: DINO-style schedules allocate per epoch."""
    config = eval_linear.Config if name == "eval_linear" else SCRIPTS[name].Config
    limits = {}
    for klass in reversed(config.__mro__):
        limits.update(vars(klass).get("limits", {}))
    fields = set(numeric_fields(config))
    flags = [f for f in fields if f in HUGE or "epochs" in f or f == "freeze_last_layer"]
    assert "epochs" in flags or name == "eval_linear"
    for flag in flags:
        high = limits[flag][1:-1].split(",")[1].strip()
        assert high != "inf" and 10 <= float(high) <= 10000, (flag, limits[flag])
        message = error_of(lambda: training.parse_config(config, [f"--{flag}", "1000000000"]))
        assert message == f"error: --{flag} 1000000000 is out of range; pass a value in {limits[flag]}"


@pytest.mark.parametrize("name", [n for n in SCRIPTS if n != "finetune"])
def test_a_data_root_is_refused_with_the_split_to_pass(name, image_root, tmp_path):
    """--data_path at the root holding train/ and val/: ImageFolder would read the two splits as two classes and
    train on both; every pre-training program stops before any step and names the folder to pass."""
    cfg = training.parse_config(SCRIPTS[name].Config, tiny_args(image_root, tmp_path, method=name))
    message = error_of(lambda: SCRIPTS[name].main(cfg))
    assert message.startswith(f"error: {image_root} holds train/, val/ (the splits of a data set)")
    assert message.endswith(f"pass --data_path {image_root / 'train'}")
    assert not (tmp_path / "log.jsonl").exists()


def test_a_folder_of_data_sets_is_refused_and_deep_images_are_not(tmp_path):
    """Class folders that hold only folders (a folder of data sets, one level too high) stop with one line naming
    one of them; ImageFolder's files at any depth below a class that holds images itself still count."""
    make_image_folder(str(tmp_path / "sets" / "cifar"), per_class=2)
    make_image_folder(str(tmp_path / "sets" / "pets"), per_class=2)
    message = error_of(lambda: common.image_dataset(str(tmp_path / "sets"), None))
    assert "(folders of folders)" in message and message.endswith(f"pass --data_path {tmp_path / 'sets' / 'cifar'}")
    root = make_image_folder(str(tmp_path / "ok"), per_class=2)
    make_image_folder(os.path.join(root, "c0", "more"), classes=1, per_class=2)
    assert len(common.image_dataset(root, None)) == 6
    # finetune.py and eval_linear.py take the root: a split given instead names its parent
    make_image_folder(str(tmp_path / "data" / "train"), per_class=2)
    make_image_folder(str(tmp_path / "data" / "val"), per_class=2)
    message = error_of(lambda: common.split_folders(str(tmp_path / "data" / "train")))
    assert message.endswith(f"--data_path {tmp_path / 'data'}")
    assert common.split_folders(str(tmp_path / "data")) == (str(tmp_path / "data" / "train"),
                                                            str(tmp_path / "data" / "val"))


def test_the_start_line_counts_what_limit_keeps(image_root):
    cfg = training.parse_config(hpm.Config, tiny_args(image_root / "train", "unused", "--limit", "8"))
    dataset = common.image_dataset(str(image_root / "train"), None)
    assert training.Batches(dataset, cfg, cpu_context()).found() == "8 of 24 images in 2 classes (--limit 8)"
    cfg = training.parse_config(hpm.Config, tiny_args(image_root / "train", "unused", "--limit", "24"))
    assert training.Batches(dataset, cfg, cpu_context()).found() == "24 images in 2 classes"


def test_loader_workers_follow_the_cores_in_every_config(monkeypatch):
    """eval_linear's 8 workers on 2 cores: capped like the training programs' (an explicit value is kept)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    for config in (eval_linear.Config, hpm.Config, finetune.Config):
        assert training.parse_config(config, []).num_workers == 2
        assert training.parse_config(config, ["--num_workers", "5"]).num_workers == 5


# --- presets that follow the user ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_micro_batch_follows_the_batch_size_unless_given(name):
    module = SCRIPTS[name]
    preset_micro = module.Config.presets["cifar10"]["micro_batch"]
    assert training.parse_config(module.Config, ["--preset", "cifar10", "--batch_size", "64"]).micro_batch == 64
    assert training.parse_config(module.Config, ["--preset", "cifar10", "--batch_size", "96"]).micro_batch == 96
    big = training.parse_config(module.Config, ["--preset", "cifar10", "--batch_size", str(6 * preset_micro)])
    assert big.micro_batch == preset_micro  # the preset's micro-batch is the cap
    assert training.parse_config(module.Config, ["--preset", "cifar10", "--batch_size", "64",
                                               "--micro_batch", "16"]).micro_batch == 16
    assert error_of(lambda: training.parse_config(module.Config, ["--preset", "cifar10", "--batch_size", "64",
                                                                "--micro_batch", "48"])).startswith(
        "error: --batch_size 64 is not a multiple of --micro_batch 48")


def test_help_shows_the_presets_values_and_workers_follow_the_cores(capsys):
    with pytest.raises(SystemExit):
        training.parse_config(hpm.Config, ["--preset", "cifar10", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(preset cifar10: vit_tiny)" in text and "(preset cifar10: 100)" in text and "(default: vit_base)" not in text
    cores = len(os.sched_getaffinity(0))
    assert training.parse_config(hpm.Config, []).num_workers == min(10, cores)
    assert training.parse_config(hpm.Config, ["--num_workers", "7"]).num_workers == 7


# --- checkpoints: malformed files, resumes that check what they resume ---------------------------------------
MALFORMED = {
    "a list": [1, 2],
    "no config": {"method": "hpm", "model": {}, "epoch": 1},
    "config not a dict": {"method": "hpm", "model": {}, "epoch": 1, "config": "x"},
    "config without a model": {"method": "hpm", "model": {}, "epoch": 1, "config": {}},
    "encoders malformed": {"method": "hpm", "model": {}, "epoch": 1, "config": {}, "encoders": {"cnn": {"arch": 1}}},
    "encoder without state": {"method": "hpm", "model": {}, "epoch": 1, "config": {},
                              "encoders": {"vit": {"arch": {"model": "vit_tiny"}}}},
    "wrong weights": {"method": "hpm", "model": {"cls_token": torch.zeros(3)}, "epoch": 1,
                      "config": {"model": "vit_tiny", "input_size": 32, "patch_size": 4}},
    "no optimizer": {"method": "hpm", "model": {}, "epoch": 1,
                     "config": {"model": "vit_tiny", "input_size": 32, "patch_size": 4}},
}


@pytest.mark.parametrize("kind", [*MALFORMED, "garbage bytes", "a folder"])
def test_malformed_checkpoints_give_one_line_errors(kind, image_root, tmp_path):
    """For eval_linear's loader and for resume alike: one `error:` line, never a KeyError or TypeError."""
    out = tmp_path / "out"
    out.mkdir()
    path = out / "checkpoint.pth"
    if kind == "garbage bytes":
        path.write_bytes(b"not a checkpoint")
    elif kind == "a folder":
        path.mkdir()
    else:
        torch.save(MALFORMED[kind], path)
    assert error_of(lambda: training.load_encoder(str(path)))
    cfg = training.parse_config(hpm.Config, tiny_args(image_root / "train", out))
    assert error_of(lambda: hpm.main(cfg))


def test_resume_refuses_other_settings_unless_asked(image_root, tmp_path, capsys):
    """Auto-resume with another --data_path or --batch_size stops and names both values; more --epochs or another
    --micro_batch continue; --resume PATH continues deliberately and prints what changed."""
    make = lambda *extra: training.parse_config(hpm.Config, tiny_args(image_root / "train", tmp_path, *extra))  # noqa
    hpm.main(make("--epochs", "1"))
    message = error_of(lambda: hpm.main(make("--data_path", str(image_root / "val"), "--batch_size", "4")))
    assert f"--data_path {image_root / 'train'} (now {image_root / 'val'})" in message
    assert "--batch_size 8 (now 4)" in message and "--resume" in message and "--output_dir" in message
    capsys.readouterr()
    hpm.main(make("--epochs", "2", "--micro_batch", "8"))  # free settings: no complaint
    assert "resumed from" in capsys.readouterr().err
    hpm.main(make("--epochs", "3", "--blr", "3e-4", "--resume", str(tmp_path / "checkpoint.pth")))
    assert "with changed settings: --blr 0.00015 (now 0.0003)" in capsys.readouterr().err
    assert json.load(open(tmp_path / "config.json"))["blr"] == 3e-4


def test_killed_run_resumes_with_each_step_logged_once(image_root, tmp_path, monkeypatch):
    """A kill in the middle of epoch 1 (after steps 3 and 4 were logged) and a resume from the epoch-1 checkpoint:
    log.jsonl holds every step once; a stale checkpoint.pth.tmp from a killed save is removed at start."""
    cfg = training.parse_config(hpm.Config, tiny_args(image_root / "train", tmp_path))
    step = training.Logger.step

    def step_then_die(self, s, *args):
        step(self, s, *args)
        if s == 4:
            raise KeyboardInterrupt
    monkeypatch.setattr(training.Logger, "step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        hpm.main(cfg)
    monkeypatch.undo()
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [0, 1, 2, 3, 4]
    (tmp_path / "checkpoint.pth.tmp").write_bytes(b"torn")
    hpm.main(cfg)
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [0, 1, 2, 3, 4, 5]
    assert not (tmp_path / "checkpoint.pth.tmp").exists()


@pytest.mark.parametrize("problem", ["a file", "not writable"])
def test_unusable_output_dir(problem, image_root, tmp_path):
    target = tmp_path / "out"
    if problem == "a file":
        target.write_text("x")
    else:
        target.mkdir()
        target.chmod(0o500)
        if os.access(target, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: every folder is writable")
    cfg = training.parse_config(hpm.Config, tiny_args(image_root / "train", target))
    assert error_of(lambda: hpm.main(cfg)).startswith(("error: --output_dir", "error: cannot write to --output_dir"))
