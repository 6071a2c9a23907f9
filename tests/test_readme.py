"""The documentation says what the code does: the README's quick start runs as written (on a tiny folder in place of
CIFAR-10); every `python X.py ...` and `torchrun ... X.py ...` command in README.md, docs/ and tests/README.md
parses with that program's own flags, on as many processes as it asks for; each method page's flags table gives the
code's defaults and preset values; relative links lead to files and headings that exist; and the pages name nothing
outside the repository."""
import dataclasses
import glob
import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torchvision

import bench
import synthetic
import training
from conftest import ROOT, make_image_folder

PAGES = sorted([os.path.join(ROOT, "README.md"), os.path.join(ROOT, "tests", "README.md"),
                *glob.glob(os.path.join(ROOT, "docs", "*.md"))])
PROGRAMS = ("hpm", "droppos", "semaim", "mokd", "scfs", "finetune", "eval_linear", "visualize")


def read(path):
    with open(path) as f:
        return f.read()


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def command_lines(text):
    """Each line of a bash block (continuation lines joined) and each inline `python ...` / `torchrun ...` span."""
    lines = [line for block in bash_blocks(text) for line in block.replace("\\\n", " ").splitlines()]
    spans = re.findall(r"(?<!`)`((?:python|torchrun) [^`]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    return lines + [" ".join(span.split()) for span in spans]


def commands(path):
    """[(where, script, args, nodes, procs)] for every command line that runs a .py file with python or torchrun
    (comments dropped); nodes x procs are the processes torchrun starts."""
    found = []
    for line in command_lines(read(path)):
        words = shlex.split(line, comments=True)
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if not scripts or not {"python", "python3", "torchrun"} & set(words[:scripts[0]]) or "-m" in words:
            continue
        i = scripts[0]
        launcher = " ".join(words[:i])
        nodes = re.search(r"--nnodes[= ](\d+)", launcher)
        procs = re.search(r"--nproc_per_node[= ](\d+)", launcher)
        found.append((f"{os.path.relpath(path, ROOT)}: {line.strip()[:80]}", words[i], words[i + 1:],
                      int(nodes.group(1)) if nodes else 1, int(procs.group(1)) if procs else 1))
    return found


ALL = [c for page in PAGES for c in commands(page)]


def test_the_pages_document_every_program():
    """The scan finds the commands: each training program, eval_linear.py, bench.py and tests/synthetic.py appears."""
    assert {os.path.basename(c[1])[:-3] for c in ALL} >= {*PROGRAMS, "bench", "synthetic"}


@pytest.mark.parametrize("where,script,args,nodes,procs", ALL, ids=[c[0] for c in ALL])
def test_documented_command_parses(where, script, args, nodes, procs, monkeypatch):
    """Each command's flags exist, their values are in range, and its batch splits over the processes it starts."""
    monkeypatch.setenv("WORLD_SIZE", str(nodes * procs))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(procs))
    name = os.path.basename(script)[:-3]
    try:
        if name in PROGRAMS:
            training.parse_config(importlib.import_module(name).Config, args)
        elif name == "bench":
            parsed = []
            monkeypatch.setattr(bench, "bench_one", lambda a, rest: parsed.append(
                training.parse_config(importlib.import_module(a.method).Config, rest)))
            monkeypatch.setattr(bench, "bench_all", lambda a, rest: parsed.extend(
                training.parse_config(importlib.import_module(line[0]).Config, [*line[1:], *rest])
                for line in bench.BASELINES.values()))
            monkeypatch.setattr(sys, "argv", [script, *args])
            bench.main()
            assert parsed
        elif script == "tests/synthetic.py":
            synthetic.parse(args)
        else:
            pytest.fail(f"{where}: no such program {script}")
    except SystemExit as e:  # --help exits 0
        if e.code not in (0, None):
            pytest.fail(f"{where}: {e.code}")


