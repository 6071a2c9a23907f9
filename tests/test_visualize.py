"""visualize.py: the picture of each method's checkpoint (a row per image, the method's columns, cells of the stated
size), columns that are the model's own masks, scores, positions and orders for the seed, the curves of a log, the
attention weights it reads, and one-line errors. Tiny untrained checkpoints (conftest's tiny runs: 32 px, patch 4;
clips 4 frames of 16 px) saved by training.save_checkpoint; 3 images of conftest's image folder; cells of 32 px."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import droppos
import hpm
import mokd
import scfs
import semaim
import training
import visualize
from conftest import ROOT, cpu_context, tiny_args
from synthetic import make_clip_folder

MODULES = {"hpm": hpm, "droppos": droppos, "semaim": semaim, "mokd": mokd, "scfs": scfs}
# kind: (method, extra flags, columns as the docstring of visualize.py states them)
KINDS = {"hpm": ("hpm", [], 6), "mae": ("hpm", ["--no-learning_loss", "--norm_pix_loss"], 4),
         "clips": ("hpm", ["--preset", "video_tiny", "--num_frames", "4", "--input_size", "16"], 6),
         "droppos": ("droppos", [], 5), "semaim": ("semaim", [], 4), "saim": ("semaim", ["--order", "stochastic"], 5),
         "mokd": ("mokd", [], 5), "scfs": ("scfs", [], 5)}
ROWS, CELL, SEED = 3, 32, 5
GREY = (128, 128, 128)  # visualize.GREY in 8 bits


@pytest.fixture(scope="module")
def runs(tmp_path_factory, image_root):
    """{kind: (checkpoint path, data folder)}: each kind's tiny model, untrained, saved after 'epoch 1 of 2'."""
    root = tmp_path_factory.mktemp("vis")
    clips = make_clip_folder(str(root / "clip_folder"), per_class=1, frames=8)
    out = {}
    for kind, (method, extra, _) in KINDS.items():
        cfg = training.parse_config(MODULES[method].Config, tiny_args("unused", root / kind, *extra, method=method))
        torch.manual_seed(0)
        model = MODULES[method].build(cfg)
        os.makedirs(cfg.output_dir)
        training.save_checkpoint(cfg, method, model, torch.optim.SGD(model.parameters(), lr=0.1), 1, cpu_context())
        out[kind] = (str(root / kind / "checkpoint.pth"), clips if kind == "clips" else str(image_root / "train"))
    return out


def draw(runs, kind, tmp_path, seed=SEED):
    """Run visualize.main on the kind's checkpoint; -> (result, the PNG as uint8 (H, W, 3))."""
    path, data = runs[kind]
    output = str(tmp_path / f"{kind}_{seed}.png")
    cfg = training.parse_config(visualize.Config, ["--checkpoint", path, "--data_path", data, "--num_images", str(ROWS),
                                                   "--cell", str(CELL), "--seed", str(seed), "--output", output,
                                                   "--device", "cpu"])
    result = visualize.main(cfg)
    return result, np.asarray(Image.open(output).convert("RGB"))


def cell(png, row, col, size=CELL):
    """The pixels of one cell of the grid, (size, size, 3)."""
    top, left = visualize.TITLE_HEIGHT + visualize.PAD + row * (size + visualize.PAD), visualize.PAD + col * (
        size + visualize.PAD)
    return png[top:top + size, left:left + size]


def patch_cells(png, row, col, grid):
    """The grid x grid patches of one cell, (grid * grid, p, p, 3) row-major."""
    c = cell(png, row, col)
    p = CELL // grid
    return c.reshape(grid, p, grid, p, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, p, p, 3)


def model_and_images(runs, kind):
    """The checkpoint's model rebuilt here as its method's main() builds it, and the 3 images visualize.py draws."""
    path, data = runs[kind]
    ckpt = training.load_checkpoint(path)
    module = MODULES[ckpt["method"]]
    cfg = module.Config(**ckpt["config"])
    model = module.build(cfg)
    training.import_state(model, ckpt["model"])
    dataset = common.subset(common.image_dataset(data, common.eval_transform(cfg.input_size)), ROWS)
    imgs = torch.stack([dataset[i][0] for i in range(ROWS)])
    return model.eval(), imgs, (ckpt["epoch"] - 1) / cfg.epochs


