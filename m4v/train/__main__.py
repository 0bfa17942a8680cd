"""``python -m m4v.train``: train M4V (or the causal VAE) with resumable checkpoints.

    python -m m4v.train                                   # tiny M4V on the Shapes world
    python -m m4v.train --preset tiny --steps 2000 --run-dir runs/tiny --set lr=5e-4
    python -m m4v.train --run-dir runs/tiny --steps 4000  # continue that run to 4000 steps
    python -m m4v.train --stage vae --set num_frames=9 --run-dir runs/vae
    torchrun --nproc_per_node 8 -m m4v.train --preset small --parallel fsdp --run-dir runs/small

Re-running with the same --run-dir resumes from its latest checkpoint ("resumed from step K");
without --preset the run's stored configuration is the base for the overrides. Overrides:
``--set KEY=VALUE ...`` with dotted keys (``lr=1e-3``, ``model.hidden_size=96``,
``sample.steps=[2,2,2]``; ``--print-config`` shows them all) or the explicit flags below.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from m4v.train.config import TRAIN_PRESETS, parse_override
from m4v.train.metrics import load_sink
from m4v.train.trainer import resolve_run_config, train

# explicit flag -> TrainConfig field
_FLAGS = {
    "steps": int, "stage": str, "lr": float, "batch_size": int, "seed": int,
    "parallel": str, "precision": str, "save_every": int, "log_every": int, "device": str,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m m4v.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(TRAIN_PRESETS),
                        help="starting configuration (default: tiny, or the run's own on resume)")
    parser.add_argument("--run-dir", default="runs/default",
                        help="checkpoints, metrics.jsonl, samples (default: %(default)s)")
    for name, kind in _FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, dest=name)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. lr=1e-3 model.hidden_size=96")
    parser.add_argument("--metrics-sink", action="append", default=[], metavar="MODULE:CALLABLE",
                        help="also send every metrics record to this callable (repeatable)")
    parser.add_argument("--no-samples", action="store_true",
                        help="no sample videos at the end (= --set sample_at_end=false)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as JSON and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of input errors instead of a one-line message")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None):
    args = parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        if args.debug:
            raise
        sys.exit(f"error: {e}")


def _run(args: argparse.Namespace):
    overrides = dict(parse_override(text) for text in args.set)
    for name in _FLAGS:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.no_samples:
        overrides["sample_at_end"] = False
    cfg, _ = resolve_run_config(args.run_dir, args.preset, overrides)
    sinks = [load_sink(spec) for spec in args.metrics_sink]
    if args.print_config:
        print(cfg.to_json())
        return None
    result = train(cfg, args.run_dir, sinks=sinks)
    if int(os.environ.get("RANK", "0")) == 0:
            print(f"run: {result.run_dir}  step {result.step}  checkpoint: {result.checkpoint}  "
              f"metrics: {result.run_dir / 'metrics.jsonl'}", flush=True)
    return result


if __name__ == "__main__":
    main()
