"""HPM on clips (the TPAMI video extension): tube masking, the space-time ViT, VideoMAE's targets, sampling and
crop, clip folders, and the training program end to end on synthetic moving-square clips.
Tiny models: 8 frames of 32 px, 2 x 4 x 4 tubelets -> T' = 4 slices of S = 64 locations, N = 256 tokens;
mask ratio 0.9 -> K = 64 - int(57.6) = 7 visible locations (28 tokens), M = 57 masked (228 tokens)."""
import json
import math
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms

import common
import eval_linear
import hpm
import training
from common import clip_indices
from conftest import ROOT, TINY
from synthetic import DIRECTIONS, make_clip_folder
from test_train import assert_equal_states
from hpm import HPM, hard_count, mask_order, predicted_loss, tube_ids, tubelet_targets, visible_count

IMG, PATCH, FRAMES, TUBELET = 32, 4, 8, 2
T, S = FRAMES // TUBELET, (IMG // PATCH) ** 2
N = T * S
K = S - int(0.9 * S)
M = S - K
LATE = 0.95  # the last of 10 epochs: n_hard = floor(57 * 0.5) = 28


def tiny_video_hpm(seed=0, **kw):
    torch.manual_seed(seed)
    encoder = common.VisionTransformer(IMG, PATCH, embed_dim=32, depth=2, num_heads=2, num_frames=FRAMES,
                                       tubelet_size=TUBELET)
    kw = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "mask_ratio": 0.9, "norm_pix_loss": True,
          "epochs": 10, **kw}
    return HPM(encoder, **kw)


