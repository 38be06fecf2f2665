"""The checks one rank runs (device, data, run folder, all-reduce), each recorded in its `RankReport`."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_pipeline.shards import sharding, storage

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
    """check name -> outcome, in the order run: device, data <folder>, run folder, run folder (shared),
    all-reduce."""
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
    # torch and trainer.engine.dist (torch) are imported where a check needs them, here and below: `python -m
    # trainer.tools.preflight --help` does not load torch.
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

    The rank's share starts at position N*rank // W of the folder's shards in file order (data_pipeline.shards.sharding);
    raises DataError (or OSError) with one line on anything unreadable.
    """
    folder = sharding.open_folder(folder_dir)
    start, stop = sharding.rank_range(folder.total, rank, world_size)
    pieces = sharding.segments(list(folder.shards), start, stop)
    if not pieces:
        raise sharding.DataError(
            f"{folder.folder}: {folder.total} samples for {world_size} ranks: none for this one"
        )
    shard, first, last = pieces[0]
    entries = sharding.read_index(shard)[first : min(last, first + n)]
    parts = [(i, ext, span) for i, entry in enumerate(entries, start=first) for ext, span in entry.items()]
    # Ranged reads: seeks in a local file, range requests for a folder in object storage (s3://).
    for (i, ext, (_, size)), raw in zip(
        parts, storage.read_ranges(shard.tar, [p[2] for p in parts]), strict=True
    ):
        if len(raw) < size:
            raise sharding.DataError(f"{shard.tar}: sample {i}: its {ext} lies past the end of the file")
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
        # The checkpoints go into checkpoints/, which can be a link elsewhere (one to nothing) or a read-only mount:
        # the trainer's own start refuses those too (trainer/run/run_folder.py `write_problem`).
        from trainer.run.run_folder import RunFolder

        problem = RunFolder(path).write_problem()
        report.checks["run folder"] = (
            Check() if problem is None else Check(False, f"checkpoints cannot be written: {problem}")
        )
    except OSError as exc:
        report.checks["run folder"] = Check(False, f"{path}: not writable ({exc.strerror or exc})")
    return created


SHARED_CHECK = "run folder (shared)"
SHARED_PROBE = ".preflight-shared-"


def _read_probe(path: Path, wait_s: float) -> bytes | None:
    """The file's bytes, waiting up to `wait_s` for it to appear (a shared filesystem may show it a moment late)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)


def check_shared_run_dir(report: RankReport, run_dir: str, is_main: bool, wait_s: float = 2.0) -> None:
    """Every rank sees the same run folder: rank 0 writes a probe file with a random token into its --run-dir, and
    every rank reads it back from its own. A rank that does not find it has a folder of its own at that path (a
    node's local disk instead of one shared filesystem), where each node would write its part of every checkpoint:
    the checkpoints would be split between the nodes and no node could resume. A collective over the world; no
    entry where a rank's run folder already failed its own check, or rank 0's did."""
    from trainer.engine import dist as D

    token = uuid.uuid4().hex
    probe = Path(run_dir) / f"{SHARED_PROBE}{token[:12]}"
    own_ok = report.checks.get("run folder", Check(False)).ok
    written = None
    if is_main and own_ok:
        try:
            with open(probe, "w") as f:
                f.write(token)
                f.flush()
                os.fsync(f.fileno())
            written = (probe.name, token)
        except OSError as exc:
            report.checks[SHARED_CHECK] = Check(
                False, f"{run_dir}: cannot write a probe ({exc.strerror or exc})"
            )
    shared = D.broadcast_object(written)  # after rank 0's write: what every rank must now find
    if shared is not None and own_ok:
        name, expected = shared  # type: ignore[misc]
        seen = _read_probe(Path(run_dir) / name, wait_s)
        report.checks[SHARED_CHECK] = (
            Check()
            if seen == expected.encode()
            else Check(
                False,
                f"{run_dir}: rank 0's probe file {name} is not there: the run folder is not shared between nodes, "
                f"so each node would keep its own part of every checkpoint (split checkpoints, no resume); mount "
                f"one shared filesystem at the same path on every node",
            )
        )
    D.barrier()  # every rank has looked: the probe can go
    if written is not None:
        probe.unlink(missing_ok=True)


def check_all_reduce(report: RankReport, device: Any, sizes: list[int], iters: int) -> None:
    """A correct sum over the world, then the mean time of `iters` all-reduces per size on this rank."""
    import torch
    import torch.distributed as tdist

    from trainer.engine import dist as D

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
