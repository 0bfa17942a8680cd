"""Text conditioning as the flow code handles it: validation, batching, dropout/CFG mixing.

The text encoders (:mod:`m4v.text`) return an object with fields ``tokens (b, Lt, text_dim)``,
``mask (b, Lt) bool`` (True = real token) and ``pooled (b, pooled_dim)``. Here it is unpacked to a
:class:`TextFields` triple so that embeddings of different lengths (a prompt and the empty prompt)
can be mixed row by row or stacked for one batched classifier-free-guidance call: the shorter one
is right-padded with zero tokens whose mask is False, which the model ignores.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F


class TextLike(Protocol):
    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class TextFields(NamedTuple):
    tokens: torch.Tensor  # (b, Lt, text_dim)
    mask: torch.Tensor  # (b, Lt) bool
    pooled: torch.Tensor  # (b, pooled_dim)


def text_fields(text: TextLike, batch: int, name: str) -> TextFields:
    """Validate ``text`` and broadcast a batch of 1 to ``batch`` rows."""
    for field in ("tokens", "mask", "pooled"):
        if not isinstance(getattr(text, field, None), torch.Tensor):
            raise ValueError(f"{name}: expected an object with tensor fields tokens, mask, pooled")
    tokens, mask, pooled = text.tokens, text.mask, text.pooled
    if tokens.dim() != 3 or mask.shape != tokens.shape[:2] or pooled.dim() != 2:
        raise ValueError(
            f"{name}: got tokens {tuple(tokens.shape)}, mask {tuple(mask.shape)}, pooled "
            f"{tuple(pooled.shape)}; expected (b, Lt, text_dim), (b, Lt), (b, pooled_dim)"
        )
    if pooled.shape[0] != tokens.shape[0] or tokens.shape[0] not in (1, batch):
        raise ValueError(
            f"{name}: got batch {tokens.shape[0]} (pooled {pooled.shape[0]}), expected 1 or {batch}"
        )
    if tokens.shape[0] == 1 and batch != 1:
        tokens = tokens.expand(batch, -1, -1)
        mask = mask.expand(batch, -1)
        pooled = pooled.expand(batch, -1)
    return TextFields(tokens, mask.bool(), pooled)


def pad_text(text: TextFields, length: int) -> TextFields:
    """Right-pad to ``length`` tokens with zeros and mask False."""
    extra = length - text.tokens.shape[1]
    if extra <= 0:
        return text
    return TextFields(
        F.pad(text.tokens, (0, 0, 0, extra)), F.pad(text.mask, (0, extra), value=False), text.pooled
    )


def _common_length(a: TextFields, b: TextFields) -> tuple[TextFields, TextFields]:
    if a.tokens.shape[2] != b.tokens.shape[2] or a.pooled.shape[1] != b.pooled.shape[1]:
        raise ValueError(
            f"text: embedding widths differ: tokens {a.tokens.shape[2]} vs {b.tokens.shape[2]}, "
            f"pooled {a.pooled.shape[1]} vs {b.pooled.shape[1]}"
        )
    length = max(a.tokens.shape[1], b.tokens.shape[1])
    return pad_text(a, length), pad_text(b, length)


def select_text(cond: TextFields, uncond: TextFields, use_uncond: torch.Tensor) -> TextFields:
    """Row ``k`` from ``uncond`` where ``use_uncond[k]`` (b,) else from ``cond``."""
    cond, uncond = _common_length(cond, uncond)
    u = use_uncond.to(cond.tokens.device)
    return TextFields(
        torch.where(u[:, None, None], uncond.tokens, cond.tokens),
        torch.where(u[:, None], uncond.mask, cond.mask),
        torch.where(u[:, None], uncond.pooled, cond.pooled),
    )


def concat_text(first: TextFields, second: TextFields) -> TextFields:
    """Stack two batches along the batch axis (for one batched CFG call)."""
    first, second = _common_length(first, second)
    return TextFields(*(torch.cat(pair) for pair in zip(first, second, strict=True)))


def take_text(text: TextFields, rows: torch.Tensor) -> TextFields:
    """The rows ``rows`` (LongTensor) of every field."""
    return TextFields(*(field[rows.to(field.device)] for field in text))
