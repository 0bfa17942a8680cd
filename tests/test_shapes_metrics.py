"""Exact Shapes-world metrics (harness.shapes)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from harness.shapes import (
    ShapesSuite,
    aggregate,
    analyse_video,
    evaluate_folder,
    evaluate_video,
    load_suite,
    main,
    temporal_flickering,
    write_reference_videos,
)
from m4v.data.shapes import COLOURS, DIRECTIONS, SHAPES, ShapesWorld, caption_for, parse_caption
from m4v.video_io import encode_video, frames_to_tensor, read_video, write_video

N = 48
ACCURACIES = ("colour", "shape", "direction", "background")


@pytest.fixture(scope="module")
def ground_truth():
    world = ShapesWorld(seed=21)
    items = []
    for i in range(N):
        attributes = world.attributes(i)
        items.append((attributes, world.frames(attributes, i)))
    return items


def test_ground_truth_scores_perfectly(ground_truth):
    agg = aggregate([evaluate_video(frames, attrs) for attrs, frames in ground_truth])
    assert agg["num_videos"] == N
    for key in (*ACCURACIES, "all"):
        assert agg[f"{key}_accuracy"] >= 0.99, agg


def test_ground_truth_after_mp4_round_trip(ground_truth):
    scores, errors = [], []
    for attrs, frames in ground_truth:
        decoded = read_video(encode_video(frames))  # default codec: yuv420p, chroma bleeds
        errors.append(np.abs(decoded.astype(int) - frames).max())
        scores.append(evaluate_video(decoded, caption_for(attrs)))
    assert max(errors) > 100  # the round trip is far from exact along colour edges
    agg = aggregate(scores)
    for key in (*ACCURACIES, "all"):
        assert agg[f"{key}_accuracy"] >= 0.99, agg


def test_float_video_gives_the_same_verdict(ground_truth):
    attrs, frames = ground_truth[0]
    a, b = evaluate_video(frames, attrs), evaluate_video(frames_to_tensor(frames), attrs)
    assert a.predicted == b.predicted and a.temporal_flickering == b.temporal_flickering


def test_shuffled_captions_score_at_chance(ground_truth):
    # a derangement: video j is scored against the caption of video j + 1; since the metrics are
    # exact on ground truth, each accuracy must equal the fraction of neighbouring pairs whose
    # true attribute happens to coincide, which is near chance (1/8, 1/4, 1/8, 1/8)
    pairs = [(ground_truth[j][1], ground_truth[(j + 1) % N][0]) for j in range(N)]
    agg = aggregate([evaluate_video(frames, attrs) for frames, attrs in pairs])
    for key in ACCURACIES:
        coincide = np.mean(
            [ground_truth[j][0][key] == ground_truth[(j + 1) % N][0][key] for j in range(N)]
        )
        assert agg[f"{key}_accuracy"] == pytest.approx(coincide), key
        assert agg[f"{key}_accuracy"] <= 0.4, key
    assert agg["all_accuracy"] <= 0.05


def test_detects_each_attribute_value():
    """Every colour, shape, direction and background of the vocabulary is recognised."""
    world = ShapesWorld(seed=2)
    colours = list(COLOURS)
    for k in range(max(len(COLOURS), len(SHAPES), len(DIRECTIONS))):
        attrs = {
            "colour": colours[k % 8],
            "shape": SHAPES[k % 4],
            "direction": list(DIRECTIONS)[k % 8],
            "background": colours[(k + 3) % 8],
        }
        assert evaluate_video(world.frames(attrs, k), attrs).all_correct, attrs


def test_empty_and_static_videos():
    plain = np.zeros((6, 32, 32, 3), np.uint8)
    plain[:] = COLOURS["green"]
    attrs = parse_caption("a red square moves up on a green background")
    score = evaluate_video(plain, attrs)
    assert score.predicted["colour"] is None and score.predicted["shape"] is None
    assert score.background_correct and not score.colour_correct and not score.direction_correct
    assert score.temporal_flickering == 1.0
    still = plain.copy()
    still[:, 10:20, 10:20] = COLOURS["red"]
    score = evaluate_video(still, attrs)
    assert score.colour_correct and score.shape_correct and score.background_correct
    assert score.predicted["direction"] is None and not score.direction_correct
    assert score.predicted["displacement"] == pytest.approx((0.0, 0.0), abs=1e-9)


def test_direction_from_known_motion():
    frames = np.zeros((5, 32, 32, 3), np.uint8)
    frames[:] = COLOURS["black"]
    for t in range(5):  # 2 px right and 2 px up per frame
        frames[t, 20 - 2 * t : 28 - 2 * t, 4 + 2 * t : 12 + 2 * t] = COLOURS["white"]
    result = analyse_video(frames)
    assert result["direction"] == "up-right"
    assert result["displacement"] == pytest.approx((8.0, -8.0))


def test_temporal_flickering_formula():
    static = np.full((5, 8, 8, 3), 77, np.uint8)
    assert temporal_flickering(static) == 1.0
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    alternating = np.stack([a, b, a, b])
    # every consecutive pair differs by |a - b|; its mean over pixels and channels, by hand
    diffs = [abs(int(x) - int(y)) for x, y in zip(a.ravel(), b.ravel(), strict=True)]
    mean_abs = sum(diffs) / len(diffs)
    assert temporal_flickering(alternating) == pytest.approx((255 - mean_abs) / 255, abs=1e-12)
    two_levels = np.stack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 51, np.uint8)] * 2)
    assert temporal_flickering(two_levels) == pytest.approx(0.8)
    assert temporal_flickering(frames_to_tensor(alternating)) == temporal_flickering(alternating)
    with pytest.raises(ValueError, match=">= 2"):
        temporal_flickering(static[:1])


def test_evaluate_folder_skips_corrupt_and_reports_missing(tmp_path, ground_truth, caplog):
    (a0, f0), (a1, f1), (a2, _) = ground_truth[:3]
    p0, p1, p2 = caption_for(a0), caption_for(a1), caption_for(a2)
    write_video(tmp_path / f"{p0}-0.mp4", f0)
    write_video(tmp_path / f"{p0}-1.mp4", f0)
    write_video(tmp_path / f"{p1}-0.mp4", f1)
    (tmp_path / f"{p1}-1.mp4").write_bytes(b"\x00\x00\x00 broken mp4" * 30)
    write_video(tmp_path / "a blue cross moves up on a red background-0.mp4", f0)  # other prompt
    (tmp_path / "notes.txt").write_text("ignored")
    report = evaluate_folder(tmp_path, [p0, p1, p2], samples_per_prompt=2, progress=False)
    assert report.aggregate["num_videos"] == 3 and report.aggregate["all_accuracy"] == 1.0
    assert [p.split("/")[-1] for p, _ in report.skipped] == [f"{p1}-1.mp4"]
    assert "VideoDecodeError" in report.skipped[0][1]
    assert report.missing == [f"{p2}-0.mp4", f"{p2}-1.mp4"]
    assert f"{p1}-1.mp4" in caplog.text
    json.dumps(report.to_dict())  # serialisable as is
    with pytest.raises(ValueError, match="caption"):
        evaluate_folder(tmp_path, ["a dog runs"], progress=False)
    with pytest.raises(FileNotFoundError):
        evaluate_folder(tmp_path / "none", [p0])


def test_default_suite_is_balanced():
    suite = load_suite()
    assert (suite.num_frames, suite.height, suite.width) == (8, 32, 32)
    attrs = [parse_caption(p) for p in suite.prompts]
    assert len(set(suite.prompts)) == len(suite.prompts) == 32
    for key, vocab in (
        ("colour", COLOURS),
        ("shape", SHAPES),
        ("direction", DIRECTIONS),
        ("background", COLOURS),
    ):
        counts = Counter(a[key] for a in attrs)
        assert set(counts) == set(vocab) and len(set(counts.values())) == 1, key


def test_bad_suites_are_rejected(tmp_path):
    path = tmp_path / "s.yaml"
    good = "name: s\nseed: 0\nsamples_per_prompt: 1\nworld: {num_frames: 4, size: 32}\n"
    path.write_text(good + "prompts: ['a red cross moves up on a red background']\n")
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        load_suite(path)
    dup = "a red cross moves up on a blue background"
    path.write_text(good + f"prompts: ['{dup}', '{dup}']\n")
    with pytest.raises(ValueError, match="duplicate"):
        load_suite(path)
    path.write_text("name: s\nprompts: []\n")
    with pytest.raises(ValueError, match="missing keys"):
        load_suite(path)


def test_reference_videos_and_cli(tmp_path, capsys):
    suite = ShapesSuite(
        name="mini",
        prompts=(
            "a red cross moves up on a blue background",
            "a white circle moves to the left on a black background",
        ),
        samples_per_prompt=2,
        seed=0,
        num_frames=8,
        height=32,
        width=32,
        fps=8,
    )
    paths = write_reference_videos(suite, tmp_path / "ref")
    assert len(paths) == 4 and all(p.is_file() for p in paths)
    stamps = [p.stat().st_mtime_ns for p in paths]
    write_reference_videos(suite, tmp_path / "ref")  # idempotent: existing videos are kept
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    report = evaluate_folder(tmp_path / "ref", list(suite.prompts), 2, progress=False)
    assert report.aggregate["all_accuracy"] == 1.0 and not report.missing
    suite_file = tmp_path / "mini.yaml"
    suite_file.write_text(
        "name: mini\nseed: 0\nsamples_per_prompt: 2\nworld: {num_frames: 8, size: 32, fps: 8}\n"
        "prompts:\n" + "".join(f"  - '{p}'\n" for p in suite.prompts)
    )
    out = tmp_path / "report.json"
    main(["evaluate", str(tmp_path / "ref"), "--suite", str(suite_file), "--json", str(out)])
    assert "all_accuracy" in capsys.readouterr().out
    assert json.loads(out.read_text())["aggregate"]["num_videos"] == 4


@pytest.mark.parametrize("size", [(48, 64), (16, 16)])
def test_other_frame_sizes(size):
    world = ShapesWorld(seed=4, num_frames=6, size=size)
    for i in range(8):
        attrs = world.attributes(i)
        assert evaluate_video(world.frames(attrs, i), attrs).all_correct, (size, attrs)
