"""Running a comparison: one trainer process per variant and seed through the real stack (trainer/main.py, under the
deepspeed launcher where there are GPUs), kept once finished and continued from its last checkpoint if interrupted.
With `--val-subset N` the runs validate on a fixed subset of --val-data written once in the comparison folder, and
each finished run's last checkpoint is then scored on the whole --val-data by the trainer's `--eval-only`."""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

from common import atomic
from data_pipeline.convert.build import ConversionError
from data_pipeline.convert.subset import subset_record, write_subset
from data_pipeline.shards.format import MANIFEST, file_sha256
from data_pipeline.shards.sharding import read_manifest
from trainer.tools.compare.results import DONE_FILE, FULL_EVAL_DIR, CompareError, read_full_eval
from trainer.tools.compare.schedule import Slot
from trainer.tools.compare.variants import Variant

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]  # trainer/tools/compare/runs.py -> the repository
# The first GPU run's rendezvous port (--master-port), away from DeepSpeed's default 29500.
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
        # torch (seconds to import) only to count GPUs, and trainer.run.run_folder (torch) only where a run's folder is
        # read: the comparison's own process stays light.
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch CUDA runtime: CPU
        return 0


def gpus_per_run(args: argparse.Namespace) -> int:
    """--gpus-per-run, resolved: 1 where there are GPUs, 0 (a CPU run) otherwise."""
    if args.num_gpus is not None:
        return int(args.num_gpus)
    return 1 if local_gpu_count() > 0 else 0


def ranks_per_run(args: argparse.Namespace) -> int:
    return max(1, gpus_per_run(args))


# Slots side by side search disjoint ports: slot k tries its own port, then that + PORT_STRIDE, ... (fewer slots than
# this on any node).
PORT_STRIDE = 64


def free_port(start: int, step: int = 1) -> int:
    """The first port from `start` upward (by `step`) that this host can listen on: another job's rendezvous (an
    earlier run still exiting, another comparison, a training job) holds its port, and the deepspeed launcher's rank 0
    would die on it with EADDRINUSE while the other ranks joined that job's rendezvous."""
    for port in range(start, 65536, step):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise CompareError(
        f"no free port from {start} to 65535 on this host for the rendezvous: give --master-port"
    )


def _launcher(slot: Slot | None) -> list[str]:
    if slot is not None and slot.gpus:
        # No --num_gpus: the launcher then takes its GPUs from the slot's CUDA_VISIBLE_DEVICES (with --num_gpus it
        # would ignore them and start on GPU 0 beside every other run). The slot's port, or the next free one of its
        # own, chosen again for every run.
        port = free_port(slot.port, step=PORT_STRIDE)
        return [shutil.which("deepspeed") or "deepspeed", "--master_port", str(port)]
    return [sys.executable]


