"""`python -m trainer.tools.compare`'s command line: check the arguments, run every variant and seed, then write
results.json, loss_curves.png and report.md in --run-dir."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from common import atomic
from common.machine import machine
from data_pipeline.convert.subset import subset_record
from data_pipeline.shards import storage
from trainer.config.config import VARIANTS
from trainer.tools.compare.report import plot_results, write_report
from trainer.tools.compare.results import (
    DONE_FILE,
    RESULTS_SCHEMA_VERSION,
    SMOOTH_STEPS,
    CompareError,
    aggregate,
    shown,
    summarise_run,
    validate_results,
)
from trainer.tools.compare.runs import (
    DEFAULT_MASTER_PORT,
    RunSpec,
    Stopped,
    gpus_per_run,
    local_gpu_count,
    prepare_val_subset,
    run_all,
)
from trainer.tools.compare.schedule import oversubscribed, parse_jobs, plan, usable_cpus
from trainer.tools.compare.variants import (
    DUPLICATES_FIELD,
    MODIFIERS,
    SYNTAX,
    VariantError,
    infonce_variants,
    parse_variants,
)

# The paper's three models and the ablation that separates the CLIP tower from the alignment.
DEFAULT_VARIANTS = ("baseline", "clip-no-infonce", "clip-infonce-cos", "clip-infonce-dot")


def machine_description() -> str:
    """The GPUs the runs share, else the CPU (common/machine.py's description)."""
    m = machine(gpus=True)
    if m["gpus"]:
        return f"{len(m['gpus'])} x {m['gpus'][0]}"
    return f"CPU only, {m['cores']} cores ({m['cpu']})"


EPILOG = """variants:
  clip-infonce-dot               the paper's model (3); identical questions of a batch are InfoNCE negatives
  clip-infonce-dot+dup-mask      the same model with loss.duplicate_questions=mask (identical questions masked)
  clip-infonce-cos+dup-positive  model (2) with loss.duplicate_questions=positive (identical questions positives)
A variant with a modifier is also checked against the plain variant it modifies (fewer steps to each loss
threshold, higher whole-split VQA score), under the same noise rule as the paper's claims.

example (the demo: the four default variants, validation every 100 steps on 500 fixed test questions):
  python -m trainer.tools.compare --preset demo --train-data data/easy-vqa/train --val-data data/easy-vqa/test \\
      --run-dir runs/demo --val-subset 500 --val-every 100"""


def subset_summary(folder: str) -> dict[str, Any]:
    """results.json's `val_subset`: the subset folder and its draw (data_pipeline/convert/subset.py's record)."""
    record = subset_record(folder)
    assert record is not None, f"{folder}: prepare_val_subset wrote it"
    return {
        "folder": shown(folder),
        "size": record["count"],
        "seed": record["seed"],
        "of_samples": record["of_samples"],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.tools.compare",
        description="Run the paper's comparison: every variant with the same seeds, data order and hyperparameters; "
        "write results.json, loss_curves.png and report.md in --run-dir.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="demo", help="trainer preset for every run (default: demo)")
    p.add_argument("--train-data", required=True, metavar="DIR", help="training shard folder")
    p.add_argument(
        "--val-data", required=True, metavar="DIR", help="validation shard folder (the whole split)"
    )
    p.add_argument(
        "--run-dir", default="runs/compare", metavar="DIR", help="comparison folder (default runs/compare)"
    )
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        metavar="V1,V2,...",
        help=f"comma-separated variants, each {SYNTAX}: NAME a model variant ({', '.join(VARIANTS)}); MODIFIER "
        f"one of {', '.join(MODIFIERS)}, which sets loss.duplicate_questions to mask or positive for an InfoNCE "
        f"variant ({', '.join(infonce_variants())}), e.g. clip-infonce-dot+dup-mask; run folders, results and "
        f"report use the name as written (default: {','.join(DEFAULT_VARIANTS)})",
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
        "--val-subset",
        type=int,
        default=None,
        metavar="N",
        help="validate during training on a fixed subset of N questions of --val-data (a shard folder written "
        "once in --run-dir, drawn with seed 0), then score each run's last checkpoint on the whole --val-data",
    )
    p.add_argument(
        "--val-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="steps between validations during training (train.eval_every; default: the preset's)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="configuration override for every run (repeatable)",
    )
    p.add_argument(
        "--jobs",
        default="auto",
        metavar="N",
        help="runs side by side (default auto: one per --gpus-per-run GPUs where there are GPUs, else one per "
        "--threads-per-run cores); the numbers of a run do not depend on it",
    )
    p.add_argument(
        "--gpus-per-run",
        "--num-gpus",
        dest="num_gpus",
        type=int,
        default=None,
        metavar="G",
        help="GPUs of each run, under the deepspeed launcher with its own CUDA_VISIBLE_DEVICES "
        "(default: 1 where there are GPUs; 0 = CPU runs)",
    )
    p.add_argument(
        "--threads-per-run",
        type=int,
        default=1,
        metavar="T",
        help="intra-op threads of each run's processes (OMP_NUM_THREADS etc.; default 1); part of what a run's "
        "numbers depend on, recorded in results.json",
    )
    p.add_argument(
        "--master-port",
        type=int,
        default=DEFAULT_MASTER_PORT,
        help="rendezvous port of the deepspeed launcher of the first GPU run; run k of those side by side uses "
        f"this + k, or where that is taken the next free one of its own (default {DEFAULT_MASTER_PORT})",
    )
    p.add_argument(
        "--only",
        default=None,
        metavar="V1,V2,...",
        help="run only these of --variants (with --seeds), e.g. one cell of a study on one node of a cluster "
        "(docs/cluster.md); no report: gather it with --report-only once every cell is done",
    )
    p.add_argument(
        "--report-only", action="store_true", help="only rebuild the outputs from finished runs (run folders)"
    )
    p.add_argument("--quiet", dest="show_progress", action="store_false", help="no live progress bars")
    return p


log = logging.getLogger("trainer.tools.compare")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        parsed = parse_variants(args.variants)
    except VariantError as exc:
        print(f"compare: error: --variants {exc}", file=sys.stderr)
        return 2
    variants = {v.name: v for v in parsed}
    if any(item.split("=", 1)[0].strip() == DUPLICATES_FIELD for item in args.set):
        print(
            f"compare: error: --set {DUPLICATES_FIELD}: give it per variant in --variants "
            f"(e.g. clip-infonce-dot+dup-mask), so that the names say which loss each run had",
            file=sys.stderr,
        )
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        thresholds = [float(t) for t in args.loss_thresholds.split(",")]
    except ValueError:
        print("compare: error: --seeds and --loss-thresholds take comma-separated numbers", file=sys.stderr)
        return 2
    for flag, value in (("--smooth-steps", args.smooth_steps), ("--val-subset", args.val_subset),
                        ("--val-every", args.val_every)):  # fmt: skip
        if value is not None and value < 1:
            print(f"compare: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    for flag, folder in (("--train-data", args.train_data), ("--val-data", args.val_data)):
        if storage.is_remote(folder):
            print(
                f"compare: error: {flag} {folder}: the comparison reads local shard folders only: copy it to "
                "local disk first (e.g. aws s3 sync URL DIR)",
                file=sys.stderr,
            )
            return 2
        if not (Path(folder) / "manifest.json").is_file():
            print(
                f"compare: error: {flag} {folder}: not a shard folder (no manifest.json); convert it with "
                f"python -m data_pipeline.convert",
                file=sys.stderr,
            )
            return 2
    only = None
    if args.only is not None:
        only = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in only if name not in variants]
        if unknown or not only:
            print(
                f"compare: error: --only {args.only}: not among --variants ({', '.join(variants)})",
                file=sys.stderr,
            )
            return 2
        if args.report_only:
            print("compare: error: --only runs cells; --report-only gathers them: give one", file=sys.stderr)
            return 2
    root = Path(args.run_dir)
    specs = [RunSpec(v, s, root / f"{v.name}-seed{s}") for s in seeds for v in parsed]
    todo = [spec for spec in specs if only is None or spec.variant.name in only]
    try:
        slots = plan(
            parse_jobs(args.jobs),
            len(todo),
            gpus_per_run=gpus_per_run(args),
            local_gpus=local_gpu_count(),
            cpus=usable_cpus(),
            threads_per_run=args.threads_per_run,
            base_port=args.master_port,
        )
    except ValueError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    start = time.time()
    try:
        args.subset_dir = None if args.val_subset is None else str(prepare_val_subset(args, root))
        if not args.report_only:
            print(
                f"[compare] {len(todo)} run(s), {len(slots)} at a time: "
                + "; ".join(slot.describe() for slot in slots),
                flush=True,
            )
            if oversubscribed(slots, usable_cpus()):
                log.warning(
                    "--jobs %d x --threads-per-run %d threads on %d cores: the runs slow each other down (their "
                    "numbers stay the same)",
                    len(slots),
                    args.threads_per_run,
                    usable_cpus(),
                )
            failures = run_all(todo, args, slots)
            if failures:
                raise CompareError(
                    f"{len(failures)} of {len(todo)} run(s) failed (the others finished and are kept; the same "
                    f"command retries the failed ones):\n" + "\n".join(failures)
                )
        if only is not None:
            print(f"[compare] done: {', '.join(only)}; the report: the same command with --report-only and without "
                  f"--only once every cell is done", flush=True)  # fmt: skip
            return 0
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for spec in specs:
            if not (spec.run_dir / DONE_FILE).is_file():
                raise CompareError(
                    f"{spec.run_dir}: run not complete; run the comparison without --report-only"
                )
            runs[spec.variant.name].append(
                summarise_run(
                    spec.run_dir, thresholds, args.smooth_steps, full_eval=args.subset_dir is not None
                )
            )
    except CompareError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 1
    except Stopped as exc:
        print(
            f"compare: stopped by {exc}; the same command continues (finished runs are kept, the others resume "
            f"from their last checkpoint in {root})",
            file=sys.stderr,
        )
        return 128 + exc.signum
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "preset": args.preset,
        "steps": args.steps,
        "seeds": seeds,
        "variants_order": list(variants),
        "train_data": shown(args.train_data),
        "val_data": shown(args.val_data),
        "val_subset": None if args.subset_dir is None else subset_summary(args.subset_dir),
        "loss_thresholds": thresholds,
        "smooth_steps": args.smooth_steps,
        # What a run's numbers depend on besides the configuration (schedule.py): threads and GPUs of each run.
        "threads_per_run": args.threads_per_run,
        "gpus_per_run": gpus_per_run(args),
        "jobs": None if args.report_only else len(slots),
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "wall_time_s": sum(r["wall_time_s"] for rs in runs.values() for r in rs)
        if args.report_only
        else time.time() - start,
        "variants": aggregate(runs, thresholds, variants, args.smooth_steps),
    }
    validate_results(results)
    atomic.write_text(root / "results.json", json.dumps(results, indent=2) + "\n")
    plot_results(results, root / "loss_curves.png")
    write_report(results, root / "report.md")
    print(f"[compare] report: {root / 'report.md'}")
    print(f"[compare] watch:  tensorboard --logdir {root}")
    return 0