@pytest.mark.parametrize("kind", KINDS)
def test_a_row_per_image_and_the_methods_columns_of_the_stated_cells(kind, runs, tmp_path):
    """The PNG decodes to TITLE_HEIGHT + rows x (cell + PAD) + PAD by columns x (cell + PAD) + PAD pixels, white
    between the cells (so every cell sits where the grid says), and the columns are the ones visualize.py states."""
    result, png = draw(runs, kind, tmp_path)
    columns = KINDS[kind][2]
    assert len(result["titles"]) == columns and result["kind"] == kind.replace("clips", "hpm")
    step = CELL + visualize.PAD
    assert png.shape == (visualize.TITLE_HEIGHT + ROWS * step + visualize.PAD, columns * step + visualize.PAD, 3)
    grid = png[visualize.TITLE_HEIGHT:]
    for k in range(max(ROWS, columns) + 1):  # the white lines between cells
        for offset in range(visualize.PAD):
            if k <= columns:
                assert (grid[:, k * step + offset] == 255).all()
            if k <= ROWS:
                assert (grid[k * step + offset] == 255).all()


def test_hpm_mask_and_hard_columns_are_the_models_own_for_the_seed(runs, tmp_path):
    """Visible cells of the mask column are the image's, the others grey, exactly where hpm.order_to_mask of
    hpm.mask_order (the seed's first draw, the EMA predictor's scores, the last epoch's hard count) hides them; the
    hard column tints exactly mask_order's last num_hard patches. The same seed draws the same picture, another
    seed another mask."""
    model, imgs, progress = model_and_images(runs, "hpm")
    S, K, num_hard = model.encoder.grid ** 2, model.num_visible, model.num_hard(progress)
    assert num_hard == int(model.num_masked * 0.25)  # epoch 1 of 2: alpha = 0.5 * 1 / 2
    torch.manual_seed(SEED)
    with torch.no_grad():
        ids = hpm.mask_order(ROWS, S, imgs.device, model.teacher_scores(imgs), num_hard)
    mask = hpm.order_to_mask(ids, K).numpy()
    hard = np.zeros((ROWS, S), bool)
    np.put_along_axis(hard, ids[:, S - num_hard:].numpy(), True, axis=1)
    _, png = draw(runs, "hpm", tmp_path)
    for r in range(ROWS):
        image, visible, hard_col = (patch_cells(png, r, c, model.encoder.grid) for c in (0, 1, 5))
        same = (visible == image).all(axis=(1, 2, 3))
        grey = (visible == GREY).all(axis=(1, 2, 3))
        assert (same == ~mask[r]).all() and (grey == mask[r]).all()
        assert ((hard_col == image).all(axis=(1, 2, 3)) == ~mask[r]).all()  # visible: the image
        assert ((hard_col == GREY).all(axis=(1, 2, 3)) == (mask[r] & ~hard[r])).all()  # masked, not hard: grey
        tinted = hard_col[hard[r]].astype(int)
        assert (tinted[..., 0] >= tinted[..., 1:].max(-1)).all()  # hard: tinted red
    _, again = draw(runs, "hpm", tmp_path)
    _, other = draw(runs, "hpm", tmp_path, seed=SEED + 1)
    assert (again == png).all() and not (cell(other, 0, 1) == cell(png, 0, 1)).all()


def test_difficulty_map_is_monotone_in_the_predictors_scores(runs, tmp_path):
    """Cells of the predicted-loss column, ordered by the EMA predictor's score (HPM.teacher_scores), never get
    darker in any channel; the highest score is brighter than the lowest."""
    model, imgs, _ = model_and_images(runs, "hpm")
    with torch.no_grad():
        scores = model.teacher_scores(imgs)  # (B, S)
    _, png = draw(runs, "hpm", tmp_path)
    for r in range(ROWS):
        colours = patch_cells(png, r, 3, model.encoder.grid)[:, 0, 0].astype(int)  # (S, 3)
        ordered = colours[scores[r].argsort().numpy()]
        assert (np.diff(ordered, axis=0) >= 0).all()
        assert ordered[-1].sum() > ordered[0].sum() + 300


