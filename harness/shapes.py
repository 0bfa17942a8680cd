"""Exact, model-free metrics for Shapes-world videos (``m4v.data.shapes``).

Given a video and the attributes of its prompt, the pixels are analysed without any learned model:

* background: the most frequent palette colour on the frame border (all frames);
* shape colour: the most frequent palette colour among non-background pixels, counted on the
  interior of the non-background region (one-pixel erosion), so the colour bleed that yuv420p
  chroma subsampling leaves along edges does not vote;
* foreground: pixels nearer to the measured shape colour than to the measured background colour,
  in a YCbCr distance that weights chroma by ``CHROMA_WEIGHT`` (the palette's luma values are
  all at least 29 apart, and luma survives yuv420p at full resolution); per frame, the largest
  4-connected component is "the shape";
* shape: each frame's mask is compared with the ideal rendering (``shape_mask``) of every shape,
  fitted to the mask's bounding box (size -1/0/+1 px, centre shifted by -0.5/0/+0.5 px); the shape
  with the best mean IoU over frames wins;
* direction: least-squares velocity of the mask centroid over frames, times (t - 1), classified to
  the nearest of the 8 directions by angle; displacements under ``MIN_TRAVEL`` of the shorter side
  count as "no motion" (always wrong);
* temporal flickering as VBench defines it: ``(255 - mean_t mean|f_{t+1} - f_t|) / 255``, on
  ``uint8`` RGB frames.

``evaluate_folder`` scores a folder of ``{prompt}-{i}.mp4`` files (VBench naming); files that do
not decode are skipped and reported, never fatal.

CLI::

    python -m harness.shapes evaluate FOLDER [--suite suites/shapes.yaml] [--json out.json]
    python -m harness.shapes reference FOLDER [--suite suites/shapes.yaml]   # ground-truth videos
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy import ndimage
from tqdm import tqdm

from m4v.data.shapes import (
    ATTRIBUTE_KEYS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    ShapesWorld,
    parse_caption,
    shape_mask,
)
from m4v.video_io import read_video, to_frames, video_decodes, write_video

logger = logging.getLogger(__name__)

MIN_TRAVEL = 0.05  # fraction of the shorter frame side below which a shape counts as static
MIN_MASK_PIXELS = 4
CHROMA_WEIGHT = 0.03  # weight of chroma against luma when splitting shape from background pixels
DEFAULT_SUITE = Path(__file__).resolve().parent.parent / "suites" / "shapes.yaml"

_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float64)  # (k, 3)
_DIRECTION_NAMES = tuple(DIRECTIONS)
_DIRECTION_UNITS = np.array([DIRECTIONS[d] for d in _DIRECTION_NAMES], dtype=np.float64)
_DIRECTION_UNITS /= np.linalg.norm(_DIRECTION_UNITS, axis=1, keepdims=True)  # (8, 2)
_RGB_TO_YCBCR = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)
_FILE_NAME = re.compile(r"^(?P<prompt>.+)-(?P<index>\d+)\.mp4$")


# ---------------------------------------------------------------------------------------------
# per-video analysis


def temporal_flickering(video: np.ndarray | torch.Tensor) -> float:
    """VBench temporal flickering: ``(255 - mean over consecutive pairs of the mean absolute
    pixel difference) / 255`` on ``uint8`` frames; 1.0 for a static video."""
    frames = to_frames(video).astype(np.float64)
    if len(frames) < 2:
        raise ValueError(f"video: got {len(frames)} frame, expected >= 2 for temporal flickering")
    pair_mae = np.abs(frames[1:] - frames[:-1]).mean(axis=(1, 2, 3))
    return float((255.0 - pair_mae.mean()) / 255.0)


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) index of the nearest palette colour."""
    distances = ((pixels[..., None, :] - _PALETTE) ** 2).sum(-1)
    return distances.argmin(-1)


def _ycbcr(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (..., 3) full-range BT.601 Y, Cb, Cr."""
    return rgb @ _RGB_TO_YCBCR.T


def _codec_distance(ycc: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Squared distance that trusts luma more than chroma (codecs keep chroma at half resolution,
    so chroma smears across edges while luma stays sharp)."""
    d = ycc - reference
    return d[..., 0] ** 2 + CHROMA_WEIGHT * (d[..., 1] ** 2 + d[..., 2] ** 2)


def _mode(labels: np.ndarray) -> int:
    return int(np.bincount(labels.ravel(), minlength=len(_PALETTE)).argmax())


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())[1:]
    return labelled == (1 + int(sizes.argmax()))


