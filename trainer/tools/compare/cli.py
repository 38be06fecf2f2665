"""`python -m trainer.compare`'s command line: check the arguments, run every variant and seed, then write
results.json, loss_curves.png and report.md in --run-dir."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from data_pipeline import atomic
from trainer.tools.compare.report import plot, write_report
from trainer.tools.compare.results import (
    DONE_FILE,
    RESULTS_SCHEMA_VERSION,
    SMOOTH_STEPS,
    CompareError,
    aggregate,
    summarise_run,
    validate_results,
)
from trainer.tools.compare.runs import RunSpec, run_one

DEFAULT_VARIANTS = ("baseline", "clip-infonce-cos", "clip-infonce-dot")


def machine_description() -> str:
    import platform

    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001
        pass
    return f"CPU only, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.compare",
        description="Run the paper's comparison: every variant with the same seeds, data order and hyperparameters; "
        "write results.json, loss_curves.png and report.md in --run-dir.",
    )
    p.add_argument("--preset", default="demo", help="trainer preset for every run (default: demo)")
    p.add_argument("--train-data", required=True, metavar="DIR", help="training shard folder")
    p.add_argument("--val-data", required=True, metavar="DIR", help="validation shard folder")
    p.add_argument(
        "--run-dir", default="runs/compare", metavar="DIR", help="comparison folder (default runs/compare)"
    )
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated model variants (default: {','.join(DEFAULT_VARIANTS)}; also clip-no-infonce)",
    )
    p.add_argument(
        "--steps", type=int, default=None, metavar="N", help="optimizer steps per run (default: preset's)"
    )
    p.add_argument(
        "--seeds", default="0", help="comma-separated seeds, each run for every variant (default: 0)"
    )
    p.add_argument(
        "--loss-thresholds",
        default="2.0,1.5,1.0",
        help="VQA-loss levels for 'steps to stay under' (default: 2.0,1.5,1.0)",
    )
    p.add_argument(
        "--smooth-steps",
        type=int,
        default=SMOOTH_STEPS,
        metavar="N",
        help=f"width of the centred smoothing window in training steps (default: {SMOOTH_STEPS})",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="configuration override for every run (repeatable)",
    )
    p.add_argument(
        "--num-gpus", type=int, default=None, help="GPUs per run (default: all local GPUs; 0 = CPU)"
    )
    p.add_argument("--master-port", type=int, default=29512, help="rendezvous port of the deepspeed launcher")
    p.add_argument("--report-only", action="store_true", help="only rebuild the outputs from finished runs")
    p.add_argument("--quiet", dest="show_progress", action="store_false", help="no live progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from trainer.config import VARIANTS

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        print(
            f"compare: error: --variants: unknown {unknown} (one of: {', '.join(VARIANTS)})", file=sys.stderr
        )
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        thresholds = [float(t) for t in args.loss_thresholds.split(",")]
    except ValueError:
        print("compare: error: --seeds and --loss-thresholds take comma-separated numbers", file=sys.stderr)
        return 2
    if args.smooth_steps < 1:
        print(f"compare: error: --smooth-steps must be >= 1, got {args.smooth_steps}", file=sys.stderr)
        return 2
    for flag, folder in (("--train-data", args.train_data), ("--val-data", args.val_data)):
        if not (Path(folder) / "manifest.json").is_file():
            print(
                f"compare: error: {flag} {folder}: not a shard folder (no manifest.json); convert it with "
                f"python -m data_pipeline.convert",
                file=sys.stderr,
            )
            return 2
    root = Path(args.run_dir)
    specs = [RunSpec(v, s, root / f"{v}-seed{s}") for s in seeds for v in variants]
    start = time.time()
    try:
        if not args.report_only:
            for spec in specs:
                run_one(spec, args)
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for spec in specs:
            if not (spec.run_dir / DONE_FILE).is_file():
                raise CompareError(
                    f"{spec.run_dir}: run not complete; run the comparison without --report-only"
                )
            runs[spec.variant].append(summarise_run(spec.run_dir, thresholds, args.smooth_steps))
    except CompareError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 1
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "preset": args.preset,
        "steps": args.steps,
        "seeds": seeds,
        "variants_order": variants,
        "train_data": args.train_data,
        "val_data": args.val_data,
        "loss_thresholds": thresholds,
        "smooth_steps": args.smooth_steps,
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "wall_time_s": sum(r["wall_time_s"] for rs in runs.values() for r in rs)
        if args.report_only
        else time.time() - start,
        "variants": aggregate(runs, thresholds),
    }
    validate_results(results)
    atomic.write_text(root / "results.json", json.dumps(results, indent=2) + "\n")
    plot(runs, root / "loss_curves.png", args.smooth_steps)
    write_report(results, root / "report.md")
    print(f"[compare] report: {root / 'report.md'}")
    print(f"[compare] watch:  tensorboard --logdir {root}")
    return 0