def test_droppos_position_column_marks_the_decoders_right_and_wrong_cells(runs, tmp_path):
    """The position column tints exactly the visible patches whose position was dropped (droppos.random_masks for
    the seed), green where DropPos.position_logits' arg-max is the true cell, red elsewhere; the error column is
    black exactly at the right ones."""
    model, imgs, _ = model_and_images(runs, "droppos")
    grid, N = model.encoder.grid, model.encoder.num_patches
    torch.manual_seed(SEED)
    with torch.no_grad():
        ids_keep, drop = droppos.random_masks(ROWS, N, model.num_visible, model.num_keep_pos, imgs.device)
        pred, _, _ = droppos.position_errors(model.position_logits(imgs, ids_keep, drop), ids_keep, grid)
    _, png = draw(runs, "droppos", tmp_path)
    for r in range(ROWS):
        state = np.zeros(N, int)  # 0 masked, 1 kept its position, 2 dropped and right, 3 dropped and wrong
        state[ids_keep[r].numpy()] = np.where(drop[r], np.where(pred[r] == ids_keep[r], 2, 3), 1)
        image, position, error = (patch_cells(png, r, c, grid).astype(int) for c in (0, 2, 3))
        green = position[..., 1] - position[..., [0, 2]].max(-1)
        red = position[..., 0] - position[..., 1:].max(-1)
        assert ((position == image).all(axis=(1, 2, 3)) == (state == 1)).all()
        assert ((position == GREY).all(axis=(1, 2, 3)) == (state == 0)).all()
        dropped = state >= 2
        assert ((green > 0).all(axis=(1, 2))[dropped] == (state[dropped] == 2)).all()
        assert ((red > 0).all(axis=(1, 2))[dropped] == (state[dropped] == 3)).all()
        assert ((error == 0).all(axis=(1, 2, 3)) == (state == 2)).all()  # distance 0: the heat map's black


def test_semaim_order_starts_at_the_models_semantic_centre(runs, tmp_path):
    """The brightest cell of the semantic order column (rank 0) is SemAIM.semantic_centre's patch, and ranks grow
    with the grid distance from it (rank maps are brighter for earlier patches)."""
    model, imgs, _ = model_and_images(runs, "saim")
    grid = model.encoder.grid
    with torch.no_grad():
        centre = model.semantic_centre(imgs).numpy()
    _, png = draw(runs, "saim", tmp_path)
    for r in range(ROWS):
        brightness = patch_cells(png, r, 1, grid)[:, 0, 0].astype(int).sum(-1)  # (N,)
        assert brightness.argmax() == centre[r]
        rows, cols = np.divmod(np.arange(grid * grid), grid)
        d2 = (rows - centre[r] // grid) ** 2 + (cols - centre[r] % grid) ** 2
        assert all(brightness[d2 == a].min() >= brightness[d2 == b].max() for a, b in zip(np.unique(d2),
                                                                                           np.unique(d2)[1:]))


def test_log_curves_one_panel_each_with_the_curves_direction(tmp_path):
    """--log: one panel per logged value (loss, lr, rank_corr; not step, epoch, throughput or memory), 3 a row; the
    falling loss is drawn from high (left) to low (right), the rising lr the other way; a malformed line is one
    error line."""
    log = tmp_path / "log.jsonl"
    with open(log, "w") as f:
        for step in range(30):
            f.write(json.dumps({"step": step, "epoch": 0, "lr": 1e-3 * step, "loss": 2.0 - step / 30,
                                "rank_corr": 0.1, "img_per_s": 50.0, "peak_mem_gib": 1.0}) + "\n")
    result = visualize.main(training.parse_config(visualize.Config, ["--log", str(log)]))
    assert result["output"] == str(tmp_path / "curves.png") and result["titles"] == ["loss", "lr", "rank_corr"]
    png = np.asarray(Image.open(result["output"]).convert("RGB"))
    P = visualize.PAD
    assert png.shape == (visualize.PANEL_H + 2 * P, 3 * (visualize.PANEL_W + P) + P, 3)
    line = np.round(visualize.LINE.numpy() * 255).astype(int)
    for panel, falling in ((0, True), (1, False)):
        left = P + panel * (visualize.PANEL_W + P)
        ys, xs = np.nonzero((png[:, left:left + visualize.PANEL_W].astype(int) == line).all(-1))
        first, last = ys[xs == xs.min()].mean(), ys[xs == xs.max()].mean()
        assert (first < last - 50) if falling else (first > last + 50)
    with open(log, "a") as f:
        f.write("{not json\n")
    with pytest.raises(SystemExit) as e:
        visualize.main(training.parse_config(visualize.Config, ["--log", str(log)]))
    assert str(e.value).startswith("error: line 31 of ")


def run(*args):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "visualize.py"), *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return p.returncode, p.stderr


