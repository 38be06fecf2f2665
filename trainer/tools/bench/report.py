"""The benchmark's report: the JSON file (written after every cell) and the table printed at the end."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
from pathlib import Path
from typing import Any

import torch

from common import atomic
from common.machine import machine_line
from trainer.tools.bench.cells import Setup

GIB = 2**30


def _flops(rate: float) -> str:
    return f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"


def _basis_note(rows: list[dict[str, Any]]) -> str:
    bases = sorted({(r["precision"], r["mfu_basis"]) for r in rows})
    if all(p == b for p, b in bases):
        return "the peak of its own precision"
    return ", ".join(f"{p} cells against the {b} peak" for p, b in bases) + " (the fastest measured here)"


def format_table(report: dict[str, Any]) -> str:
    rows = report["results"]
    memory = rows[0]["memory_measure"] if rows else ""
    mem_head = "peak mem GiB" + (" (RSS)" if "RSS" in memory else "")
    head = [
        "variant", "px", "mode", "engine", "loader", "samples/s", "step ms", mem_head, "GFLOP/sample", "MFU",
        "data wait", "1st step s",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["variant"], str(r["image_size"]), r["mode"], r["engine"] + (" +compile" if r["compile"] else ""),
            r["loader"], f"{r['samples_per_s']:.1f}", f"{r['step_time_s'] * 1e3:.1f}",
            f"{r['peak_memory_bytes'] / GIB:.2f}", f"{r['flops_per_sample'] / 1e9:.3f}", f"{r['mfu'] * 100:.2f}%",
            f"{r['data_wait_fraction'] * 100:.1f}%", f"{r['first_step_s']:.1f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    peaks = ", ".join(f"{k} {_flops(v)}" for k, v in report["matmul_peak_flops_per_s"].items())
    a = report["settings"]
    notes = [
        f"machine: {report['machine']}",
        f"date: {report['date']}; command: {report['command']}",
        f"batch {a['batch_size']}; median of {a['repeats']} windows of {a['steps']} steps after {a['warmup']} warm-up "
        f"steps; DeepSpeed config {report['deepspeed_config_file']}",
        f"MFU basis: measured {report['matmul_peak_size']}x{report['matmul_peak_size']} matrix-product peak ({peaks}), "
        f"each cell against {_basis_note(rows)}; FLOPs of forward + backward counted by FlopCounterMode",
        f"peak memory: {memory}",
    ]
    for r in rows:
        prof = r.get("profile")
        if prof:
            syncs = ", ".join(f"{k} {v:g}" for k, v in sorted(prof["syncs_per_step"].items())) or "none"
            busy = prof["device_busy_s_per_step"]
            notes.append(
                f"profile {r['variant']} {r['image_size']} px {r['mode']}: {prof['wall_s_per_step'] * 1e3:.1f} ms per "
                + (
                    f"step, device busy {busy * 1e3:.1f} ms ({busy / prof['wall_s_per_step'] * 100:.0f}%), "
                    if busy
                    else "step, "
                )
                + f"host synchronisations per step: {syncs} ({prof['file']})"
            )
    restarts = [r for r in rows if r["epoch_restarts"]]
    if restarts:
        notes.append(
            "loader epochs restarted inside the timing (a larger --train-data avoids it): "
            + ", ".join(f"{r['variant']} {r['image_size']} px {r['epoch_restarts']}" for r in restarts)
        )
    return "\n".join(lines + [""] + notes)


def new_report(args: argparse.Namespace, argv: list[str], setup: Setup) -> dict[str, Any]:
    device = setup.dist.device
    return {
        "machine": machine_line(("torch", "DALI", "DeepSpeed")),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m trainer.tools.bench " + shlex.join(argv),
        "preset": args.preset,
        "settings": {
            "batch_size": setup.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "overrides": list(args.set),
            "train_data": args.train_data,
            "hf_vilt": args.hf_vilt,
            "profile": args.profile,
        },  # fmt: skip
        "deepspeed_config_file": _repo_relative(setup.ds_path),
        "deepspeed_config": setup.ds_base,
        "n_answers": setup.n_answers,
        "vilt_vocab_size": setup.vilt_vocab,
        "matmul_peak_flops_per_s": setup.peaks,
        "matmul_peak_size": setup.peak_size,
        "complete": False,
        "results": [],
    }


def write_report(report: dict[str, Any], out: Path) -> None:
    """The JSON file, replaced atomically (a reader never sees half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out, json.dumps(report, indent=2) + "\n")


def _repo_relative(path: Path) -> str:
    """A shipped file as the repository names it (deepspeed_configs/...), wherever the checkout lies; others as given."""
    repo = Path(__file__).resolve().parents[3]
    try:
        return Path(path).resolve().relative_to(repo).as_posix()
    except ValueError:
        return str(path)
