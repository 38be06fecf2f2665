"""Running a comparison: one trainer process per variant and seed through the real stack (trainer/main.py, under the
deepspeed launcher where there are GPUs), kept once finished and continued from its last checkpoint if interrupted.
With `--val-subset N` the runs validate on a fixed subset of --val-data written once in the comparison folder, and
each finished run's last checkpoint is then scored on the whole --val-data by the trainer's `--eval-only`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipeline import atomic
from data_pipeline.build import ConversionError
from data_pipeline.sharding import read_manifest
from data_pipeline.shards import MANIFEST, file_sha256
from data_pipeline.subset import subset_record, write_subset
from trainer.tools.compare.results import DONE_FILE, FULL_EVAL_DIR, CompareError, read_full_eval
from trainer.tools.compare.variants import Variant

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]  # trainer/tools/compare/runs.py -> the repository
# Where the search for a free rendezvous port starts (`free_port`), away from DeepSpeed's default 29500.
DEFAULT_MASTER_PORT = 29512
SUBSET_SEED = (
    0  # the draw of --val-subset: fixed, so that every comparison of a split validates on one subset
)


@dataclass(frozen=True)
class RunSpec:
    variant: Variant
    seed: int
    run_dir: Path


def local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch CUDA runtime: CPU
        return 0


def ranks_per_run(args: argparse.Namespace) -> int:
    gpus = args.num_gpus if args.num_gpus is not None else local_gpu_count()
    return max(1, gpus)


def free_port(start: int) -> int:
    """The first port from `start` upward that this host can listen on: another job's rendezvous (an earlier run
    still exiting, another comparison, a training job) holds its port, and the deepspeed launcher's rank 0 would die
    on it with EADDRINUSE while the other ranks joined that job's rendezvous."""
    for port in range(start, 65536):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise CompareError(
        f"no free port from {start} to 65535 on this host for the rendezvous: give --master-port"
    )


def _launcher(args: argparse.Namespace) -> list[str]:
    gpus = args.num_gpus if args.num_gpus is not None else local_gpu_count()
    if gpus > 0:
        # A port given is the user's; otherwise one free now, chosen again for every run.
        port = args.master_port if args.master_port is not None else free_port(DEFAULT_MASTER_PORT)
        return [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(gpus), "--master_port", str(port)]
    return [sys.executable]  # one process: trainer/dist.py picks a free port itself


def trainer_command(spec: RunSpec, args: argparse.Namespace, resume: bool) -> list[str]:
    """The training run of one variant and seed; it validates on the subset folder when there is one."""
    cmd = [
        *_launcher(args),
        str(REPO / "trainer" / "main.py"),
        "--preset",
        args.preset,
        "--run-dir",
        str(spec.run_dir),
    ]
    cmd += ["--train-data", args.train_data, "--val-data", getattr(args, "subset_dir", None) or args.val_data]
    if args.steps is not None:
        cmd += ["--max-steps", str(args.steps)]
    cadence = [f"train.eval_every={args.val_every}"] if getattr(args, "val_every", None) else []
    for item in [*cadence, *args.set, *spec.variant.overrides(), f"train.seed={spec.seed}"]:
        cmd += ["--set", item]
    if resume:
        # auto, not latest: a run killed during its first save holds only an incomplete checkpoint, which the
        # trainer sets aside and starts afresh beside (latest would refuse it at every restart).
        cmd += ["--resume", "auto"]
    return cmd


def full_eval_command(spec: RunSpec, args: argparse.Namespace) -> list[str]:
    """The trainer's own evaluation (`--eval-only`) of a finished run's last checkpoint on the whole --val-data; it
    writes under RUN/full_eval/eval/<tag>/ only."""
    return [
        *_launcher(args),
        str(REPO / "trainer" / "main.py"),
        "--run-dir",
        str(spec.run_dir / FULL_EVAL_DIR),
        "--resume",
        "latest",
        "--eval-only",
        "--val-data",
        args.val_data,
    ]


