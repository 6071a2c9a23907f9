"""Deliberate copies and the files each method needs.

A definition preceded by `# Copied from scfs.py: dino_loss` (optionally `... with old->new, a->b`) must equal,
token for token, the definition of that name in the named file after the renames (transformers' check_copies
rule): a reader sees the whole loss in the method's own file, and an edit to one side that is not made to the
other fails here. Each method file's docstring states what to copy for what use; the last tests copy exactly
those files into an empty folder and use them there."""
import ast
import io
import os
import re
import shutil
import subprocess
import sys
import tokenize

import pytest

from conftest import ROOT, TINY, make_image_folder

MARKER = re.compile(r"^# Copied from (\w+\.py): (\w+)(?: with (.+))?$")


def definitions(source):
    """{name: (first line, last line)} of the top-level functions and classes, decorators included (1-based)."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out[node.name] = (first, node.end_lineno)
    return out


def tokens(code):
    """The code's tokens as (type, text), comments included, line breaks and layout left out."""
    skip = {tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING, tokenize.ENDMARKER}
    return [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type not in skip]


def copy_mismatches(folder):
    """Every marked copy among folder's *.py files that differs from its original: [(file:line, reason)].
    A marker must stand right above a definition whose name is the marked one after the renames."""
    problems, sources = [], {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                sources[name] = f.read()
    for name, source in sources.items():
        lines, defs = source.split("\n"), definitions(source)
        starts = {first: (def_name, last) for def_name, (first, last) in defs.items()}
        for i, line in enumerate(lines, 1):
            m = MARKER.match(line)
            if not m:
                continue
            origin, original_name, renames = m.groups()
            pairs = [tuple(p.strip() for p in r.split("->")) for r in renames.split(",")] if renames else []
            where = f"{name}:{i}"
            if origin not in sources or original_name not in definitions(sources[origin]):
                problems.append((where, f"{origin} defines no {original_name}"))
                continue
            if i + 1 not in starts:
                problems.append((where, "the marker is not right above a definition"))
                continue
            first, last = definitions(sources[origin])[original_name]
            expected = "\n".join(sources[origin].split("\n")[first - 1:last])
            for old, new in pairs:
                expected = re.sub(rf"\b{re.escape(old)}\b", new, expected)
            copy_name, copy_last = starts[i + 1]
            copied = "\n".join(lines[i:copy_last])
            if tokens(copied) != tokens(expected):
                problems.append((where, f"{copy_name} differs from {origin}: {original_name}"))
    return problems


def test_marked_copies_equal_their_originals():
    assert copy_mismatches(ROOT) == []


def test_dino_loss_is_in_both_dino_files_and_checked():
    """DINO's loss, head and centre are defined in scfs.py and, as marked copies, in mokd.py; not in common.py."""
    with open(os.path.join(ROOT, "mokd.py")) as f:
        mokd = f.read()
    for name in ("dino_loss", "DINOHead", "DINOCenter", "MultiCrop", "teacher_temperature"):
        assert f"# Copied from scfs.py: {name}\n" in mokd
        with open(os.path.join(ROOT, "scfs.py")) as f:
            assert name in definitions(f.read())
    with open(os.path.join(ROOT, "common.py")) as f:
        common_defs = definitions(f.read())
    assert not {"dino_loss", "DINOHead", "DINOCenter", "CLIPVisionTower", "FrozenTeacher"} & set(common_defs)


def test_the_check_catches_an_edited_copy_a_stray_marker_and_honours_renames(tmp_path):
    original = "def loss(x, t):\n    # the centred target\n    return (x - t).mean()\n"
    (tmp_path / "a.py").write_text(original)
    (tmp_path / "b.py").write_text("import torch\n\n\n# Copied from a.py: loss\n" + original)
    assert copy_mismatches(tmp_path) == []
    (tmp_path / "b.py").write_text("# Copied from a.py: loss\n" + original.replace("mean()", "sum()"))
    assert copy_mismatches(tmp_path) == [("b.py:1", "loss differs from a.py: loss")]
    (tmp_path / "b.py").write_text("# Copied from a.py: loss\n" + original.replace("centred", "centered"))
    assert len(copy_mismatches(tmp_path)) == 1  # comments are part of the copy
    (tmp_path / "b.py").write_text("# Copied from a.py: loss with x->y\n" + original.replace("x", "y"))
    assert copy_mismatches(tmp_path) == []
    (tmp_path / "b.py").write_text("# Copied from a.py: loss\n\nz = 1\n")
    assert copy_mismatches(tmp_path) == [("b.py:1", "the marker is not right above a definition")]
    (tmp_path / "b.py").write_text("# Copied from a.py: gone\ndef gone():\n    pass\n")
    assert copy_mismatches(tmp_path) == [("b.py:1", "a.py defines no gone")]


# --- What to copy: the sets each method file's docstring states -------------------------------------------------
USES = {"the model": ["common.py"], "the program": ["common.py", "training.py"],
        "feature targets": ["common.py", "training.py", "teachers.py"]}


@pytest.mark.parametrize("method", ["hpm", "droppos", "semaim", "mokd", "scfs"])
def test_docstring_states_what_to_copy(method):
    """The docstring names the files of each use; feature targets only where the method has them."""
    with open(os.path.join(ROOT, f"{method}.py")) as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    stated = doc[doc.index("To reuse:"):]
    assert f"{method}.py + common.py" in stated and "+ training.py" in stated
    assert ("+ teachers.py" in stated) == (method in ("hpm", "semaim"))


def run_in(folder, code_or_args, *, script=False):
    """Python in `folder` with nothing of the repository on its path (a clean environment but for torch)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    args = [sys.executable, *code_or_args] if script else [sys.executable, "-c", code_or_args]
    return subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("method", ["hpm", "mokd"])
def test_copied_files_alone_run_the_model_and_the_program(method, tmp_path):
    """this file + common.py: the model trains one step (no training.py there); + training.py: the program runs
    one tiny epoch and writes its checkpoint; the model-only copy asked to run the program says what it lacks, and so
    does HPM's program copy asked for feature targets without teachers.py."""
    model_dir, program_dir = tmp_path / "model", tmp_path / "program"
    for folder, files in ((model_dir, USES["the model"]), (program_dir, USES["the program"])):
        folder.mkdir()
        for name in [f"{method}.py", *files]:
            shutil.copy(os.path.join(ROOT, name), folder)
    step = {
        "hpm": "import hpm, common\n"
               "enc = common.vit('vit_tiny', 32, 4)\n"
               "model = hpm.HPM(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2, mask_ratio=0.75, epochs=2)\n"
               "x = torch.randn(2, 3, 32, 32)\n",
        "mokd": "import mokd, common\n"
                "cnn = common.resnet('resnet18')\n"
                "vit = common.vit('vit_tiny', 32, 8)\n"
                "model = mokd.MOKD(cnn, vit, out_dim=64, hidden_dim=32, bottleneck_dim=16, thead_depth=1, cnn_grid=1, "
                "epochs=2)\n"
                "x = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 2\n",
    }[method]
    code = ("import torch\n" + step + "loss, stats = model(x, 0.0)\nloss.backward()\n"
            "grads = [p.grad for p in model.parameters() if p.requires_grad]\n"
            "assert torch.isfinite(loss) and any(g is not None and g.abs().sum() > 0 for g in grads)\n"
            "import sys; assert 'training' not in sys.modules\nprint('stepped', float(loss))\n")
    out = run_in(model_dir, code)
    assert out.returncode == 0 and "stepped" in out.stdout, out.stderr[-2000:]
    out = run_in(model_dir, [f"{method}.py", "--help"], script=True)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "training.py" in out.stderr.strip().splitlines()[-1]
    data = make_image_folder(str(tmp_path / "images"), classes=2, per_class=4)
    args = ["--preset", "cifar10", "--data_path", data, "--output_dir", "out", *TINY[method], "--epochs", "1",
            "--warmup_epochs", "0", "--batch_size", "8", "--micro_batch", "4", "--num_workers", "0"]
    out = run_in(program_dir, [f"{method}.py", *args], script=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.path.isfile(program_dir / "out" / "checkpoint.pth")
    if method == "hpm":  # the program copy without teachers.py: feature targets ask for it in one line
        args[args.index("out")] = "out_features"
        out = run_in(program_dir, [f"{method}.py", *args, "--target", "features", "--teacher", "t.pt"], script=True)
        last = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 1 and last.startswith("error: ") and "teachers.py" in last, out.stderr[-2000:]
