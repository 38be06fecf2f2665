"""What a training step does besides the model's own arithmetic, read from a torch.profiler trace of a few steps and
from the Python calls the autograd engine makes: for the multi-rank benchmark (trainer/tools/bench/ranks.py).

- Communication: the collectives' own intervals. On the CPU (gloo) each collective runs on gloo's worker thread as a
  `gloo:<op>` event; on a GPU (NCCL) as an `nccl...` kernel on the device. Gradient reduction is every all-reduce,
  reduce-scatter and reduce (this includes the InfoNCE loss's reduce-scatter in backward, one small call a step);
  all-gathers (the loss's global negatives in forward, ZeRO's weights after the step) are reported apart.
- Overlap with backward: the part of the gradient reduction's time that falls inside backward's own computation. On
  the CPU that computation is the span from the start of each step's backward (a `bench:backward` range around the
  engine's backward) to the end of the last autograd node it ran (`autograd::engine::evaluate_function: ...`): what
  comes after it, e.g. the wait for the last bucket or DeepSpeed's all-reduce after backward, is exposed. On a GPU it
  is the time when a non-communication kernel runs at the same time.
- Host work per step: per-tensor norms (`aten::linalg_vector_norm`, `aten::norm`; torch's foreach norm, one call over
  all gradients, is counted apart), gradient copies (`aten::copy_`), host reads of device values
  (`aten::_local_scalar_dense`) and device synchronisations.
- Python hooks: every Python function the autograd engine itself calls during backward (a tensor or parameter hook,
  or a Python autograd Function's backward), counted with `sys.setprofile` over one step: torch.profiler does not
  record Python calls without its stack tracer. The names are kept, so that a per-parameter hook shows as one name
  with hundreds of calls.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable
from typing import Any

import torch

BACKWARD_RANGE = "bench:backward"
_NODE_PREFIX = "autograd::engine::evaluate_function"
_NORMS = ("aten::linalg_vector_norm", "aten::norm")
_SYNCS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "aten::_local_scalar_dense",
)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two interval unions."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _is_comm(name: str) -> bool:
    return name.startswith("gloo:") or "nccl" in name.lower()


def _is_reduction(name: str) -> bool:
    low = name.lower()
    return _is_comm(name) and "reduce" in low and "all_gather" not in low and "allgather" not in low


def _backward_compute(events: list[Any]) -> list[tuple[float, float]]:
    """Each step's backward computation on the host: its `bench:backward` range up to its last autograd node."""
    ranges = [e for e in events if e.name == BACKWARD_RANGE]
    nodes = [e for e in events if e.name.startswith(_NODE_PREFIX)]
    spans = []
    for r in ranges:
        start, end = r.time_range.start, r.time_range.end
        last = max((n.time_range.end for n in nodes if start <= n.time_range.start <= end), default=start)
        spans.append((start, last))
    return _union(spans)


def analyse(prof: Any, steps: int, device: torch.device) -> dict[str, Any]:
    """Communication, its overlap with backward, and host work per step, from a profile of `steps` steps."""
    events = list(prof.events())
    on_device = device.type == "cuda"
    if on_device:
        kernels = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
        comm = [e for e in kernels if _is_comm(e.name)]
        compute = _union([(e.time_range.start, e.time_range.end) for e in kernels if not _is_comm(e.name)])
    else:
        comm = [e for e in events if _is_comm(e.name)]
        compute = _backward_compute(events)
    reduction = _union([(e.time_range.start, e.time_range.end) for e in comm if _is_reduction(e.name)])
    gathers = _union([(e.time_range.start, e.time_range.end) for e in comm if not _is_reduction(e.name)])
    overlapped = _intersection(reduction, compute)
    reduce_us = _length(reduction)
    per_op = collections.Counter(e.name for e in comm)
    counts = collections.Counter(e.name for e in events)
    return {
        "reduction_ms_per_step": reduce_us / 1e3 / steps,
        "reduction_overlapped_ms_per_step": overlapped / 1e3 / steps,
        "reduction_overlap_fraction": overlapped / reduce_us if reduce_us else 0.0,
        "other_collectives_ms_per_step": _length(gathers) / 1e3 / steps,
        "collective_calls_per_step": {k: v / steps for k, v in sorted(per_op.items())},
        "per_tensor_norms_per_step": sum(counts[k] for k in _NORMS) / steps,
        "foreach_norms_per_step": counts["aten::_foreach_norm"] / steps,
        "copies_per_step": counts["aten::copy_"] / steps,
        "host_syncs_per_step": {k: counts[k] / steps for k in _SYNCS if counts[k]},
        "overlap_basis": "device kernels" if on_device else "host: backward's autograd nodes",
    }


def python_calls_from_autograd(run_step: Callable[[], None]) -> dict[str, int]:
    """The Python functions the autograd engine calls during one `run_step()` (hooks, Python autograd Functions),
    by name (`file:function`), counted with sys.setprofile on this thread: the CPU's backward runs on the calling
    thread. On a GPU backward runs on the device's autograd thread, which this does not see."""
    engine_frames = {"_engine_run_backward"}
    calls: collections.Counter[str] = collections.Counter()

    def tracer(frame: Any, event: str, arg: Any) -> None:
        if event != "call" or frame.f_back is None or frame.f_back.f_code.co_name not in engine_frames:
            return
        code = frame.f_code
        calls[f"{code.co_filename.rsplit('/', 2)[-2:][-1]}:{code.co_name}"] += 1

    previous = sys.getprofile()
    sys.setprofile(tracer)
    try:
        run_step()
    finally:
        sys.setprofile(previous)
    return dict(calls.most_common())
