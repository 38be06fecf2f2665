"""`python -m trainer.tools.bench --ranks N`: the DeepSpeed engine's data-parallel modes against plain torch DDP, on N ranks
in one run.

    python -m trainer.tools.bench --ranks 2 --preset demo                       (the CPU: 2 gloo ranks, spawned here)
    python -m trainer.tools.bench --ranks 8 --preset vqa2-base --batch-size 256 --set model.compile=true     (8 GPUs, NCCL)

It spawns N processes (gloo on the CPU, NCCL on GPUs, one GPU per rank). Each builds every cell's engine on the same
task (same seed, same weights) and its own synthetic batch of `--batch-size` samples (the preset's global batch / N by
default), so that every cell trains the same model on the same global batch in the same precision:

- `stage0-overlap`: the default, deepspeed_configs/stage0_*.json: ZeRO stage 0, the gradient all-reduce overlapped
  with backward in buckets (trainer/engine/grad_sync.py); `stage0-overlap-bf16`: the same with `communication_data_type` bf16;
- `stage0-after-backward`: the same file with `overlap_comm` false: DeepSpeed's own stage-0 all-reduce after backward;
- `zero1`, `zero2`: zero1_*.json, zero2_*.json (ZeRO-2 was the multi-rank default before the stage-0 one);
- `ddp`: no DeepSpeed: torch's DistributedDataParallel (the default's bucket size, gradients as bucket views), the
  same fused AdamW and schedule (trainer/engine/plain.py), autocast bf16 where the engine computes in bf16.

`*_fp32.json` on the CPU, `*_bf16.json` on GPUs. After `--warmup` steps of each, `--repeats` rounds of `--steps`
steps per cell are timed, the cells taking turns step by step (A B C A B C ...: on a shared machine a slow spell hits
every cell alike); each step is timed from a barrier to its end, the slowest rank's. The table shows the median round
and the spread; "vs DDP" is the median over the rounds of each round's ratio to DDP's, and the CPU time per step (all
threads of a rank) is reported beside the wall time: it hardly depends on the machine's other load. Then each cell runs
`--profile-steps` steps under torch.profiler (communication, its overlap with backward, host work per step:
trainer/tools/bench/hostwork.py) and one step counting the Python calls of the autograd engine. Logging steps (the
engine's gradient norm) are not part of it: every step here is a non-logging step. Rank 0 writes the JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from common.errors import is_bad_input
from trainer.config.config import ConfigError
from trainer.config.presets import get_preset
from trainer.engine import dist as D
from trainer.tools.bench.ranks_report import format_table

CELLS = ("stage0-overlap", "ddp", "zero2", "stage0-overlap-bf16", "stage0-after-backward", "zero1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.tools.bench --ranks N",
        description="The DeepSpeed engine's data-parallel modes and plain torch DDP on N ranks, interleaved: "
        "samples/s, time in gradient all-reduce and how much of it overlaps backward, host work per step.",
    )
    p.add_argument(
        "--ranks", type=int, required=True, help="processes to spawn (>= 2): gloo on CPU, one GPU each"
    )
    p.add_argument("--preset", default="demo", help="configuration to start from (default: demo)")
    p.add_argument("--variant", help="model variant (default: the preset's)")
    p.add_argument("--image-size", type=int, help="image size in px (default: the preset's)")
    p.add_argument(
        "--batch-size", type=int, help="samples per rank per step (default: preset's global batch / N)"
    )
    p.add_argument(
        "--answers",
        type=int,
        default=3129,
        help="answers of the head (default 3,129, VQA v2's; easy-VQA: 13)",
    )
    p.add_argument(
        "--vocab",
        type=int,
        help="ViLT's WordPiece vocabulary (default: the preset's model.wordpiece_vocab_size)",
    )
    p.add_argument(
        "--cells", default=",".join(CELLS), help=f"comma-separated, of {', '.join(CELLS)} (default: all)"
    )
    p.add_argument("--steps", type=int, default=5, help="steps per timed window (default: 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per cell first (default: 3)")
    p.add_argument("--repeats", type=int, default=3, help="windows per cell, interleaved (default: 3)")
    p.add_argument(
        "--profile-steps", type=int, default=2, help="steps under the profiler per cell (default: 2)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override"
    )
    p.add_argument("--out", default="runs/bench_ranks.json", metavar="FILE", help="the JSON report")
    return p


def _checked(args: argparse.Namespace) -> list[str]:
    if args.ranks < 2:
        raise ConfigError(f"--ranks must be >= 2, got {args.ranks} (one rank: python -m trainer.tools.bench)")
    if torch.cuda.is_available() and torch.cuda.device_count() < args.ranks:
        raise ConfigError(f"--ranks {args.ranks}: this host has {torch.cuda.device_count()} GPUs")
    for name in ("steps", "warmup", "repeats", "profile_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        raise ConfigError(f"--cells: unknown cell(s) {unknown or args.cells!r} (of: {', '.join(CELLS)})")
    return cells


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    args.argv = list(argv)
    try:
        cells = _checked(args)
        get_preset(args.preset)  # a bad preset fails here, once, not in every rank
    except Exception as exc:
        if not is_bad_input(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.spawn(_rank_main, args=(args, cells, port), nprocs=args.ranks, join=True)
    report = json.loads(Path(args.out).read_text())
    print(format_table(report))
    print(f"results: {args.out}")
    return 0


def _rank_main(rank: int, args: argparse.Namespace, cells: list[str], port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(args.ranks), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(args.ranks),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    if not torch.cuda.is_available():
        # The ranks share the host's cores: one thread each on 2 cores, as `deepspeed --num_gpus 2` on CPU runs them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks))
    # Here, not at the top: trainer.tools.bench.ranks_cells imports this module.
    from trainer.tools.bench.ranks_cells import run_rank

    dist = D.init_distributed()
    try:
        report = run_rank(args, cells, dist)
        if dist.is_main:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    finally:
        D.destroy()


def summarise_windows(windows: list[float], global_batch: int) -> dict[str, Any]:
    """Median samples/s of the windows' step times (the slowest rank's), and the spread."""
    sps = [global_batch / t for t in windows]
    return {
        "samples_per_s": statistics.median(sps),
        "samples_per_s_windows": sps,
        "spread": (max(sps) - min(sps)) / statistics.median(sps),
        "step_time_s": statistics.median(windows),
    }


def now() -> float:
    return time.perf_counter()
