"""Evaluate a checkpoint or a folder of videos on VBench dimensions (and the Shapes metrics).

    python -m harness.vbench                      # the default: latest checkpoint under runs/,
                                                  # the Shapes suite (suites/shapes.yaml)
    python -m harness.vbench --checkpoint runs/default --suite standard   # VBench's 946 prompts
    python -m harness.vbench --checkpoint DIR --prompts my_prompts.txt --samples 3
    python -m harness.vbench --videos DIR [--prompt-file map.json] [--name my-model]
    python -m harness.vbench --videos DIR --suite standard   # a folder of standard-suite videos

With a checkpoint, the videos ``{prompt}-{i}.mp4`` are generated first (``m4v.generate``; videos
already there are kept) into ``--out`` (default ``reports/videos/<run>/<step>/<suite>``). The
dimensions are ``--dimensions``, else every VBench dimension whose weights are in the cache and
that the input supports (the others are listed as not run). Results go to the store (``--store``,
``M4V_STORE``, ``reports/results.duckdb``); work already stored is skipped. A table in the style
of the paper's VBench table is printed at the end (scores x100; ``*`` marks a partial total).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.store import AGGREGATE, Store
from harness.vbench import dimensions as dims
from harness.vbench import runner, scoring, suites
from harness.vbench.weights import available_dimensions, cache_dir

SHAPES_SUITE_FILE = Path(__file__).resolve().parents[2] / "suites" / "shapes.yaml"
SHAPES_EVALUATOR = "shapes"
SHAPES_METRICS = ("colour", "shape", "direction", "background", "all")


@dataclass
class Inputs:
    checkpoint: str  # the label results are stored under
    suite: str
    items: list[runner.VideoItem]
    missing: list[str]
    folder: Path
    shapes_prompts: list[str] | None  # set for the Shapes suite: its metrics are computed too


def latest_checkpoint(runs_dir: Path) -> Path:
    """The newest complete checkpoint (by step save time) of any run under ``runs_dir``."""
    from m4v.train.checkpoint import CheckpointManager

    found = [c for run in sorted(runs_dir.glob("*/")) if (c := CheckpointManager(run).latest())]
    if not found:
        raise SystemExit(f"no checkpoint under {runs_dir}/ : train one first (`nox -s train`) "
                         "or pass --checkpoint DIR or --videos DIR")
    return max(found, key=lambda c: (c / "trainer.json").stat().st_mtime)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _from_checkpoint(args, store: Store) -> Inputs:
    from m4v.generate import generate
    from m4v.train.checkpoint import find_checkpoint, read_checkpoint_info

    path = find_checkpoint(args.checkpoint) if args.checkpoint else latest_checkpoint(
        Path(args.runs_dir))
    info = read_checkpoint_info(path)
    run = path.parent.parent.name
    label = args.name or f"{run}/{path.name}"
    # registered unless the trainer did already (its row has more: config, metrics)
    store.add_run(run, kind="train", status=None, replace=False)
    store.add_checkpoint(label, run=run, step=info.step, path=str(path.resolve()),
                         replace=False)
    entries, suite, samples, shapes_prompts = _suite_entries(args)
    out = Path(args.out or Path("reports") / "videos" / _slug(run) / path.name / suite)
    print(f"checkpoint {path} (step {info.step}) -> {len(entries)} prompts x {samples} samples "
          f"into {out}")
    generate(path, [e.prompt for e in entries], samples, out, seed=args.seed, device=args.device
             or "auto")
    items, missing = suites.expected_items(entries, out, samples)
    return Inputs(label, suite, items, missing, out, shapes_prompts)


def _suite_entries(args):
    """(entries, suite label, samples per prompt, Shapes prompts or None) of --suite/--prompts."""
    if args.prompts:
        entries = suites.read_prompt_file(args.prompts)
        return entries, f"custom:{Path(args.prompts).stem}", args.samples or 1, None
    if args.suite == "standard":
        return (suites.standard_prompts(), suites.STANDARD_SUITE,
                args.samples or suites.STANDARD_SAMPLES, None)
    from harness.shapes import load_suite

    shapes = load_suite(SHAPES_SUITE_FILE)
    entries = [suites.PromptEntry(p) for p in shapes.prompts]
    return entries, shapes.name, args.samples or shapes.samples_per_prompt, list(shapes.prompts)


def _from_folder(args) -> Inputs:
    folder = Path(args.videos)
    label = args.name or str(folder.resolve())
    if args.suite == "standard":
        items, missing = suites.expected_items(suites.standard_prompts(), folder,
                                               args.samples or suites.STANDARD_SAMPLES)
        return Inputs(label, suites.STANDARD_SUITE, items, missing, folder, None)
    if args.suite == "shapes":
        entries, suite, samples, shapes_prompts = _suite_entries(args)
        items, missing = suites.expected_items(entries, folder, samples)
        return Inputs(label, suite, items, missing, folder, shapes_prompts)
    return Inputs(label, "custom", suites.folder_items(folder, args.prompt_file), [], folder, None)


def _choose_dimensions(args, inputs: Inputs) -> tuple[list[str], list[str]]:
    """(dimensions to run, 'name: reason' lines for the VBench dimensions not run)."""
    if args.dimensions:
        return list(args.dimensions), []
    ready = set(available_dimensions(args.cache_dir))
    standard = inputs.suite == suites.STANDARD_SUITE
    chosen, skipped = [], []
    for name in scoring.ALL_DIMENSIONS:
        if name not in ready:
            skipped.append(f"{name}: weights missing (python -m harness.vbench.weights)")
        elif dims.get(name).needs_prompt_info and not standard:
            skipped.append(f"{name}: needs the standard prompt suite")
        else:
            chosen.append(name)
    return chosen, skipped


def _shapes_metrics(store: Store, inputs: Inputs) -> dict:
    from harness.shapes import evaluate_folder

    report = evaluate_folder(inputs.folder, inputs.shapes_prompts)
    rows = []
    for score in report.scores:
        video = Path(score.path).name
        for metric in SHAPES_METRICS:
            rows.append({"checkpoint": inputs.checkpoint, "suite": inputs.suite,
                         "dimension": f"shapes_{metric}", "video": video,
                         "value": float(getattr(score, f"{metric}_correct")), "weight": 1.0,
                         "evaluator": SHAPES_EVALUATOR, "detail": score.predicted})
    for path, reason in report.skipped:
        rows.append({"checkpoint": inputs.checkpoint, "suite": inputs.suite,
                     "dimension": "shapes_all", "video": Path(path).name, "error": reason,
                     "evaluator": SHAPES_EVALUATOR})
    for metric in SHAPES_METRICS:
        value = report.aggregate.get(f"{metric}_accuracy")
        if value is not None:
            rows.append({"checkpoint": inputs.checkpoint, "suite": inputs.suite,
                         "dimension": f"shapes_{metric}", "video": AGGREGATE, "value": value,
                         "weight": float(report.aggregate["num_videos"]),
                         "evaluator": SHAPES_EVALUATOR,
                         "detail": {"num_videos": report.aggregate["num_videos"]}})
    store.add_scores(rows)
    if report.skipped:
        print(f"shapes metrics: {len(report.skipped)} unreadable video(s) skipped")
    return report.aggregate


def format_table(store: Store, checkpoint: str, suite: str) -> str:
    """The stored aggregates of ``checkpoint`` + ``suite`` as a paper-style table (x100)."""
    rows = store.records(
        "SELECT dimension, value, detail FROM scores WHERE checkpoint = ? AND suite = ? "
        "AND video = ? AND error IS NULL", [checkpoint, suite, AGGREGATE])
    values = {r["dimension"]: r["value"] for r in rows}
    partial = any(json.loads(r["detail"] or "{}").get("partial") for r in rows
                  if r["dimension"] == "vbench_total")
    columns = [("Total", "vbench_total"), ("Quality", "vbench_quality"),
               ("Semantic", "vbench_semantic")]
    columns += [(d.replace("_", " "), d) for d in scoring.ALL_DIMENSIONS if d in values]
    columns += [(f"shapes {m}", f"shapes_{m}") for m in SHAPES_METRICS
                if f"shapes_{m}" in values]
    columns = [(title, key) for title, key in columns if key in values]
    if not columns:
        return f"(no scores stored for {checkpoint} on {suite})"
    header = ["Model"] + [title for title, _ in columns]
    cells = [checkpoint] + [
        f"{100 * values[key]:.2f}" + ("*" if key == "vbench_total" and partial else "")
        for _, key in columns
    ]
    widths = [max(len(h), len(c)) for h, c in zip(header, cells, strict=True)]
    line = lambda parts: "| " + " | ".join(
        [parts[0].ljust(widths[0])] + list(map(str.rjust, parts[1:], widths[1:]))) + " |"
    table = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", line(cells)]
    if partial:
        table.append("* partial: Total/Quality/Semantic over the dimensions present only")
    return "\n".join(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.vbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="run folder or checkpoint folder to generate from")
    source.add_argument("--videos", help="evaluate this folder of .mp4 videos (any model)")
    parser.add_argument("--runs-dir", default="runs",
                        help="where the default looks for the latest checkpoint (default runs)")
    parser.add_argument("--suite", choices=("shapes", "standard"),
                        help="prompt suite (default shapes with a checkpoint; a folder is "
                        "evaluated as custom input unless --suite is given)")
    parser.add_argument("--prompts", help="custom prompt list (.txt one a line, or YAML/JSON)")
    parser.add_argument("--samples", type=int, help="videos per prompt (suite default)")
    parser.add_argument("--prompt-file", help="with --videos: JSON {file name: prompt}")
    parser.add_argument("--dimensions", nargs="+", choices=list(scoring.ALL_DIMENSIONS),
                        metavar="DIM", help="VBench dimensions (default: all with weights)")
    parser.add_argument("--no-shapes", action="store_true", help="skip the Shapes metrics")
    parser.add_argument("--cache-dir", help="VBench weights (default $VBENCH_CACHE_DIR)")
    parser.add_argument("--store", help="results database (default $M4V_STORE or "
                        "reports/results.duckdb)")
    parser.add_argument("--out", help="where generated videos go")
    parser.add_argument("--name", help="label of the model in the store and table")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed")
    args = parser.parse_args(argv)
    if args.samples is not None and args.samples < 1:
        parser.error(f"--samples: got {args.samples}, expected >= 1")
    if args.prompts and args.videos:
        parser.error("--prompts is for generation; with --videos use --prompt-file")
    if args.prompts and args.suite:
        parser.error("--prompts and --suite are exclusive")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    store = Store(args.store)
    try:
        inputs = _from_folder(args) if args.videos else _from_checkpoint(args, store)
    except (ValueError, FileNotFoundError) as e:  # no checkpoint, a bad prompt list or mapping
        print(f"error: {e}", file=sys.stderr)
        return 1
    if inputs.missing:
        print(f"WARNING: {len(inputs.missing)} expected video(s) missing from {inputs.folder}, "
              f"e.g. {inputs.missing[:3]}: results over an incomplete suite are not comparable")
    if not inputs.items:
        print(f"no video to evaluate in {inputs.folder}")
        return 1
    print(f"{len(inputs.items)} videos of suite {inputs.suite!r} from {inputs.folder}; "
          f"VBench weights from {cache_dir(args.cache_dir)}")
    if inputs.shapes_prompts is not None and not args.no_shapes:
        _shapes_metrics(store, inputs)
    chosen, not_run = _choose_dimensions(args, inputs)
    results = runner.evaluate(inputs.items, chosen, store, inputs.checkpoint, inputs.suite,
                              cache_dir=args.cache_dir, device=args.device)
    runner.summarize(store, inputs.checkpoint, inputs.suite)

    print("\nVBench dimensions:")
    for r in results:
        value = "" if r.aggregate is None else f" {100 * r.aggregate:.2f} ({r.num_videos} videos)"
        print(f"  {r.dimension:<24}{r.status}{value}")
        if r.message:
            print("    " + r.message.replace("\n", "\n    "))
    for line in not_run:
        print(f"  not run: {line}")
    print()
    print(format_table(store, inputs.checkpoint, inputs.suite))
    print(f"\nresults stored in {store.path} (checkpoint {inputs.checkpoint!r}, suite "
          f"{inputs.suite!r})")
    # exit 2 when a dimension failed, or one asked for by name could not run
    fine = {"scored", "up to date", "no videos", "not applicable"}
    if not args.dimensions:
        fine.add("unavailable")  # chosen by weights alone; the message says what else it needs
    return 0 if all(r.status in fine for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
