"""Pyramidal flow matching after PyramidFlow: stage schedule, pyramid ops, temporal history,
training loss and autoregressive sampler."""

from m4v.flow.conditioning import TextFields, TextLike
from m4v.flow.history import corrupt_history, history_frames, history_stages
from m4v.flow.loss import FlowLossOutput, LossGroup, PyramidFlowLoss, split_by_ratio
from m4v.flow.pyramid import (
    block_noise,
    check_latent_size,
    downsample,
    downsample_noise,
    stage_pyramid,
    upsample_nearest,
)
from m4v.flow.sampler import PyramidSampler
from m4v.flow.schedule import PyramidSchedule

__all__ = [
    "FlowLossOutput",
    "LossGroup",
    "PyramidFlowLoss",
    "PyramidSampler",
    "PyramidSchedule",
    "TextFields",
    "TextLike",
    "block_noise",
    "check_latent_size",
    "corrupt_history",
    "downsample",
    "downsample_noise",
    "history_frames",
    "history_stages",
    "split_by_ratio",
    "stage_pyramid",
    "upsample_nearest",
]
