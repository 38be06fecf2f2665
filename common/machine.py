"""What a measurement names about the machine it ran on (the benchmarks and reports print it beside their figures).

`machine()` is the one description; each report picks its fields: the data benchmark's line (CPU, cores, GPU, torch,
DALI), the training benchmark's (the same and DeepSpeed), the conversion benchmark's JSON (CPU, cores, Python, torch,
Pillow, numpy), the comparison's (GPUs, else CPU and cores) and the mutation check's (cores, CPU, Python). Versions
come from package metadata, so that describing the machine imports no library; only `gpus=True` imports torch.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from importlib import metadata
from typing import Any

NOT_INSTALLED = "not installed"


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which a container or `taskset` narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def package_version(name: str) -> str:
    """The installed version of package `name` (a distribution name; "DALI" for NVIDIA DALI, whose distribution is
    named after its CUDA release), or "not installed"."""
    if name == "DALI":
        found = (
            d.version
            for d in metadata.distributions()
            if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")
        )
        return next(found, NOT_INSTALLED)
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED


def machine(packages: Iterable[str] = (), *, gpus: bool = False) -> dict[str, Any]:
    """The machine: `cpu` (model name), `cores` (usable), `python`, the version of each of `packages` under its own
    name, and with `gpus` the names of the CUDA devices torch sees (`gpus`, empty without one; imports torch)."""
    out: dict[str, Any] = {"cpu": cpu_model(), "cores": usable_cores(), "python": platform.python_version()}
    out.update({name: package_version(name) for name in packages})
    if gpus:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(count)]
    return out


def machine_line(packages: Iterable[str] = ()) -> str:
    """`machine(gpus=True)` as one line: "CPU, N cores, GPU (or no GPU); name version, ..." for `packages`."""
    packages = tuple(packages)
    m = machine(packages, gpus=True)
    gpu = m["gpus"][0] if m["gpus"] else "no GPU"
    versions = ", ".join(f"{name} {m[name]}" for name in packages)
    return f"{m['cpu']}, {m['cores']} cores, {gpu}; {versions}"
