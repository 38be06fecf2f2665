"""Environments without any launcher's variables, for tests that start or imitate launchers themselves."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "MPI_LOCAL")
TORCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any launcher's variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in TORCH_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    return {**env, **(extra or {})}


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    """Wait for every process within one deadline; kill what is left (a hang fails the test instead of the suite)."""
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    return [p.returncode for p in procs]


def wait_for_output(proc: subprocess.Popen, log: Path, needle: str, timeout_s: float) -> str:
    """Wait until `needle` appears in `log`, the file the process writes its output to, and return the log so far.
    The file is polled, so the deadline holds whether or not output arrives (a loop over a pipe's lines would wait
    for the next line before looking at the clock); fails if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if needle in text:
            return text
        assert proc.poll() is None, (
            f"exited with {proc.returncode} before printing {needle!r}:\n{text[-5000:]}"
        )
        assert time.monotonic() < deadline, f"no {needle!r} within {timeout_s:.0f} s:\n{text[-5000:]}"
        time.sleep(0.2)


def running_in_group(pgid: int) -> list[int]:
    """Running processes (not zombies) of the process group `pgid`: a process started with start_new_session=True
    leads its own group, and its children (launched ranks, loader workers) stay in it, even once orphaned."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def wait_group(proc: subprocess.Popen, timeout_s: float) -> int:
    """Wait, polling, until the process started with start_new_session=True and every process of its group have
    exited (a launcher may exit before the ranks it started); returns its exit status. Fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None or running_in_group(proc.pid):
        left = running_in_group(proc.pid)
        assert time.monotonic() < deadline, (
            f"processes {left} of group {proc.pid} still run after {timeout_s:.0f} s"
        )
        time.sleep(0.2)
    return proc.returncode
