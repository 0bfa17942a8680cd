"""A folder of videos with captions listed in a JSONL or CSV index.

Layout::

    root/
      captions.jsonl     {"video": "clips/a.mp4", "caption": "..."} one per line
      (or captions.csv)  header with columns video, caption
      clips/a.mp4 ...

Everything that can be checked without decoding is checked at construction (folder, index, rows,
that every listed file exists), with an error that says what is wrong and what to do.

A clip that fails to decode at load time (corrupt file, too few frames) must not stop a run:
``__getitem__`` logs a warning and falls through to the next index, whose clip stands in.
Counting across DataLoader workers: every sample carries ``"skipped"`` (1 when the clip of the
requested index was unreadable, else 0), so summing ``batch["skipped"]`` over an epoch counts each
unreadable clip exactly once (the sampler requests every index once), whatever ``num_workers``
is. Failures met while falling through are logged but counted when their own index comes up.
``dataset.skipped`` lists (path, reason) of the requested clips that failed in this process (with
workers, each worker's copy holds its own). A stand-in repeats a neighbouring clip, which shifts
the data distribution negligibly while skips are rare; the warning log says when they are not.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from torch.utils.data import Dataset

from m4v.data.clips import ClipSpec, load_clip

logger = logging.getLogger(__name__)

INDEX_NAMES = ("captions.jsonl", "captions.csv")
MAX_CONSECUTIVE_SKIPS = 64


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: expected an object with keys video, caption")
        rows.append((number, row))
    return [_check_row(path, number, row) for number, row in rows]


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"video", "caption"} <= set(reader.fieldnames):
            raise ValueError(
                f"{path}: header has columns {reader.fieldnames}, expected at least video, caption"
            )
        return [_check_row(path, number, row) for number, row in enumerate(reader, start=2)]


def _check_row(path: Path, number: int, row: dict) -> dict:
    for key in ("video", "caption"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(
                f"{path}, row at line {number}: '{key}' must be a non-empty string, "
                f"got {row.get(key)!r}"
            )
    return {"video": row["video"].strip(), "caption": row["caption"].strip()}


def find_index(root: Path, index: str | Path | None) -> Path:
    if index is not None:
        path = Path(index) if Path(index).is_absolute() else root / index
        if not path.is_file():
            raise FileNotFoundError(
                f"index: {str(path)!r} does not exist; pass the JSONL or CSV file that lists "
                "video, caption"
            )
        return path
    present = [root / name for name in INDEX_NAMES if (root / name).is_file()]
    if len(present) != 1:
        found = "neither" if not present else "both"
        raise FileNotFoundError(
            f"root {str(root)!r}: found {found} of {INDEX_NAMES}; put exactly one there or "
            "pass index="
        )
    return present[0]


class VideoFolderDataset(Dataset):
    """Map-style dataset of ``{"video": (3, t, h, w) float32 in [-1, 1], "caption": str,
    "path": str, "skipped": int}`` from a folder of videos and a caption index."""

    def __init__(
        self,
        root: str | Path,
        index: str | Path | None = None,
        num_frames: int = 8,
        size: int | tuple[int, int] = 32,
        stride: int = 1,
        random_offset: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"root: {str(self.root)!r} is not a directory; pass the folder holding the videos "
                f"and {' or '.join(INDEX_NAMES)}"
            )
        self.spec = ClipSpec.of(num_frames, size, stride, random_offset)
        self.index_path = find_index(self.root, index)
        reader = _read_csv if self.index_path.suffix.lower() == ".csv" else _read_jsonl
        self.rows = reader(self.index_path)
        if not self.rows:
            raise ValueError(f"{self.index_path}: lists no videos")
        missing = [r["video"] for r in self.rows if not self._path(r).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.rows)} videos listed in {self.index_path} do not "
                f"exist under {self.root}, e.g. {missing[:5]}; fix the paths (relative to the "
                "root) or remove those rows"
            )
        self.skipped: list[tuple[str, str]] = []

    def _path(self, row: dict) -> Path:
        return self.root / row["video"]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} videos")
        failures: list[tuple[str, str]] = []
        for attempt in range(min(len(self), MAX_CONSECUTIVE_SKIPS)):
            row = self.rows[(index + attempt) % len(self)]
            path = self._path(row)
            try:
                video = load_clip(path, self.spec)
            except (OSError, ValueError) as e:
                reason = f"{type(e).__name__}: {e}"
                if attempt == 0:
                    self.skipped.append((str(path), reason))
                logger.warning("skipping unreadable clip %s: %s", path, reason)
                failures.append((str(path), reason))
                continue
            return {
                "video": video,
                "caption": row["caption"],
                "path": str(path),
                "skipped": int(bool(failures)),
            }
        raise RuntimeError(
            f"{len(failures)} consecutive clips from index {index} failed to load, e.g. "
            f"{failures[:3]}; check the files (m4v.video_io.video_decodes) before training"
        )
