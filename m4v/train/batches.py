"""Which clips each rank trains on at each step: a pure function of (seed, step, rank).

The global batch of step ``s`` is positions ``[s * B, (s + 1) * B)`` of an endless stream made of
one seeded permutation of the dataset per epoch; rank ``r`` of ``W`` takes the ``r``-th of ``W``
equal slices. Nothing about the data order is stored in a checkpoint: resuming at step ``s``
regenerates exactly the batches a run that never stopped would have seen, and with any world
size that divides ``B`` the union of the ranks' slices is the same global batch.

Streaming (iterable) datasets such as webdataset shards cannot be indexed: each rank reads its own
shards (the dataset splits them over ranks and workers), epoch after epoch. Their resume is not
exact: a resumed run starts a new shard order (epoch number = the resume step) rather than
re-reading the stream up to the point where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler


def local_batch_size(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise ValueError(f"batch_size: got {global_batch}, expected a multiple of the world size "
                         f"{world_size} (it is the global batch, split over the ranks)")
    return global_batch // world_size


def epoch_permutation(length: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the dataset in ``epoch`` (int64 array of ``length`` indices)."""
    return np.random.default_rng([seed, epoch]).permutation(length)


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's dataset indices for steps ``start_step, start_step + 1, ...`` forever."""

    def __init__(self, length: int, global_batch: int, rank: int, world_size: int, seed: int,
                 start_step: int = 0):
        if length < 1:
            raise ValueError("dataset: got an empty dataset, expected at least one clip")
        self.local_batch = local_batch_size(global_batch, world_size)
        self.length, self.global_batch = length, global_batch
        self.rank, self.world_size = rank, world_size
        self.seed, self.start_step = seed, start_step

    def indices(self, step: int) -> list[int]:
        first = step * self.global_batch + self.rank * self.local_batch
        out, cache = [], {}
        for pos in range(first, first + self.local_batch):
            epoch, offset = divmod(pos, self.length)
            if epoch not in cache:
                cache[epoch] = epoch_permutation(self.length, self.seed, epoch)
            out.append(int(cache[epoch][offset]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.indices(step)
            step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs len() for progress estimates
        raise TypeError("StepBatchSampler is endless")


def collate(items: list[dict]) -> dict:
    """Stack ``video`` (b, 3, T, H, W); keep ``caption`` as a list of strings."""
    return {
        "video": torch.stack([it["video"] for it in items]),
        "caption": [it["caption"] for it in items],
    }


def _stream_batches(dataset: IterableDataset, local_batch: int, start_step: int,
                    num_workers: int, seed: int) -> Iterator[dict]:
    epoch = start_step
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=local_batch, collate_fn=collate, drop_last=True,
                            num_workers=num_workers,
                            generator=torch.Generator().manual_seed(seed + epoch))
        produced = 0
        for batch in loader:
            produced += 1
            yield batch
        if produced == 0:
            raise ValueError(f"dataset: an epoch yielded no full batch of {local_batch} clips on "
                             "this rank; add data or lower batch_size")
        epoch += 1


def step_batches(dataset: Dataset, global_batch: int, rank: int, world_size: int, seed: int,
                 start_step: int, num_workers: int = 0) -> Iterator[dict]:
    """Endless iterator over this rank's batches from ``start_step`` on."""
    if isinstance(dataset, IterableDataset):
        local = local_batch_size(global_batch, world_size)
        return _stream_batches(dataset, local, start_step, num_workers, seed)
    sampler = StepBatchSampler(len(dataset), global_batch, rank, world_size, seed, start_step)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                        num_workers=num_workers, persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    return iter(loader)