def prepare_val_subset(args: argparse.Namespace, root: Path) -> Path:
    """The fixed validation subset of --val-data in ROOT/val-subset-N (written once; data_pipeline/subset.py).

    Kept when it holds the same draw (source manifest, count, seed); rewritten when only its shard count differs
    (the same questions, for another number of ranks); a different draw is refused: earlier runs of this
    comparison were validated on it."""
    out = root / f"val-subset-{args.val_subset}"
    n_shards = ranks_per_run(args)
    src_digest = file_sha256(Path(args.val_data) / MANIFEST)
    record = subset_record(out)
    if record is not None:
        same = (record["of_manifest_sha256"], record["count"], record["seed"])
        if same != (src_digest, args.val_subset, SUBSET_SEED):
            raise CompareError(
                f"{out}: holds another subset (of {record['of']}, {record['count']} questions, seed "
                f"{record['seed']}); the runs in {root} were validated on it: use another --run-dir"
            )
        if len(read_manifest(out)["shards"]) == n_shards:
            return out
    try:
        summary = write_subset(
            args.val_data, out, count=args.val_subset, seed=SUBSET_SEED, n_shards=n_shards, overwrite=True
        )
    except ConversionError as exc:
        raise CompareError(f"--val-subset {args.val_subset}: {exc}") from None
    print(f"[compare] validation {summary.line()}", flush=True)
    return out


def _run_logged(cmd: list[str], log_file: Path, args: argparse.Namespace, what: str) -> None:
    with log_file.open("a") as fh:
        # stderr carries the progress bar: shown live; stdout (log lines) goes to the log file too.
        proc = subprocess.run(
            cmd, cwd=REPO, stdout=fh, stderr=None if args.show_progress else fh, check=False
        )
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise CompareError(f"{what} failed (exit {proc.returncode}); log: {log_file}\n{tail}")


def run_one(spec: RunSpec, args: argparse.Namespace) -> None:
    """Train one variant/seed unless it already finished (continue it if it was interrupted); then, with a
    validation subset, score its last checkpoint on the whole --val-data unless that is done."""
    name = f"{spec.variant.name} seed {spec.seed}"
    if (spec.run_dir / DONE_FILE).is_file():
        log.info("%s: already trained, kept", name)
    else:
        ckpts = spec.run_dir / "checkpoints"
        resume = ckpts.is_dir() and any(ckpts.iterdir())
        cmd = trainer_command(spec, args, resume)
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        print(f"[compare] {name}{' (resuming)' if resume else ''}: {' '.join(cmd)}", flush=True)
        start = time.time()
        _run_logged(cmd, spec.run_dir / "train.log", args, name)
        done = {"variant": spec.variant.name, "seed": spec.seed, "wall_time_s": round(time.time() - start, 1)}
        atomic.write_text(spec.run_dir / DONE_FILE, json.dumps(done) + "\n")
    if getattr(args, "subset_dir", None) is None or read_full_eval(spec.run_dir) is not None:
        return
    folder = prepare_full_eval(spec.run_dir)
    cmd = full_eval_command(spec, args)
    print(f"[compare] {name}, whole validation split: {' '.join(cmd)}", flush=True)
    _run_logged(cmd, folder / "eval.log", args, f"{name}: the evaluation on {args.val_data}")
    if read_full_eval(spec.run_dir) is None:
        raise CompareError(
            f"{name}: the evaluation on {args.val_data} wrote no metrics; log: {folder / 'eval.log'}"
        )


def prepare_full_eval(run_dir: Path) -> Path:
    """RUN/full_eval: a run folder for the trainer's --eval-only with the run's configuration, answers and tokenizer,
    and its checkpoints through a link to RUN/checkpoints; its TensorBoard events and eval/ files stay apart from
    the run's own validations (which score the subset at the same steps)."""
    from trainer.run_folder import RunFolder

    src, dst = RunFolder(run_dir), RunFolder(run_dir / FULL_EVAL_DIR)
    dst.save(src.read_config(), answers=src.read_answers(), tokenizer_files=src.tokenizer_files())
    link = dst.path / "checkpoints"
    if not link.is_symlink():
        os.symlink(Path("..") / "checkpoints", link, target_is_directory=True)
    return dst.path
