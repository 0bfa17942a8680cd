"""Temporal pyramid: the compressed history that conditions each latent frame.

PyramidFlow (Jin et al. 2024, sec. 3.3, eq. (1) of the M4V paper) predicts latent frame ``i`` from
the clean frames before it, kept at decreasing resolution the further back they are::

    c^i = [K2(x^0), ..., K2(x^{i-3}), K1(x^{i-2}), x^{i-1}]

with ``Kl`` = ``l`` pyramid levels coarser than the current stage. In general (any number of stages,
the rule of PyramidFlow's sampler): history frame ``j`` for current frame ``i`` at stage ``s`` is at
stage ``max(s - (i - 1 - j), 0)``: the newest frame at the current stage's resolution, each older
frame one level coarser, clamped at the coarsest stage. At stage 0 the whole history is at the
coarsest resolution. Frames are listed oldest first, the order the model consumes them in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from m4v.flow.pyramid import gaussian


def history_stages(frame: int, stage: int) -> list[tuple[int, int]]:
    """``[(frame_id, resolution_stage), ...]`` of the history of ``frame`` at ``stage``.

    Oldest first; ``resolution_stage = max(stage - (frame - 1 - frame_id), 0)``.
    """
    if frame < 0:
        raise ValueError(f"frame: got {frame}, expected >= 0")
    if stage < 0:
        raise ValueError(f"stage: got {stage}, expected >= 0")
    return [(j, max(stage - (frame - 1 - j), 0)) for j in range(frame)]


def history_frames(
    pyramid: Sequence[torch.Tensor], frame: int, stage: int
) -> tuple[list[torch.Tensor], list[int]]:
    """The history frames of ``frame`` at ``stage`` and their latent frame ids.

    Args:
        pyramid: clean latents per stage, ``pyramid[k]`` of shape ``(b, C, T, h_k, w_k)`` at stage
            k's resolution (:func:`m4v.flow.pyramid.stage_pyramid`), with ``T >= frame``.
        frame: index ``i`` of the frame being predicted; frames ``0 .. i-1`` form the history.
        stage: current stage (its resolution is the newest history frame's).

    Returns:
        ``(frames, frame_ids)``: ``frames[n]`` is ``(b, C, h, w)``, oldest first.
    """
    if not 0 <= stage < len(pyramid):
        raise ValueError(
            f"stage: got {stage}, expected 0 <= stage < {len(pyramid)} (pyramid levels)"
        )
    available = pyramid[0].shape[2]
    if frame > available:
        raise ValueError(f"frame: got {frame}, expected <= {available} (frames in pyramid)")
    layout = history_stages(frame, stage)
    return [pyramid[k][:, :, j] for j, k in layout], [j for j, _ in layout]


def corrupt_history(
    frames: Sequence[torch.Tensor],
    max_noise: float = 1 / 3,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """``s * eps + (1 - s) * h`` for every history frame, ``s ~ U[0, max_noise)`` per sample.

    PyramidFlow's training-time history corruption (it makes the model robust to the errors of its
    own earlier frames at sampling time). One ``s`` per sample, shared by all its history frames;
    fresh ``eps ~ N(0, I)`` per frame.
    """
    if not 0 <= max_noise <= 1:
        raise ValueError(f"max_noise: got {max_noise}, expected in [0, 1]")
    if not frames or max_noise == 0:
        return list(frames)
    b = frames[0].shape[0]
    ref = frames[0]
    draw = generator.device if generator is not None else ref.device
    s = torch.rand(b, generator=generator, device=draw).to(ref.device) * max_noise
    s = s.view(b, 1, 1, 1)
    out = []
    for h in frames:
        eps = gaussian(h.shape, generator, h.device, torch.float32)
        out.append((s * eps + (1 - s) * h.float()).to(h.dtype))
    return out