def _shape_scores(mask: np.ndarray) -> np.ndarray:
    """Best IoU of ``mask`` (h, w) with each of SHAPES fitted to its bounding box."""
    ys, xs = np.nonzero(mask)
    extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    # every candidate template lies in a square of side extent + 2 around the box centre: work
    # in a window of that square plus a margin (clipped to the frame) instead of the whole frame
    x0, y0 = max(0, math.floor(cx - extent / 2) - 2), max(0, math.floor(cy - extent / 2) - 2)
    window = mask[y0 : math.ceil(cy + extent / 2) + 2, x0 : math.ceil(cx + extent / 2) + 2]
    height, width = window.shape
    cx, cy = cx - x0, cy - y0
    area = mask.sum()
    best = np.zeros(len(SHAPES))
    for k, shape in enumerate(SHAPES):
        for size in (extent - 1, extent, extent + 1):
            for ox in (-0.5, 0.0, 0.5):
                for oy in (-0.5, 0.0, 0.5):
                    template = shape_mask(shape, cx + ox, cy + oy, size, height, width)
                    inter = np.logical_and(window, template).sum()
                    best[k] = max(best[k], inter / (area + template.sum() - inter))
    return best


def analyse_video(video: np.ndarray | torch.Tensor) -> dict:
    """Attributes read off the pixels: {colour, shape, direction, background} (None where no shape
    is found) plus ``displacement`` (dx, dy) in pixels and ``shape_iou`` per shape."""
    frames = to_frames(video)
    pixels = frames.astype(np.float64)
    t, height, width, _ = frames.shape
    labels = _nearest_palette(pixels)  # (t, h, w)

    border = np.zeros((height, width), dtype=bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    border_labels = labels[:, border]
    background = _mode(border_labels)
    background_rgb = np.median(pixels[:, border][border_labels == background], axis=0)

    result = {
        "background": _COLOUR_NAMES[background],
        "colour": None,
        "shape": None,
        "direction": None,
        "displacement": None,
        "shape_iou": None,
    }
    rough = labels != background
    if rough.sum() < MIN_MASK_PIXELS:
        return result
    core = ndimage.binary_erosion(rough, structure=np.ones((1, 3, 3), dtype=bool))
    voters = core if core.any() else rough
    colour = _mode(labels[voters])
    colour_rgb = np.median(pixels[voters & (labels == colour)], axis=0)
    result["colour"] = _COLOUR_NAMES[colour]

    ycc, shape_ycc, background_ycc = _ycbcr(pixels), _ycbcr(colour_rgb), _ycbcr(background_rgb)
    nearer_shape = _codec_distance(ycc, shape_ycc) < _codec_distance(ycc, background_ycc)
    masks = [_largest_component(m) for m in nearer_shape]
    present = [i for i, m in enumerate(masks) if m.sum() >= MIN_MASK_PIXELS]
    if not present:
        return result
    ious = np.mean([_shape_scores(masks[i]) for i in present], axis=0)
    result["shape"] = SHAPES[int(ious.argmax())]
    result["shape_iou"] = {s: float(v) for s, v in zip(SHAPES, ious, strict=True)}

    if len(present) >= 2:
        times = np.array(present, dtype=np.float64)
        centroids = np.array([np.argwhere(masks[i]).mean(axis=0)[::-1] for i in present])  # (x, y)
        velocity = np.polyfit(times, centroids, 1)[0]  # (2,): px per frame
        displacement = velocity * (t - 1)
        result["displacement"] = (float(displacement[0]), float(displacement[1]))
        travel = float(np.linalg.norm(displacement))
        if travel >= MIN_TRAVEL * min(height, width):
            result["direction"] = _DIRECTION_NAMES[int((_DIRECTION_UNITS @ displacement).argmax())]
    return result


@dataclass
class VideoScore:
    expected: dict[str, str]
    predicted: dict
    colour_correct: bool
    shape_correct: bool
    direction_correct: bool
    background_correct: bool
    temporal_flickering: float
    path: str | None = None

    @property
    def all_correct(self) -> bool:
        return (
            self.colour_correct
            and self.shape_correct
            and self.direction_correct
            and self.background_correct
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "all_correct": self.all_correct}


def evaluate_video(
    video: np.ndarray | torch.Tensor, attributes: dict[str, str] | str, path: str | None = None
) -> VideoScore:
    """Score one video (uint8 (t, h, w, 3) or float (3, t, h, w)) against its prompt's attributes
    (a dict or the caption itself)."""
    expected = parse_caption(attributes) if isinstance(attributes, str) else dict(attributes)
    if set(expected) != set(ATTRIBUTE_KEYS):
        raise ValueError(f"attributes: got keys {sorted(expected)}, expected {ATTRIBUTE_KEYS}")
    predicted = analyse_video(video)
    return VideoScore(
        expected=expected,
        predicted=predicted,
        colour_correct=predicted["colour"] == expected["colour"],
        shape_correct=predicted["shape"] == expected["shape"],
        direction_correct=predicted["direction"] == expected["direction"],
        background_correct=predicted["background"] == expected["background"],
        temporal_flickering=temporal_flickering(video),
        path=path,
    )


def aggregate(scores: list[VideoScore]) -> dict:
    """Accuracies (fraction correct) per attribute, all four at once, and mean flickering."""
    n = len(scores)
    out: dict = {"num_videos": n}
    for key in ("colour", "shape", "direction", "background", "all"):
        out[f"{key}_accuracy"] = (
            sum(getattr(s, f"{key}_correct") for s in scores) / n if n else None
        )
    out["temporal_flickering"] = (
        float(np.mean([s.temporal_flickering for s in scores])) if n else None
    )
    return out


# ---------------------------------------------------------------------------------------------
# folders of generated videos


@dataclass
class FolderReport:
    scores: list[VideoScore]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    missing: list[str] = field(default_factory=list)  # expected file names not present
    aggregate: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "aggregate": self.aggregate,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "missing": self.missing,
            "videos": [s.to_dict() for s in self.scores],
        }


