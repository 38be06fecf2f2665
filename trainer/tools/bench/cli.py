"""`python -m trainer.tools.bench`'s command line and run: the cells asked for, checked; the set-up they share (DeepSpeed
config, the data's answers and tokenizer, the matrix-product peaks); every cell in turn, the report after each."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.errors import is_bad_input
from data_pipeline.loaders.loader import read_answers
from data_pipeline.shards.sharding import read_manifest
from trainer.config.config import VARIANTS, ConfigError, RunConfig, apply_overrides
from trainer.config.presets import PRESETS, get_preset
from trainer.engine import dist as D
from trainer.engine.engine import default_ds_config_path, load_ds_config
from trainer.modeling import text_lengths
from trainer.run import run_folder
from trainer.tools.bench.cells import HF_VILT, Setup, run_cell, synthetic_batch
from trainer.tools.bench.measure import measure_peaks
from trainer.tools.bench.ranks import main as ranks_main
from trainer.tools.bench.report import format_table, new_report, write_report

log = logging.getLogger(__name__)

MODES = ("synthetic", "shards", "plain")
# Without --train-data the model gets VQA v2's answer list size (3,129 answers, as ViLT) and BERT's WordPiece
# vocabulary (30,522 tokens, ViLT's tokenizer); with it, the data's own answers and a vocabulary built from its
# questions, in every mode, so that the three modes time the same model.
DEFAULT_ANSWERS = 3129
DEFAULT_VILT_VOCAB = 30522


def build_tokenizer(cfg: RunConfig, folder: str, work: Path):
    """A vocabulary built from the data's questions (never a pretrained ViLT's: the weights are random here) with
    the CLIP ids every variant may need, by the run folder's own builder."""
    model = dataclasses.replace(cfg.model, vilt_pretrained=None)
    questions = functools.partial(run_folder.shard_questions, folder)
    return run_folder.build_tokenizer(model, work / run_folder.TOKENIZER_DIR, questions, fit_clip_vocab=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.tools.bench",
        description="Training throughput (samples/s, step time, peak memory, model FLOPs utilisation, data wait) of "
        "model variants and image sizes: with batches already on the device (synthetic), from real shards through "
        "the data loader (shards), and without the DeepSpeed engine (plain). One table at the end, the same numbers "
        "in a JSON file.",
    )
    p.add_argument(
        "--preset",
        default="tiny",
        help=f"configuration to start from: {', '.join(sorted(PRESETS))} (default: tiny)",
    )
    p.add_argument(
        "--variants",
        help="comma-separated model variants (default: the preset's); one of " + ", ".join(VARIANTS),
    )
    p.add_argument("--image-sizes", help="comma-separated square image sizes in px (default: the preset's)")
    p.add_argument(
        "--batch-size", type=int, help="samples per optimizer step (default: the preset's micro-batch)"
    )
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per timed window (default: 20)")
    p.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="untimed steps first; the first compiles under model.compile (default: 5)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed windows per cell; the table shows the median (default: 3)",
    )
    p.add_argument(
        "--modes", default=None, help="comma-separated, of synthetic, shards, plain (default: all three with "
        "--train-data, else synthetic,plain); none: only transformers' ViLT (--hf-vilt)",
    )  # fmt: skip
    p.add_argument(
        "--train-data", metavar="DIR", help="shard folder for the shards mode (data_pipeline.convert)"
    )
    p.add_argument(
        "--deepspeed-config", "--deepspeed_config", metavar="FILE",
        help="DeepSpeed JSON (default: deepspeed_configs/stage0_bf16.json on a GPU, stage0_fp32.json on the CPU)",
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override a configuration field, as in trainer/main.py (e.g. model.compile=true, data.num_workers=8); "
        "--variants, --image-sizes and --batch-size win over it",
    )  # fmt: skip
    p.add_argument(
        "--hf-vilt", action="store_true",
        help="also time transformers' ViltForQuestionAnswering (the preset's ViLT shape, random weights, eager) in "
        "the plain mode at each image size: the stock-ViLT reference, in the same run",
    )  # fmt: skip
    p.add_argument(
        "--profile", metavar="DIR",
        help="after each cell's timing, profile --profile-steps more steps with torch.profiler: the operator table "
        "goes to DIR/profile_<variant>_<px>_<mode>.txt, host/device time and host synchronisations per step to the JSON",
    )  # fmt: skip
    p.add_argument(
        "--profile-steps", type=int, default=3, help="steps under the profiler per cell (default: 3)"
    )
    p.add_argument(
        "--peak-size", type=int, help="matrix size of the peak measurement (default 8192 GPU, 512 CPU)"
    )
    p.add_argument(
        "--out",
        default="runs/bench.json",
        metavar="FILE",
        help="the JSON file of the results (default: runs/bench.json)",
    )
    return p


