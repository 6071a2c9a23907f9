"""The training program end to end: DDP on CPU, resume, bad input, eval_linear, config parsing."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import common
import droppos
import eval_linear
import hpm
import mokd
import scfs
import semaim
import training
from conftest import ROOT, make_image_folder, tiny_args, write_own_checkpoint


def run(script, *args, env=None):
    """Run one of our scripts as a user would; returns (returncode, stderr)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, env=full_env, timeout=300)
    return p.returncode, p.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METHODS = {"hpm": hpm, "droppos": droppos, "semaim": semaim, "mokd": mokd, "scfs": scfs}
DIAGNOSTICS = {"hpm": {"loss_rec", "loss_pred", "rank_corr", "hard_ratio"},
               "droppos": {"acc_dropped", "grid_err", "acc_within1", "sigma"},
               "semaim": {"centre_dist", "centre_border"},
               "mokd": {"loss_sm_cnn", "loss_st_cnn", "loss_cm_cnn", "loss_ct_cnn", "loss_sm_vit", "loss_st_vit",
                        "loss_cm_vit", "loss_ct_vit", "teacher_temp_cnn", "teacher_temp_vit"},
               "scfs": {"loss_dino", "loss_stage_global", "loss_search", "search_sim", "teacher_temp"}}
# Every method, and the two with feature targets from a frozen teacher (conftest.teacher_files: clip, timm).
RUNS = [(m, None) for m in METHODS] + [("hpm", "clip"), ("semaim", "timm")]
RUN_IDS = [m if t is None else f"{m}-{t}-teacher" for m, t in RUNS]


def teacher_args(teacher, request):
    """--target features --teacher <tiny file of that kind>, or nothing."""
    if teacher is None:
        return []
    return ["--target", "features", "--teacher", request.getfixturevalue("teacher_files")[teacher]]


@pytest.mark.parametrize("method,teacher", RUNS, ids=RUN_IDS)
def test_torchrun_two_processes_keep_identical_weights(method, teacher, image_root, tmp_path, request):
    """2 processes on CPU (gloo): after training, every weight (teachers too) is identical on both ranks."""
    out = tmp_path / "ddp"
    args = tiny_args(image_root / "train", out, *teacher_args(teacher, request), method=method)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", os.path.join(ROOT, "tests", "ddp_run.py"),
           method, *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Warning" not in p.stderr, p.stderr  # e.g. DDP's broadcast_buffers deprecation
    s0, s1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    training.seed_all(0)  # rank 0's seed: the same initial weights as the run
    init = METHODS[method].build(training.parse_config(METHODS[method].Config, args)).state_dict()
    first_layers = [k for k in init if k.endswith(("blocks.0.attn.qkv.weight", "layer1.0.conv1.weight"))]
    assert first_layers and all(not torch.equal(init[k], s0[k]) for k in first_layers)  # trained
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(6))  # 24 images / (2 ranks x 4) = 3 steps x 2 epochs
    assert DIAGNOSTICS[method] | {"loss", "lr", "img_per_s", "peak_mem_gib", "grad_norm"} <= set(log[0])


def assert_equal_states(a, b, where="optimizer"):
    """Nested dicts / lists of tensors and numbers, equal bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_states(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_states(x, y, f"{where}.{i}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("method,teacher", RUNS, ids=RUN_IDS)
def test_resume_is_bitwise_identical(method, teacher, image_root, tmp_path, monkeypatch, request):
    """2 epochs straight == 1 epoch, crash, automatic resume, 1 epoch: identical weights and optimizer;
    the checkpoint holds the encoder at the top level under timm's names, which eval_linear loads. A frozen
    teacher is not in the checkpoint; its config records the teacher's path."""
    module = METHODS[method]
    extra = teacher_args(teacher, request)
    def args(out):
        return training.parse_config(module.Config,
                                   tiny_args(image_root / "train", tmp_path / out, *extra, method=method))

    model = module.main(args("a"))

    save = training.save_checkpoint

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # as if the job died right after the first epoch's checkpoint

    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        module.main(args("b"))
    assert training.load_checkpoint(str(tmp_path / "b" / "checkpoint.pth"), method)["epoch"] == 1
    monkeypatch.undo()
    module.main(args("b"))

    a, b = (training.load_checkpoint(str(tmp_path / d / "checkpoint.pth"), method) for d in "ab")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert_equal_states(a["optimizer"], b["optimizer"])
    log_b = [json.loads(line)["step"] for line in open(tmp_path / "b" / "log.jsonl")]
    assert log_b == list(range(6))  # 3 steps x 2 epochs: none skipped or repeated on resume

    assert not any(k.startswith(("module.", "_orig_mod.")) for k in a["model"])
    if teacher:
        assert a["config"]["teacher"] == extra[-1] and a["model"].keys() == training.export_state(model).keys()
        assert not any("feature_teacher" in k for k in a["model"])
    path, state = str(tmp_path / "a" / "checkpoint.pth"), model.state_dict()
    if "encoders" not in a:  # MAE-style: the encoder at the top level under timm's names
        assert not any(k.startswith("encoder.") for k in a["model"])
        stored = {"": {k: a["model"][k] for k in model.encoder.state_dict()}}
    else:  # DINO-style: the teacher encoder(s) under torchvision / timm names, one entry each
        stored = {name: e["state"] for name, e in a["encoders"].items()}
    for name, weights in stored.items():
        encoder, _, _ = training.load_encoder(path, name)
        assert encoder.state_dict().keys() == weights.keys()
        first = next(iter(weights))  # where in the model this encoder lives, e.g. "teacher_cnn.backbone."
        prefix = next(k[:-len(first)] for k in state if k.endswith(first) and torch.equal(state[k], weights[first]))
        for k, v in weights.items():
            assert torch.equal(state[prefix + k], v) and torch.equal(encoder.state_dict()[k], v), k


