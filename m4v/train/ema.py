"""Exponential moving average of the trained parameters.

The shadow tensors live next to the parameters they follow: on the same device and, under FSDP2,
as DTensors with the same sharding, so the update is local (no communication) and the EMA is
checkpointed shard by shard with the rest of the state.

The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates: early in training the
average would otherwise be dominated by the random initialisation for ~1 / (1 - decay) steps.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_decay_at(decay: float, updates: int) -> float:
    """Effective decay of update number ``updates`` (1-based), with warm-up."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class EMA:
    """EMA of ``module``'s trainable parameters, keyed by their canonical names."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"decay: got {decay}, expected in [0, 1)")
        self.decay = decay
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, updates: int) -> None:
        """Move the shadow towards the parameters after optimiser update number ``updates``."""
        weight = 1.0 - ema_decay_at(self.decay, updates)
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names],
                             [self.params[n].detach() for n in names], weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors themselves (loading into this dict in place restores the EMA)."""
        return self.shadow
