"""The output every text encoder returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextEmbedding:
    """Per-token text features plus a pooled vector.

    tokens: (b, Lt, text_dim); positions where ``mask`` is False are padding and hold zeros.
    mask:   (b, Lt) bool, True = real token.
    pooled: (b, pooled_dim), or None for encoders without one (T5 alone).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise ValueError(f"tokens: got shape {tuple(self.tokens.shape)}, expected (b, Lt, d)")
        if self.mask.shape != self.tokens.shape[:2] or self.mask.dtype != torch.bool:
            raise ValueError(
                f"mask: got {self.mask.dtype} {tuple(self.mask.shape)}, "
                f"expected bool {tuple(self.tokens.shape[:2])}"
            )
        if self.pooled is not None and (
            self.pooled.ndim != 2 or self.pooled.shape[0] != self.tokens.shape[0]
        ):
            raise ValueError(
                f"pooled: got shape {tuple(self.pooled.shape)}, "
                f"expected ({self.tokens.shape[0]}, pooled_dim)"
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, *args, **kwargs) -> TextEmbedding:
        """Moves/casts like ``Tensor.to``; the mask keeps its bool dtype."""
        pooled = None if self.pooled is None else self.pooled.to(*args, **kwargs)
        device = self.tokens.to(*args, **kwargs).device
        return TextEmbedding(self.tokens.to(*args, **kwargs), self.mask.to(device), pooled)


def check_prompts(prompts) -> None:
    """Encoders take a list of strings; a bare string would be split into characters."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts: got an empty list, expected at least one prompt")