def evaluate_folder(
    folder: str | os.PathLike,
    prompts: list[str],
    samples_per_prompt: int | None = None,
    progress: bool = True,
) -> FolderReport:
    """Score every ``{prompt}-{i}.mp4`` in ``folder`` for the given prompts.

    Files that do not decode are skipped and listed in ``report.skipped`` with the reason; with
    ``samples_per_prompt`` the expected files ``{prompt}-0..n-1.mp4`` that are absent are listed in
    ``report.missing``. Files of other prompts are ignored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder: {str(folder)!r} is not a directory of generated videos")
    expected = {p: parse_caption(p) for p in prompts}  # ValueError names a bad prompt
    found: list[tuple[str, int, Path]] = []
    for name in sorted(os.listdir(folder)):
        match = _FILE_NAME.match(name)
        if match and match["prompt"] in expected:
            found.append((match["prompt"], int(match["index"]), folder / name))
    order = {p: k for k, p in enumerate(prompts)}
    found.sort(key=lambda item: (order[item[0]], item[1]))

    missing = []
    if samples_per_prompt is not None:
        present = {(p, i) for p, i, _ in found}
        missing = [
            f"{p}-{i}.mp4"
            for p in prompts
            for i in range(samples_per_prompt)
            if (p, i) not in present
        ]

    scores, skipped = [], []
    for prompt, _, path in tqdm(found, desc="shapes metrics", unit="video", disable=not progress):
        try:
            frames = read_video(path)
            scores.append(evaluate_video(frames, expected[prompt], path=str(path)))
        except (OSError, ValueError) as e:
            logger.warning("skipping %s: %s", path, e)
            skipped.append((str(path), f"{type(e).__name__}: {e}"))
    return FolderReport(
        scores=scores, skipped=skipped, missing=missing, aggregate=aggregate(scores)
    )


# ---------------------------------------------------------------------------------------------
# the prompt suite


@dataclass(frozen=True)
class ShapesSuite:
    name: str
    prompts: tuple[str, ...]
    samples_per_prompt: int
    seed: int
    num_frames: int
    height: int
    width: int
    fps: float

    def world(self) -> ShapesWorld:
        return ShapesWorld(
            seed=self.seed, num_frames=self.num_frames, size=(self.height, self.width)
        )


def load_suite(path: str | os.PathLike = DEFAULT_SUITE) -> ShapesSuite:
    """Read and validate a Shapes suite YAML (see ``suites/shapes.yaml``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite: no such file {str(path)!r}")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(
            f"suite {path}: expected a mapping at the top level, got {type(raw).__name__}"
        )
    required = ("name", "prompts", "samples_per_prompt", "seed", "world")
    absent = [k for k in required if k not in raw]
    if absent:
        raise ValueError(f"suite {path}: missing keys {absent} (expected {list(required)})")
    prompts = raw["prompts"]
    if not isinstance(prompts, list) or not prompts:
        raise ValueError(f"suite {path}: 'prompts' must be a non-empty list of captions")
    for k, prompt in enumerate(prompts):
        try:
            parse_caption(prompt)
        except ValueError as e:
            raise ValueError(f"suite {path}: prompts[{k}]: {e}") from None
    duplicates = sorted({p for p in prompts if prompts.count(p) > 1})
    if duplicates:
        raise ValueError(f"suite {path}: duplicate prompts {duplicates[:3]}")
    world = raw["world"]
    if not isinstance(world, dict):
        raise ValueError(f"suite {path}: 'world' must be a mapping of num_frames, size, fps")
    size = world.get("size", 32)
    height, width = (size, size) if isinstance(size, int) else size
    suite = ShapesSuite(
        name=str(raw["name"]),
        prompts=tuple(prompts),
        samples_per_prompt=int(raw["samples_per_prompt"]),
        seed=int(raw["seed"]),
        num_frames=int(world.get("num_frames", 8)),
        height=int(height),
        width=int(width),
        fps=float(world.get("fps", 8)),
    )
    if suite.samples_per_prompt < 1:
        raise ValueError(
            f"suite {path}: samples_per_prompt: got {suite.samples_per_prompt}, expected >= 1"
        )
    suite.world()  # validates seed, frames and size
    return suite


