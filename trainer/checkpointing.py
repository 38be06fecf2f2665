"""Checkpoints with an explicit state contract, and the universal-checkpoint conversion command.

Layout of a run's checkpoints (`<run_dir>/checkpoints/`):

    global_step<N>/               one checkpoint; every rank writes its DeepSpeed ZeRO shards into it
        ...DeepSpeed files...     model states, optimizer shards, lr scheduler
        trainer_state.json        the loop's state_dict: step, epoch, position in the epoch, samples seen, world size
        rng_rank<R>.pt            each rank's RNG states (torch, CUDA, numpy, python)
        COMPLETE                  written last, atomically, by rank 0 after every rank has finished writing
    global_step<N>_universal/     the same step converted for another world size (`to-universal` below)
    latest                        DeepSpeed's pointer, rewritten only once a checkpoint is COMPLETE

DeepSpeed writes its own `latest` from rank 0 as soon as rank 0's files are out, before the other ranks are known to
have finished (deepspeed/runtime/engine.py, save_checkpoint), and not atomically. A checkpoint is therefore only ever
taken as a resume point when its COMPLETE marker exists, so a crash (kill -9) mid-save leaves the previous checkpoint
as the latest one. A run that reaches a step whose complete checkpoint already exists (after resuming from an earlier
one) writes `global_step<N>.partial` and swaps it in only once complete, so a broken run never costs a good
checkpoint; leftovers of such attempts are removed by the next successful save.

Different world size: DeepSpeed refuses a ZeRO checkpoint written by another number of ranks. Convert it once,

    python -m trainer.checkpointing to-universal --run-dir RUN [--tag global_step<N>]

which runs `python -m deepspeed.checkpoint.ds_to_universal --input_folder RUN/checkpoints/<tag> --output_folder
RUN/checkpoints/<tag>_universal --inject_missing_state`, copies the trainer's side files and marks it COMPLETE; then
resume with `--resume <tag>_universal` on any number of ranks (the trainer sets `"checkpoint": {"load_universal":
true}` in the DeepSpeed config for it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import dist as D
from trainer.config import ConfigError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
UNIVERSAL_SUFFIX = "_universal"
PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
_TAG_RE = re.compile(r"^global_step(\d+)(_universal)?$")
_LEFTOVER_RE = re.compile(r"^global_step(\d+)(\.partial|\.old)$")


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a torn one (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint on disk and what its side files say about it."""

    load_dir: Path
    tag: str
    step: int
    world_size: int
    universal: bool

    @property
    def path(self) -> Path:
        return self.load_dir / self.tag


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


def list_complete(ckpt_dir: Path) -> list[CheckpointRef]:
    """Every complete checkpoint under `ckpt_dir`, oldest step first (a universal copy after its source)."""
    refs = []
    if not ckpt_dir.is_dir():
        return refs
    for p in ckpt_dir.iterdir():
        m = _TAG_RE.match(p.name)
        if not (m and p.is_dir() and is_complete(p)):
            continue
        state = read_state(p)
        refs.append(
            CheckpointRef(
                load_dir=ckpt_dir,
                tag=p.name,
                step=int(state["step"]),
                world_size=int(state["world_size"]),
                universal=bool(m.group(2)),
            )
        )
    return sorted(refs, key=lambda r: (r.step, r.universal))


def resolve_resume(ckpt_dir: Path, which: str, world_size: int) -> CheckpointRef:
    """Find the checkpoint `--resume which` means: `latest` (newest complete) or a tag; check the world size."""
    refs = list_complete(ckpt_dir)
    if which == "latest":
        if not refs:
            raise ConfigError(f"--resume latest: no complete checkpoint in {ckpt_dir}")
        newest = max(r.step for r in refs)
        candidates = [r for r in refs if r.step == newest]
        # Same step in both forms: the original where the world size matches, else the universal copy.
        same = [r for r in candidates if not r.universal and r.world_size == world_size]
        universal = [r for r in candidates if r.universal]
        ref = (same or universal or candidates)[0]
    else:
        path = ckpt_dir / which
        if not path.is_dir():
            names = ", ".join(r.tag for r in refs) or "none"
            raise ConfigError(
                f"--resume {which}: no checkpoint '{which}' in {ckpt_dir} (complete ones: {names})"
            )
        if not is_complete(path):
            raise ConfigError(
                f"--resume {which}: {path} is incomplete (no {COMPLETE} marker: its save was cut off)"
            )
        ref = next(r for r in refs if r.tag == which)
    if not ref.universal and ref.world_size != world_size:
        raise ConfigError(
            f"checkpoint {ref.tag} was written by {ref.world_size} ranks and this run has {world_size}: "
            f"DeepSpeed cannot reshard it directly. Convert it once with\n"
            f"  python -m trainer.checkpointing to-universal --run-dir {ckpt_dir.parent} --tag {ref.tag}\n"
            f"then resume with --resume {ref.tag}{UNIVERSAL_SUFFIX}"
        )
    return ref


