"""Which VBench weight files are present in the local cache, and where missing ones go.

The cache folder is ``--cache-dir``, else ``VBENCH_CACHE_DIR``, else ``~/.cache/vbench`` (vbench's
own default). Nothing is downloaded: fill the cache on a machine with internet access from the
listed addresses, then copy it over.

    python -m harness.vbench.weights [--cache-dir DIR] [--dimensions d1 d2 ...]

A dimension whose files are all present is also imported (vbench's module for it), so that one
that cannot run in this environment (a missing dependency) is reported here rather than later.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from harness.vbench import upstream
from harness.vbench.dimensions import DIMENSIONS, get, missing_weights
from harness.vbench.scoring import ALL_DIMENSIONS

ENV_VAR = "VBENCH_CACHE_DIR"


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The VBench weight cache: ``path``, else ``$VBENCH_CACHE_DIR``, else ``~/.cache/vbench``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vbench"


@dataclass(frozen=True)
class WeightStatus:
    dimension: str
    path: Path  # absolute, where the file is expected
    present: bool
    url: str
    description: str
    note: str


def weight_status(dimensions=ALL_DIMENSIONS, cache: str | os.PathLike | None = None
                  ) -> list[WeightStatus]:
    """One row per (dimension, weight file) for the given dimensions."""
    root = cache_dir(cache)
    rows = []
    for name in dimensions:
        for w in get(name).weights:
            full = root / w.path
            rows.append(WeightStatus(name, full, full.is_file(), w.url, w.description, w.note))
    return rows


def unavailable_message(name: str, cache: str | os.PathLike | None = None) -> str | None:
    """Why ``name`` cannot run for lack of weights (every missing file with its expected path and
    upstream address), or ``None`` when all its files are present."""
    root = cache_dir(cache)
    missing = missing_weights(name, root)
    if not missing:
        return None
    lines = [f"{name}: {len(missing)} weight file(s) missing from {root} "
             f"(set {ENV_VAR} or --cache-dir to another cache):"]
    for w in missing:
        lines.append(f"  {root / w.path}  <- {w.url}  ({w.description})")
        if w.note:
            lines.append(f"      note: {w.note}")
    return "\n".join(lines)


def available_dimensions(cache: str | os.PathLike | None = None) -> list[str]:
    """The dimensions whose weight files are all present (leaderboard order)."""
    root = cache_dir(cache)
    return [d for d in ALL_DIMENSIONS if not missing_weights(d, root)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.vbench.weights",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", help=f"weight cache (default ${ENV_VAR} or ~/.cache/vbench)")
    parser.add_argument("--dimensions", nargs="+", default=list(ALL_DIMENSIONS),
                        choices=list(ALL_DIMENSIONS), metavar="DIM")
    args = parser.parse_args(argv)
    root = cache_dir(args.cache_dir)
    print(f"VBench weight cache: {root}")
    for name in args.dimensions:
        rows = weight_status([name], root)
        state = "ready" if all(r.present for r in rows) else "MISSING WEIGHTS"
        if state == "ready":
            try:
                upstream.compute_function(name, root)
            except upstream.DimensionUnavailable as e:
                state = f"weights present, CANNOT RUN HERE: {e}"
        print(f"\n{name}  [{state}]")
        if not rows:
            print("  (no weights needed)")
        for r in rows:
            print(f"  {'present' if r.present else 'missing'}  {r.path}")
            print(f"           {r.description}; upstream: {r.url}")
            if r.note:
                print(f"           note: {r.note}")
        if DIMENSIONS[name].requires:
            print(f"  also needs: {DIMENSIONS[name].requires}")
        if DIMENSIONS[name].needs_prompt_info:
            print("  only with the standard prompt suite (needs its per-prompt information)")
    ready = available_dimensions(root)
    print(f"\n{len(ready)}/{len(ALL_DIMENSIONS)} dimensions have all their weights: "
          f"{', '.join(ready) or '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