# --- beyond one process: torchrun restarts, two nodes, node-local folders ------------------------------------
def torchrun(*launcher, args, env=None):
    """Start one torchrun agent running tests/ddp_run.py hpm with `args`; returns the Popen."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, os.path.join(ROOT, "tests", "ddp_run.py"),
           "hpm", *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def finish(*procs):
    return [(p.wait(timeout=300), p.stderr.read()) for p in procs]


def test_torchrun_restart_heals_a_killed_worker(image_root, tmp_path):
    """--max-restarts 1, rank 1 SIGKILLed right after the first checkpoint: torchrun restarts both workers, which
    rendezvous afresh, resume epoch 1 and finish (rc 0); every step logged once; both ranks end equal."""
    out = tmp_path / "run"
    [(rc, err)] = finish(torchrun("--nproc_per_node=2", "--max-restarts=1", "--nnodes=1", "--master_addr=127.0.0.1",
                                  f"--master_port={free_port()}", args=tiny_args(image_root / "train", out),
                                  env={"KILL_RANK": "1"}))
    assert rc == 0, err[-3000:]
    assert "resumed from" in err and "epoch 1 of 2" in err
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == list(range(6))
    s0, s1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def two_nodes(image_root, out0, out1, *extra):
    launcher = ("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
                "--rdzv_id=two_nodes")
    return finish(*(torchrun(*launcher, args=tiny_args(image_root / "train", out, *extra)) for out in (out0, out1)))


def test_two_agents_as_two_nodes_train_one_epoch(image_root, tmp_path):
    """Two torchrun agents on localhost, c10d rendezvous, one shared output folder: one epoch, equal weights."""
    out = tmp_path / "shared"
    results = two_nodes(image_root, out, out, "--epochs", "1")
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [0, 1, 2]
    s0, s1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_nodes_with_separate_output_folders_stop_before_any_step(image_root, tmp_path):
    """Node-local output folders, a checkpoint in only one: every rank stops before a step, with one line naming a
    rank and host and saying the folder must be shared; nothing is written to either folder."""
    hpm.main(training.parse_config(hpm.Config, tiny_args(image_root / "train", tmp_path / "n0", "--epochs", "1")))
    (tmp_path / "n1").mkdir()
    os.remove(tmp_path / "n0" / "log.jsonl")
    before = (tmp_path / "n0" / "checkpoint.pth").stat().st_mtime
    results = two_nodes(image_root, tmp_path / "n0", tmp_path / "n1", "--epochs", "2")
    assert all(rc != 0 for rc, _ in results)
    lines = [line for _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "the output folder must be on a filesystem all nodes share" in lines[0]
    assert lines[0].startswith("error: rank 1 on ")
    assert not (tmp_path / "n0" / "log.jsonl").exists() and not any((tmp_path / "n1").iterdir())
    assert (tmp_path / "n0" / "checkpoint.pth").stat().st_mtime == before


def error_line(stderr):
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1]


def test_missing_data_folder_is_one_line_error(tmp_path):
    rc, err = run("hpm.py", *tiny_args(tmp_path / "nope", tmp_path / "out"))
    assert rc != 0 and error_line(err).startswith("error: --data_path") and "Traceback" not in err


def test_empty_data_folder_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    rc, err = run("hpm.py", *tiny_args(tmp_path / "empty", tmp_path / "out"))
    assert rc != 0 and error_line(err).startswith("error: no images found") and "Traceback" not in err


def test_checkpoint_from_another_method_is_one_line_error(image_root, tmp_path):
    (tmp_path / "out").mkdir()
    torch.save({"method": "droppos", "model": {}, "epoch": 1}, tmp_path / "out" / "checkpoint.pth")
    rc, err = run("hpm.py", *tiny_args(image_root / "train", tmp_path / "out"))
    assert rc != 0 and "Traceback" not in err
    assert error_line(err).startswith("error:") and "droppos" in error_line(err)


def test_corrupt_image_is_skipped_with_a_warning(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), per_class=12)
    bad = os.path.join(data, "c0", "005.jpg")
    with open(bad, "wb") as f:
        f.write(b"this is not a jpeg")
    rc, err = run("hpm.py", *tiny_args(data, tmp_path / "out", "--epochs", "1"))
    assert rc == 0, err[-2000:]
    assert f"warning: skipping unreadable image {bad}" in err
    assert os.path.exists(tmp_path / "out" / "checkpoint.pth")


def test_mostly_corrupt_images_stop_the_run(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), per_class=12)
    for c in (0, 1):
        for i in range(12):
            if i % 4:  # 3 of every 4 files are broken
                with open(os.path.join(data, f"c{c}", f"{i:03d}.jpg"), "wb") as f:
                    f.write(b"garbage")
    rc, err = run("hpm.py", *tiny_args(data, tmp_path / "out", "--epochs", "1"))
    assert rc != 0 and "Traceback" not in err
    assert error_line(err).startswith("error: most images could not be read")


def test_cifar10_offline_names_the_fix(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(common, "CIFAR10", no_network)
    with pytest.raises(SystemExit) as e:
        common.image_dataset("cifar10", None, str(tmp_path))
    assert str(e.value).startswith("error: could not get CIFAR-10") and "ImageFolder" in str(e.value)


def test_eval_linear_on_a_tiny_checkpoint(image_root, tmp_path):
    """Loads the student encoder exactly; k=1 k-NN of a set against itself is 100 %."""
    model = hpm.main(training.parse_config(hpm.Config, tiny_args(image_root / "train", tmp_path, "--epochs", "1")))
    encoder, ckpt, arch = training.load_encoder(str(tmp_path / "checkpoint.pth"))
    size = arch["input_size"]
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[k], v), k
    cfg = training.parse_config(eval_linear.Config, [
        "--checkpoint", str(tmp_path / "checkpoint.pth"), "--data_path", str(image_root), "--num_workers", "0",
        "--probe_epochs", "30", "--knn_k", "1", "--device", "cpu"])
    result = eval_linear.main(cfg)
    assert result["train_images"] == result["val_images"] == 24 and result["method"] == "hpm"
    assert 0 <= result["linear_top1"] <= 100
    x, y = eval_linear.extract(encoder, common.image_dataset(str(image_root / "train"), common.eval_transform(size)),
                               cfg, torch.device("cpu"))
    assert x.shape == (24, 192)
    assert eval_linear.knn_top1(x, y, x, y, 1, 0.07, 2) == 100.0


def test_eval_linear_clamps_knn_k_to_the_training_samples(image_root, tmp_path, capsys):
    """--limit 6 leaves 6 training features, fewer than --knn_k 20 (a topk error before): k-NN votes over all 6, one
    line says so, the JSON records k; the start line names what was found and kept."""
    write_own_checkpoint(str(tmp_path / "own"))
    cfg = training.parse_config(eval_linear.Config, [
        "--checkpoint", str(tmp_path / "own" / "checkpoint.pth"), "--data_path", str(image_root), "--num_workers", "0",
        "--probe_epochs", "1", "--limit", "6", "--device", "cpu"])
    result = eval_linear.main(cfg)
    err = capsys.readouterr().err
    assert err.count("--knn_k 20 is more than the 6 training samples; the k-NN vote uses all 6") == 1
    assert "train 6 of 24 images in 2 classes, val 6 of 24 images in 2 classes (--limit 6)" in err
    assert result["knn_k"] == 6 and result["train_images"] == 6 and 0 <= result["knn_top1"] <= 100


def test_eval_linear_rejects_a_foreign_file(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pth")
    rc, err = run("eval_linear.py", "--checkpoint", tmp_path / "foreign.pth", "--data_path", tmp_path)
    assert rc != 0 and error_line(err).startswith("error:") and "Traceback" not in err


def test_linear_probe_separates_separable_features():
    torch.manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.randn(200, 16) * 0.1 + torch.nn.functional.one_hot(y, 16).float() * 3
    cfg = training.parse_config(eval_linear.Config, ["--probe_epochs", "20"])
    assert eval_linear.linear_top1(x, y, x, y, 4, cfg) == 100.0


def test_config_preset_and_flags():
    """--preset sets new defaults, explicit flags still win, bools take --no-."""
    cfg = training.parse_config(hpm.Config, ["--preset", "cifar10", "--epochs", "3", "--no-learning_loss"])
    assert (cfg.model, cfg.input_size, cfg.patch_size, cfg.epochs, cfg.learning_loss) == ("vit_tiny", 32, 4, 3, False)
    assert training.parse_config(hpm.Config, []).batch_size == 2048
