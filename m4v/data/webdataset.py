"""WebDataset shards of videos: tar files of ``{key}.mp4`` + ``{key}.txt`` (or ``{key}.json``
with a "caption" field), members of one sample adjacent, the webdataset package's convention
(the key is the member name up to the first dot of its last path component).

Reading uses the standard library's streaming ``tarfile`` so that every failure is attributed
to a sample or a shard and counted: a sample without video or caption, or whose video does not
decode, is skipped; a truncated or corrupt shard ends early (the samples read so far are kept).
Skips are logged, kept in the worker's ``dataset.skipped`` list with reasons, and counted in
each sample's ``"skipped"`` field (skips since the previous sample of the same worker), so summing
``batch["skipped"]`` over a run counts every skip that precedes a yielded sample. Skips after a
worker's last sample of an epoch are only in its log and list.

Shards are split over distributed ranks and DataLoader workers (shard ``k`` goes to reader
``k mod (world_size * num_workers)``); with fewer shards than readers some readers get none.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from m4v.data.clips import ClipSpec, load_clip
from m4v.video_io import encode_video, write_bytes_atomic

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov")


def expand_shards(shards: str | Path | Iterable[str | Path]) -> list[Path]:
    """A folder (its ``*.tar``), a glob, a brace pattern (``shard-{000..009}.tar``), one path or
    a list of paths -> the list of shard files, which must all exist."""
    if isinstance(shards, (str, Path)):
        text = str(shards)
        if Path(text).is_dir():
            paths = sorted(Path(text).glob("*.tar"))
        elif "{" in text:
            from braceexpand import braceexpand  # installed with the webdataset package

            paths = [Path(p) for p in braceexpand(text)]
        elif any(c in text for c in "*?["):
            paths = sorted(Path(p) for p in glob.glob(text))
        else:
            paths = [Path(text)]
    else:
        paths = [Path(p) for p in shards]
    if not paths:
        raise FileNotFoundError(f"shards: {shards!r} matches no tar files")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"shards: {len(missing)} of {len(paths)} do not exist, e.g. {missing[:5]}"
        )
    return paths


def _split_key(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _grouped_members(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each run of adjacent members with one key."""
    key, files = None, {}
    with tarfile.open(shard, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, extension = _split_key(member.name)
            if member_key != key and files:
                yield key, files
                files = {}
            key = member_key
            files[extension] = tar.extractfile(member).read()
    if files:
        yield key, files


def _caption(files: dict[str, bytes]) -> str:
    if "txt" in files:
        caption = files["txt"].decode("utf-8")
    elif "json" in files:
        meta = json.loads(files["json"])
        caption = (meta.get("caption") or meta.get("text")) if isinstance(meta, dict) else None
        if not isinstance(caption, str):
            raise ValueError("json member has no string 'caption' (or 'text') field")
    else:
        raise ValueError(f"no caption member (.txt or .json); members: {sorted(files)}")
    if not caption.strip():
        raise ValueError("empty caption")
    return caption.strip()


def _reader_slot() -> tuple[int, int]:
    """(this reader's index, number of readers) over distributed ranks x DataLoader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


class WebVideoDataset(IterableDataset):
    """Iterable dataset of ``{"video": (3, t, h, w) float32 in [-1, 1], "caption": str,
    "key": str, "skipped": int}`` from webdataset shards. ``shuffle_shards`` permutes the shard
    order per epoch (``set_epoch``) with ``seed``, identically on every reader."""

    def __init__(
        self,
        shards: str | Path | Iterable[str | Path],
        num_frames: int = 8,
        size: int | tuple[int, int] = 32,
        stride: int = 1,
        random_offset: bool = True,
        shuffle_shards: bool = False,
        seed: int = 0,
    ) -> None:
        self.shards = expand_shards(shards)
        self.spec = ClipSpec.of(num_frames, size, stride, random_offset)
        self.shuffle_shards, self.seed, self.epoch = shuffle_shards, seed, 0
        self.skipped: list[tuple[str, str]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _skip(self, where: str, reason: str) -> None:
        self.skipped.append((where, reason))
        logger.warning("skipping %s: %s", where, reason)

    def __iter__(self) -> Iterator[dict]:
        order = list(range(len(self.shards)))
        if self.shuffle_shards:
            order = list(np.random.default_rng([self.seed, self.epoch]).permutation(order))
        slot, slots = _reader_slot()
        pending = 0
        for shard in (self.shards[k] for k in order[slot::slots]):
            try:
                for key, files in _grouped_members(shard):
                    where = f"{shard}:{key}"
                    try:
                        video_ext = next((e for e in VIDEO_EXTENSIONS if e in files), None)
                        if video_ext is None:
                            raise ValueError(
                                f"no video member ({VIDEO_EXTENSIONS}); members: {sorted(files)}"
                            )
                        caption = _caption(files)
                        video = load_clip(files[video_ext], self.spec)
                    except (OSError, ValueError, UnicodeDecodeError) as e:
                        self._skip(where, f"{type(e).__name__}: {e}")
                        pending += 1
                        continue
                    yield {"video": video, "caption": caption, "key": key, "skipped": pending}
                    pending = 0
            except (tarfile.TarError, OSError, EOFError) as e:
                self._skip(str(shard), f"shard unreadable from here on ({type(e).__name__}: {e})")
                pending += 1


def write_shards(
    samples: Iterable[dict],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    fps: float = 8.0,
) -> list[Path]:
    """Write ``samples`` ({"video": uint8 (t, h, w, 3) or float (3, t, h, w), "caption": str,
    optional "key": str without dots}) as ``{prefix}-{n:06d}.tar`` shards of mp4 + txt.
    Each shard is written atomically. Returns the shard paths."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard: got {samples_per_shard}, expected >= 1")
    out_dir = Path(out_dir)
    paths: list[Path] = []
    buffer, members = io.BytesIO(), 0
    tar = tarfile.open(fileobj=buffer, mode="w")

    def add(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def flush() -> None:
        nonlocal buffer, tar, members
        tar.close()
        paths.append(
            write_bytes_atomic(out_dir / f"{prefix}-{len(paths):06d}.tar", buffer.getvalue())
        )
        buffer, members = io.BytesIO(), 0
        tar = tarfile.open(fileobj=buffer, mode="w")

    for number, sample in enumerate(samples):
        key = str(sample.get("key", f"{number:08d}"))
        if "." in key or not key:
            raise ValueError(
                f"samples[{number}]['key']: got {key!r}, expected a non-empty name without dots"
            )
        caption = sample.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(
                f"samples[{number}]['caption']: got {caption!r}, expected a non-empty string"
            )
        add(f"{key}.mp4", encode_video(sample["video"], fps))
        add(f"{key}.txt", caption.encode("utf-8"))
        members += 1
        if members == samples_per_shard:
            flush()
    if members:
        flush()
    tar.close()
    return paths
