"""Checkpoints with an explicit state contract, and the universal-checkpoint conversion command.

Layout of a run's checkpoints (`<run_dir>/checkpoints/`):

    global_step<N>/               one checkpoint; every rank writes its DeepSpeed ZeRO shards into it
        ...DeepSpeed files...     model states, optimizer shards, lr scheduler
        trainer_state.json        the loop's state_dict: step, epoch, position in the epoch, samples seen, world size
        rng_rank<R>.pt            each rank's RNG states (torch, CUDA, numpy, python) as tensors and numbers
        COMPLETE                  written last, atomically, by rank 0 after every rank has finished writing; lists
                                  every file of the checkpoint with its size
    global_step<N>_universal/     the same step converted for another world size (`to-universal` below)
    latest                        DeepSpeed's pointer, rewritten only once a checkpoint is COMPLETE

DeepSpeed writes its own `latest` from rank 0 as soon as rank 0's files are out, before the other ranks are known to
have finished (deepspeed/runtime/engine.py, save_checkpoint), and not atomically. A checkpoint is therefore only ever
taken as a resume point when its COMPLETE marker exists, so a crash (kill -9) mid-save leaves the previous checkpoint
as the latest one. A run that reaches a step whose complete checkpoint already exists (after resuming from an earlier
one) writes `global_step<N>.partial` and swaps it in only once complete, so a broken run never costs a good
checkpoint; leftovers of such attempts are removed by the next successful save.

A checkpoint is complete only while its marker exists and every file the marker lists is there with its size, so a
checkpoint damaged after it was written (files deleted by hand, a copy cut short) is not offered for resuming either.
Deleting a checkpoint (keep-last pruning, replacing a universal copy) first renames it to `<tag>.deleting`, an
atomic step after which it no longer counts, and only then removes its files: a kill -9 in the middle leaves a
`.deleting` folder that is never listed and that the next save removes.

Safety: every file of a checkpoint this project reads itself is loaded with `torch.load(weights_only=True)`, which
unpickles tensors and plain containers only and refuses any other object before running anything. The RNG files
hold tensors, lists and numbers only for that reason; RNG files of the older format (numpy's state as an array) are
accepted through an explicit allow-list of numpy's array globals. Before DeepSpeed loads a checkpoint (its loader
unpickles everything), every `.pt` file in it is scanned, without unpickling, for the objects it names; a file that
names anything outside what DeepSpeed itself writes is refused.

Disk space: before a save, rank 0 compares the free space of the checkpoint folder with the size of the newest
complete checkpoint (all ranks' files), and refuses to start a save that cannot fit: with `train.keep_last=K`, K
checkpoints stay on disk while the next one is written, so the folder needs room for K+1. A save that runs out of
space anyway (ENOSPC, or torch's "unexpected pos" from its zip writer) stops the run with one line saying so
(exit 1: trainer/main.py), removes its own half-written folder and leaves the earlier checkpoints as they were.

Different world size: DeepSpeed refuses a ZeRO checkpoint written by another number of ranks. Convert it once,

    python -m trainer.checkpointing to-universal --run-dir RUN [--tag global_step<N>]

which runs `python -m deepspeed.checkpoint.ds_to_universal --input_folder RUN/checkpoints/<tag> --output_folder
RUN/checkpoints/<tag>_universal --inject_missing_state`, copies the trainer's side files and marks it COMPLETE; then
resume with `--resume <tag>_universal` on any number of ranks (the trainer sets `"checkpoint": {"load_universal":
true}` in the DeepSpeed config for it).

A checkpoint of a single-rank run is written at ZeRO stage 0 (trainer/engine.py `resolve_ds_config`): no ZeRO
shards, the full weights and torch's AdamW state in `mp_rank_00_model_states.pt`. It resumes on one rank as it is.
ds_to_universal reads ZeRO shards only, and a run on more ranks runs under ZeRO, whose optimizer cannot load that
state: `to-universal` and a resume on another number of ranks refuse it, saying so.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import pickle
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

from data_pipeline import atomic
from trainer import dist as D
from trainer.config import ConfigError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
UNIVERSAL_SUFFIX = "_universal"
PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
DELETING_SUFFIX = ".deleting"
RNG_FORMAT = "vqa-align/rng/2"
_TAG_RE = re.compile(r"^global_step(\d+)(_universal)?$")
_LEFTOVER_RE = re.compile(r"^global_step(\d+)(\.partial|\.old)$")
_DELETING_RE = re.compile(r"^global_step\d+(_universal)?(\.partial|\.old)?\.deleting$")


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


# -- RNG files ---------------------------------------------------------------------------------------------------
# The older RNG format pickled numpy's state as a tuple holding an ndarray: loading it needs numpy's array globals,
# allowed for that format only. numpy 1 and 2 name the reconstructor differently; both names map to the one here.
_np_multiarray = getattr(np, "_core", None) or np.core
_LEGACY_RNG_GLOBALS: list[Any] = [
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    (_np_multiarray.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    (_np_multiarray.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
]
_LEGACY_RNG_NAMES = {
    "numpy.ndarray",
    "numpy.dtype",
    f"numpy.dtypes.{type(np.dtype(np.uint32)).__name__}",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
}


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, lists, strings and numbers: a file that `weights_only=True` loads."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "format": RNG_FORMAT,
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": int(py_version), "state": [int(x) for x in py_internal], "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved (or the older format, which holds numpy's and python's own tuples)."""
    torch.set_rng_state(state["torch"])
    if state.get("format") == RNG_FORMAT:
        n, p = state["numpy"], state["python"]
        np.random.set_state(
            {
                "bit_generator": n["bit_generator"],
                "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                "has_gauss": n["has_gauss"],
                "gauss": n["gauss"],
            }
        )
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    else:
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unsafe_globals(file: Path) -> list[str]:
    """The objects other than tensors and plain containers a torch file names, read from its pickle opcodes
    without unpickling anything; ["unreadable"] where the file is no torch zip file."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    except Exception:  # noqa: BLE001 - any reason it cannot be scanned means it is refused, not loaded
        return ["unreadable"]


def load_rng_file(file: Path) -> dict[str, Any]:
    """A rank's RNG file, loaded with `weights_only=True` and checked; ConfigError for anything else."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Either the older format (numpy's array inside) or a file naming other objects: decide from its opcodes
        # before unpickling anything, and allow numpy's array globals for the older format only.
        unsafe = unsafe_globals(file)
        if not unsafe or not set(unsafe) <= _LEGACY_RNG_NAMES:
            raise ConfigError(
                f"{file}: holds objects other than tensors and plain containers ({', '.join(unsafe) or 'unknown'})"
                f"; not loaded (not an RNG file the trainer wrote)"
            ) from None
        with torch.serialization.safe_globals(_LEGACY_RNG_GLOBALS):
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: one line naming it
        raise ConfigError(f"{file}: not a readable RNG file ({first_line(exc)})") from None
    check_rng_state(state, file)
    return state


