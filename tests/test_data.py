"""Data layer: mp4 I/O, the Shapes world, folder and webdataset readers."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from m4v.data.folder import VideoFolderDataset
from m4v.data.shapes import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    ShapesWorld,
    all_attributes,
    caption_for,
    parse_caption,
)
from m4v.data.webdataset import WebVideoDataset, expand_shards, write_shards
from m4v.video_io import (
    VideoDecodeError,
    encode_video,
    frames_to_tensor,
    probe_video,
    read_video,
    to_frames,
    video_decodes,
    write_video,
)


def ramp_video(num_frames: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Frame t is a uniform grey of level 8 t + 3 (so every frame says which one it is)."""
    levels = 8 * np.arange(num_frames, dtype=np.uint8) + 3
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


# --------------------------------------------------------------------------------------------
# video_io


def test_lossless_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 18, 22, 3), dtype=np.uint8)
    path = write_video(tmp_path / "v.mp4", frames, fps=8, lossless=True)
    np.testing.assert_array_equal(read_video(path), frames)
    info = probe_video(path)
    assert (info.num_frames, info.height, info.width, info.fps) == (5, 18, 22, 8.0)


def test_default_codec_keeps_flat_colours(tmp_path):
    frames = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    frames[:] = COLOURS["blue"]
    frames[:, 8:24, 8:24] = COLOURS["yellow"]
    decoded = read_video(write_video(tmp_path / "v.mp4", frames))
    # away from the colour edge the yuv420p round trip is within a few levels
    interior = np.abs(decoded.astype(int) - frames)[:, 11:21, 11:21]
    corner = np.abs(decoded.astype(int) - frames)[:, :5, :5]
    assert interior.max() <= 4 and corner.max() <= 4


