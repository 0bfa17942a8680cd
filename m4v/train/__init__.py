"""Training: ``python -m m4v.train`` or :func:`train` (see :mod:`m4v.train.trainer`)."""

from m4v.train.checkpoint import CheckpointError, find_checkpoint, load_weights
from m4v.train.config import TrainConfig, apply_overrides, parse_override
from m4v.train.metrics import MetricsLog, read_metrics
from m4v.train.trainer import TrainResult, resolve_run_config, train

__all__ = [
    "CheckpointError",
    "MetricsLog",
    "TrainConfig",
    "TrainResult",
    "apply_overrides",
    "find_checkpoint",
    "load_weights",
    "parse_override",
    "read_metrics",
    "resolve_run_config",
    "train",
]
