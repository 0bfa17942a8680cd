"""The Shapes world: procedurally generated text-video pairs with exact ground truth.

Each clip shows ONE coloured shape moving in a straight line at constant speed over a plain
background of a different colour, captioned exactly, e.g.
"a red circle moves to the left on a blue background". Everything is a pure function of
``(seed, index)``, so a dataset index is reproducible on any machine, and the caption can be
parsed back to the attributes the evaluator (``harness.shapes``) checks the pixels against.

Rendering is crisp (no anti-aliasing): every pixel is either the shape colour or the background
colour, and the shape stays fully inside the frame with a one-pixel margin. The shape is a rigid
sprite aligned to the pixel grid (so it is symmetric): it moves by whole pixels, the frame-t
offset being ``round(travel * t / (t_total - 1))``, so its pixels are the same in every frame,
only translated, and it never shimmers.

Geometry: a shape of size ``s`` is inscribed in an ``s x s`` box centred at ``(cx, cy)``; a pixel
``(i, j)`` belongs to it when its centre ``(j + 0.5, i + 0.5)`` satisfies the shape's inequality.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
from torch.utils.data import Dataset

from m4v.video_io import frames_to_tensor

# Corners of the RGB cube: the most separated palette there is (minimum pairwise distance 255).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Unit steps in image coordinates (x right, y down) and the caption phrase of each direction.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "up-left": (-1, -1),
    "up-right": (1, -1),
    "down-left": (-1, 1),
    "down-right": (1, 1),
}
DIRECTION_PHRASES: dict[str, str] = {
    "left": "to the left",
    "right": "to the right",
    "up": "up",
    "down": "down",
    "up-left": "up and to the left",
    "up-right": "up and to the right",
    "down-left": "down and to the left",
    "down-right": "down and to the right",
}
ATTRIBUTE_KEYS = ("colour", "shape", "direction", "background")

# Shape size and total travel as fractions of the shorter frame side: at 32 px a shape is 9-12 px
# and travels 8-14 px over the clip (1.1-2 px per frame with 8 frames).
SIZE_RANGE = (0.28, 0.38)
TRAVEL_RANGE = (0.25, 0.45)
MARGIN = 1  # pixels of background kept between the shape and the frame edge
MIN_SIDE = 16


def caption_for(attributes: dict[str, str]) -> str:
    """The exact caption of an attribute dict {colour, shape, direction, background}."""
    _check_attributes(attributes)
    a = attributes
    return (
        f"a {a['colour']} {a['shape']} moves {DIRECTION_PHRASES[a['direction']]} "
        f"on a {a['background']} background"
    )


def _caption_pattern() -> re.Pattern[str]:
    def alternatives(words):
        return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))

    return re.compile(
        rf"a (?P<colour>{alternatives(COLOURS)}) (?P<shape>{alternatives(SHAPES)}) "
        rf"moves (?P<phrase>{alternatives(DIRECTION_PHRASES.values())}) "
        rf"on a (?P<background>{alternatives(COLOURS)}) background"
    )


_CAPTION = _caption_pattern()
_DIRECTION_OF_PHRASE = {phrase: name for name, phrase in DIRECTION_PHRASES.items()}


def parse_caption(text: str) -> dict[str, str]:
    """Inverse of :func:`caption_for`; raises ValueError for text that is not a Shapes caption."""
    match = _CAPTION.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"caption: got {text!r}, expected 'a <colour> <shape> moves <direction> on a "
            f"<colour> background' with colours {list(COLOURS)}, shapes {list(SHAPES)}, "
            f"directions {list(DIRECTION_PHRASES.values())}"
        )
    attributes = {
        "colour": match["colour"],
        "shape": match["shape"],
        "direction": _DIRECTION_OF_PHRASE[match["phrase"]],
        "background": match["background"],
    }
    _check_attributes(attributes)
    return attributes


def _check_attributes(attributes: dict[str, str]) -> None:
    vocab = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS, "background": COLOURS}
    if set(attributes) != set(ATTRIBUTE_KEYS):
        raise ValueError(f"attributes: got keys {sorted(attributes)}, expected {ATTRIBUTE_KEYS}")
    for key, options in vocab.items():
        if attributes[key] not in options:
            raise ValueError(
                f"attributes[{key!r}]: got {attributes[key]!r}, expected one of {list(options)}"
            )
    if attributes["colour"] == attributes["background"]:
        raise ValueError(f"attributes: colour and background are both {attributes['colour']!r}")


def shape_mask(
    shape: str, cx: float, cy: float, size: float, height: int, width: int
) -> np.ndarray:
    """Boolean ``(height, width)`` mask of ``shape`` inscribed in a ``size`` box centred at
    ``(cx, cy)``."""
    x = np.arange(width, dtype=np.float64)[None, :] + 0.5 - cx
    y = np.arange(height, dtype=np.float64)[:, None] + 0.5 - cy
    r = size / 2
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return (np.abs(x) <= r) & (np.abs(y) <= r)
    if shape == "triangle":  # apex up, base at the bottom of the box
        return (y >= -r) & (y <= r) & (np.abs(x) <= (y + r) / 2)
    if shape == "cross":  # plus sign, arms one third of the size wide
        arm = size / 6
        return ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    raise ValueError(f"shape: got {shape!r}, expected one of {SHAPES}")


@dataclass(frozen=True)
class Layout:
    """Where a shape starts and how far it travels, in pixels: (x0, y0) is the top-left corner of
    the shape's box in the first frame, ``travel`` the whole-pixel displacement along each moving
    axis from the first frame to the last."""

    size: int
    x0: int
    y0: int
    travel: int

    def offset(self, t: int, num_frames: int) -> int:
        """Whole-pixel displacement along a moving axis at frame ``t``."""
        return int(round(self.travel * t / (num_frames - 1)))


def sample_layout(
    rng: np.random.Generator, direction: str, num_frames: int, height: int, width: int
) -> Layout:
    """A random size, start and speed that keep the shape fully in frame for the whole clip."""
    side = min(height, width)
    size = int(round(side * (SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * rng.random())))
    shortest, longest = (int(round(side * f)) for f in TRAVEL_RANGE)
    travel = min(shortest + int(rng.random() * (longest - shortest + 1)), longest)
    dx, dy = DIRECTIONS[direction]

    def start(extent: int, d: int) -> int:
        free = extent - 2 * MARGIN - size - travel * abs(d)
        lowest = MARGIN + (travel if d < 0 else 0)
        return lowest + min(int(rng.random() * (free + 1)), free)

    x0 = start(width, dx)
    y0 = start(height, dy)
    return Layout(size=size, x0=x0, y0=y0, travel=travel)


def render(
    attributes: dict[str, str], layout: Layout, num_frames: int, height: int, width: int
) -> np.ndarray:
    """``uint8`` frames ``(t, h, w, 3)`` of the clip described by ``attributes`` and ``layout``."""
    _check_attributes(attributes)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[:] = COLOURS[attributes["background"]]
    dx, dy = DIRECTIONS[attributes["direction"]]
    half = layout.size / 2
    for t in range(num_frames):
        shift = layout.offset(t, num_frames)
        cx = layout.x0 + half + dx * shift
        cy = layout.y0 + half + dy * shift
        mask = shape_mask(attributes["shape"], cx, cy, layout.size, height, width)
        frames[t][mask] = COLOURS[attributes["colour"]]
    return frames


def all_attributes(
    colours: tuple[str, ...] = tuple(COLOURS),
    shapes: tuple[str, ...] = SHAPES,
    directions: tuple[str, ...] = tuple(DIRECTIONS),
) -> list[dict[str, str]]:
    """Every (colour, shape, direction, background) combination, background != colour."""
    return [
        {"colour": c, "shape": s, "direction": d, "background": b}
        for c, s, d, b in product(colours, shapes, directions, colours)
        if b != c
    ]


def _size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"size: got {size}, expected height and width >= {MIN_SIDE}")
    return int(height), int(width)


class ShapesWorld(Dataset):
    """Map-style dataset of Shapes clips; item ``i`` depends only on ``(seed, i)`` and the options.

    Yields ``{"video": (3, t, h, w) float32 in [-1, 1], "caption": str, "attributes": dict}``.
    ``colours`` / ``shapes`` / ``directions`` restrict the vocabulary (default: all of it).
    """

    def __init__(
        self,
        seed: int = 0,
        num_frames: int = 8,
        size: int | tuple[int, int] = 32,
        length: int = 1_000_000,
        colours: tuple[str, ...] | None = None,
        shapes: tuple[str, ...] | None = None,
        directions: tuple[str, ...] | None = None,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed: got {seed}, expected >= 0")
        if num_frames < 2:
            raise ValueError(f"num_frames: got {num_frames}, expected >= 2 (motion needs 2 frames)")
        if length < 1:
            raise ValueError(f"length: got {length}, expected >= 1")
        self.seed, self.num_frames, self.length = seed, num_frames, length
        self.height, self.width = _size_pair(size)
        self.colours = _subset("colours", colours, tuple(COLOURS))
        self.shapes = _subset("shapes", shapes, SHAPES)
        self.directions = _subset("directions", directions, tuple(DIRECTIONS))
        if len(self.colours) < 2:
            raise ValueError(
                f"colours: got {self.colours}, expected at least 2 (shape + background)"
            )

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index, stream])

    def attributes(self, index: int) -> dict[str, str]:
        rng = self._rng(self._check_index(index), 0)
        colour = self.colours[rng.integers(len(self.colours))]
        backgrounds = [c for c in self.colours if c != colour]
        return {
            "colour": colour,
            "shape": self.shapes[rng.integers(len(self.shapes))],
            "direction": self.directions[rng.integers(len(self.directions))],
            "background": backgrounds[rng.integers(len(backgrounds))],
        }

    def frames(self, attributes: dict[str, str], index: int) -> np.ndarray:
        """``uint8`` ``(t, h, w, 3)``: ``attributes`` rendered with the layout of item ``index``
        (so a prompt can be rendered as ground truth any number of times, reproducibly)."""
        _check_attributes(attributes)
        layout = sample_layout(
            self._rng(self._check_index(index), 1),
            attributes["direction"],
            self.num_frames,
            self.height,
            self.width,
        )
        return render(attributes, layout, self.num_frames, self.height, self.width)

    def __getitem__(self, index: int) -> dict:
        attributes = self.attributes(index)
        video = frames_to_tensor(self.frames(attributes, index))
        return {"video": video, "caption": caption_for(attributes), "attributes": attributes}

    def all_prompts(self) -> list[str]:
        """Captions of every attribute combination this world can produce."""
        combos = all_attributes(self.colours, self.shapes, self.directions)
        return [caption_for(a) for a in combos]

    def _check_index(self, index: int) -> int:
        index = int(index.item()) if isinstance(index, torch.Tensor) else int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesWorld of length {self.length}")
        return index


def _subset(name: str, chosen: tuple[str, ...] | None, options: tuple[str, ...]) -> tuple[str, ...]:
    if chosen is None:
        return options
    chosen = tuple(chosen)
    unknown = [c for c in chosen if c not in options]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"{name}: got {chosen}, expected distinct non-empty subset of {options}")
    return chosen
