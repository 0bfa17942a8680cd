"""Atomic, resumable, sharded checkpoints.

Layout of ``RUN_DIR/checkpoints``::

    latest                   one line: the name of the newest complete checkpoint
    step_00000500/
        config.json          the full TrainConfig (model, codec, text encoder, data, loss, ...)
        trainer.json         step, world size, parallel mode, lr-scheduler state, wall time
        state/               torch.distributed.checkpoint: "model", "ema", "optimizer"
    step_00001000/ ...

Tensors go through ``torch.distributed.checkpoint`` (DCP) in every mode: each rank writes its own
shards under FSDP2, replicated tensors are written once under DDP, and loading reshards, so a run
saved on 2 ranks resumes on 1 (or 4), and generation reads the weights in one plain process.
Keys are the canonical parameter names of the trained module (``model.*`` for the M4V network,
``text_encoder.*`` for a trained built-in text encoder), identical in every parallel mode.

Why a crash (even ``kill -9``) never leaves a broken latest checkpoint:

1. everything is written into ``.step_XXXXXXXX.tmp/`` (files fsynced by the DCP writer and by us);
2. after a barrier rank 0 renames it to ``step_XXXXXXXX/`` (atomic on POSIX) and fsyncs the folder;
3. rank 0 writes ``latest`` to a temporary file, fsyncs it and ``os.replace``-s it over the old one;
4. older checkpoints beyond ``keep_last`` are first renamed to ``.trash-*`` and then deleted.

A crash in 1 leaves only a dot-prefixed temporary folder (ignored and removed by the next save);
in 2-3 the old pointer still names a complete checkpoint. Loading reads ``latest``; if it is
missing or names a folder that is not complete, the newest complete ``step_*`` folder is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from m4v.train.config import TrainConfig, config_diff, is_resumable_change
from m4v.train.distributed import barrier, broadcast_object

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked (missing, incomplete, another configuration)."""


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group that it assumes one process: we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_durable(path: Path, text: str) -> None:
    """``path`` holds ``text`` or its previous content, never a mix (temp + fsync + replace)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / "trainer.json").is_file() and (path / "config.json").is_file() and (
        path / "state" / ".metadata").is_file()


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    config: TrainConfig
    trainer: dict[str, Any]


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Config and trainer metadata of one checkpoint folder."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"checkpoint: {path} is not a complete checkpoint (expected "
                              "config.json, trainer.json and state/.metadata in it)")
    trainer = json.loads((path / "trainer.json").read_text())
    config = TrainConfig.from_dict(json.loads((path / "config.json").read_text()))
    return CheckpointInfo(path, int(trainer["step"]), config, trainer)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve a run folder, its ``checkpoints`` folder or one checkpoint folder to a checkpoint.

    Raises CheckpointError naming what was looked for when there is none.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint: {path} does not exist")
    if is_complete(path):
        return path
    found = CheckpointManager(path.parent if path.name == "checkpoints" else path).latest()
    if found is None:
        raise CheckpointError(
            f"checkpoint: no complete checkpoint under {path} (expected a run folder with "
            "checkpoints/latest, or a checkpoint folder holding config.json, trainer.json, state/)"
        )
    return found


class CheckpointManager:
    """Saves and finds the checkpoints of one run (``run_dir/checkpoints``)."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep_last = keep_last

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and is_complete(p)]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            target = self.root / pointer.read_text().strip()
            if _STEP_DIR.match(target.name) and is_complete(target):
                return target
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: dict[str, Any], config: TrainConfig,
             trainer: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` (collective: every rank calls it with its own ``state``).

        ``state``: nested dicts of tensors/DTensors for DCP. ``trainer``: JSON-able metadata
        (rank 0's copy is written).
        """
        rank = dist.get_rank() if dist.is_initialized() else 0
        final = self.root / step_name(step)
        tmp = self.root / f".{step_name(step)}.tmp"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
        barrier()
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp / "state"), no_dist=not dist.is_initialized())
        if rank == 0:
            _write_text_durable(tmp / "config.json", config.to_json())
            meta = {**trainer, "step": step, "saved_at": time.time()}
            _write_text_durable(tmp / "trainer.json", json.dumps(meta, indent=2, sort_keys=True))
            _fsync_dir(tmp / "state")
        barrier()
        if rank == 0:
            self._commit(tmp, final)
        barrier()
        return final

    def _commit(self, tmp: Path, final: Path) -> None:
        if final.exists():  # the same step saved again (e.g. a re-run that trained no further)
            self._discard(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        _write_text_durable(self.root / "latest", final.name + "\n")
        for old in self.complete_checkpoints()[:-self.keep_last]:
            if old != final:
                self._discard(old)

    def _discard(self, path: Path) -> None:
        trash = self.root / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Temporary and trash folders left by a crashed save or prune."""
        for p in self.root.iterdir():
            if p.name.startswith((".step_", ".trash-")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def load(self, path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Load DCP ``state`` in place from checkpoint ``path`` (collective); return trainer.json.
        """
        try:
            with _single_process_quiet():
                dcp.load(state, checkpoint_id=str(path / "state"),
                         no_dist=not dist.is_initialized())
        except Exception as e:  # DCP raises assorted types for missing keys / shape mismatches
            raise CheckpointError(f"checkpoint: cannot load {path}: {e}") from e
        return json.loads((path / "trainer.json").read_text())


def check_resume_config(stored: TrainConfig, requested: TrainConfig, where: Path) -> None:
    """Raise CheckpointError listing the fields that may not change when resuming."""
    diff = {k: v for k, v in config_diff(stored, requested).items() if not is_resumable_change(k)}
    if not diff:
        return
    lines = "\n".join(f"  {k}: checkpoint {a!r}, requested {b!r}" for k, (a, b) in diff.items())
    raise CheckpointError(
        f"cannot resume: {where} was trained with a different configuration:\n{lines}\n"
        "These fields define the model, the data or the optimisation and cannot change in a "
        "resumed run. Either train the new configuration in a new --run-dir, or drop these "
        f"overrides to continue the stored run (its configuration is {where / 'config.json'})."
    )


def latest_on_all_ranks(manager: CheckpointManager) -> Path | None:
    """Rank 0's view of the latest checkpoint, shared so that every rank loads the same one."""
    found = manager.latest() if not dist.is_initialized() or dist.get_rank() == 0 else None
    found = broadcast_object(None if found is None else str(found))
    return None if found is None else Path(found)


def load_weights(path: Path, module: torch.nn.Module, which: str = "ema") -> dict[str, Any]:
    """Load the ``which`` ("ema" or "model") weights of checkpoint ``path`` into a plain module.

    One process, no process group needed (generation, evaluation). Every tensor of the module's
    state dict comes from ``which`` when the checkpoint has it there (the EMA covers trainable
    parameters only), otherwise from "model" (buffers, frozen parameters). Returns trainer.json.
    """
    if which not in ("ema", "model"):
        raise ValueError(f"which: got {which!r}, expected 'ema' or 'model'")
    stored = set(dcp.FileSystemReader(str(path / "state")).read_metadata().state_dict_metadata)
    current = {k: v.detach().clone() for k, v in module.state_dict().items()}
    state: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}}
    for key, tensor in current.items():
        state["ema" if which == "ema" and f"ema.{key}" in stored else "model"][key] = tensor
    try:
        with _single_process_quiet():
            dcp.load({k: v for k, v in state.items() if v}, checkpoint_id=str(path / "state"),
                     no_dist=True)
    except Exception as e:  # DCP raises assorted types for missing keys / shape mismatches
        raise CheckpointError(
            f"checkpoint: cannot load the {which} weights of {path} into "
            f"{type(module).__name__}: {e}\nThe module must be built from the checkpoint's own "
            "config.json (or the code changed since the checkpoint was written)."
        ) from e
    module.load_state_dict({**state["model"], **state["ema"]})
    return json.loads((path / "trainer.json").read_text())
