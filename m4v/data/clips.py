"""Turning a decoded video into a training clip: temporal sampling, resize and centre crop.

Shared by the folder and webdataset readers so both produce identical tensors from identical
files: ``num_frames`` frames ``stride`` apart, from a random start (``random_offset``, drawn from
torch's global generator, which DataLoader seeds per worker) or from frame 0, resized so the
frame covers ``(height, width)`` and centre-cropped, as float32 ``(3, t, h, w)`` in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from m4v.video_io import Source, probe_video, read_video


@dataclass(frozen=True)
class ClipSpec:
    num_frames: int = 8
    height: int = 32
    width: int = 32
    stride: int = 1
    random_offset: bool = True

    def __post_init__(self) -> None:
        for name in ("num_frames", "height", "width", "stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected >= 1")

    @property
    def span(self) -> int:
        """Frames of the source video one clip covers."""
        return (self.num_frames - 1) * self.stride + 1

    @classmethod
    def of(cls, num_frames: int, size: int | tuple[int, int], stride: int, random_offset: bool):
        height, width = (size, size) if isinstance(size, int) else size
        return cls(num_frames, int(height), int(width), stride, random_offset)


def clip_start(total_frames: int, spec: ClipSpec) -> int:
    """First source frame of the clip; ValueError when the video is shorter than one clip."""
    if total_frames < spec.span:
        raise ValueError(
            f"video has {total_frames} frames, a clip of {spec.num_frames} frames with stride "
            f"{spec.stride} needs {spec.span}"
        )
    if not spec.random_offset:
        return 0
    return int(torch.randint(0, total_frames - spec.span + 1, ()).item())


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """``uint8`` ``(t, h, w, 3)`` -> float32 ``(3, t, height, width)`` in [-1, 1]: scaled
    (antialiased bilinear) so the frame covers the target, then centre-cropped."""
    video = (
        torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    )  # (t, 3, h, w)
    h, w = video.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        new_h, new_w = (
            max(height, math.ceil(h * scale - 1e-6)),
            max(width, math.ceil(w * scale - 1e-6)),
        )
        if (new_h, new_w) != (h, w):
            video = F.interpolate(
                video, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
            )
        top, left = (new_h - height) // 2, (new_w - width) // 2
        video = video[:, :, top : top + height, left : left + width]
    return (video.clamp(0, 255) / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()


def load_clip(source: Source, spec: ClipSpec) -> torch.Tensor:
    """Decode one clip of ``source`` (a path, file object or mp4 bytes) as ``(3, t, h, w)``."""
    start = clip_start(probe_video(source).num_frames, spec)
    frames = read_video(source, start=start, num_frames=spec.num_frames, stride=spec.stride)
    return resize_center_crop(frames, spec.height, spec.width)
