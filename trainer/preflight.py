"""Preflight: check every rank's GPU, network, data and run folder in seconds, before a long training job.

    ./launch.sh train --preflight -- --train-data D/train --val-data D/val --run-dir R     (the trainer's ranks)
    deepspeed --num_gpus 8 --module trainer.preflight --train-data D/train --run-dir R
    torchrun --nproc_per_node 8 -m trainer.preflight ...      srun python -m trainer.preflight ...
    python -m trainer.preflight --train-data D/train --run-dir R                           (a plain single process)

Why: a cluster job can wait an hour in the queue and then fail in its first minute, on a node whose GPUs the
container cannot see, a network the ranks cannot reach each other over, shards a node cannot read, or a run folder
it cannot write (a read-only or unmounted volume, the wrong owner). Run with the same launcher, nodes and paths as
the training job, the preflight finds each of these in seconds and names the host and rank at fault.

On every rank (the launcher's variables are read by trainer/dist.py, as for the trainer):
- device: the GPU the rank will use (name, free and total memory); a CUDA device file without a usable CUDA device
  (a driver or container problem), a local rank with no GPU of its own, or a GPU already mostly full
  (--min-free-fraction) fails; without GPUs the device is "cpu" (host memory shown), which fails only with
  --require-gpu;
- all-reduce: the process group forms (gloo on CPU, NCCL on GPUs, as the trainer's), every rank gets the right
  sum, and the time of an all-reduce at a few message sizes (--sizes) gives the latency and the bus bandwidth as
  NCCL's tests define it: busbw = algbw * 2 (n - 1) / n, where algbw = bytes / time and n is the world size
  (the slowest rank's time is reported);
- data: for each shard folder given (--train-data, --val-data), the manifest, answers and files are present, and
  the first 2 samples of the rank's first shard (where its share of the data starts) are read through the index:
  every component complete, the json parses, the image decodes;
- run folder (--run-dir): created if missing (as the trainer would), and a test file written, synced, read back
  and deleted; a folder the preflight created is removed again.

Rank 0 gathers every rank's results and prints one table (one row per rank) and the all-reduce table. Exit status:
0 every check passed; 1 a check failed (one `error:` line on stderr names the first failing host, rank and check);
2 bad arguments or launcher variables. Arguments the preflight does not know (the trainer's, e.g. --preset) are
ignored, so that `--preflight` can be added to any training command.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SIZES_GPU = ("1KiB", "1MiB", "64MiB")
DEFAULT_SIZES_CPU = ("1KiB", "1MiB")
SAMPLES_TO_READ = 2
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KIB": 1 << 10,
    "M": 1 << 20,
    "MIB": 1 << 20,
    "G": 1 << 30,
    "GIB": 1 << 30,
}


@dataclass
class Check:
    """One check's outcome on one rank: ok, or the reason it failed (one line)."""

    ok: bool = True
    detail: str = ""


@dataclass
class RankReport:
    host: str
    rank: int
    local_rank: int
    device: str = "?"
    memory: str = "-"
    checks: dict[str, Check] = field(default_factory=dict)
    """check name -> outcome, in the order run: device, data:<folder>, run folder, all-reduce."""
    timings: dict[int, float] = field(default_factory=dict)
    """all-reduce message size in bytes -> mean seconds per all-reduce on this rank."""

    def failures(self) -> list[tuple[str, str]]:
        return [(name, c.detail) for name, c in self.checks.items() if not c.ok]