def write_reference_videos(suite: ShapesSuite, folder: str | os.PathLike) -> list[Path]:
    """Ground-truth renderings ``{prompt}-{i}.mp4`` of a suite: the upper-bound anchor for the
    metrics (the codec's effect included). Files that already exist and decode are kept."""
    world = suite.world()
    paths = []
    for k, prompt in enumerate(tqdm(suite.prompts, desc="reference videos", unit="prompt")):
        attributes = parse_caption(prompt)
        for i in range(suite.samples_per_prompt):
            path = Path(folder) / f"{prompt}-{i}.mp4"
            if not video_decodes(path):
                write_video(
                    path, world.frames(attributes, k * suite.samples_per_prompt + i), suite.fps
                )
            paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# CLI


def _print_report(report: FolderReport) -> None:
    agg = report.aggregate
    print(f"{'metric':<24}{'value':>10}")
    for key, value in agg.items():
        text = (
            "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        )
        print(f"{key:<24}{text:>10}")
    print(f"{'skipped (unreadable)':<24}{len(report.skipped):>10}")
    print(f"{'missing':<24}{len(report.missing):>10}")
    for path, reason in report.skipped[:10]:
        print(f"  skipped {path}: {reason}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m harness.shapes", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="score a folder of {prompt}-{i}.mp4 videos")
    ev.add_argument("folder")
    ev.add_argument("--suite", default=str(DEFAULT_SUITE))
    ev.add_argument("--json", help="write the full report (per video) to this JSON file")
    ref = sub.add_parser("reference", help="write ground-truth videos of a suite")
    ref.add_argument("folder")
    ref.add_argument("--suite", default=str(DEFAULT_SUITE))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    suite = load_suite(args.suite)
    if args.command == "reference":
        paths = write_reference_videos(suite, args.folder)
        print(f"{len(paths)} reference videos in {args.folder}")
        return
    report = evaluate_folder(args.folder, list(suite.prompts), suite.samples_per_prompt)
    _print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1))
        print(f"report written to {args.json}")


if __name__ == "__main__":
    main()