def trainer_command(
    spec: RunSpec, args: argparse.Namespace, resume: bool, slot: Slot | None = None
) -> list[str]:
    """The training run of one variant and seed in SLOT (None: a CPU process); it validates on the subset folder when
    there is one."""
    cmd = [
        *_launcher(slot),
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


def full_eval_command(spec: RunSpec, args: argparse.Namespace, slot: Slot | None = None) -> list[str]:
    """The trainer's own evaluation (`--eval-only`) of a finished run's last checkpoint on the whole --val-data, in
    the run's slot; it writes under RUN/full_eval/eval/<tag>/ only."""
    return [
        *_launcher(slot),
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
    """The fixed validation subset of --val-data in ROOT/val-subset-N (written once; data_pipeline/convert/subset.py).

    Kept when it holds the same draw (source manifest, count, seed); rewritten when only its shard count differs
    (the same questions, for another number of ranks); a different draw is refused: earlier runs of this
    comparison were validated on it. Cells of one study started at once on several nodes (`--only`, docs/cluster.md)
    take turns through a lock file beside it, so that one writes it and the others find it written."""
    out = root / f"val-subset-{args.val_subset}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".val-subset-{args.val_subset}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare_val_subset(args, root, out)


def _prepare_val_subset(args: argparse.Namespace, root: Path, out: Path) -> Path:
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


def _run_logged(
    cmd: list[str], log_file: Path, args: argparse.Namespace, what: str, slot: Slot | None
) -> None:
    with log_file.open("a") as fh:
        # stderr carries the trainer's progress bar: shown live when one run runs at a time; with runs side by side
        # their bars would overwrite each other, so it goes to the log with the rest (the comparison shows its own).
        live = args.show_progress and getattr(args, "jobs_running", 1) == 1
        env = None if slot is None else slot.env()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=None if live else fh, env=env)
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        try:
            proc.wait()
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise CompareError(f"{what} failed (exit {proc.returncode}); log: {log_file}\n{tail}")


def run_one(spec: RunSpec, args: argparse.Namespace, slot: Slot | None = None) -> bool:
    """Train one variant/seed in SLOT unless it already finished (continue it if it was interrupted); then, with a
    validation subset, score its last checkpoint on the whole --val-data in the same slot unless that is done.
    True when something ran, False when both were already done."""
    name = f"{spec.variant.name} seed {spec.seed}"
    ran = False
    if (spec.run_dir / DONE_FILE).is_file():
        log.info("%s: already trained, kept", name)
    else:
        ckpts = spec.run_dir / "checkpoints"
        resume = ckpts.is_dir() and any(ckpts.iterdir())
        cmd = trainer_command(spec, args, resume, slot)
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        where = "" if slot is None else f" [{slot.describe()}]"
        print(f"[compare] {name}{' (resuming)' if resume else ''}{where}: {' '.join(cmd)}", flush=True)
        start = time.time()
        _run_logged(cmd, spec.run_dir / "train.log", args, name, slot)
        done = {"variant": spec.variant.name, "seed": spec.seed, "wall_time_s": round(time.time() - start, 1)}
        if slot is not None:
            done.update(threads=slot.threads, gpus=len(slot.gpus))
        atomic.write_text(spec.run_dir / DONE_FILE, json.dumps(done) + "\n")
        ran = True
    if getattr(args, "subset_dir", None) is None or read_full_eval(spec.run_dir) is not None:
        return ran
    folder = prepare_full_eval(spec.run_dir)
    cmd = full_eval_command(spec, args, slot)
    print(f"[compare] {name}, whole validation split: {' '.join(cmd)}", flush=True)
    _run_logged(cmd, folder / "eval.log", args, f"{name}: the evaluation on {args.val_data}", slot)
    if read_full_eval(spec.run_dir) is None:
        raise CompareError(
            f"{name}: the evaluation on {args.val_data} wrote no metrics; log: {folder / 'eval.log'}"
        )
    return True


# The trainers running now (run_all forwards a SIGTERM to them: each saves a checkpoint and stops).
_RUNNING: set[subprocess.Popen[bytes]] = set()
_RUNNING_LOCK = threading.Lock()


class Stopped(Exception):
    """SIGTERM or Ctrl-C stopped the comparison: its running trainers saved a checkpoint and stopped; the same command
    continues them. `signum` is the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


class Progress:
    """One line per finished run, each with the comparison's bar: runs done of all, time so far, time left. Runs
    kept from before count as done; the time left is the work left (the runs waiting, and what remains of those
    running, at the mean time of the runs finished so far) shared among the slots."""

    def __init__(self, total: int, kept: int, slots: int, width: int = 20) -> None:
        self.total, self.done, self.slots, self.width = total, kept, slots, width
        self.start = time.time()
        self.durations: list[float] = []
        self.running: dict[str, float] = {}
        self.lock = threading.Lock()

    def started(self, name: str) -> None:
        with self.lock:
            self.running[name] = time.time()

    def line(self, name: str, outcome: str) -> str:
        with self.lock:
            now = time.time()
            self.durations.append(now - self.running.pop(name, now))
            self.done += 1
            mean = sum(self.durations) / len(self.durations)
            waiting = self.total - self.done - len(self.running)
            work = waiting * mean + sum(max(0.0, mean - (now - t)) for t in self.running.values())
            left = self.total - self.done
            eta = f"ETA {_clock(work / self.slots)}" if left else "all done"
            fill = self.width * self.done // max(1, self.total)
            bar = "#" * fill + "-" * (self.width - fill)
            return f"[compare] {name}: {outcome}  [{bar}] {self.done}/{self.total} runs, {_clock(now - self.start)}, {eta}"


def run_all(specs: list[RunSpec], args: argparse.Namespace, slots: list[Slot]) -> list[str]:
    """Run every spec, as many at a time as there are slots, each run in one slot at a time; returns the failures
    (one message each, naming the run and its log) after every other run has finished.

    Ctrl-C reaches every trainer itself (one process group); a SIGTERM to this process alone (a batch system's
    notice before its time limit) is passed on to them. Either way each trainer saves a checkpoint and stops, no
    further run starts, and Stopped is raised once they have: the same command continues them (`--resume auto`)."""
    todo = [s for s in specs if not _finished(s, args)]
    for spec in specs:
        if spec not in todo:
            log.info("%s seed %d: already trained and scored, kept", spec.variant.name, spec.seed)
    if not todo:
        return []
    free: Queue[Slot] = Queue()
    for slot in slots:
        free.put(slot)
    args.jobs_running = len(slots)
    progress = Progress(len(specs), len(specs) - len(todo), len(slots))
    stop: list[int] = []
    failures: list[str] = []

    def work(spec: RunSpec) -> None:
        if stop:
            return
        slot = free.get()
        name = f"{spec.variant.name} seed {spec.seed}"
        start = time.time()
        progress.started(name)
        try:
            run_one(spec, args, slot)
            print(progress.line(name, f"done in {_clock(time.time() - start)}"), flush=True)
        except CompareError as exc:
            if stop:  # stopped by the signal, not failed
                print(f"[compare] {name}: stopped; the same command continues it", flush=True)
            else:
                failures.append(str(exc))
                print(progress.line(name, f"FAILED: {str(exc).splitlines()[0]}"), flush=True)
        finally:
            free.put(slot)

    def on_term(signum: int, frame: object) -> None:
        stop.append(signum)
        with _RUNNING_LOCK:
            for proc in _RUNNING:
                proc.send_signal(signal.SIGTERM)  # a trainer ignores the repeat of one it already got

    previous = signal.signal(signal.SIGTERM, on_term)
    pool = ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="compare-run")
    try:
        futures = [pool.submit(work, spec) for spec in todo]
        for fut in futures:
            fut.result()
    except KeyboardInterrupt:
        stop.append(signal.SIGINT)
        pool.shutdown(wait=True, cancel_futures=True)
    finally:
        pool.shutdown(wait=True)
        signal.signal(signal.SIGTERM, previous)
    if stop:
        raise Stopped(stop[0])
    return failures


def _finished(spec: RunSpec, args: argparse.Namespace) -> bool:
    if not (spec.run_dir / DONE_FILE).is_file():
        return False
    return getattr(args, "subset_dir", None) is None or read_full_eval(spec.run_dir) is not None


def prepare_full_eval(run_dir: Path) -> Path:
    """RUN/full_eval: a run folder for the trainer's --eval-only with the run's configuration, answers and tokenizer,
    and its checkpoints through a link to RUN/checkpoints; its TensorBoard events and eval/ files stay apart from
    the run's own validations (which score the subset at the same steps)."""
    from trainer.run.run_folder import RunFolder

    src, dst = RunFolder(run_dir), RunFolder(run_dir / FULL_EVAL_DIR)
    dst.save(src.read_config(), answers=src.read_answers(), tokenizer_files=src.tokenizer_files())
    link = dst.path / "checkpoints"
    if not link.is_symlink():
        os.symlink(Path("..") / "checkpoints", link, target_is_directory=True)
    return dst.path
