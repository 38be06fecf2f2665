"""Checkpoints with an explicit state contract: the Checkpointer component, which every rank calls every step.

The checkpointer decides the cadence (`train.ckpt_every`), saves the engine plus the loop's state_dict and each rank's
RNG states, marks a checkpoint COMPLETE once every rank has written, keeps the newest `train.keep_last`, and loads a
checkpoint back after checking its files. What is on disk and when it counts: trainer/checkpoint/layout.py; how its
files are loaded safely: trainer/checkpoint/safety.py; `python -m trainer.checkpoint to-universal | list`:
trainer/checkpoint/universal.py. Callers import each name from the module that defines it.

Damage: a checkpoint whose COMPLETE marker no longer matches its files, or whose content check failed when this run
chose where to resume from (`Checkpointer.failed`), is never pruned, replaced or deleted; a save of its step renames
it to `<tag>.damaged-<n>` first. A save cut off before its marker is set aside at the next start
(`set_aside_incomplete`).

Disk space: before a save, rank 0 compares the free space of the checkpoint folder with the size of the newest
complete checkpoint (all ranks' files), and refuses to start a save that cannot fit: with `train.keep_last=K`, K
checkpoints stay on disk while the next one is written, so the folder needs room for K+1. A save that runs out of
space anyway (ENOSPC, or torch's "unexpected pos" from its zip writer) stops the run with one line saying so
(exit 1: trainer/main.py), removes its own half-written folder and leaves the earlier checkpoints as they were.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from common import atomic
from trainer.checkpoint.layout import (
    COMPLETE,
    DELETING_RE,
    LEFTOVER_RE,
    OLD_SUFFIX,
    PARTIAL_SUFFIX,
    STATE_FILE,
    TAG_RE,
    CheckpointRef,
    damaged,
    incomplete,
    is_complete,
    list_complete,
    read_marker,
    read_state,
    remove_checkpoint,
    set_aside,
    tag_for_step,
    write_complete_marker,
)
from trainer.checkpoint.safety import (
    check_deepspeed_files,
    first_line,
    load_rng_file,
    rng_state,
    set_rng_state,
)
from trainer.config.config import ConfigError
from trainer.engine import dist as D

log = logging.getLogger(__name__)

# Names a checkpoint folder is set aside under (layout.set_aside): never listed or resumed. The next save's
# pruning removes incomplete ones (they never counted); damaged ones are never removed by the trainer.
INCOMPLETE_LABEL = "incomplete"  # <tag>.incomplete-<n>: a save cut off, set aside at the next start
DAMAGED_LABEL = "damaged"  # <tag>.damaged-<n>: failed its checks, moved out of a new save's way


def set_aside_incomplete(ckpt_dir: Path) -> None:
    """Rank 0 of a training start, under the run folder's lock: every checkpoint folder without a COMPLETE marker (a
    save cut off, e.g. by kill -9) is renamed to `<tag>.incomplete-<n>`, so that it blocks no start and no save of the
    same step; it never counted as a checkpoint, and the next save's pruning removes it (saying so)."""
    for path in incomplete(ckpt_dir):
        moved = set_aside(path, INCOMPLETE_LABEL)
        log.warning("set aside %s as %s: its save was cut off (no %s marker)", path, moved.name, COMPLETE)


class CheckpointSpaceError(RuntimeError):
    """A checkpoint cannot be written for want of disk space. Neither bad input nor a bug in the program: trainer/main.py
    prints the one-line message and exits with 1, the status of a failure while training."""


