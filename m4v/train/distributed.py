"""Process group set-up (torchrun), data-parallel wrapping (DDP, FSDP2) and small collectives.

Under ``torchrun`` the environment carries ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address; without it the run is a single process and nothing is initialised. The
backend is NCCL on CUDA and gloo on CPU, so every distributed path is testable on a laptop.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each element of every ``nn.ModuleList`` in
the trained module (the transformer / Mamba blocks, the text encoder layers) as its own unit, then
the root, so only one block's parameters are gathered at a time. Parameter names are unchanged by
``fully_shard`` (unlike FSDP1 or DDP), which keeps EMA and checkpoint keys identical across modes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # this process group was created by us (and is destroyed by us)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if the environment describes one (else single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    created = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        created = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local_rank, dev, created)


def shutdown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over ranks (one all-reduce); identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def resolve_parallel(mode: str, info: DistInfo) -> str:
    """``auto`` -> ``ddp`` with more than one rank, else ``none``; ddp/fsdp need a process group."""
    if mode == "auto":
        return "ddp" if info.world_size > 1 else "none"
    if mode in ("ddp", "fsdp") and not info.distributed:
        # One process: both degenerate to plain training; FSDP2 still works on a 1-rank group,
        # but needs a process group that a single un-launched process does not have.
        return "none"
    if mode == "none" and info.world_size > 1:
        raise ValueError(f"parallel: got 'none' with world size {info.world_size}; expected ddp "
                         "or fsdp (each rank would otherwise train its own copy)")
    return mode


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """The elements of every ``nn.ModuleList`` under ``module``: the units FSDP2 shards."""
    units = []
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList):
            units.extend(sub)
    return units


def wrap(module: nn.Module, mode: str, info: DistInfo, bf16: bool) -> nn.Module:
    """Wrap ``module`` (already on ``info.device``) for data-parallel training.

    ``none``: returned unchanged. ``ddp``: DistributedDataParallel. ``fsdp``: FSDP2 in place on
    each block and the root; with ``bf16`` the blocks compute in bf16 and reduce gradients in
    fp32 (``MixedPrecisionPolicy``); the sharded fp32 parameters are the optimiser's master copy.
    """
    if mode == "none":
        return module
    if mode == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None,
            reduce_dtype=torch.float32 if bf16 else None,
        )
        for unit in fsdp_units(module):
            fully_shard(unit, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        return module
    raise ValueError(f"parallel: got {mode!r}, expected none, ddp or fsdp")


def unwrap(module: nn.Module) -> nn.Module:
    """The module whose parameter names are canonical (DDP adds a ``module.`` prefix)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