def check_rng_state(state: Any, file: Path) -> None:
    """The shape of either RNG format, checked before any of it is applied."""
    ok = isinstance(state, dict) and isinstance(state.get("torch"), torch.Tensor)
    if ok and state.get("format") == RNG_FORMAT:
        n, p = state.get("numpy"), state.get("python")
        ok = (
            isinstance(n, dict)
            and isinstance(n.get("key"), torch.Tensor)
            and isinstance(p, dict)
            and isinstance(p.get("state"), list)
        )
    elif ok:
        ok = isinstance(state.get("numpy"), tuple) and isinstance(state.get("python"), tuple)
    if not ok:
        raise ConfigError(f"{file}: not an RNG file the trainer wrote (unexpected contents)")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# -- files DeepSpeed loads ---------------------------------------------------------------------------------------
# What DeepSpeed's own checkpoint files name besides what `weights_only=True` allows (read from checkpoints written at
# ZeRO stages 0-3 and their universal copies; DynamicLossScaler is fp16's loss scaler). DeepSpeed unpickles its files
# fully (weights_only=False), so a file naming anything else is refused before DeepSpeed opens it.
DEEPSPEED_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


def check_deepspeed_files(path: Path) -> None:
    """Refuse a checkpoint whose .pt files name objects DeepSpeed does not write, without unpickling them."""
    for file in sorted(path.rglob("*.pt")):
        if file.name.startswith("rng_rank"):
            continue  # loaded by load_rng_file, with weights_only=True
        unknown = sorted(set(unsafe_globals(file)) - DEEPSPEED_GLOBALS)
        if unknown:
            raise ConfigError(
                f"{file}: names objects that DeepSpeed's checkpoint files do not hold ({', '.join(unknown)}); "
                f"not loaded"
            )


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
    """The marker exists and every file it lists is there with its size (markers written before the list existed
    vouch for the folder as it is)."""
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        return False  # no marker (the marker is written atomically: it is never torn)
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict):
        return True
    return all(_size(path / name) == size for name, size in files.items())


def _size(file: Path) -> int | None:
    try:
        return file.stat().st_size
    except OSError:
        return None