def _csv(raw: str | None, default: list, cast: Callable, what: str) -> list:
    if raw is None:
        return default
    try:
        items = [cast(x.strip()) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: '{raw}' is not a comma-separated list") from None
    if not items:
        raise ConfigError(f"{what}: empty list")
    return items


@dataclasses.dataclass(frozen=True)
class Plan:
    """The cells asked for on the command line, checked."""

    base: RunConfig
    variants: list[str]
    sizes: list[int]
    modes: list[str]
    batch_size: int


def resolve_args(args: argparse.Namespace) -> Plan:
    """The base configuration and the cells asked for; ConfigError on anything that cannot run."""
    base = apply_overrides(get_preset(args.preset), list(args.set))
    variants = _csv(args.variants, [base.model.variant], str, "--variants")
    for v in variants:
        if v not in VARIANTS:
            raise ConfigError(f"--variants: unknown variant '{v}' (one of: {', '.join(VARIANTS)})")
    sizes = _csv(args.image_sizes, [base.model.image_size], int, "--image-sizes")
    default_modes = list(MODES) if args.train_data else ["synthetic", "plain"]
    # `none` times only transformers' ViLT, so that a time-limited caller can run the stock reference on its own.
    modes = [] if args.modes == "none" else _csv(args.modes, default_modes, str, "--modes")
    if not modes and not args.hf_vilt:
        raise ConfigError("--modes none leaves nothing to time: add --hf-vilt (transformers' ViLT)")
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"--modes: unknown mode '{m}' (one of: {', '.join(MODES)})")
    if "shards" in modes and not args.train_data:
        raise ConfigError(
            "--modes shards needs --train-data DIR (a shard folder written by data_pipeline.convert)"
        )
    batch_size = base.train.micro_batch_size if args.batch_size is None else args.batch_size
    counts = {
        "batch-size": batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "profile-steps": args.profile_steps,
    }
    for name, value in counts.items():
        if value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    if any(s < 1 for s in sizes):
        raise ConfigError(f"--image-sizes must be positive, got {sizes}")
    return Plan(base, variants, sizes, modes, batch_size)


def prepare(args: argparse.Namespace, plan: Plan, dist: D.DistInfo, work: Path) -> Setup:
    ds_path = Path(args.deepspeed_config) if args.deepspeed_config else default_ds_config_path(dist.device)
    ds_base = load_ds_config(ds_path)
    bf16 = bool(ds_base.get("bf16", {}).get("enabled", False))
    if ds_base.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"{ds_path}: fp16 is not benchmarked (the project trains in bf16 or fp32)")
    tokenizer, clip_vocab = None, None
    n_answers, vilt_vocab = DEFAULT_ANSWERS, DEFAULT_VILT_VOCAB
    if args.train_data:
        read_manifest(args.train_data)  # fails plainly on a folder that is not a finished shard folder
        n_answers = len(read_answers(args.train_data))
        tokenizer = build_tokenizer(plan.base, args.train_data, work)
        # The text lengths a training run on this data would use (trainer/modeling/text_lengths.py): FLOPs at those shapes.
        plan = dataclasses.replace(
            plan, base=text_lengths.fixed_from_data(plan.base, tokenizer, args.train_data)
        )
        vilt_vocab = tokenizer.vilt_vocab_size
        clip_vocab = tokenizer.clip_vocab
    elif plan.base.model.compact_clip_vocab:
        # Without questions: the ids the synthetic batches use (built only when asked: a batch holds the images too).
        probe = synthetic_batch(
            plan.base,
            n_answers=n_answers,
            vilt_vocab=vilt_vocab,
            batch_size=plan.batch_size,
            device=torch.device("cpu"),
        )
        clip_vocab = sorted(set(probe["clip_ids"].flatten().tolist()))
    peaks, n = measure_peaks(dist.device, bf16, args.peak_size)
    return Setup(
        args,
        plan.base,
        plan.batch_size,
        dist,
        ds_base,
        ds_path,
        bf16,
        n_answers,
        vilt_vocab,
        clip_vocab,
        tokenizer,
        peaks,
        n,
    )


def _logged_cell(
    setup: Setup, variant: str, size: int, mode: str, flops: dict[tuple[str, int], int]
) -> dict[str, Any]:
    log.info("cell: %s, %d px, %s", variant, size, mode)
    r = run_cell(setup, variant, size, mode, flops)
    log.info(
        "  %.1f samples/s, step %.1f ms, MFU %.2f%%, data wait %.1f%%",
        r["samples_per_s"], r["step_time_s"] * 1e3, r["mfu"] * 100, r["data_wait_fraction"] * 100,
    )  # fmt: skip
    return r


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Every cell asked for; the report (see `write_report`) is written after each cell, so that a run stopped at a
    time limit keeps the cells it finished (`"complete": false` until the last one)."""
    plan = resolve_args(args)
    if D.env_world_size() != 1:
        raise ConfigError(
            "trainer.tools.bench runs in one process: start it with python -m trainer.tools.bench, no launcher"
        )
    dist = D.init_distributed()
    with tempfile.TemporaryDirectory(prefix="vqa-bench-") as tmp:
        setup = prepare(args, plan, dist, Path(tmp))
        flops: dict[tuple[str, int], int] = {}
        cells = [(v, size, mode) for v in plan.variants for size in plan.sizes for mode in plan.modes]
        if args.hf_vilt:
            cells += [(HF_VILT, size, "plain") for size in plan.sizes]
        report = new_report(args, argv, setup)
        for variant, size, mode in cells:
            report["results"].append(_logged_cell(setup, variant, size, mode, flops))
            report["complete"] = len(report["results"]) == len(cells)
            write_report(report, Path(args.out))
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--ranks" or a.startswith("--ranks=") for a in argv):
        # Several ranks: the engine's data-parallel modes against torch DDP, in spawned processes (ranks.py).
        return ranks_main(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own message
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("trainer").setLevel(logging.INFO)  # the cells' progress; not open_clip's INFO lines
    try:
        report = run(args, argv)
    except Exception as exc:
        if not is_bad_input(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        D.destroy()
    print(format_table(report))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