def test_unknown_checkpoint_missing_file_and_empty_folder_are_one_line_errors(runs, tmp_path):
    path, data = runs["hpm"]
    ckpt = training.load_checkpoint(path)
    ckpt["method"] = "finetune"
    other = tmp_path / "finetune.pth"
    torch.save(ckpt, other)
    empty = tmp_path / "empty"
    empty.mkdir()
    unknown = f"error: {other} is a checkpoint of finetune.py"
    for args, start in ((["--checkpoint", other, "--data_path", data], unknown),
                        (["--checkpoint", tmp_path / "nothing.pth", "--data_path", data], "error: checkpoint "),
                        (["--checkpoint", path, "--data_path", empty], f"error: no images found under {empty}")):
        rc, err = run(*args)
        assert rc != 0 and err.startswith(start) and err.count("\n") == 1, err


def test_attention_weights_are_the_ones_forward_applies():
    """common.Attention.weights @ values through proj is forward's output (with a mask too); the ViT's
    last_attention is that of its last block's input in a plain forward."""
    torch.manual_seed(0)
    vit = common.VisionTransformer(32, 8, embed_dim=32, depth=2, num_heads=4).eval()
    attn, x = vit.blocks[0].attn, torch.randn(2, 5, 32)
    allowed = torch.rand(2, 1, 5, 5) > 0.3
    allowed[..., 0] = True
    for mask in (None, allowed):
        w = attn.weights(x, mask)  # (B, heads, T, T)
        v = attn.qkv(x).view(2, 5, 3, 4, 8)[:, :, 2].transpose(1, 2)  # (B, heads, T, D/heads)
        assert torch.allclose(attn.proj((w @ v).transpose(1, 2).reshape(2, 5, 32)), attn(x, mask), atol=1e-5)
        assert torch.allclose(w.sum(-1), torch.ones(2, 4, 5)) and (mask is None or (w[~mask.expand_as(w)] == 0).all())
    seen = []
    vit.blocks[-1].attn.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        vit(imgs)
        assert torch.allclose(vit.last_attention(imgs), vit.blocks[-1].attn.weights(seen[0]), atol=1e-6)


def test_hpm_reconstruct_is_forwards_pass():
    """HPM.forward's loss_rec is the mean of HPM.reconstruct's per-patch losses under the mask of the same draw."""
    torch.manual_seed(0)
    model = hpm.HPM(common.VisionTransformer(32, 4, embed_dim=32, depth=1, num_heads=2), decoder_dim=32,
                    decoder_depth=1, decoder_heads=2, epochs=2)
    imgs = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    _, stats = model(imgs, 0.6)
    torch.manual_seed(1)
    with torch.no_grad():
        ids = hpm.mask_order(2, 64, imgs.device, model.teacher_scores(imgs), model.num_hard(0.6))
        _, loss, pred, ids_masked = model.reconstruct(imgs, ids)
    assert torch.equal(stats["loss_rec"], loss.mean()) and pred.shape == loss.shape == ids_masked.shape == (2, 48)
    assert torch.equal(ids_masked, ids[:, 16:])
