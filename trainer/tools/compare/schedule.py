"""How a comparison shares the machine: `--jobs` runs side by side, each in a slot of its own.

A slot is what one run (its trainer, then its whole-split evaluation) may use:
- on the CPU, `--threads-per-run` threads (default 1): OMP_NUM_THREADS, MKL_NUM_THREADS and the other BLAS/OpenMP
  variables of its processes, which fix torch's intra-op thread count. Models of the demo's size do not scale across
  a process's threads but across processes (README, "Since 2026-12-07 the runs go side by side"), so `--jobs auto`
  runs one run per `--threads-per-run` cores;
- on GPUs, `--gpus-per-run` GPUs (default 1): its own CUDA_VISIBLE_DEVICES and its own rendezvous port
  (`--master-port` + the slot's index), so that concurrent deepspeed launchers neither share a GPU nor a port.

The thread count is the comparison's setting, never the machine's load or the number of runs beside it: a run's
floating-point reductions depend on how many threads split them (the demo's losses differ in the 4th decimal between
1 and 2 threads), so the same command gives the same numbers with `--jobs 1` and `--jobs 4`. results.json records
the setting. The loader's own threads (DALI CPU threads, PyTorch loader workers) are the preset's `data.num_workers`
(1 in the tiny and demo presets) and change no number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Every thread-pool variable of the libraries under torch (OpenMP, MKL, OpenBLAS, BLIS, Accelerate, numexpr).
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


class ScheduleError(ValueError):
    """A --jobs / --gpus-per-run / --threads-per-run combination this host cannot give; the message names it."""


@dataclass(frozen=True)
class Slot:
    index: int
    threads: int
    """Intra-op threads of each of the run's processes."""
    gpus: tuple[int, ...] = ()
    """Local GPU ids of the run (CUDA_VISIBLE_DEVICES); () = a CPU run."""
    port: int | None = None
    """The deepspeed launcher's rendezvous port (GPU runs; a single CPU process picks a free one itself)."""

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of the slot's processes: BASE (default os.environ) with its threads and devices."""
        env = dict(os.environ if base is None else base)
        env.update(dict.fromkeys(THREAD_VARS, str(self.threads)))
        if self.gpus:
            # The slot's GPUs are numbered among those this process sees: under a CUDA_VISIBLE_DEVICES already set
            # (e.g. by Slurm for the job's GPUs), GPU k of the slot is the k-th listed there.
            seen = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(seen[g] if g < len(seen) else str(g) for g in self.gpus)
            env["MASTER_PORT"] = str(self.port)
        return env

    def describe(self) -> str:
        where = f"GPU {','.join(map(str, self.gpus))}, port {self.port}" if self.gpus else "CPU"
        return f"slot {self.index}: {where}, {self.threads} thread{'s' if self.threads > 1 else ''}"


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask, e.g. a Slurm allocation), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call on this platform
        return os.cpu_count() or 1


def parse_jobs(text: str) -> int | None:
    """--jobs: `auto` (None) or a positive count; ValueError with the option's name otherwise."""
    if text == "auto":
        return None
    try:
        jobs = int(text)
    except ValueError:
        raise ValueError(f"--jobs must be auto or a number >= 1, got '{text}'") from None
    if jobs < 1:
        raise ValueError(f"--jobs must be auto or a number >= 1, got {jobs}")
    return jobs


def plan(
    jobs: int | None,
    runs: int,
    *,
    gpus_per_run: int,
    local_gpus: int,
    cpus: int,
    threads_per_run: int = 1,
    base_port: int = 29512,
) -> list[Slot]:
    """The slots of RUNS runs: `jobs` of them (None = as many as the host holds, never more than the runs)."""
    if threads_per_run < 1:
        raise ScheduleError(f"--threads-per-run must be >= 1, got {threads_per_run}")
    if gpus_per_run < 0:
        raise ScheduleError(f"--gpus-per-run must be >= 0, got {gpus_per_run}")
    if gpus_per_run > 0:
        fit = local_gpus // gpus_per_run
        if fit < 1:
            raise ScheduleError(f"--gpus-per-run {gpus_per_run}: this host has {local_gpus} GPU(s)")
        if jobs is not None and jobs > fit:
            raise ScheduleError(
                f"--jobs {jobs} with --gpus-per-run {gpus_per_run} needs {jobs * gpus_per_run} GPUs; this host "
                f"has {local_gpus}"
            )
        n = min(jobs or fit, max(1, runs))
        return [
            Slot(i, threads_per_run, tuple(range(i * gpus_per_run, (i + 1) * gpus_per_run)), base_port + i)
            for i in range(n)
        ]
    n = min(jobs or max(1, cpus // threads_per_run), max(1, runs))
    return [Slot(i, threads_per_run) for i in range(n)]


def oversubscribed(slots: list[Slot], cpus: int) -> bool:
    """CPU runs that together ask for more threads than there are cores (an explicit --jobs beyond the host)."""
    return bool(slots) and not slots[0].gpus and sum(s.threads for s in slots) > cpus
