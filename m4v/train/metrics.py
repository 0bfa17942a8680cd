"""Training metrics: one JSON object per line in ``RUN_DIR/metrics.jsonl``, plus optional sinks.

The JSONL file is the record of a run; anything else (the harness's DuckDB store, a dashboard)
is a *sink*: a callable ``sink(record: dict) -> None`` given to :func:`m4v.train.train` or named
on the command line as ``--metrics-sink package.module:callable``. m4v never imports the harness;
the harness registers itself this way, or ingests the JSONL afterwards.

Every record has ``event``, ``step`` (optimiser steps done) and ``time`` (unix seconds). Events:
``start`` (each invocation: ``run_dir``, ``world_size``, ``parallel``, the full ``config``; a sink
keys its run on it), ``train`` (means over the last ``log_every`` steps and ranks: ``loss``,
``loss_stage<k>``, ``grad_norm``, ``lr``, ``samples_per_s``), ``checkpoint`` (``path``) and
``samples`` (``folder``, ``count``). Non-finite values are written as null. On resume, records past
the checkpoint's step (written after the last save by the interrupted process) are dropped: those
steps are trained again and logged again, so the curve never holds two values for one step.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

Sink = Callable[[dict], None]


def load_sink(spec: str) -> Sink:
    """``"package.module:attribute"`` -> the callable it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"metrics sink: got {spec!r}, expected 'package.module:callable'")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"metrics sink: cannot load {spec!r}: {e}") from e
    if not callable(target):
        raise ValueError(f"metrics sink: {spec!r} is not callable")
    return target


def _json_value(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricsLog:
    """Appends records to ``path`` (flushed per record) and forwards them to ``sinks``."""

    def __init__(self, path: str | os.PathLike, sinks: Iterable[Sink] = (), enabled: bool = True):
        self.path = Path(path)
        self.sinks = list(sinks)
        self.enabled = enabled

    def truncate_after(self, step: int) -> int:
        """Drop records with ``step > step`` (atomically); return how many were dropped."""
        if not self.enabled or not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                dropped += 1
                continue
            if record.get("step", 0) > step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        return dropped

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **{k: _json_value(v) for k, v in record.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        for sink in self.sinks:
            sink(record)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All complete records of a metrics file, in order."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