def test_quick_start_runs_as_written(tmp_path):
    """The README's quick-start block, with a 2-class folder of 12 + 12 images for /path/to/cifar10 and nothing
    else changed: pre-training, evaluation, fine-tuning and the picture chain through runs/quick and write only under runs/."""
    block = re.search(r"<!-- quickstart\b[^>]*-->\s*```bash\n(.*?)```", read(os.path.join(ROOT, "README.md")), re.S)
    assert block, "README.md has no ```bash block after a <!-- quickstart --> marker"
    data = tmp_path / "cifar10"
    make_image_folder(str(data / "train"), seed=0)
    make_image_folder(str(data / "test"), seed=1)
    work, bin_dir = tmp_path / "clone", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    for path in glob.glob(os.path.join(ROOT, "*.py")):  # the programs, as in a fresh clone's root
        os.symlink(path, work / os.path.basename(path))
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # `python` is this interpreter
    (bin_dir / "python").chmod(0o755)
    script = block.group(1).replace("/path/to/cifar10", str(data))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    probe, tuned = results[-2], results[-1]
    assert probe["checkpoint"] == "runs/quick/checkpoint.pth" and probe["method"] == "hpm"
    assert probe["train_images"] == probe["val_images"] == 24 and 0 <= probe["linear_top1"] <= 100
    assert tuned["checkpoint"] == "runs/quick/checkpoint.pth" and tuned["val_images"] == 24 and tuned["epochs"] == 1
    assert (work / "runs" / "quick_finetune" / "checkpoint_best.pth").is_file()
    picture = torchvision.io.decode_png(torchvision.io.read_file(str(work / "runs" / "quick" / "visualize.png")))
    assert picture.shape[0] == 3 and picture.shape[1] > 8 * 32  # a row per image of the 8 drawn
    assert sorted(p.name for p in work.iterdir() if not p.is_symlink() and p.name != "__pycache__") == ["runs"]


def cell_value(text):
    """A flags table cell as the value it stands for: on / off, (none), a number or a product like 0.1 x 32 / 224."""
    text = text.strip().strip("`")
    if text in ("on", "off"):
        return text == "on"
    if text == "(none)":
        return ""
    if re.fullmatch(r"[\d.e+-]+( [x/] [\d.e+-]+)*", text):
        return eval(text.replace(" x ", " * "))  # digits and operators only (checked above)
    return text


@pytest.mark.parametrize("name", ["hpm", "droppos", "semaim", "mokd", "scfs", "finetune"])
def test_flags_table_matches_the_code(name):
    """Every row of the page's flags table names a field of the program's Config, with its default and its value
    under --preset cifar10."""
    config = importlib.import_module(name).Config
    fields = {f.name: f.default for f in dataclasses.fields(config)}
    preset = {**fields, **config.presets["cifar10"]}
    section = read(os.path.join(ROOT, "docs", f"{name}.md")).split("## Flags", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `--(\w+)` \| ([^|]+) \| ([^|]+) \|", section, re.M)
    assert len(rows) >= 10
    for flag, default, cifar in rows:
        assert flag in fields, f"docs/{name}.md: --{flag} is no flag of {name}.py"
        for cell, want in ((default, fields[flag]), (cifar, preset[flag])):
            got = cell_value(cell)
            assert got == pytest.approx(want) if isinstance(want, float) else got == want, \
                f"docs/{name}.md: --{flag} is {cell.strip()} there, {want!r} in {name}.py"


def test_relative_links_lead_somewhere():
    """[text](path#anchor): the file exists, and the anchor is one of its headings (GitHub's slugs)."""
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", read(page)):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            assert os.path.exists(full), f"{os.path.relpath(page, ROOT)}: {target} does not exist"
            if anchor:
                slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                         for h in re.findall(r"^#+ (.*)$", read(full), re.M)}
                assert anchor in slugs, f"{os.path.relpath(page, ROOT)}: no heading #{anchor} in {path or 'itself'}"


def test_the_product_names_nothing_outside_the_repository():
    """Pages, programs and tests speak of the software: no work records, no paths above the repository."""
    banned = re.compile("|".join(["ses" + "sion", r"issue [0-9]", r"\.\./sha" + "red", "spe" + r"cs/", "STY" + "LE.md"]),
                        re.I)
    files = PAGES + glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py"))
    hits = [f"{os.path.relpath(f, ROOT)}:{n}: {line.strip()}" for f in files
            for n, line in enumerate(read(f).splitlines(), 1) if banned.search(line)]
    assert not hits, "\n".join(hits)
