"""The table of `python -m trainer.tools.bench --ranks N` (trainer/tools/bench/ranks.py) from its JSON report."""

from __future__ import annotations

from typing import Any


def _hooks(profile: dict[str, Any]) -> str:
    calls = profile["python_calls_from_autograd_per_step"]
    if not calls:
        return "0"
    top, n = next(iter(calls.items()))
    return f"{profile['python_calls_from_autograd_total']} ({top} x{n})"


def format_table(report: dict[str, Any]) -> str:
    head = (
        f"{report['ranks']} ranks ({report['backend']}, {report['device']}, {report['threads_per_rank']} threads per "
        f"rank), {report['preset']} {report['variant']} {report['image_size']} px, {report['batch_per_rank']} per rank "
        f"(global {report['global_batch']}), {report['parameters']:,} parameters; median round, {report['order']}; "
        f"vs DDP: the median of the rounds' ratios"
    )
    cols = (
        "cell", "samples/s", "spread", "vs DDP", "CPU ms/step", "CPU vs DDP", "grad reduce ms", "overlapped", "per-tensor norms", "copies",
        "host syncs", "autograd Python calls", "engine",
    )  # fmt: skip
    lines = [head, " | ".join(cols)]
    for r in report["results"]:
        p = r["profile"]
        syncs = sum(p["host_syncs_per_step"].values())
        lines.append(
            " | ".join(
                [
                    r["cell"],
                    f"{r['samples_per_s']:.1f}",
                    f"{r['spread'] * 100:.0f}%",
                    "-" if r["vs_ddp"] is None else f"{r['vs_ddp']:.3f}",
                    f"{r['cpu_s_per_step'] * 1e3:.0f}",
                    "-" if r["cpu_vs_ddp"] is None else f"{r['cpu_vs_ddp']:.3f}",
                    f"{p['reduction_ms_per_step']:.1f}",
                    f"{p['reduction_overlap_fraction'] * 100:.0f}%",
                    f"{p['per_tensor_norms_per_step']:g}",
                    f"{p['copies_per_step']:g}",
                    f"{syncs:g}",
                    _hooks(p),
                    r["engine"],
                ]
            )
        )
    return "\n".join(lines)
