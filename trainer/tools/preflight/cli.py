"""`python -m trainer.tools.preflight`: arguments, the checks on this rank, and the verdict gathered on rank 0."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any

from trainer.tools.preflight.checks import (
    SHARED_CHECK,
    Check,
    RankReport,
    check_all_reduce,
    check_data,
    check_device,
    check_run_dir,
    check_shared_run_dir,
    parse_size,
)
from trainer.tools.preflight.report import render

DEFAULT_SIZES_GPU = ("1KiB", "1MiB", "64MiB")
DEFAULT_SIZES_CPU = ("1KiB", "1MiB")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.tools.preflight",
        description=(
            "Check, on every rank of a job, the GPU and its memory, an all-reduce over the world (latency and bus "
            "bandwidth), reading samples of each shard folder, and writing to the run folder (the same folder on "
            "every rank); rank 0 prints one table. Exit 0 when every check passes, 1 when one fails (one line names the host, rank and check). "
            "Start it with the training job's launcher (deepspeed --module trainer.tools.preflight, torchrun -m, srun, "
            "plain python); ./launch.sh train --preflight does. Unknown arguments are ignored."
        ),
    )
    p.add_argument("--train-data", metavar="DIR", help="a shard folder to read samples from")
    p.add_argument("--val-data", metavar="DIR", help="another shard folder to read samples from")
    p.add_argument(
        "--run-dir", metavar="DIR", help="the run folder to check for writing (created if missing)"
    )
    default_sizes = f"{' '.join(DEFAULT_SIZES_GPU)} on GPUs, {' '.join(DEFAULT_SIZES_CPU)} on CPU"
    sizes_help = f"all-reduce message sizes (commas also separate); default {default_sizes}"
    p.add_argument("--sizes", nargs="+", metavar="SIZE", help=sizes_help)
    p.add_argument("--iters", type=int, default=5, help="timed all-reduces per size after a warm-up (5)")
    p.add_argument(
        "--require-gpu", action="store_true", help="fail on a rank without a GPU (default: CPU is ok)"
    )
    free_help = "fail when less than this fraction of a GPU's memory is free (default 0.5)"
    p.add_argument("--min-free-fraction", type=float, default=0.5, help=free_help)
    timeout_help = "give up on the rendezvous or a collective after this long (default 300)"
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help=timeout_help)
    local_help = "set by the deepspeed/torch launchers; the LOCAL_RANK environment variable takes precedence"
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=local_help)
    return p


# -- the checks of one rank ----------------------------------------------------------------------------------------


def _sizes(args: argparse.Namespace, on_gpu: bool) -> list[int]:
    words = args.sizes or (DEFAULT_SIZES_GPU if on_gpu else DEFAULT_SIZES_CPU)
    return [parse_size(w) for word in words for w in word.split(",") if w.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, _ignored = parser.parse_known_args(argv)
        if args.sizes:
            _sizes(args, True)  # refuse a bad size here, on every rank, before anything starts
        if args.iters < 1:
            parser.error("--iters must be at least 1")
    except argparse.ArgumentTypeError as exc:
        print(f"error: --sizes: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, or argparse's own message
        return int(exc.code or 0)

    # trainer.engine.dist and torch.distributed are imported after the arguments are parsed, here and below: --help does not
    # load torch.
    from trainer.engine import dist as D

    try:
        launch = D.world_info_from_env(local_rank_arg=args.local_rank)
    except D.LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = socket.gethostname()
    if _ignored and launch.rank == 0:
        print(f"preflight: ignoring arguments it does not use: {' '.join(_ignored)}", file=sys.stderr)
    report = RankReport(host=host, rank=launch.rank, local_rank=launch.local_rank)

    # The checks that need no other rank come first: they are reported even when the ranks cannot meet.
    device = check_device(report, args.require_gpu, args.min_free_fraction)
    for name, folder in (("train", args.train_data), ("val", args.val_data)):
        if folder:
            check_data(report, name, folder, launch.world_size)
    created = check_run_dir(report, args.run_dir) if args.run_dir else []

    try:
        info = D.init_distributed(timeout_s=args.timeout, local_rank_arg=args.local_rank)
    except D.LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the rendezvous failed: no table, this rank's own line
        print(
            f"error: preflight failed on host {host} rank {launch.rank}: rendezvous at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: {str(exc).splitlines()[0]}",
            file=sys.stderr,
        )
        return 1
    try:
        return _checks_over_the_world(args, report, device, info.world_size, info.is_main, created)
    finally:
        D.destroy()


def _checks_over_the_world(
    args: argparse.Namespace,
    report: RankReport,
    device: Any,
    world_size: int,
    is_main: bool,
    created: list[Path],
) -> int:
    """The checks that need the other ranks (the run folder shared, the all-reduce), the verdict, then the removal
    of the folders this rank made for its probe; the exit status."""
    import torch.distributed as tdist

    from trainer.engine import dist as D

    sizes = _sizes(args, device.type == "cuda")
    if args.run_dir and world_size > 1:
        try:
            check_shared_run_dir(report, args.run_dir, is_main)
        except Exception as exc:  # the collective itself failed: the all-reduce check says more
            report.checks[SHARED_CHECK] = Check(
                False, f"cannot compare with rank 0: {str(exc).splitlines()[0]}"
            )
    check_all_reduce(report, device, sizes, args.iters)
    verdict = _verdict(report, sizes, str(tdist.get_backend()), is_main)
    D.barrier()  # every rank's probe file is gone: the folders made for it can go
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (the trainer wrote into it meanwhile), or another rank removed it
    return verdict


def _verdict(report: RankReport, sizes: list[int], backend: str, is_main: bool) -> int:
    """Every rank's report to rank 0, which prints the tables and the first failure; the exit status, on every rank."""
    from trainer.engine import dist as D

    gathered = D.gather_objects(report)
    verdict = 0
    if is_main:
        assert gathered is not None
        reports: list[RankReport] = gathered  # type: ignore[assignment]
        print("\n".join(render(reports, sizes, backend)), flush=True)
        failures = [(r, name, detail) for r in reports for name, detail in r.failures()]
        if failures:
            r, name, detail = failures[0]
            more = f" (and {len(failures) - 1} more, listed above)" if len(failures) > 1 else ""
            print(
                f"error: preflight failed on host {r.host} rank {r.rank}: {name}: {detail}{more}",
                file=sys.stderr,
            )
            verdict = 1
    return int(D.broadcast_object(verdict))  # type: ignore[call-overload]