def parse_size(text: str) -> int:
    """`1KiB`, `64MiB`, `1M`, `4096` -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"not a message size: {text!r} (e.g. 1KiB, 1MiB, 64MiB, 4096)")
    return int(m.group(1)) * _UNITS[unit]


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.preflight",
        description=(
            "Check, on every rank of a job, the GPU and its memory, an all-reduce over the world (latency and bus "
            "bandwidth), reading samples of each shard folder, and writing to the run folder; rank 0 prints one "
            "table. Exit 0 when every check passes, 1 when one fails (one line names the host, rank and check). "
            "Start it with the training job's launcher (deepspeed --module trainer.preflight, torchrun -m, srun, "
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


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f}"


def _host_memory() -> tuple[int, int] | None:
    """(available, total) bytes of host memory: /proc/meminfo's MemAvailable (page cache counts as free)."""
    try:
        info = dict(
            line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
        )
        return int(info["MemAvailable"].split()[0]) * 1024, int(info["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_device(report: RankReport, require_gpu: bool, min_free_fraction: float) -> Any:
    """Fill in the rank's device and memory; returns the torch.device it will use."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if report.local_rank >= count:
            report.device = f"cuda:{report.local_rank}"
            report.checks["device"] = Check(
                False, f"local rank {report.local_rank} but only {count} GPU(s) visible on the host"
            )
            return torch.device("cuda", report.local_rank % count)
        device = torch.device("cuda", report.local_rank)
        torch.cuda.set_device(device)
        free, total = torch.cuda.mem_get_info(device)
        report.device = f"cuda:{device.index} {torch.cuda.get_device_name(device)}"
        report.memory = f"{_gib(free)}/{_gib(total)} GiB free"
        if free < min_free_fraction * total:
            report.checks["device"] = Check(
                False,
                f"{report.device}: only {_gib(free)} of {_gib(total)} GiB free (another process uses the GPU?)",
            )
        else:
            report.checks["device"] = Check()
        return device
    report.device = "cpu"
    host_memory = _host_memory()
    if host_memory:
        report.memory = f"{_gib(host_memory[0])}/{_gib(host_memory[1])} GiB free (host)"
    device_files = sorted(p.name for p in Path("/dev").glob("nvidia[0-9]*"))
    if device_files:
        report.checks["device"] = Check(
            False,
            f"{len(device_files)} GPU device file(s) (/dev/{device_files[0]}, ...) but torch sees no CUDA device "
            f"(a driver or CUDA version mismatch, or a container without the GPU libraries?)",
        )
    elif require_gpu:
        report.checks["device"] = Check(False, "no GPU visible (CUDA_VISIBLE_DEVICES, --gpus, the driver?)")
    else:
        report.checks["device"] = Check()
    return torch.device("cpu")


def read_first_samples(folder_dir: str, rank: int, world_size: int, n: int = SAMPLES_TO_READ) -> str:
    """Read the first `n` samples of the rank's share of a shard folder through its index; a one-line summary.

    The rank's share starts at position N*rank // W of the folder's shards in file order (data_pipeline.sharding);
    raises DataError (or OSError) with one line on anything unreadable.
    """
    from PIL import Image

    from data_pipeline import sharding

    folder = sharding.open_folder(folder_dir)
    start, stop = sharding.rank_range(folder.total, rank, world_size)
    pieces = sharding.segments(list(folder.shards), start, stop)
    if not pieces:
        raise sharding.DataError(
            f"{folder.folder}: {folder.total} samples for {world_size} ranks: none for this one"
        )
    shard, first, last = pieces[0]
    entries = sharding.read_index(shard)[first : min(last, first + n)]
    with open(shard.tar, "rb") as f:
        for i, entry in enumerate(entries, start=first):
            for ext, (offset, size) in entry.items():
                f.seek(offset)
                raw = f.read(size)
                if len(raw) < size:
                    raise sharding.DataError(
                        f"{shard.tar}: sample {i}: its {ext} lies past the end of the file"
                    )
                try:
                    if ext == "json":
                        json.loads(raw)
                    elif ext.lower() in ("jpg", "jpeg", "png", "webp"):
                        with Image.open(io.BytesIO(raw)) as im:
                            im.verify()
                except Exception as exc:  # any decoder's error: the sample is damaged
                    raise sharding.DataError(
                        f"{shard.tar}: sample {i}: its {ext} does not decode ({str(exc).splitlines()[0]})"
                    ) from None
    return f"{shard.tar.name}: {len(entries)} samples"


def check_data(report: RankReport, name: str, folder_dir: str, world_size: int) -> None:
    try:
        read_first_samples(folder_dir, report.rank, world_size)
        report.checks[f"data {name}"] = Check()
    except Exception as exc:  # an unreadable folder fails the check; the message names the file
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        report.checks[f"data {name}"] = Check(False, text)


def check_run_dir(report: RankReport, run_dir: str) -> list[Path]:
    """Create the run folder if missing, write, sync, read back and delete a file; returns the folders created."""
    path = Path(run_dir)
    created: list[Path] = []
    try:
        missing = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        created = [p for p in missing if p.is_dir()]
        probe = path / f".preflight-{report.host}-rank{report.rank}-{uuid.uuid4().hex[:8]}"
        payload = os.urandom(4096)
        with open(probe, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        try:
            if probe.read_bytes() != payload:
                raise OSError(f"{probe}: read back different bytes than written")
        finally:
            probe.unlink()
        report.checks["run folder"] = Check()
    except OSError as exc:
        report.checks["run folder"] = Check(False, f"{path}: not writable ({exc.strerror or exc})")
    return created


def check_all_reduce(report: RankReport, device: Any, sizes: list[int], iters: int) -> None:
    """A correct sum over the world, then the mean time of `iters` all-reduces per size on this rank."""
    import torch
    import torch.distributed as tdist

    from trainer import dist as D

    world = tdist.get_world_size()
    try:
        t = torch.full((256,), float(report.rank + 1), device=device)
        tdist.all_reduce(t)
        expected = world * (world + 1) / 2
        if not bool((t == expected).all()):
            report.checks["all-reduce"] = Check(False, f"wrong sum {t[0].item()} (expected {expected})")
        for size in sizes:
            buf = torch.zeros(max(1, size // 4), dtype=torch.float32, device=device)
            tdist.all_reduce(buf)  # warm-up: the first use of a size sets up buffers and connections
            D.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                tdist.all_reduce(buf)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            report.timings[size] = (time.perf_counter() - start) / iters
        report.checks.setdefault("all-reduce", Check())
    except Exception as exc:  # a collective that fails or times out: the network between the ranks
        report.checks["all-reduce"] = Check(
            False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        )


# -- the report on rank 0 ------------------------------------------------------------------------------------------


def _cell(report: RankReport, prefix: str) -> str:
    checks = [c for name, c in report.checks.items() if name.startswith(prefix)]
    if not checks:
        return "-"
    return "ok" if all(c.ok for c in checks) else "FAIL"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def render(reports: list[RankReport], sizes: list[int], backend: str) -> list[str]:
    hosts = len({r.host for r in reports})
    lines = [f"preflight: {len(reports)} rank(s) on {hosts} host(s), backend {backend}", ""]
    header = "host rank local device memory".split() + ["device ok", "data read", "run folder", "all-reduce"]
    rows = [
        [r.host, str(r.rank), str(r.local_rank), r.device, r.memory]
        + [_cell(r, prefix) for prefix in ("device", "data ", "run folder", "all-reduce")]
        for r in reports
    ]
    lines += _table(header, rows)
    n = len(reports)
    timed = [s for s in sizes if all(s in r.timings for r in reports)]
    if timed:
        lines += [
            "",
            f"all-reduce over {n} rank(s), float32, slowest rank's mean time (busbw = algbw * 2(n-1)/n):",
        ]
        perf = []
        for s in timed:
            t = max(r.timings[s] for r in reports)
            algbw = s / t / 1e9 if t > 0 else float("inf")
            busbw = algbw * 2 * (n - 1) / n
            perf.append([format_size(s), f"{t * 1e6:.1f} us", f"{algbw:.3g} GB/s", f"{busbw:.3g} GB/s"])
        lines += _table(["size", "latency", "algbw", "busbw"], perf)
    failures = [(r, name, detail) for r in reports for name, detail in r.failures()]
    if failures:
        lines += ["", "failures:"]
        lines += [f"  host {r.host} rank {r.rank}: {name}: {detail}" for r, name, detail in failures]
    else:
        lines += ["", "preflight: every check passed"]
    return lines


# -- main ----------------------------------------------------------------------------------------------------------


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

    from trainer import dist as D

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
        import torch.distributed as tdist

        backend = str(tdist.get_backend())
        sizes = _sizes(args, device.type == "cuda")
        check_all_reduce(report, device, sizes, args.iters)
        gathered = D.gather_objects(report)
        verdict = 0
        if info.is_main:
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
        verdict = int(D.broadcast_object(verdict))  # type: ignore[call-overload]
        D.barrier()  # every rank's probe file is gone: the folders made for it can go
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty (the trainer wrote into it meanwhile), or another rank removed it
        return verdict
    finally:
        D.destroy()


if __name__ == "__main__":
    sys.exit(main())