def file_sizes(path: Path) -> dict[str, int]:
    """Every file under checkpoint folder `path` (relative name -> bytes), its marker and temp files aside."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != COMPLETE and not f.name.startswith("."):
            out[f.relative_to(path).as_posix()] = f.stat().st_size
    return out


def write_complete_marker(path: Path, marker: dict[str, Any]) -> None:
    """Mark checkpoint folder `path` complete, listing its files so that a later loss of any of them shows."""
    atomic.write_text(path / COMPLETE, json.dumps(dict(marker, files=file_sizes(path))) + "\n")


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder such that no moment of the deletion leaves a complete-looking one: rename it to
    `<name>.deleting` first (atomic; that name is never listed), then remove the files. A deletion cut short (kill -9)
    leaves only the `.deleting` folder, which the next save removes."""
    if not path.exists():
        return
    doomed = path.with_name(path.name + DELETING_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)  # an earlier deletion of the same name that was cut short
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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
        try:
            state = read_state(p)
        except (OSError, ValueError):
            continue  # a marker without the trainer's state: not a checkpoint this trainer can resume
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
        ref = next((r for r in refs if r.tag == which), None)
        if ref is None:
            raise ConfigError(
                f"--resume {which}: {path} is incomplete (no {COMPLETE} marker, or files it lists are missing: "
                f"its save or its deletion was cut off)"
            )
    if not ref.universal and ref.world_size != world_size:
        if written_zero_stage(ref.path) == 0:
            raise ConfigError(stage0_reshard_message(ref.tag, ref.world_size))
        raise ConfigError(
            f"checkpoint {ref.tag} was written by {ref.world_size} ranks and this run has {world_size}: "
            f"DeepSpeed cannot reshard it directly. Convert it once with\n"
            f"  python -m trainer.checkpointing to-universal --run-dir {ckpt_dir.parent} --tag {ref.tag}\n"
            f"then resume with --resume {ref.tag}{UNIVERSAL_SUFFIX}"
        )
    return ref


def has_zero_shards(path: Path) -> bool:
    """Whether DeepSpeed checkpoint folder `path` holds ZeRO optimizer shards; a stage-0 checkpoint has none."""
    return any(path.glob("*zero_pp_rank_*_optim_states.pt"))


def written_zero_stage(path: Path) -> int:
    """The ZeRO stage checkpoint `path` was written with as far as its trainer state records it (0 or >= 1 from its
    files where the record is missing)."""
    stage = read_state(path).get("zero_stage")
    if stage is not None:
        return int(stage)
    return 1 if has_zero_shards(path) else 0


def stage0_reshard_message(tag: str, world_size: int) -> str:
    """Why a stage-0 checkpoint continues only on the number of ranks that wrote it, and what to do instead."""
    ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
    return (
        f"checkpoint {tag} was written at ZeRO stage 0 (deepspeed_configs/README.md) and needs no conversion: "
        f"resume it on {ranks} with --resume {tag}. It cannot continue on another number of ranks: those run "
        f"under ZeRO, whose optimizer cannot load its AdamW state (mp_rank_00_model_states.pt), and "
        f"ds_to_universal converts ZeRO shards only; start such a run afresh"
    )


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
        """Every rank calls this. The checkpoint counts only once rank 0 has written COMPLETE, after all ranks.
        Raises CheckpointSpaceError on every rank where the disk is (or would be) too full; the earlier checkpoints
        stay as they were."""
        tag = tag_for_step(step)
        final = self.ckpt_dir / tag
        # A complete checkpoint of this step already exists (a resumed run passing it again): write beside it and
        # swap at the end, so that a run dying mid-save never costs the good copy. Rank 0 decides for everyone
        # (DeepSpeed needs the same tag on every rank), and whether there is room for another checkpoint at all.
        decision = (is_complete(final), self._room_problem(tag)) if self.dist.is_main else None
        replacing, no_room = D.broadcast_object(decision)  # type: ignore[misc]
        if no_room:
            raise CheckpointSpaceError(no_room)
        write_tag = tag + PARTIAL_SUFFIX if replacing else tag
        path = self.ckpt_dir / write_tag
        t0 = time.perf_counter()
        if self.dist.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            # Whatever is at the write path is a leftover of an attempt that died (a complete checkpoint never is):
            # stale shards, e.g. from another world size, must not mix with the new ones.
            shutil.rmtree(path, ignore_errors=True)
        D.barrier()
        failure = self._out_of_space_guard(tag, lambda: self._write_files(path, write_tag, trainer_state))
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

    def _write_files(self, path: Path, write_tag: str, trainer_state: dict[str, Any]) -> None:
        """This rank's part of a checkpoint: DeepSpeed's files, its RNG states, and (rank 0) the trainer's state."""
        self.engine.save(self.ckpt_dir, write_tag, client_state={"trainer": trainer_state})
        atomic.torch_save(rng_state(), path / f"rng_rank{self.dist.rank}.pt")
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
        refs = [r for r in list_complete(self.ckpt_dir) if not r.universal]
        doomed = [r.path for r in refs[: max(0, len(refs) - self.keep_last)] if r.path != keep]
        keep_step = read_state(keep)["step"]
        for p in self.ckpt_dir.iterdir():
            if _DELETING_RE.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                continue
            m = _TAG_RE.match(p.name) or _LEFTOVER_RE.match(p.name)
            if not (m and p.is_dir()) or p == keep:
                continue
            leftover = _LEFTOVER_RE.match(p.name) is not None
            half_written = not m.group(2) and not is_complete(p)
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
    if written_zero_stage(src) == 0:
        raise ConfigError(stage0_reshard_message(tag, read_state(src)["world_size"]))
    dst = ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}"
    remove_checkpoint(dst)
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
    write_complete_marker(dst, marker)
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
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
