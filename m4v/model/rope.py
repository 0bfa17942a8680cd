"""3D rotary position embedding over (t, h, w) for the video tokens.

History frames of the temporal pyramid are stored at lower resolution than the current frame. Their
h/w positions are interpolated onto the current frame's token grid (cell centres of a coarse grid
land between the fine grid's cells), so a coarse token and the fine tokens it summarises share
spatial positions, as in PyramidFlow. Text tokens are not rotated (position 0 on every axis).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from m4v.model.embeddings import ClipLayout
from m4v.transfer import to_device


def axis_positions(n: int, ref: int) -> Tensor:
    """Centres of ``n`` cells that tile the same extent as ``ref`` unit cells: (n,) float64."""
    return (torch.arange(n, dtype=torch.float64) + 0.5) * (ref / n) - 0.5


def video_positions(layout: ClipLayout) -> Tensor:
    """(Lv, 3) float64 (t, h, w) position of every video token, frames in order, raster inside."""
    ref_h, ref_w = layout.current_size
    rows = []
    for (h, w), t in zip(layout.frame_sizes, layout.frame_ids, strict=True):
        ph = axis_positions(h, ref_h)[:, None].expand(h, w)
        pw = axis_positions(w, ref_w)[None, :].expand(h, w)
        pt = torch.full((h, w), float(t), dtype=torch.float64)
        rows.append(torch.stack([pt, ph, pw], dim=-1).reshape(h * w, 3))
    return torch.cat(rows)


def rope_angles(positions: Tensor, axes: tuple[int, int, int], theta: float = 10000.0) -> Tensor:
    """(L, 3) positions -> (L, sum(axes) / 2) rotation angles; each axis has its own frequencies."""
    parts = []
    for i, dim in enumerate(axes):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        parts.append(torch.outer(positions[:, i], freqs))
    return torch.cat(parts, dim=-1)


def rope_cos_sin(layout: ClipLayout, axes: tuple[int, int, int], device, theta: float = 10000.0):
    """cos, sin of shape (Lv, head_dim / 2), float32 on ``device``; shared, not to be modified.

    Cached per (layout, axes, device, theta): they are computed on the host in float64 and copied
    over, and a training run sees the same few layouts (pyramid stage x frame) again and again.
    64 layouts at most; a 768p layout's pair takes 3 MB (pyramid) to 16 MB (16 full frames) at
    head_dim 64."""
    return _cos_sin(layout, tuple(axes), torch.device(device), float(theta))


@lru_cache(maxsize=64)
def _cos_sin(layout: ClipLayout, axes: tuple[int, int, int], device: torch.device, theta: float):
    ang = rope_angles(video_positions(layout), axes, theta)
    return to_device(ang.cos().float(), device), to_device(ang.sin().float(), device)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of ``x`` (b, heads, L, head_dim) by angles (L, head_dim / 2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).type_as(x)
