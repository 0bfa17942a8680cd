"""Zigzag scan orders over a grid of h x w tokens (ZigMa-style, generalised to rectangles).

A frame of h x w tokens is stored in raster order (index ``i * w + j`` for row i, column j). A
zigzag order is a boustrophedon path through all cells whose consecutive cells are 4-neighbours,
so a 1-D scan over the reordered tokens never jumps across the image. There are 8 of them: for
each of the 4 start corners, a row-wise and a column-wise boustrophedon. Direction ``k`` is

    corner = k // 2   (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)
    axis   = k % 2    (0 row-wise: sweep along rows, turning at the row ends;
                       1 column-wise: sweep along columns, turning at the column ends)

so direction 0 (row-wise from the top-left) is the order closest to raster, and consecutive
directions alternate between row-wise and column-wise sweeps.

For h, w >= 2 the 8 orders are distinct. On a 1-wide grid (h == 1 or w == 1) a row-wise and a
column-wise sweep coincide and only the two ends of the line differ, so there are just 2 distinct
orders (1 for a single cell); the result still has 8 rows.

Results are cached per (h, w, device) and shared between callers: treat them as read-only (clone
before any in-place change). Reordering tokens is one gather with these indices:
``x_zig = x[..., orders[k], :]`` and back with ``x = x_zig[..., inverse[k], :]``.
"""

from __future__ import annotations

import functools

import torch

NUM_DIRECTIONS = 8


def _check_grid(h: int, w: int) -> None:
    for name, value in (("h", h), ("w", w)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{name} must be an int >= 1 (grid height/width in tokens), got {value!r}"
            )


def _row_wise_from_top_left(h: int, w: int) -> torch.Tensor:
    """Raster indices of the row-wise boustrophedon from (0, 0): (h * w,)."""
    grid = torch.arange(h * w).view(h, w)
    grid[1::2] = grid[1::2].flip(-1)
    return grid.reshape(-1)


def _build_orders(h: int, w: int) -> torch.Tensor:
    rows, cols = torch.arange(h * w).div(w, rounding_mode="floor"), torch.arange(h * w) % w
    # Column-wise sweeps are row-wise sweeps of the transposed grid, mapped back to (row, col).
    path_rows = _row_wise_from_top_left(h, w)
    path_cols_t = _row_wise_from_top_left(w, h)
    row_wise = (rows[path_rows], cols[path_rows])
    col_wise = (path_cols_t % h, path_cols_t.div(h, rounding_mode="floor"))
    orders = []
    for flip_rows, flip_cols in ((False, False), (False, True), (True, False), (True, True)):
        for r, c in (row_wise, col_wise):
            r = (h - 1 - r) if flip_rows else r
            c = (w - 1 - c) if flip_cols else c
            orders.append(r * w + c)
    return torch.stack(orders)


@functools.lru_cache(maxsize=256)
def _orders_cached(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    orders = _build_orders(h, w)
    inverse = torch.argsort(orders, dim=1)
    return orders.to(device), inverse.to(device)


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def zigzag_orders(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The 8 zigzag scan orders of an h x w grid: LongTensor (8, h * w).

    ``orders[k, s]`` is the raster index of the cell visited at scan step s in direction k (see
    the module docstring for the direction numbering). Cached and shared: do not modify in place.
    """
    _check_grid(h, w)
    return _orders_cached(h, w, _device(device))[0]


def inverse_orders(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse permutations of :func:`zigzag_orders`: LongTensor (8, h * w).

    ``inverse[k, i]`` is the scan step at which direction k visits raster cell i, so
    ``orders[k][inverse[k]] == arange(h * w)``. Cached and shared: do not modify in place.
    """
    _check_grid(h, w)
    return _orders_cached(h, w, _device(device))[1]


def raster_order(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The identity order (plain raster scan), LongTensor (h * w,): the ablation without zigzag."""
    _check_grid(h, w)
    return torch.arange(h * w, device=_device(device))