def is_out_of_space(exc: BaseException) -> bool:
    """Whether `exc` (or an error it was raised from) says the disk is full. torch's zip writer reports ENOSPC as a
    RuntimeError ("[enforce fail at inline_container.cc] unexpected pos ..." or "... file write failed")."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if isinstance(e, RuntimeError) and any(
            s in text for s in ("No space left", "unexpected pos", "file write failed", "Disk quota")
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class CheckpointEngine(Protocol):
    """What the checkpointer needs of an engine (trainer/engine/engine.py `Engine`): every rank writes and reads its own part
    of a DeepSpeed checkpoint folder; the ZeRO stage is recorded in the trainer state beside it."""

    @property
    def zero_stage(self) -> int: ...

    def save(self, save_dir: Path, tag: str) -> None: ...

    def load(self, load_dir: Path, tag: str) -> None: ...


class Checkpointer:
    """Saves and loads the engine plus the loop's state; decides cadence and keeps the last K checkpoints.

    The loop's state is stored once, in trainer_state.json (read back by `load`); DeepSpeed's files hold the
    weights and the optimizer and schedule state only."""

    def __init__(
        self, run_dir: Path, engine: CheckpointEngine, dist: D.DistInfo, *, every: int, keep_last: int
    ) -> None:
        self.ckpt_dir = Path(run_dir) / "checkpoints"
        self.engine = engine
        self.dist = dist
        self.every = every
        self.keep_last = keep_last
        self.failed: set[str] = set()
        """Tags whose files failed their content check at this start (Run sets it): never pruned nor replaced."""

    def due(self, step: int) -> bool:
        """Asked by the loop after every optimizer step: whether a checkpoint is due now (`train.ckpt_every`)."""
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, trainer_state: dict[str, Any], loader_state: bytes | None = None) -> Path:
        """Every rank calls this. The checkpoint counts only once rank 0 has written COMPLETE, after all ranks.
        Raises CheckpointSpaceError on every rank where the disk is (or would be) too full; the earlier checkpoints
        stay as they were."""
        tag = tag_for_step(step)
        final = self.ckpt_dir / tag
        # A complete checkpoint of this step already exists (a resumed run passing it again): write beside it and
        # swap at the end, so that a run dying mid-save never costs the good copy. Rank 0 decides for everyone
        # (DeepSpeed needs the same tag on every rank), and whether there is room for another checkpoint at all.
        decision = (self._keep_apart(final), self._room_problem(tag)) if self.dist.is_main else None
        replacing, no_room = D.broadcast_object(decision)  # type: ignore[misc]
        if no_room:
            raise CheckpointSpaceError(no_room)
        write_tag = tag + PARTIAL_SUFFIX if replacing else tag
        path = self.ckpt_dir / write_tag
        t0 = time.perf_counter()
        if self.dist.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            # Whatever is at the write path is a leftover of an attempt that died (a complete checkpoint never is):
            # stale shards, e.g. from another world size, must not mix with the new ones. A symbolic link there is
            # removed, not followed: the new files go into the run folder.
            if path.is_symlink():
                path.unlink()
            shutil.rmtree(path, ignore_errors=True)
        D.barrier()
        failure = self._out_of_space_guard(
            tag, lambda: self._write_files(path, write_tag, trainer_state, loader_state)
        )
        # Every rank's shards and side files are on disk, or some rank ran out of space: all ranks learn which.
        if D.any_rank(failure is not None):
            if self.dist.is_main:
                remove_checkpoint(path)  # incomplete: its space is better given back
            raise CheckpointSpaceError(failure or self._space_message(tag, "another rank's write failed"))
        if self.dist.is_main:
            failure = self._out_of_space_guard(tag, lambda: self._finish(tag, step, path, final, replacing))
            if failure is None:
                log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - t0)
            elif not is_complete(path):
                remove_checkpoint(path)
        if D.any_rank(failure is not None):
            raise CheckpointSpaceError(failure or self._space_message(tag, "rank 0's write failed"))
        return final

    def _write_files(
        self, path: Path, write_tag: str, trainer_state: dict[str, Any], loader_state: bytes | None
    ) -> None:
        """This rank's part of a checkpoint: DeepSpeed's files, its RNG states and loader position, and (rank 0) the
        trainer's state."""
        self.engine.save(self.ckpt_dir, write_tag)
        atomic.torch_save(rng_state(), path / f"rng_rank{self.dist.rank}.pt")
        if loader_state is not None:
            atomic.write_bytes(path / f"loader_rank{self.dist.rank}.bin", loader_state)
        if self.dist.is_main:
            state = dict(trainer_state, world_size=self.dist.world_size, zero_stage=self.engine.zero_stage)
            atomic.write_text(path / STATE_FILE, json.dumps(state, indent=2) + "\n")

    def _finish(self, tag: str, step: int, path: Path, final: Path, replacing: bool) -> None:
        """Rank 0, once every rank has written: mark complete, swap in a replacement, point `latest`, prune."""
        write_complete_marker(
            path, {"tag": tag, "step": step, "world_size": self.dist.world_size, "time": time.time()}
        )
        if replacing:
            old = self.ckpt_dir / (tag + OLD_SUFFIX)
            os.rename(final, old)
            os.rename(path, final)
            shutil.rmtree(old, ignore_errors=True)
        atomic.write_text(self.ckpt_dir / "latest", tag)
        self._prune(keep=final)

    def _keep_apart(self, final: Path) -> bool:
        """Rank 0, before saving step `final`: whether a complete copy is there to be replaced once the new one is
        complete. A damaged copy (its marker no longer matches its files, or its content check failed at this
        start) is never replaced nor deleted: it is renamed to `<tag>.damaged-<n>` and the new one written beside."""
        if not final.is_dir() or read_marker(final) is None:
            return False
        if final.name in self.failed or final.name in dict(damaged(self.ckpt_dir)):
            moved = set_aside(final, DAMAGED_LABEL)
            self.failed.discard(final.name)  # the name now belongs to the checkpoint written next
            log.warning(
                "%s failed its checks: set aside as %s, left as it is; writing a new one", final, moved.name
            )
            return False
        return is_complete(final)

    def _out_of_space_guard(self, tag: str, write: Any) -> str | None:
        """Run `write`; None if it succeeded, the one-line message if the disk filled up (other errors propagate)."""
        try:
            write()
        except Exception as exc:
            if not is_out_of_space(exc):
                raise
            return self._space_message(tag, first_line(exc))
        return None

    def _space_message(self, tag: str, cause: str) -> str:
        free = human_bytes(shutil.disk_usage(self.ckpt_dir).free) if self.ckpt_dir.is_dir() else "unknown"
        return (
            f"disk full while writing checkpoint {tag} in {self.ckpt_dir} ({cause}; {free} free now): it was "
            f"removed and the earlier checkpoints are intact; {self._keep_last_note()}"
        )

    def _keep_last_note(self) -> str:
        k = self.keep_last
        return (
            f"train.keep_last={k} keeps {k} checkpoint{'s' if k != 1 else ''} while the next one is written, so the "
            f"folder needs room for {k + 1}: free space, lower train.keep_last, or move --run-dir"
        )

    def _room_problem(self, tag: str) -> str | None:
        """Rank 0, before a save: why the next checkpoint cannot fit, judged by the newest complete one's size (every
        rank's files are in its folder); None where it fits or there is nothing to judge by yet."""
        refs = [r for r in list_complete(self.ckpt_dir) if not r.universal]
        if not refs:
            return None
        last = refs[-1].path
        need = folder_bytes(last)
        free = shutil.disk_usage(self.ckpt_dir).free
        if free >= need:
            return None
        return (
            f"not enough disk space for checkpoint {tag} in {self.ckpt_dir}: {human_bytes(free)} free, about "
            f"{human_bytes(need)} needed (the size of {last.name}); {self._keep_last_note()}"
        )

    def _prune(self, keep: Path) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older ones, older half-written leftovers, and what
        deletions cut short left behind."""
        refs = [r for r in list_complete(self.ckpt_dir) if not r.universal and r.tag not in self.failed]
        doomed = [r.path for r in refs[: max(0, len(refs) - self.keep_last)] if r.path != keep]
        keep_step = read_state(keep)["step"]
        for p in self.ckpt_dir.iterdir():
            if DELETING_RE.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                continue
            m = TAG_RE.match(p.name) or LEFTOVER_RE.match(p.name)
            if not (m and p.is_dir()) or p == keep:
                continue
            leftover = LEFTOVER_RE.match(p.name) is not None
            # Only a folder without any marker is half-written; one whose marker no longer matches its files is
            # damaged and stays (`damaged`), like one that failed its content check (`failed`).
            half_written = not m.group(2) and read_marker(p) is None
            if (leftover or half_written) and int(m.group(1)) <= keep_step:
                doomed.append(p)
        for p in doomed:
            remove_checkpoint(p)
            log.info("removed old checkpoint %s", p)

    def load(self, ref: CheckpointRef) -> dict[str, Any]:
        """Load engine state (all ranks) and return the loop's state; restores this rank's RNG where it exists.
        Every file is checked before anything of it is unpickled, and every rank stops if any rank's check fails."""
        state = read_state(ref.path)
        rng_file = ref.path / f"rng_rank{self.dist.rank}.pt"
        own_rng = rng_file.is_file() and ref.world_size == self.dist.world_size
        refused, rng = None, None
        try:
            check_deepspeed_files(ref.path)
            rng = load_rng_file(rng_file) if own_rng else None
        except ConfigError as exc:
            refused = str(exc)
        if D.any_rank(refused is not None):
            raise ConfigError(
                refused or f"checkpoint {ref.tag}: another rank refused its files (see its error)"
            )
        self.engine.load(ref.load_dir, ref.tag)
        loader_file = ref.path / f"loader_rank{self.dist.rank}.bin"
        if own_rng and loader_file.is_file():  # the same world size: this rank's loader position is its own
            state["loader_state"] = loader_file.read_bytes()
        if rng is not None:
            set_rng_state(rng)
        else:
            # A different world size has no saved RNG stream for this rank: derive a fresh one from the position.
            seed = 1_000_003 * int(state["step"]) + self.dist.rank
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
        log.info("resumed from %s (step %d, written by %d ranks)", ref.path, ref.step, ref.world_size)
        return state