def test_float_and_uint8_layouts_agree(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    tensor = frames_to_tensor(frames)
    assert tensor.shape == (3, 3, 16, 16) and tensor.min() >= -1 and tensor.max() <= 1
    np.testing.assert_array_equal(to_frames(tensor), frames)
    np.testing.assert_array_equal(to_frames(tensor.double().numpy()), frames)
    a = encode_video(frames, lossless=True)
    b = encode_video(tensor, lossless=True)
    np.testing.assert_array_equal(read_video(a), read_video(b))


def test_read_video_start_and_stride(tmp_path):
    path = write_video(tmp_path / "ramp.mp4", ramp_video(11), lossless=True)
    clip = read_video(path, start=1, num_frames=4, stride=3)
    np.testing.assert_array_equal(clip[:, 0, 0, 0], 8 * np.array([1, 4, 7, 10]) + 3)
    assert len(read_video(path, start=9)) == 2
    with pytest.raises(VideoDecodeError, match="too few frames"):
        read_video(path, start=2, num_frames=5, stride=3)


def test_bad_inputs_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="even height and width"):
        encode_video(np.zeros((2, 31, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"video: got uint8 of shape"):
        encode_video(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"\(3, t, h, w\)"):
        encode_video(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="fps"):
        encode_video(np.zeros((2, 32, 32, 3), np.uint8), fps=0)


def test_write_is_atomic_and_decodes_checks(tmp_path):
    path = write_video(tmp_path / "out.mp4", ramp_video(3))
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_video(path, np.zeros((2, 31, 31, 3), np.uint8))  # fails before anything is replaced
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"]  # no temporary left behind
    assert video_decodes(path)
    (tmp_path / "cut.mp4").write_bytes(before[: len(before) // 3])
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 50)
    assert not video_decodes(tmp_path / "cut.mp4")
    assert not video_decodes(tmp_path / "junk.mp4")
    assert not video_decodes(tmp_path / "absent.mp4")
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "absent.mp4")


# --------------------------------------------------------------------------------------------
# Shapes world


def test_shapes_world_is_deterministic():
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    for i in (0, 1, 977):
        x, y = a[i], b[i]
        assert torch.equal(x["video"], y["video"]) and x["caption"] == y["caption"]
    assert not torch.equal(a[0]["video"], a[1]["video"])
    assert not torch.equal(a[0]["video"], ShapesWorld(seed=4)[0]["video"])
    assert len({a[i]["caption"] for i in range(40)}) > 30


def test_shapes_world_output_format():
    world = ShapesWorld(seed=0, num_frames=6, size=(32, 48), length=10)
    item = world[2]
    assert item["video"].shape == (3, 6, 32, 48) and item["video"].dtype == torch.float32
    palette = {tuple(np.array(c) / 127.5 - 1) for c in COLOURS.values()}
    pixels = {tuple(p) for p in item["video"].permute(1, 2, 3, 0).reshape(-1, 3).tolist()}
    assert pixels <= palette and len(pixels) == 2  # exactly the shape and background colours
    assert parse_caption(item["caption"]) == item["attributes"]
    assert len(world) == 10
    with pytest.raises(IndexError):
        world[10]
    batch = next(iter(DataLoader(world, batch_size=4)))
    assert batch["video"].shape == (4, 3, 6, 32, 48) and len(batch["attributes"]["shape"]) == 4


def test_captions_parse_back_exactly():
    prompts = ShapesWorld().all_prompts()
    assert len(prompts) == len(COLOURS) * (len(COLOURS) - 1) * len(SHAPES) * len(DIRECTIONS)
    assert len(set(prompts)) == len(prompts)
    for attributes in all_attributes():
        assert parse_caption(caption_for(attributes)) == attributes
    assert (
        caption_for({"colour": "red", "shape": "circle", "direction": "left", "background": "blue"})
        == "a red circle moves to the left on a blue background"
    )
    for bad in (
        "a red circle moves left on a blue background",
        "a red circle moves to the left on a red background",
        "a purple circle moves up on a blue background",
    ):
        with pytest.raises(ValueError, match="caption|colour and background"):
            parse_caption(bad)


def test_restricted_vocabulary_and_bad_options():
    world = ShapesWorld(colours=("red", "blue"), shapes=("square",), directions=("up", "down"))
    seen = {tuple(world.attributes(i).values()) for i in range(64)}
    assert {s[0] for s in seen} == {"red", "blue"} and {s[1] for s in seen} == {"square"}
    assert len(world.all_prompts()) == 2 * 1 * 2 * 1
    with pytest.raises(ValueError, match="colours"):
        ShapesWorld(colours=("red", "mauve"))
    with pytest.raises(ValueError, match="num_frames"):
        ShapesWorld(num_frames=1)
    with pytest.raises(ValueError, match="size"):
        ShapesWorld(size=8)


def looks_like(mask: np.ndarray, shape: str) -> bool:
    """Structural test of a rendered sprite, from the row widths inside its bounding box."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    widths, w = box.sum(1), box.shape[1]
    if shape == "square":
        return bool(box.all())
    if shape == "triangle":  # apex up: widths grow from a point to the full base
        return bool((np.diff(widths) >= 0).all() and widths[0] <= 3 and widths[-1] >= w - 1)
    corners_empty = not (box[0, 0] or box[0, -1] or box[-1, 0] or box[-1, -1])
    if shape == "circle":  # already wide one row below the top, widest in the middle
        return corners_empty and widths[1] > w / 2 and widths[len(widths) // 2] == w
    if shape == "cross":  # narrow arm one row below the top, full bar in the middle
        return corners_empty and widths[1] <= w / 2 and widths[len(widths) // 2] == w
    raise AssertionError(shape)


@pytest.mark.parametrize("seed", [0, 1])
def test_rendered_pixels_match_attributes(seed):
    world = ShapesWorld(seed=seed)
    for i in range(48):
        attributes = world.attributes(i)
        frames = world.frames(attributes, i)
        colour = np.array(COLOURS[attributes["colour"]])
        masks = (frames == colour).all(-1)
        assert (
            (frames == colour).all(-1) | (frames == COLOURS[attributes["background"]]).all(-1)
        ).all()
        # fully visible, with a one pixel margin, in every frame
        assert not masks[:, 0].any() and not masks[:, -1].any()
        assert not masks[:, :, 0].any() and not masks[:, :, -1].any()
        ys, xs = np.nonzero(masks[0])
        for t in range(1, len(frames)):  # a rigid sprite: frame t is frame 0 translated
            yt, xt = np.nonzero(masks[t])
            assert len(set(yt - ys)) == 1 and len(set(xt - xs)) == 1
        assert looks_like(masks[0], attributes["shape"]), attributes
        assert [looks_like(masks[0], s) for s in SHAPES].count(True) == 1
        # centroid moves in the stated direction, by 1-2.1 px per frame along each moving axis
        centroids = np.array([np.argwhere(m).mean(0)[::-1] for m in masks])  # (t, [x, y])
        step = (centroids[-1] - centroids[0]) / (len(frames) - 1)
        dx, dy = DIRECTIONS[attributes["direction"]]
        for d, s in ((dx, step[0]), (dy, step[1])):
            if d == 0:
                assert abs(s) < 0.15
            else:
                assert np.sign(s) == d and 1.0 <= abs(s) <= 2.1, (attributes, step)


# --------------------------------------------------------------------------------------------
# folder dataset


def make_folder(root, names_and_frames, index="jsonl", captions=None):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (name, frames) in enumerate(names_and_frames):
        if frames is not None:
            write_video(root / name, frames, lossless=True)
        rows.append({"video": name, "caption": (captions or {}).get(name, f"caption {k}")})
    if index == "jsonl":
        (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        with open(root / "captions.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["video", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    return root


@pytest.mark.parametrize("index", ["jsonl", "csv"])
def test_folder_dataset_reads_clips(tmp_path, index):
    root = make_folder(
        tmp_path / "data",
        [("clips/a.mp4", ramp_video(10)), ("b.mp4", ramp_video(12)[::-1].copy())],
        index=index,
        captions={"b.mp4": 'a "quoted", comma caption'},
    )
    ds = VideoFolderDataset(root, num_frames=4, size=32, stride=2, random_offset=False)
    assert len(ds) == 2
    item = ds[0]
    expected = (8 * np.array([0, 2, 4, 6]) + 3) / 127.5 - 1
    assert item["video"].shape == (3, 4, 32, 32) and item["caption"] == "caption 0"
    np.testing.assert_allclose(
        item["video"][:, :, 5, 7].numpy(), np.tile(expected, (3, 1)), atol=1e-6
    )
    assert ds[1]["caption"] == 'a "quoted", comma caption' and ds[1]["skipped"] == 0


def test_folder_dataset_resizes_and_centre_crops(tmp_path):
    frames = np.zeros((3, 32, 64, 3), np.uint8)
    frames[:, :, :24] = COLOURS["red"]  # columns 0-23 red, 24-39 green, 40-63 blue
    frames[:, :, 24:40] = COLOURS["green"]
    frames[:, :, 40:] = COLOURS["blue"]
    root = make_folder(tmp_path / "d", [("wide.mp4", frames)])
    video = VideoFolderDataset(root, num_frames=3, size=16, random_offset=False)[0]["video"]
    assert video.shape == (3, 3, 16, 16)
    # scaled by 1/2 to 16x32, then the central 16 columns (source columns 16-47) are kept:
    # 4 red, 8 green, 4 blue (one column each side blends across an edge)
    row = to_frames(video)[0, 8]
    assert (row[:3] == COLOURS["red"]).all() and (row[5:11] == COLOURS["green"]).all()
    assert (row[13:] == COLOURS["blue"]).all()


def test_folder_random_offset_stays_in_range(tmp_path):
    root = make_folder(tmp_path / "d", [("long.mp4", ramp_video(20))])
    ds = VideoFolderDataset(root, num_frames=3, stride=4, random_offset=True)
    starts = set()
    for _ in range(30):
        levels = to_frames(ds[0]["video"])[:, 0, 0, 0].astype(int)
        start = (levels[0] - 3) // 8
        np.testing.assert_array_equal(levels, 8 * (start + np.array([0, 4, 8])) + 3)
        starts.add(start)
    assert starts <= set(range(0, 20 - 8)) and len(starts) > 3


def test_folder_construction_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        VideoFolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="found neither"):
        VideoFolderDataset(tmp_path / "empty")
    names = [("ok.mp4", ramp_video(4))] + [(f"gone{i}.mp4", None) for i in range(7)]
    root = make_folder(tmp_path / "missing", names)
    with pytest.raises(FileNotFoundError, match=r"7 of 8 videos .*gone0\.mp4.*gone4\.mp4") as e:
        VideoFolderDataset(root)
    assert "gone5.mp4" not in str(e.value)  # only the first few are listed
    make_folder(tmp_path / "missing", [("ok.mp4", ramp_video(4))], index="csv")
    with pytest.raises(FileNotFoundError, match="found both"):
        VideoFolderDataset(root)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "captions.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\n{"video": "b.mp4"}\n')
    with pytest.raises(ValueError, match="line 2: 'caption'"):
        VideoFolderDataset(bad)
    (bad / "captions.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        VideoFolderDataset(bad)
    (bad / "captions.jsonl").unlink()
    (bad / "captions.csv").write_text("path,text\na.mp4,x\n")
    with pytest.raises(ValueError, match="expected at least video, caption"):
        VideoFolderDataset(bad)


def test_folder_corrupt_clip_is_skipped_and_counted(tmp_path, caplog):
    root = make_folder(
        tmp_path / "d",
        [
            ("a.mp4", ramp_video(6)),
            ("bad.mp4", None),
            ("short.mp4", ramp_video(2)),
            ("c.mp4", ramp_video(6)),
        ],
    )
    (root / "bad.mp4").write_bytes(b"\x00garbage" * 64)
    ds = VideoFolderDataset(root, num_frames=4, random_offset=False)
    with caplog.at_level(logging.WARNING):
        item = ds[1]
    assert item["path"].endswith("c.mp4") and item["skipped"] == 1
    assert ds[0]["skipped"] == 0 and ds[2]["path"].endswith("c.mp4")
    assert [os.path.basename(p) for p, _ in ds.skipped] == ["bad.mp4", "short.mp4"]
    assert "needs 4" in ds.skipped[1][1]
    assert "bad.mp4" in caplog.text
    # across DataLoader workers the per-sample counts add up to the number of broken clips
    loader = DataLoader(
        VideoFolderDataset(root, num_frames=4, random_offset=False), batch_size=2, num_workers=2
    )
    assert sum(int(b["skipped"].sum()) for b in loader) == 2


def test_folder_all_corrupt_raises(tmp_path):
    root = make_folder(tmp_path / "d", [("a.mp4", None), ("b.mp4", None)])
    for name in ("a.mp4", "b.mp4"):
        (root / name).write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="consecutive clips"):
        VideoFolderDataset(root)[0]


# --------------------------------------------------------------------------------------------
# webdataset shards


def shapes_samples(n):
    world = ShapesWorld(seed=5)
    return [world[i] for i in range(n)]


def test_webdataset_round_trip(tmp_path):
    samples = shapes_samples(5)
    paths = write_shards(samples, tmp_path / "shards", samples_per_shard=2)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    ds = WebVideoDataset(tmp_path / "shards", num_frames=8, size=32, random_offset=False)
    out = list(ds)
    assert [o["caption"] for o in out] == [s["caption"] for s in samples]
    assert [o["key"] for o in out] == [f"{i:08d}" for i in range(5)]
    for o, s in zip(out, samples, strict=True):
        assert o["video"].shape == (3, 8, 32, 32) and o["skipped"] == 0
        assert (o["video"] - s["video"]).abs().mean() < 0.03  # yuv420p: colour edges blur
    # the webdataset package reads the same shards
    wds = pytest.importorskip("webdataset")
    keys = [
        (s["__key__"], sorted(k for k in s if not k.startswith("__")))
        for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False)
    ]
    assert keys == [(f"{i:08d}", ["mp4", "txt"]) for i in range(5)]


def test_webdataset_splits_over_workers(tmp_path):
    write_shards(shapes_samples(6), tmp_path, samples_per_shard=2)
    ds = WebVideoDataset(
        str(tmp_path / "shard-{000000..000002}.tar"), num_frames=2, random_offset=False
    )
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    assert sorted(s["key"] for s in loader) == [f"{i:08d}" for i in range(6)]


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_corrupt_samples_and_shards_are_skipped(tmp_path, caplog):
    good = [encode_video(s["video"]) for s in shapes_samples(3)]
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        add_member(tar, "a.mp4", good[0])
        add_member(tar, "a.txt", b"first")
        add_member(tar, "b.mp4", b"corrupt bytes" * 20)
        add_member(tar, "b.txt", b"broken video")
        add_member(tar, "c.mp4", good[1])  # no caption
        add_member(tar, "d.mp4", good[2])
        add_member(tar, "d.json", json.dumps({"caption": "from json"}).encode())
    with tarfile.open(tmp_path / "whole.tar", "w") as tar:
        for k in range(3):
            add_member(tar, f"k{k}.mp4", good[k])
            add_member(tar, f"k{k}.txt", f"cut {k}".encode())
    with tarfile.open(tmp_path / "whole.tar") as tar:
        k1 = tar.getmember("k1.mp4")
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: k1.offset_data + k1.size // 2])
    ds = WebVideoDataset(
        [tmp_path / "mixed.tar", tmp_path / "cut.tar"], num_frames=8, random_offset=False
    )
    with caplog.at_level(logging.WARNING):
        out = list(ds)
    assert [(o["caption"], o["skipped"]) for o in out][:2] == [("first", 0), ("from json", 2)]
    assert [o["caption"] for o in out[2:]] == ["cut 0"]  # k1 is cut mid-member
    reasons = [r for _, r in ds.skipped]
    assert "Decode" in reasons[0] and "no caption" in reasons[1] and "shard" in reasons[2]
    assert len(ds.skipped) == 3 and "mixed.tar:b" in caplog.text


def test_expand_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no tar files"):
        expand_shards(str(tmp_path / "*.tar"))
    with pytest.raises(FileNotFoundError, match="1 of 1 do not exist"):
        expand_shards([tmp_path / "x.tar"])
