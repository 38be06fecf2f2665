"""The benchmark's measurements: matrix-product peaks, the FLOPs of one training step, peak memory, the timed windows
of a cell and the profiler. Nothing here builds a model or an engine: an engine is anything with train, forward,
backward and step (trainer.engine.engine.Engine, trainer.engine.plain.PlainEngine)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    device: torch.device, dtype: torch.dtype, n: int, *, reps: int, budget_s: float = 2.0
) -> float:
    """The best FLOP/s of `reps` back-to-back n x n @ n x n products in `dtype`, timed again and again for `budget_s`
    seconds (at least 3 times). A fixed number of short trials is not enough: a CPU's first products run at a
    fraction of its peak (thread pool start, clock ramp; docs/performance.md, "Figures behind choices in the code"),
    which made the MFU column read over 100%. On a shared machine
    the best timing is the peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # kernel selection, allocation
    synchronize(device)
    best, start, trial = 0.0, time.perf_counter(), 0
    while trial < 3 or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
        trial += 1
    return best


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_step_flops(
    task: torch.nn.Module, batch: dict[str, Any], *, autocast: torch.dtype | None = None
) -> int:
    """FLOPs of one forward + backward of `task` on `batch` (FlopCounterMode); the gradients are dropped after.

    torch's counter knows the CUDA attention kernels but not the CPU one that `scaled_dot_product_attention` runs on
    the CPU: it is counted here with torch's own attention formulas, so the CPU figure covers attention too.
    """
    aten = torch.ops.aten
    counter = FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
        },
    )
    device_type = batch["pixels"].device.type
    with counter, torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        task(batch)["loss"].backward()
    task.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


class PeakMemory:
    """CUDA max allocated on a GPU; the process's peak resident set (VmHWM) on the CPU, reset through clear_refs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.label = "CUDA max allocated" if device.type == "cuda" else "process peak RSS (VmHWM)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # "5" resets the peak resident set size of this process (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.label = "process peak RSS since start (ru_maxrss: VmHWM could not be reset)"

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            status = Path("/proc/self/status").read_text()
            match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
            if match and "ru_maxrss" not in self.label:
                return int(match.group(1)) * 1024
        except OSError:
            pass
        self.label = "process peak RSS since start (ru_maxrss)"
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# Host-device synchronisations as the profiler names them: each one stalls the host until the GPU catches up.
_SYNC_EVENTS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "aten::_local_scalar_dense",
)


def profile_steps(engine: Any, batches: Any, n: int, device: torch.device, out: Path) -> dict[str, Any]:
    """`n` more steps under torch.profiler; the operator table (self device time first on a GPU) goes to `out`.

    Returns what the table shows in numbers: host (CPU) time and device time per step from the profiler's own
    totals, and the host synchronisations per step, the ones that keep the host from running ahead of the GPU.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        train_steps(engine, batches, n)
        synchronize(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = [
        f"{n} steps, {wall / n * 1e3:.1f} ms per step under the profiler",
        events.table(sort_by=sort, row_limit=30),
    ]
    if device.type == "cuda":
        tables.append(events.table(sort_by="self_cpu_time_total", row_limit=20))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(tables) + "\n")
    # Kernels are events of their own (device_type CUDA); the operators that launch them carry the same time again.
    kernels = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    device_us = sum(e.self_device_time_total for e in kernels)
    syncs = {e.key: e.count / n for e in events if e.key in _SYNC_EVENTS}
    return {
        "file": str(out),
        "steps": n,
        "wall_s_per_step": wall / n,
        "device_busy_s_per_step": device_us / 1e6 / n,
        "syncs_per_step": syncs,
    }


def train_steps(engine: Any, batches: Any, n: int) -> float:
    """`n` optimizer steps (one micro-batch each); returns the seconds spent waiting for batches."""
    wait = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        out = engine.forward(batch)
        engine.backward(out["loss"])
        engine.step()
    return wait


@dataclasses.dataclass
class Timing:
    first_step_s: float
    windows: list[dict[str, float]]
    peak_memory_bytes: int
    memory_measure: str
    epoch_restarts: int
    """Loader epochs begun during the timed windows: each rebuilds the loader inside the timing."""


def time_engine(
    engine: Any, batches: Any, *, batch_size: int, args: argparse.Namespace, device: torch.device
) -> Timing:
    """The first step (compilation, allocator and loader start-up), the rest of the warm-up, then the windows."""
    memory = PeakMemory(device)
    engine.train(True)
    synchronize(device)
    t0 = time.perf_counter()
    train_steps(engine, batches, 1)
    synchronize(device)
    first = time.perf_counter() - t0
    train_steps(engine, batches, args.warmup - 1)
    synchronize(device)
    memory.reset()
    epochs = batches.epochs_started
    windows = []
    for _ in range(args.repeats):
        synchronize(device)
        t0 = time.perf_counter()
        wait = train_steps(engine, batches, args.steps)
        synchronize(device)
        elapsed = time.perf_counter() - t0
        windows.append(
            {
                "samples_per_s": args.steps * batch_size / elapsed,
                "step_time_s": elapsed / args.steps,
                "data_wait_fraction": min(1.0, wait / elapsed),
            }
        )
    return Timing(first, windows, memory.read(), memory.label, batches.epochs_started - epochs)


def mfu_basis(device: torch.device, precision: str, peaks: dict[str, float]) -> str:
    """Which measured peak a cell's MFU divides by: its own precision's on a GPU; on the CPU the fastest measured
    one (a CPU without bf16 units emulates bf16 products, slower than fp32: no peak for bf16 work, which may run
    partly in fp32 kernels)."""
    if device.type == "cuda":
        return precision
    return max(peaks, key=lambda name: peaks[name])


def measure_peaks(device: torch.device, bf16: bool, size: int | None) -> tuple[dict[str, float], int]:
    """Matrix-product peaks: bf16 (and fp32 where the cells run in fp32) on a GPU; fp32 and bf16 on the CPU."""
    n = size or (8192 if device.type == "cuda" else 512)
    reps = 20 if device.type == "cuda" else 2
    dtypes = ["bf16"] + ([] if bf16 and device.type == "cuda" else ["fp32"])
    table = {"bf16": torch.bfloat16, "fp32": torch.float32}
    return {name: matmul_peak(device, table[name], n, reps=reps) for name in dtypes}, n
