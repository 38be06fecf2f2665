"""Running a comparison: one trainer process per variant and seed through the real stack (trainer/main.py, under the
deepspeed launcher where there are GPUs), kept once finished and continued from its last checkpoint if interrupted."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipeline import atomic
from trainer.tools.compare.results import DONE_FILE, CompareError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]  # trainer/tools/compare/runs.py -> the repository


@dataclass(frozen=True)
class RunSpec:
    variant: str
    seed: int
    run_dir: Path


def local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch CUDA runtime: CPU
        return 0


def trainer_command(spec: RunSpec, args: argparse.Namespace, resume: bool) -> list[str]:
    gpus = args.num_gpus if args.num_gpus is not None else local_gpu_count()
    if gpus > 0:
        launcher = [
            shutil.which("deepspeed") or "deepspeed",
            "--num_gpus",
            str(gpus),
            "--master_port",
            str(args.master_port),
        ]
    else:
        launcher = [sys.executable]
    cmd = [
        *launcher,
        str(REPO / "trainer" / "main.py"),
        "--preset",
        args.preset,
        "--run-dir",
        str(spec.run_dir),
    ]
    cmd += ["--train-data", args.train_data, "--val-data", args.val_data]
    if args.steps is not None:
        cmd += ["--max-steps", str(args.steps)]
    for item in [*args.set, f"model.variant={spec.variant}", f"train.seed={spec.seed}"]:
        cmd += ["--set", item]
    if resume:
        cmd += ["--resume", "latest"]
    return cmd


def run_one(spec: RunSpec, args: argparse.Namespace) -> None:
    """Train one variant/seed unless it already finished; continue it if it was interrupted."""
    if (spec.run_dir / DONE_FILE).is_file():
        log.info("%s seed %d: already complete, kept", spec.variant, spec.seed)
        return
    ckpts = spec.run_dir / "checkpoints"
    resume = ckpts.is_dir() and any(ckpts.iterdir())
    cmd = trainer_command(spec, args, resume)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    log_file = spec.run_dir / "train.log"
    print(
        f"[compare] {spec.variant} seed {spec.seed}{' (resuming)' if resume else ''}: {' '.join(cmd)}",
        flush=True,
    )
    start = time.time()
    with log_file.open("a") as fh:
        # stderr carries the progress bar: shown live; stdout (log lines) goes to the run's log file too.
        proc = subprocess.run(
            cmd, cwd=REPO, stdout=fh, stderr=None if args.show_progress else fh, check=False
        )
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise CompareError(
            f"{spec.variant} seed {spec.seed} failed (exit {proc.returncode}); log: {log_file}\n{tail}"
        )
    done = {"variant": spec.variant, "seed": spec.seed, "wall_time_s": round(time.time() - start, 1)}
    atomic.write_text(spec.run_dir / DONE_FILE, json.dumps(done) + "\n")
