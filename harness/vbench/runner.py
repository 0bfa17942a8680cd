"""Run VBench dimensions over a set of videos, one dimension at a time, into the results store.

For each requested dimension (VBench's own ``compute_<dimension>``, weights from the local cache):

1. availability: weight files present (else the dimension is ``unavailable`` with a message
   naming each missing file, where it goes and its upstream address), prompt information present
   for the dimensions that need the standard suite, vbench's module importable;
2. resumption: videos that already have a stored score for this checkpoint + suite + dimension
   are skipped;
3. validation: every video is decoded once with PyAV (``m4v.video_io``); one that does not decode,
   or has too few frames or too small frames for the dimension, is reported, stored as an error
   row and skipped;
4. scoring: the remaining videos go to VBench in one call, through a VBench "full info" JSON
   (the file its ``load_dimension_info`` reads). If the call raises, the batch is split in halves
   until the failing videos are isolated (each is reported and stored as an error row); when two
   different videos fail alone with the same error before any video succeeded, the failure is
   the dimension's (its model, its code), not the videos', and the dimension is ``failed``;
5. storage: per-video scores, then the aggregate over all videos of the request that have a
   stored score, computed as VBench does (the mean; for subject and background consistency the
   sum over frame pairs divided by their number, i.e. the mean weighted by frames - 1).

Per-video values are stored on the aggregate's scale (imaging quality: VBench's per-video 0-100
value / 100; dynamic degree: 1.0 for moving, 0.0 for static).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.store import AGGREGATE, Store
from harness.vbench import dimensions as dims
from harness.vbench import scoring, upstream
from harness.vbench.weights import cache_dir as resolve_cache_dir
from harness.vbench.weights import unavailable_message
from m4v.video_io import probe_video, read_video

logger = logging.getLogger(__name__)

EVALUATOR = "vbench"
SUMMARY_DIMENSIONS = {"total": "vbench_total", "quality": "vbench_quality",
                      "semantic": "vbench_semantic"}


@dataclass(frozen=True)
class VideoItem:
    """One video to evaluate.

    ``dimensions``: the dimensions whose prompt list holds this video's prompt (standard suite);
    ``None`` means every requested dimension (custom prompts, folders). ``auxiliary_info``: the
    standard suite's per-dimension prompt information.
    """

    path: Path
    prompt: str
    dimensions: frozenset[str] | None = None
    auxiliary_info: Mapping[str, dict] = field(default_factory=dict)
    sample_index: int | None = None

    @property
    def key(self) -> str:
        """The video's name in the store (its file name; unique within one suite folder)."""
        return self.path.name


@dataclass
class DimensionResult:
    dimension: str
    # "scored" | "up to date" | "unavailable" | "failed" | "no videos" | "not applicable" (no
    # video meets the dimension's frame count or size)
    status: str
    message: str = ""
    aggregate: float | None = None
    num_videos: int = 0  # videos of the request with a stored score
    scored: dict[str, float] = field(default_factory=dict)  # scored in this call: key -> value
    errors: dict[str, str] = field(default_factory=dict)  # key -> reason (skipped videos)


@dataclass(frozen=True)
class _Decoded:
    num_frames: int
    height: int
    width: int
    fps: float


