"""Values derived from one tensor, kept while it is the same unmodified tensor object.

Every block of a forward (and its backward) gets the same text mask object. What is derived
from it, re-composition row tables or whether any text slot is padding, is then computed once per
forward instead of once per block: each such computation costs kernel launches, and reading a
value back to the host (``bool(mask.all())``) makes the host wait for the GPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

from torch import Tensor


class TensorMemo:
    """``get(tensor, key, compute)``: ``compute()``'s value, cached per key for the last tensor
    seen. Identity goes through a weak reference (no stale hit after the tensor is freed and its
    id reused) and the tensor's version counter (no hit after an in-place change)."""

    def __init__(self):
        self._ref: weakref.ref | None = None
        self._version = -1
        self._values: dict[Hashable, Any] = {}

    def get(self, tensor: Tensor, key: Hashable, compute: Callable[[], Any]) -> Any:
        seen = self._ref() if self._ref is not None else None
        if seen is not tensor or tensor._version != self._version:
            self._values = {}
            self._ref = weakref.ref(tensor)
            self._version = tensor._version
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]