def clips(batch=3, seed=1):
    return torch.randn(batch, 3, FRAMES, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def spy(monkeypatch, name):
    """Record the arguments and result of every call of hpm.<name> that HPM.forward makes."""
    calls, real = [], getattr(hpm, name)

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out
    monkeypatch.setattr(hpm, name, wrapper)
    return calls


def token_mask(ids_keep, num_tokens):
    """bool (B, num_tokens), True = hidden, from the visible token ids."""
    return torch.ones(ids_keep.shape[0], num_tokens, dtype=torch.bool).scatter_(1, ids_keep, False)


# --- tube masking -----------------------------------------------------------------------------------
def test_mask_counts_follow_videomae_and_the_ssv2_preset():
    """VideoMAE's TubeMaskingGenerator masks int(r S) locations per slice: 176 of 196 at 0.9, so the ssv2 preset
    (16 frames, tubelet 2, 224 px, patch 16) has 8 x 196 = 1568 tokens, 160 visible and M = 1408 masked; HPM's
    image rule int(N (1 - r)) would keep 19. The preset's recipe is VideoMAE's SSv2 script."""
    assert visible_count(196, 0.9, clips=True) == 20 and visible_count(196, 0.9) == 19
    assert visible_count(196, 0.75, clips=True) == visible_count(196, 0.75) == 49
    cfg = training.parse_config(hpm.Config, ["--preset", "ssv2"])
    slices, locations = cfg.num_frames // cfg.tubelet_size, (cfg.input_size // cfg.patch_size) ** 2
    visible = visible_count(locations, cfg.mask_ratio, clips=True)
    assert (slices * locations, slices * visible, slices * (locations - visible)) == (1568, 160, 1408)
    assert (cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.sampling_rate) == (384, 4, 6, 2)
    assert cfg.blr * cfg.batch_size / 256 == pytest.approx(1.2e-3) and (cfg.epochs, cfg.warmup_epochs) == (800, 40)


def test_tube_mask_is_one_spatial_mask_in_every_slice_with_exact_counts(monkeypatch):
    """forward masks whole tubes: the visible and masked tokens partition the clip, every time slice has the same
    spatial mask, K = 7 locations visible and M = 57 masked in every clip."""
    model = tiny_video_hpm()
    calls = spy(monkeypatch, "tube_ids")
    model(clips(), LATE)
    (_, _, keep), (_, _, masked) = calls
    assert keep.shape == (3, T * K) and masked.shape == (3, T * M)
    assert torch.equal(torch.cat([keep, masked], 1).sort(1).values, torch.arange(N).expand(3, -1))
    per_slice = token_mask(keep, N).view(3, T, S)
    assert (per_slice == per_slice[:, :1]).all()
    assert (per_slice[:, 0].sum(1) == M).all()


def test_tube_ids_tile_locations_over_slices():
    """tube_ids(ids) = ids, ids + S, ids + 2S, ...: location s of slice t is token t*S + s; one slice: ids."""
    ids = torch.tensor([[5, 0, 63], [1, 2, 3]])
    out = tube_ids(ids, 3, 64)
    assert torch.equal(out, torch.cat([ids, ids + 64, ids + 128], 1))
    assert torch.equal(tube_ids(ids, 1, 64), ids)


def test_hard_tubes_are_the_top_scored_locations_and_always_masked(monkeypatch):
    """The teacher scores every space-time token of the full clip; a location scores the mean over its slices;
    the n_hard best-scored locations are masked in every slice."""
    model, x = tiny_video_hpm(), clips()
    teacher = model.teacher
    with torch.no_grad():
        tokens = teacher["decoder_embed"](teacher["encoder"](x)) + model.decoder_pos_embed  # (B, 1 + N, Dd)
        per_token = predicted_loss(teacher["predictor"], teacher["predictor"].features(tokens))[:, 1:]  # (B, N)
    by_hand = per_token.view(3, T, S).mean(1)
    assert torch.allclose(model.teacher_scores(x), by_hand, atol=1e-6)
    assert not torch.allclose(per_token.view(3, T, S)[:, 0], by_hand, atol=1e-3)  # the slices do differ
    orders, tubes = spy(monkeypatch, "mask_order"), spy(monkeypatch, "tube_ids")
    model(x, LATE)
    (args, _, _), = orders
    num_hard = hard_count(M, 9, 10)
    assert args[1] == S and args[4] == num_hard == 28 and torch.allclose(args[3], by_hand, atol=1e-6)
    hidden = token_mask(tubes[0][2], N).view(3, T, S)
    top = by_hand.topk(num_hard, dim=1).indices  # (B, n_hard)
    assert torch.gather(hidden, 2, top[:, None, :].expand(-1, T, -1)).all()


def test_non_hard_locations_visible_uniformly():
    """Given the hard tubes, every other location is visible with probability K / (S - n_hard), in all slices."""
    torch.manual_seed(0)
    draws, num_hard = 20000, 28
    scores = torch.randn(1, S).expand(draws, S)  # the same hard set in every draw
    ids = mask_order(draws, S, "cpu", scores, num_hard)
    visible = ~token_mask(tube_ids(ids[:, :K], T, S), N).view(draws, T, S)
    assert (visible == visible[:, :1]).all()
    hard = set(scores[0].topk(num_hard).indices.tolist())
    rest = [s for s in range(S) if s not in hard]
    assert not visible[:, 0, sorted(hard)].any()
    p = K / (S - num_hard)
    freq = visible[:, 0, rest].double().mean(0)
    assert (freq - p).abs().max() < 5 * math.sqrt(p * (1 - p) / draws)  # 5 sigma per location


# --- space-time ViT, patches and targets ------------------------------------------------------------
def unpatchify_clip(x, p, t, frames, height, width):
    """(B, N, t*p*p*3) -> (B, 3, T, H, W): the inverse of common.patchify on clips (tests only)."""
    B = x.shape[0]
    x = x.reshape(B, frames // t, height // p, width // p, t, p, p, 3)
    return torch.einsum("bxhwtpqc->bcxthpwq", x).reshape(B, 3, frames, height, width)


def test_clip_patchify_matches_a_written_out_loop_and_round_trips():
    """Token (slice x, row r, col c) holds its tubelet laid out (frame, row, col, channel), as VideoMAE's
    rearrange '(t p0) (h p1) (w p2) -> (t h w) (p0 p1 p2 c)'; a non-square frame catches a swapped axis."""
    torch.manual_seed(0)
    p, t, frames, height, width = 4, 2, 4, 8, 12
    video = torch.randn(2, 3, frames, height, width)
    patches = common.patchify(video, p, t)
    rows, cols = height // p, width // p
    expected = torch.empty(2, (frames // t) * rows * cols, t * p * p * 3)
    for x in range(frames // t):
        for r in range(rows):
            for c in range(cols):
                n = (x * rows + r) * cols + c
                for dt in range(t):
                    for i in range(p):
                        for j in range(p):
                            for ch in range(3):
                                value = video[:, ch, x * t + dt, r * p + i, c * p + j]
                                expected[:, n, ((dt * p + i) * p + j) * 3 + ch] = value
    assert torch.equal(patches, expected)
    assert torch.equal(unpatchify_clip(patches, p, t, frames, height, width), video)
    other = torch.randn_like(patches)
    assert torch.equal(common.patchify(unpatchify_clip(other, p, t, frames, height, width), p, t), other)


def test_conv3d_embedding_is_a_linear_map_of_each_tubelet():
    """patch_embed.proj is a Conv3d over t x p x p tubelets (VideoMAE's name and shape); it equals one linear map
    applied to every tubelet's pixels; embed_patches adds the fixed table."""
    torch.manual_seed(0)
    vit = common.VisionTransformer(IMG, PATCH, 32, 1, 2, num_frames=FRAMES, tubelet_size=TUBELET)
    proj = vit.patch_embed.proj
    assert isinstance(proj, nn.Conv3d) and proj.weight.shape == (32, 3, TUBELET, PATCH, PATCH)
    x = clips(2)
    weight = proj.weight.permute(0, 2, 3, 4, 1).reshape(32, -1)  # (D, t*p*p*3) in patchify's layout
    by_hand = common.patchify(x, PATCH, TUBELET) @ weight.T + proj.bias  # (B, N, D)
    with torch.no_grad():
        assert torch.allclose(vit.patch_embed(x), by_hand, atol=1e-5)
        assert torch.allclose(vit.embed_patches(x), by_hand + vit.pos_embed[:, 1:], atol=1e-5)
    assert vit.num_patches == N and vit.pos_embed.shape == (1, 1 + N, 32) and not vit.pos_embed.requires_grad


def test_space_time_pos_embed_is_the_2d_table_plus_a_time_code():
    """Token (x, s): the first 3/4 of the channels are MAE's 2-D table at location s, the last quarter a 1-D
    sin-cos of slice x (sin at 0 is 0, cos 1); the cls slot is zero; tokens are all distinct."""
    dim, grid, slices = 64, 4, 3
    table = common.sincos_pos_embed(dim, grid, time_grid=slices)
    assert table.shape == (1 + slices * grid * grid, dim) and torch.count_nonzero(table[0]) == 0
    space = common.sincos_pos_embed(dim - dim // 4, grid, cls_token=False)
    tokens = table[1:].view(slices, grid * grid, dim)
    for x in range(slices):
        assert torch.equal(tokens[x, :, :48], space)
        omega = 1.0 / 10000 ** (np.arange(8) / 8)
        code = np.concatenate([np.sin(x * omega), np.cos(x * omega)])
        assert torch.allclose(tokens[x, :, 48:], torch.tensor(code, dtype=torch.float32).expand(grid * grid, -1))
    assert torch.cdist(table[1:], table[1:]).add(torch.eye(len(table) - 1)).min() > 0.1
    with pytest.raises(SystemExit, match="^error: a width of 40"):
        common.sincos_pos_embed(40, grid, time_grid=slices)


def test_tubelet_targets_normalise_each_tubelet_per_channel_by_hand():
    """VideoMAE's target: pixels back in [0, 1] (x * std + mean), then per tubelet and channel over its t*p*p
    values (x - mean) / (unbiased std + 1e-6), written out in Python for a few tokens."""
    torch.manual_seed(0)
    video = torch.randn(2, 3, 4, 8, 8)
    p, t = 4, 2
    raw, normed = tubelet_targets(video, p, t, False), tubelet_targets(video, p, t, True)
    assert raw.shape == normed.shape == (2, 8, t * p * p * 3)
    for b, n, ch in ((0, 0, 0), (1, 5, 2), (0, 7, 1)):
        x, rc = divmod(n, 4)
        r, c = divmod(rc, 2)
        values = [float(video[b, ch, x * t + dt, r * p + i, c * p + j]) * common.IMAGENET_STD[ch]
                  + common.IMAGENET_MEAN[ch] for dt in range(t) for i in range(p) for j in range(p)]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        assert torch.allclose(raw[b, n, ch::3], torch.tensor(values), atol=1e-6)
        assert torch.allclose(normed[b, n, ch::3], torch.tensor([(v - mean) / (std + 1e-6) for v in values]),
                              atol=1e-5)


def test_one_frame_is_the_image_model_bit_for_bit():
    """num_frames = 1 is the image path unchanged: same parameter names, shapes, values (same RNG draws) and
    outputs; HPM built with --num_frames 1 --tubelet_size 1 gives the same weights and loss. The clip pieces at
    one slice coincide with the image ones: patchify, the table, tube_ids, and a one-slice Conv3d model."""
    torch.manual_seed(0)
    image_vit = common.VisionTransformer(IMG, PATCH, 32, 2, 2)
    torch.manual_seed(0)
    one_frame = common.VisionTransformer(IMG, PATCH, 32, 2, 2, num_frames=1, tubelet_size=1)
    a, b = image_vit.state_dict(), one_frame.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(one_frame.patch_embed.proj, nn.Conv2d)
    imgs = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(image_vit(imgs), one_frame(imgs))
    args = ["--preset", "cifar10", *TINY["hpm"]]
    losses, states = [], []
    for extra in ([], ["--num_frames", "1", "--tubelet_size", "1"]):
        training.seed_all(0)
        model = hpm.build(training.parse_config(hpm.Config, args + extra))
        states.append(model.state_dict())
        torch.manual_seed(3)
        losses.append(model(imgs, LATE)[0])
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert torch.equal(losses[0], losses[1])
    # one slice of the clip path
    assert torch.equal(common.patchify(imgs[:, :, None], PATCH, 1), common.patchify(imgs, PATCH))
    assert torch.equal(common.sincos_pos_embed(32, 8, time_grid=1), common.sincos_pos_embed(32, 8))
    clip_vit = common.VisionTransformer(IMG, PATCH, 32, 2, 2, num_frames=2, tubelet_size=2)  # T' = 1, Conv3d
    state = dict(a, **{"patch_embed.proj.weight": a["patch_embed.proj.weight"][:, :, None].repeat(1, 1, 2, 1, 1) / 2})
    clip_vit.load_state_dict(state)
    with torch.no_grad():  # two equal frames, each half the 2-D kernel: the same tokens, positions and outputs
        assert torch.allclose(clip_vit(imgs[:, :, None].repeat(1, 1, 2, 1, 1)), image_vit(imgs), atol=1e-5)


# --- data: sampling, crop, clip folders -------------------------------------------------------------
def test_clip_indices_for_long_and_short_videos():
    """VideoMAE's loader (kinetics.py): start, start + s, ...; it steps only while start + s + 1 < frames, so a
    short video repeats its last reachable frame (and, by that rule, never reaches its very last one)."""
    assert clip_indices(100, 8, 4, start=10) == [10, 14, 18, 22, 26, 30, 34, 38]
    assert clip_indices(16, 8, 2, start=0) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert clip_indices(10, 8, 2, start=0) == [0, 2, 4, 6, 8, 8, 8, 8]
    assert clip_indices(3, 4, 1, start=0) == [0, 1, 1, 1]
    assert clip_indices(1, 4, 2, start=0) == [0, 0, 0, 0]


def index_video(root, frames):
    """root/c/v/<i>.png: frame i is a flat grey of value 4 i (PNG: lossless), so a clip tells its frame indices."""
    folder = os.path.join(root, "c", "v")
    os.makedirs(folder)
    for i in range(frames):
        Image.new("RGB", (8, 8), (4 * i,) * 3).save(os.path.join(folder, f"{i:04d}.png"))
    return root


@pytest.mark.parametrize("frames", [60, 11])
def test_clip_folder_samples_videomae_starts(tmp_path, frames):
    """Training draws the start uniformly from 0 .. frames - T s (0 for a short video); evaluation takes the
    centre start; the indices follow clip_indices."""
    root = index_video(str(tmp_path), frames)
    num_frames, rate = 8, 4
    to_tensor = common.ClipTransform(transforms.PILToTensor())
    train = common.ClipFolder(root, to_tensor, num_frames, rate)
    last = max(frames - num_frames * rate, 0)
    starts = set()
    torch.manual_seed(0)
    for _ in range(200):
        clip, label, skipped = train[0]
        assert clip.shape == (3, num_frames, 8, 8) and (label, skipped) == (0, 0)
        ids = (clip[0, :, 0, 0] // 4).tolist()
        assert ids == clip_indices(frames, num_frames, rate, ids[0])
        starts.add(ids[0])
    assert starts == set(range(last + 1))
    centre = common.ClipFolder(root, to_tensor, num_frames, rate, train=False)[0][0]
    assert (centre[0, :, 0, 0] // 4).tolist() == clip_indices(frames, num_frames, rate, last // 2)


def test_multiscale_crop_sizes_and_places_follow_videomae():
    """GroupMultiScaleCrop at 224 on a 320 x 240 frame: sides int(240 s) for s in (1, .875, .75, .66) = 240, 210,
    180, 158 (none within 3 px of 224), width and height at most one scale apart: 10 sizes, at offsets that are
    multiples of a quarter of the slack."""
    crop, sides = common.MultiScaleCrop(224), [240, 210, 180, 158]
    expected = {(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1}
    assert len(expected) == 10
    torch.manual_seed(0)
    seen = set()
    for _ in range(400):
        w, h, left, top = crop.params(320, 240)
        assert (w, h) in expected
        assert left % ((320 - w) // 4 or 1) == 0 and left <= 320 - w and top <= 240 - h
        seen.add((w, h))
    assert seen == expected


def test_every_frame_of_a_clip_gets_the_same_crop():
    """Frames that differ by a constant brightness stay exactly that constant apart after the crop (bilinear
    resizing is linear): one crop for the whole clip; and the crop does vary between clips."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 200, (40, 48, 3)).astype(np.uint8)
    frames = [Image.fromarray(base + 10 * k) for k in range(5)]
    transform = common.ClipTransform(transforms.ToTensor(), common.MultiScaleCrop(32))
    torch.manual_seed(0)
    outs = [transform(frames) for _ in range(8)]
    for out in outs:
        assert out.shape == (3, 5, 32, 32)
        for k in range(5):
            assert torch.allclose(out[:, k] - out[:, 0], torch.full_like(out[:, 0], 10 * k / 255), atol=1e-6)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_corrupt_frame_skips_its_video_with_a_warning(tmp_path, capsys):
    """An unreadable frame: its video is named once (with the frame), replaced by the next one, counted."""
    root = make_clip_folder(str(tmp_path), per_class=2, frames=4)
    bad = os.path.join(root, "down", "video000", "00002.jpg")
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    dataset = common.ClipFolder(root, common.videomae_transform(IMG), 4, 1)
    clip, label, skipped = dataset[0]
    assert clip.shape == (3, 4, IMG, IMG) and label == 0 and skipped == 1
    err = capsys.readouterr().err
    assert f"warning: skipping unreadable video {os.path.dirname(bad)}" in err and bad in err
    dataset[0]
    assert "warning" not in capsys.readouterr().err  # reported once


def test_short_videos_are_counted_once_and_odd_frame_sizes_resized(tmp_path, capsys):
    """Videos of 6 frames for clips of 4 x 2 = 8 frames: one line at start with the count and the shortest (a video of
    10 frames is not counted). A frame of another size (a re-encoded frame): resized to the first frame's, so the
    clip stacks, and the video is named once."""
    root = make_clip_folder(str(tmp_path / "clips"), per_class=1, frames=6)
    longer = os.path.join(root, "up", "video000")
    for f in range(6, 10):
        Image.open(os.path.join(longer, "00000.jpg")).save(os.path.join(longer, f"{f:05d}.jpg"))
    odd = os.path.join(root, "down", "video000")
    Image.open(os.path.join(odd, "00002.jpg")).resize((40, 24)).save(os.path.join(odd, "00002.jpg"))
    dataset = common.clip_dataset(root, common.ClipTransform(transforms.PILToTensor()), 4, 2, train=False)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "3 of 4 videos" in err and "= 8 frames" in err
    assert f"(the shortest, {odd}, has 6)" in err
    clip = dataset[0][0]  # down/video000: frames 0, 2, 4, 5
    assert clip.shape == (3, 4, 32, 32) and dataset[0][2] == 0
    dataset[0]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"the frames of video {odd} differ in size (32x32, 40x24)" in err


def test_a_clip_root_is_refused_with_the_split_to_pass(tmp_path):
    make_clip_folder(str(tmp_path / "train"), per_class=1, frames=2)
    make_clip_folder(str(tmp_path / "val"), per_class=1, frames=2)
    with pytest.raises(SystemExit) as e:
        common.clip_dataset(str(tmp_path), None, 2, 1)
    assert str(e.value).startswith(f"error: {tmp_path} holds train/, val/ (the splits of a data set)")
    assert str(e.value).endswith(f"pass --data_path {tmp_path / 'train'}")


def test_video_files_without_torchcodec_are_one_line_error(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "c")
    (tmp_path / "c" / "a.mp4").write_bytes(b"\0")
    monkeypatch.setattr(common.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as e:
        common.clip_dataset(str(tmp_path), None, 8, 2)
    assert str(e.value).startswith("error:") and "pip install torchcodec" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="^error: no videos found"):
        common.clip_dataset(str(tmp_path / "empty"), None, 8, 2)


def test_video_files_decode_through_torchcodec(tmp_path, monkeypatch):
    """A video file is read through torchcodec's VideoDecoder (a stand-in here: frame i is grey 5 i), each
    frame index decoded once, in VideoMAE's order."""
    asked = []

    class VideoDecoder:
        def __init__(self, path):
            assert path.endswith(".webm")

        def __len__(self):
            return 20

        def get_frames_at(self, indices):
            asked.append(list(indices))
            data = torch.stack([torch.full((3, 6, 6), 5 * i, dtype=torch.uint8) for i in indices])
            return types.SimpleNamespace(data=data)
    module = types.ModuleType("torchcodec.decoders")
    module.VideoDecoder = VideoDecoder
    monkeypatch.setitem(sys.modules, "torchcodec", types.ModuleType("torchcodec"))
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", module)
    monkeypatch.setattr(common.importlib.util, "find_spec", lambda name: object())
    os.makedirs(tmp_path / "c")
    (tmp_path / "c" / "a.webm").write_bytes(b"\0")
    dataset = common.clip_dataset(str(tmp_path), common.ClipTransform(transforms.PILToTensor()), 8, 4, train=False)
    clip, _, skipped = dataset[0]
    ids = (clip[0, :, 0, 0] // 5).tolist()
    assert skipped == 0 and ids == [0, 4, 8, 12, 16, 16, 16, 16] == clip_indices(20, 8, 4, 0)
    assert asked == [[0, 4, 8, 12, 16]]


# --- the training program on clips ------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_root(tmp_path_factory):
    """<root>/train and <root>/val: 4 directions x 6 videos of 8 frames (24 clips each)."""
    root = tmp_path_factory.mktemp("clips")
    make_clip_folder(str(root / "train"), frames=8, seed=0)
    make_clip_folder(str(root / "val"), frames=8, seed=1)
    return root


def video_args(data, out, *extra):
    """The video_tiny preset at 4 frames of 16 px (2 slices of 16 locations, 2 visible) with a 1-block 32-wide
    decoder: 2 epochs of 3 steps of 8 clips."""
    return ["--preset", "video_tiny", "--data_path", str(data), "--output_dir", str(out), *TINY["hpm"],
            "--num_frames", "4", "--input_size", "16",
            "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "8", "--micro_batch", "4", "--num_workers", "0",
            "--log_every", "1", *extra]


def test_torchrun_two_processes_on_clips(clip_root, tmp_path):
    """2 processes on CPU (gloo) on clips: identical weights (teacher too) on both ranks, trained, logged."""
    out = tmp_path / "ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
           f"--master_port={port}", os.path.join(ROOT, "tests", "ddp_run.py"), "hpm",
           *video_args(clip_root / "train", out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    s0, s1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert any(k.startswith("teacher.") for k in s0)
    training.seed_all(0)
    init = hpm.build(training.parse_config(hpm.Config, video_args(clip_root / "train", out))).state_dict()
    assert not torch.equal(init["encoder.patch_embed.proj.weight"], s0["encoder.patch_embed.proj.weight"])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(6)) and log[0]["hard_ratio"] > 0  # tubes mined from epoch 0


def test_resume_on_clips_is_bitwise_identical_and_evaluates(clip_root, tmp_path, monkeypatch):
    """2 epochs straight == 1 epoch, crash, automatic resume, 1 epoch (weights and optimizer, bit for bit); the
    checkpoint's video encoder loads exactly and eval_linear.py evaluates it on centre clips."""
    def cfg(out):
        return training.parse_config(hpm.Config, video_args(clip_root / "train", tmp_path / out))
    model = hpm.main(cfg("a"))
    save = training.save_checkpoint

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        hpm.main(cfg("b"))
    monkeypatch.undo()
    hpm.main(cfg("b"))
    a, b = (training.load_checkpoint(str(tmp_path / d / "checkpoint.pth"), "hpm") for d in "ab")
    assert a["epoch"] == b["epoch"] == 2 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert_equal_states(a["optimizer"], b["optimizer"])

    path = str(tmp_path / "a" / "checkpoint.pth")
    encoder, _, arch = training.load_encoder(path)
    assert (arch["num_frames"], arch["tubelet_size"], arch["input_size"]) == (4, 2, 16) and encoder.time_grid == 2
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[k], v), k
    eval_cfg = training.parse_config(eval_linear.Config, [
        "--checkpoint", path, "--data_path", str(clip_root), "--num_workers", "0", "--probe_epochs", "5",
        "--knn_k", "1", "--device", "cpu"])
    result = eval_linear.main(eval_cfg)
    assert result["train_images"] == result["val_images"] == 24 and 0 <= result["linear_top1"] <= 100
    dataset = common.clip_dataset(str(clip_root / "train"), common.ClipTransform(common.eval_transform(16)),
                                  4, 2, train=False)
    x1, y = eval_linear.extract(encoder, dataset, eval_cfg, torch.device("cpu"), pool="mean")
    x2, _ = eval_linear.extract(encoder, dataset, eval_cfg, torch.device("cpu"), pool="mean")
    assert x1.shape == (24, 192) and torch.equal(x1, x2)  # centre clips: deterministic
    assert sorted(set(y.tolist())) == list(range(len(DIRECTIONS)))
    assert eval_linear.knn_top1(x1, y, x1, y, 1, 0.07, 4) == 100.0


def test_bad_video_settings_are_one_line_errors(clip_root, tmp_path):
    for extra, start in ((["--num_frames", "1", "--tubelet_size", "2"], "error: --tubelet_size 2 needs clips"),
                         (["--num_frames", "7"], "error: --num_frames 7 is not a multiple"),
                         (["--mask_ratio", "0.05"], "error: --mask_ratio 0.05 leaves 16 of 16"),
                         (["--decoder_dim", "40"], "error: a width of 40")):
        with pytest.raises(SystemExit) as e:
            hpm.build(training.parse_config(hpm.Config, video_args(clip_root / "train", tmp_path, *extra)))
        assert str(e.value).startswith(start), str(e.value)