class Checkpointer:
    """Saves and loads the engine plus the loop's state; decides cadence and keeps the last K checkpoints."""

    def __init__(self, run_dir: Path, engine: Any, dist: D.DistInfo, *, every: int, keep_last: int) -> None:
        self.ckpt_dir = Path(run_dir) / "checkpoints"
        self.engine = engine
        self.dist = dist
        self.every = every
        self.keep_last = keep_last

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Every rank calls this. The checkpoint counts only once rank 0 has written COMPLETE, after all ranks."""
        tag = tag_for_step(step)
        final = self.ckpt_dir / tag
        # A complete checkpoint of this step already exists (a resumed run passing it again): write beside it and
        # swap at the end, so that a run dying mid-save never costs the good copy. Rank 0 decides for everyone
        # because DeepSpeed needs the same tag on every rank.
        replacing = bool(D.broadcast_object(self.dist.is_main and is_complete(final)))
        write_tag = tag + PARTIAL_SUFFIX if replacing else tag
        path = self.ckpt_dir / write_tag
        t0 = time.perf_counter()
        if self.dist.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            # Whatever is at the write path is a leftover of an attempt that died (a complete checkpoint never is):
            # stale shards, e.g. from another world size, must not mix with the new ones.
            shutil.rmtree(path, ignore_errors=True)
        D.barrier()
        self.engine.save(self.ckpt_dir, write_tag, client_state={"trainer": trainer_state})
        atomic_torch_save(rng_state(), path / f"rng_rank{self.dist.rank}.pt")
        if self.dist.is_main:
            state = dict(trainer_state, world_size=self.dist.world_size, zero_stage=self.engine.zero_stage)
            atomic_write_text(path / STATE_FILE, json.dumps(state, indent=2) + "\n")
        D.barrier()  # every rank's shards and side files are on disk
        if self.dist.is_main:
            marker = {"tag": tag, "step": step, "world_size": self.dist.world_size, "time": time.time()}
            atomic_write_text(path / COMPLETE, json.dumps(marker) + "\n")
            if replacing:
                old = self.ckpt_dir / (tag + OLD_SUFFIX)
                os.rename(final, old)
                os.rename(path, final)
                shutil.rmtree(old, ignore_errors=True)
            atomic_write_text(self.ckpt_dir / "latest", tag)
            self._prune(keep=final)
            log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - t0)
        D.barrier()
        return final

    def _prune(self, keep: Path) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older ones and older half-written leftovers."""
        refs = [r for r in list_complete(self.ckpt_dir) if not r.universal]
        doomed = [r.path for r in refs[: max(0, len(refs) - self.keep_last)] if r.path != keep]
        keep_step = read_state(keep)["step"]
        for p in self.ckpt_dir.iterdir():
            m = _TAG_RE.match(p.name) or _LEFTOVER_RE.match(p.name)
            if not (m and p.is_dir()) or p == keep:
                continue
            leftover = _LEFTOVER_RE.match(p.name) is not None
            half_written = not m.group(2) and not is_complete(p)
            if (leftover or half_written) and int(m.group(1)) <= keep_step:
                doomed.append(p)
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed old checkpoint %s", p)

    def load(self, ref: CheckpointRef) -> dict[str, Any]:
        """Load engine state (all ranks) and return the loop's state; restores this rank's RNG where it exists."""
        self.engine.load(ref.load_dir, ref.tag)
        state = read_state(ref.path)
        rng_file = ref.path / f"rng_rank{self.dist.rank}.pt"
        if rng_file.is_file() and ref.world_size == self.dist.world_size:
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            # A different world size has no saved RNG stream for this rank: derive a fresh one from the position.
            seed = 1_000_003 * int(state["step"]) + self.dist.rank
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
        log.info("resumed from %s (step %d, written by %d ranks)", ref.path, ref.step, ref.world_size)
        return state


# -- to-universal command ----------------------------------------------------------------------------------------


def to_universal(run_dir: Path, tag: str | None = None) -> Path:
    """Convert a complete checkpoint to DeepSpeed's universal format next to it; returns the new folder."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if tag is None:
        refs = [r for r in list_complete(ckpt_dir) if not r.universal]
        if not refs:
            raise ConfigError(f"no complete checkpoint in {ckpt_dir}")
        tag = refs[-1].tag
    src = ckpt_dir / tag
    if not is_complete(src):
        raise ConfigError(f"{src} is not a complete checkpoint (no {COMPLETE} marker)")
    dst = ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}"
    if dst.exists():
        shutil.rmtree(dst)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(src),
        "--output_folder",
        str(dst),
        "--inject_missing_state",
        "--num_extract_workers",
        str(max(1, min(4, os.cpu_count() or 1))),
        "--num_merge_workers",
        "1",
    ]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    for f in src.iterdir():
        if f.name == STATE_FILE or f.name.startswith("rng_rank"):
            shutil.copy2(f, dst / f.name)
    marker = {"tag": dst.name, "step": read_state(src)["step"], "universal_from": tag, "time": time.time()}
    atomic_write_text(dst / COMPLETE, json.dumps(marker) + "\n")
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.checkpointing",
        description="Checkpoint tools. to-universal: convert a ZeRO checkpoint so that a run with a different "
        "number of ranks can resume from it (then: --resume <tag>_universal).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-universal", help="convert RUN/checkpoints/TAG into RUN/checkpoints/TAG_universal")
    p.add_argument("--run-dir", required=True, type=Path, help="the run folder (holds checkpoints/)")
    p.add_argument("--tag", default=None, help="checkpoint to convert (default: the newest complete one)")
    p = sub.add_parser("list", help="list the complete checkpoints of a run")
    p.add_argument("--run-dir", required=True, type=Path, help="the run folder (holds checkpoints/)")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-universal":
            dst = to_universal(args.run_dir, args.tag)
            print(f"universal checkpoint: {dst}\nresume with: --resume {dst.name}")
        else:
            for r in list_complete(args.run_dir / "checkpoints"):
                kind = "universal" if r.universal else f"{r.world_size} ranks"
                print(f"{r.tag}\tstep {r.step}\t{kind}")
    except (ConfigError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