def evaluate(
    items: Sequence[VideoItem],
    dimension_names: Sequence[str],
    store: Store,
    checkpoint: str,
    suite: str,
    cache_dir: str | Path | None = None,
    device: str | None = None,
) -> list[DimensionResult]:
    """Score ``items`` on each of ``dimension_names`` (see the module docstring); never raises for
    an unavailable dimension or an unreadable video: both are reported in the results."""
    for name in dimension_names:
        dims.get(name)  # ValueError for an unknown name, before any work
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError("items: two videos share a file name; give each suite its own folder")
    cache = resolve_cache_dir(cache_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    decoded: dict[str, _Decoded | str] = {}  # key -> decode info or the reason it failed
    results = []
    for name in dimension_names:
        result = _evaluate_dimension(name, items, store, checkpoint, suite, cache, device, decoded)
        logger.info("%s: %s", name, result.status)
        results.append(result)
    return results


def _evaluate_dimension(name, items, store, checkpoint, suite, cache, device, decoded):
    dimension = dims.get(name)
    mine = [i for i in items if i.dimensions is None or name in i.dimensions]
    if not mine:
        return DimensionResult(name, "no videos", "no video of this suite is meant for it")
    missing = unavailable_message(name, cache)
    if missing:
        return DimensionResult(name, "unavailable", missing)
    if dimension.needs_prompt_info and not all(name in i.auxiliary_info for i in mine):
        return DimensionResult(
            name, "unavailable",
            f"{name}: needs the per-prompt information of VBench's standard prompt suite "
            "(not available for custom prompts or a folder of videos)",
        )
    done = store.scored_videos(checkpoint, suite, name)
    todo = [i for i in mine if i.key not in done]
    result = DimensionResult(name, "up to date" if not todo else "scored")
    ineligible: set[str] = set()  # readable videos with too few or too small frames
    if todo:
        try:
            compute = upstream.compute_function(name, cache)
        except upstream.DimensionUnavailable as e:
            return DimensionResult(name, "unavailable", str(e))
        ready = []
        _decode_new(todo, decoded, store, checkpoint, suite)
        for item in todo:
            info = decoded[item.key]
            reason = info if isinstance(info, str) else _ineligible(info, dimension)
            if reason is None:
                ready.append(item)
            else:
                result.errors[item.key] = reason
                if not isinstance(info, str):
                    ineligible.add(item.key)
        if ready:
            try:
                values, failures = _score(compute, name, ready, dims.submodule_args(name, cache),
                                          device)
            except _DimensionFailure as e:
                result.status, result.message = "failed", str(e)
                values, failures = {}, {}
            result.errors.update(failures)
            result.scored = values
        rows = [_row(checkpoint, suite, name, key, value=value,
                     weight=_weight(dimension, decoded[key]))
                for key, value in result.scored.items()]
        rows += [_row(checkpoint, suite, name, key, error=reason)
                 for key, reason in result.errors.items()]
        store.add_scores(rows)
    _store_aggregate(result, store, checkpoint, suite, [i.key for i in mine])
    if result.num_videos == 0 and ineligible and set(result.errors) == ineligible:
        result.status, result.message = "not applicable", ""
    if result.errors:
        result.message = "; ".join(filter(None, [result.message, _skipped(result.errors)]))
    return result


def _skipped(errors: dict[str, str]) -> str:
    """'N video(s) skipped: reason (count, e.g. name); ...' for the three commonest reasons."""
    by_reason: dict[str, list[str]] = {}
    for key, reason in errors.items():
        by_reason.setdefault(reason, []).append(key)
    common = sorted(by_reason.items(), key=lambda kv: -len(kv[1]))[:3]
    return f"{len(errors)} video(s) skipped: " + "; ".join(
        f"{reason} ({len(keys)}, e.g. {keys[0]})" for reason, keys in common)


def _decode_new(items, decoded, store, checkpoint, suite) -> None:
    """Decode each item not decoded yet in this evaluation (its info or the reason it cannot be
    read goes into ``decoded``) and register the readable ones in the store."""
    rows = []
    for item in items:
        if item.key in decoded:
            continue
        try:
            frames = read_video(item.path)
            info = _Decoded(len(frames), frames.shape[1], frames.shape[2],
                            probe_video(item.path).fps)
        except (OSError, ValueError) as e:
            decoded[item.key] = f"unreadable video: {type(e).__name__}: {e}"
            continue
        decoded[item.key] = info
        rows.append({"checkpoint": checkpoint, "suite": suite, "video": item.key,
                     "path": str(item.path), "prompt": item.prompt,
                     "sample_index": item.sample_index, "num_frames": info.num_frames,
                     "height": info.height, "width": info.width, "fps": info.fps})
    store.add_videos(rows)


def _ineligible(info: _Decoded, dimension: dims.Dimension) -> str | None:
    """Why a readable video cannot be scored on ``dimension`` (too few or too small frames)."""
    if info.num_frames < dimension.min_frames:
        return f"{info.num_frames} frame(s); {dimension.name} needs at least {dimension.min_frames}"
    if min(info.height, info.width) < dimension.min_side:
        return (f"{info.height}x{info.width} frames; {dimension.name} needs both sides "
                f">= {dimension.min_side} px")
    return None


class _DimensionFailure(RuntimeError):
    pass


def _score(compute: Callable, name: str, items: list[VideoItem], args, device: str):
    """Per-video values and per-video failures, isolating failing videos by bisection."""
    values: dict[str, float] = {}
    failures: dict[str, str] = {}
    solo_errors: dict[str, str] = {}  # normalised error text -> first video that failed alone

    def run(batch: list[VideoItem]) -> None:
        try:
            values.update(_call(compute, name, batch, args, device))
            return
        except Exception as e:  # noqa: BLE001 - VBench code raises anything; isolate and report
            error = f"{type(e).__name__}: {e}"
        if len(batch) > 1:
            mid = len(batch) // 2
            run(batch[:mid])
            run(batch[mid:])
            return
        key = batch[0].key
        generic = error.replace(str(batch[0].path), "<video>")
        if not values and generic in solo_errors and solo_errors[generic] != key:
            raise _DimensionFailure(f"{name}: VBench failed on every video tried: {generic}")
        solo_errors[generic] = key
        failures[key] = f"VBench {name} failed on this video: {error}"

    run(items)
    return values, failures


def _call(compute: Callable, name: str, batch: list[VideoItem], args, device: str
          ) -> dict[str, float]:
    scale = dims.get(name).per_video_scale
    with tempfile.TemporaryDirectory(prefix="m4v-vbench-") as work:
        info = Path(work) / "full_info.json"
        info.write_text(json.dumps(_full_info(name, batch)))
        with upstream.trusted_torch_load():
            _, video_results = compute(str(info), device, args)
    by_path = {str(r["video_path"]): r["video_results"] for r in video_results}
    out = {}
    for item in batch:
        if str(item.path) not in by_path:
            raise RuntimeError(f"VBench returned no score for {item.path}")
        out[item.key] = float(by_path[str(item.path)]) * scale
    return out


def _full_info(name: str, batch: list[VideoItem]) -> list[dict]:
    """VBench's full-info list for one dimension: one entry per prompt with its videos."""
    entries: dict[str, dict] = {}
    for item in batch:
        entry = entries.setdefault(item.prompt, {"prompt_en": item.prompt, "dimension": [name],
                                                 "video_list": []})
        entry["video_list"].append(str(item.path))
        if name in item.auxiliary_info:
            entry["auxiliary_info"] = {name: item.auxiliary_info[name]}
    return list(entries.values())


def _weight(dimension: dims.Dimension, info: _Decoded) -> float:
    return float(info.num_frames - 1) if dimension.frame_weighted else 1.0


def _row(checkpoint, suite, dimension, video, value=None, weight=None, error=None, detail=None):
    return {"checkpoint": checkpoint, "suite": suite, "dimension": dimension, "video": video,
            "value": value, "weight": weight, "error": error, "detail": detail,
            "evaluator": EVALUATOR}


def _store_aggregate(result: DimensionResult, store: Store, checkpoint: str, suite: str,
                     keys: list[str]) -> None:
    rows = store.records(
        "SELECT video, value, weight FROM scores WHERE checkpoint = ? AND suite = ? "
        "AND dimension = ? AND video <> ? AND error IS NULL",
        [checkpoint, suite, result.dimension, AGGREGATE],
    )
    wanted = set(keys)
    rows = [r for r in rows if r["video"] in wanted]
    result.num_videos = len(rows)
    if not rows:
        if result.status in ("scored", "up to date"):
            result.status = "failed"
            result.message = result.message or f"{result.dimension}: no video could be scored"
        return
    total_weight = sum(r["weight"] for r in rows)
    result.aggregate = sum(r["value"] * r["weight"] for r in rows) / total_weight
    store.add_scores([_row(
        checkpoint, suite, result.dimension, AGGREGATE, value=result.aggregate,
        weight=total_weight, detail={"num_videos": len(rows), "num_expected": len(keys)},
    )])


def summarize(store: Store, checkpoint: str, suite: str) -> dict | None:
    """VBench Total / Quality / Semantic from the stored aggregates of ``checkpoint`` + ``suite``
    (``scoring.aggregate``), stored as the dimensions ``vbench_total``, ``vbench_quality`` and
    ``vbench_semantic``; ``None`` when no VBench dimension has an aggregate."""
    rows = store.records(
        "SELECT dimension, value FROM scores WHERE checkpoint = ? AND suite = ? AND video = ? "
        "AND error IS NULL AND evaluator = ?",
        [checkpoint, suite, AGGREGATE, EVALUATOR],
    )
    raw = {r["dimension"]: r["value"] for r in rows if r["dimension"] in scoring.ALL_DIMENSIONS}
    if not raw:
        return None
    summary = scoring.aggregate(raw)
    detail = {"partial": summary["partial"], "missing": summary["missing"]}
    store.add_scores([
        _row(checkpoint, suite, column, AGGREGATE, value=summary[key], detail=detail)
        for key, column in SUMMARY_DIMENSIONS.items() if summary[key] is not None
    ])
    return summary


_SAMPLE_SUFFIX = re.compile(r"-(\d+)$")


def prompt_from_filename(path: str | Path) -> tuple[str, int | None]:
    """VBench's naming rule: ``{prompt}-{i}.mp4`` -> (prompt, i); ``{prompt}.mp4`` -> (prompt,
    None)."""
    stem = Path(path).stem
    match = _SAMPLE_SUFFIX.search(stem)
    if match:
        return stem[: match.start()], int(match.group(1))
    return stem, None
