"""The distributed paths on CPU with gloo: 2-rank DDP and FSDP2 (``fully_shard``) train and
checkpoint; a sharded FSDP2 checkpoint resumes on 1 process and a 1-process checkpoint on 2 FSDP2
ranks, with the reassembled tensors checked against the checkpoint."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from test_train import checkpoint_tensors, flatten, mini  # noqa: E402

from m4v.train import train  # noqa: E402
from m4v.train.checkpoint import CheckpointManager  # noqa: E402
from m4v.train.distributed import init_distributed, shutdown  # noqa: E402
from m4v.train.metrics import read_metrics  # noqa: E402
from m4v.train.trainer import Trainer, check_fsdp_call_pattern  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, job, payload) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    job(payload)


def run_ranks(job, payload, world: int = 2) -> None:
    """``job(payload)`` in ``world`` processes forming a gloo group (as torchrun would)."""
    mp.spawn(_rank_main, args=(world, _free_port(), job, payload), nprocs=world, join=True)


def _train_job(payload) -> None:
    cfg, run_dir = payload
    train(cfg, run_dir, progress=False)


def _trainer_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    model, optim = get_state_dict(trainer.module, trainer.optimizer)
    return flatten({"model": model, "optimizer": optim, "ema": trainer.ema.state_dict()})


def _load_gather_then_train_job(payload) -> None:
    """Load the latest checkpoint into a (sharded) trainer and save its full tensors; then train
    on from it in the same process group."""
    cfg, run_dir, out = payload
    info = init_distributed("cpu")
    try:
        trainer = Trainer(cfg, run_dir, info, progress=False)
        trainer.load(CheckpointManager(run_dir).latest())
        state = _trainer_state(trainer)  # collectives (full_tensor) on every rank
        if info.rank == 0:
            torch.save({"state": state, "parallel": trainer.parallel, "step": trainer.step}, out)
        del trainer
        train(cfg, run_dir, progress=False)
    finally:
        shutdown(info)


def assert_same_tensors(loaded: dict, stored: dict) -> None:
    assert loaded.keys() == stored.keys(), sorted(set(loaded) ^ set(stored))[:5]
    for k in stored:
        assert torch.equal(loaded[k], stored[k]), k


def test_ddp_two_ranks_train_checkpoint_and_sample(tmp_path):
    cfg = mini(steps=2, parallel="ddp", sample_at_end=True)
    run_ranks(_train_job, (cfg, tmp_path))
    latest = CheckpointManager(tmp_path).latest()
    meta = (latest / "trainer.json").read_text()
    assert latest.name == "step_00000002" and '"parallel": "ddp"' in meta
    assert '"world_size": 2' in meta
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["event"] == "train"]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    # the end-of-run samples were split over the two ranks and all written
    assert len(list((tmp_path / "samples").glob("*.mp4"))) == cfg.sample.num_prompts


def test_fsdp_refuses_a_batch_that_would_deadlock():
    with pytest.raises(ValueError, match="a multiple of 4 for these ratios"):
        check_fsdp_call_pattern(mini(batch_size=4, parallel="fsdp"), world_size=2)
    check_fsdp_call_pattern(mini(batch_size=8, parallel="fsdp"), world_size=2)


def test_fsdp2_sharded_checkpoints_resume_across_world_sizes(tmp_path):
    run = tmp_path / "run"
    # 2 ranks, FSDP2: parameters, EMA and optimiser state are sharded, each rank writes its shard
    fsdp = {"parallel": "fsdp", "batch_size": 8}  # per rank 4: one sample per stage share
    run_ranks(_train_job, (mini(steps=2, **fsdp), run))
    sharded = CheckpointManager(run).latest()
    assert '"parallel": "fsdp"' in (sharded / "trainer.json").read_text()
    assert {p.name for p in (sharded / "state").glob("*.distcp")} == {"__0_0.distcp",
                                                                     "__1_0.distcp"}
    stored = checkpoint_tensors(sharded)

    # 2 -> 1: one plain process reassembles every tensor exactly
    info = init_distributed("cpu")
    trainer = Trainer(mini(steps=3, **fsdp), run, info, progress=False)
    trainer.load(sharded)
    assert trainer.parallel == "none" and trainer.step == 2
    assert_same_tensors(_trainer_state(trainer), stored)
    del trainer
    result = train(mini(steps=3, **fsdp), run, progress=False)  # and trains on from there
    assert result.resumed_from == 2 and result.checkpoint.name == "step_00000003"

    # 1 -> 2: the single-process checkpoint is sharded over two FSDP2 ranks on load
    out = tmp_path / "gathered.pt"
    run_ranks(_load_gather_then_train_job, (mini(steps=4, **fsdp), run, out))
    gathered = torch.load(out, weights_only=False)
    assert gathered["parallel"] == "fsdp" and gathered["step"] == 3
    assert_same_tensors(gathered["state"], checkpoint_tensors(result.checkpoint))
    assert CheckpointManager(run).latest().name == "step_00000004"
