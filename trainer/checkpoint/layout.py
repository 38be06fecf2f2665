"""The on-disk contract of a run's checkpoints: layout, completeness markers, listing, resume resolution, deletion.

Layout of a run's checkpoints (`<run_dir>/checkpoints/`):

    global_step<N>/               one checkpoint; every rank writes its DeepSpeed ZeRO shards into it
        ...DeepSpeed files...     model states, optimizer shards, lr scheduler
        trainer_state.json        the loop's state_dict: step, epoch, position in the epoch, samples seen, world size
        rng_rank<R>.pt            each rank's RNG states (torch, CUDA, numpy, python) as tensors and numbers
        loader_rank<R>.bin        each rank's data loader position where the loader keeps one (DALI's checkpoint
                                  with its reading's key, data_pipeline/loaders/loader_state.py); used by a resume on the
                                  same world size, which then skips the consumed batches without decoding them
        COMPLETE                  written last, atomically, by rank 0 after every rank has finished writing; lists
                                  every file of the checkpoint with its size and SHA-256
                                  (trainer/checkpoint/integrity.py)
    global_step<N>_universal/     the same step converted for another world size (trainer/checkpoint/universal.py)
    latest                        DeepSpeed's pointer, rewritten only once a checkpoint is COMPLETE
    global_step<N>.incomplete-<k> a save cut off before its marker, set aside at the next training start
    global_step<N>.damaged-<k>    a checkpoint that failed its checks, moved out of the way of a new save of its step

DeepSpeed writes its own `latest` from rank 0 as soon as rank 0's files are out, before the other ranks are known to
have finished (deepspeed/runtime/engine.py, save_checkpoint), and not atomically. A checkpoint is therefore only ever
taken as a resume point when its COMPLETE marker exists, so a crash (kill -9) mid-save leaves the previous checkpoint
as the latest one. A run that reaches a step whose complete checkpoint already exists (after resuming from an earlier
one) writes `global_step<N>.partial` and swaps it in only once complete, so a broken run never costs a good
checkpoint; leftovers of such attempts are removed by the next successful save (trainer/checkpoint/checkpointing.py).

A checkpoint is complete only while its marker exists and every file the marker lists is there with its size, so a
checkpoint damaged after it was written (files deleted by hand, a copy cut short) is not offered for resuming either;
before a resume its files are also compared with the marker's hashes (`resolve_resume(verify=True)`), which catches
bytes changed at the same size. A checkpoint with a marker that fails either check is damaged (`damaged`): never
resumed, pruned, replaced or deleted by the trainer; where a save of its step comes along, it is renamed aside.
Deleting a checkpoint (keep-last pruning, replacing a universal copy) first renames it to `<tag>.deleting`, an
atomic step after which it no longer counts, and only then removes its files: a kill -9 in the middle leaves a
`.deleting` folder that is never listed and that the next save removes.

A checkpoint of the default configuration is written at ZeRO stage 0 (trainer/engine/ds_config.py): no ZeRO shards, the
full weights and torch's AdamW state in `mp_rank_00_model_states.pt`, the same for every rank. It resumes as it is on
any number of ranks (the engine follows the checkpoint's stage: trainer/engine/engine.py `_follow_checkpoint_stage`), the
epoch continuing at the same fraction as after a universal resume; `to-universal`, which reads ZeRO shards only, says
that it needs no conversion.

How the files inside are loaded safely: trainer/checkpoint/safety.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import atomic
from trainer.checkpoint.integrity import HASH, check_files, digests
from trainer.config.config import ConfigError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
UNIVERSAL_SUFFIX = "_universal"
PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
DELETING_SUFFIX = ".deleting"
TAG_RE = re.compile(r"^global_step(\d+)(_universal)?$")
LEFTOVER_RE = re.compile(r"^global_step(\d+)(\.partial|\.old|\.incomplete-\d+)$")
DELETING_RE = re.compile(r"^global_step\d+(_universal)?(\.partial|\.old)?\.deleting$")


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


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
    """The marker exists and every file it lists is there with its size. Content hashes are checked before a resume only (`resolve_resume(verify=True)`):
    they read every byte."""
    marker = read_marker(path)
    return marker is not None and check_files(path, marker, hashes=False) is None


def read_marker(path: Path) -> dict[str, Any] | None:
    """The COMPLETE marker of checkpoint folder `path`; None without one (it is written atomically: never torn)."""
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else {}


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
    """Mark checkpoint folder `path` complete, listing its files with their sizes and content hashes, so that a
    later loss or change of any of them shows (trainer/checkpoint/integrity.py)."""
    sizes = file_sizes(path)
    record = dict(marker, files=sizes, **{HASH: digests(path, sizes)})
    atomic.write_text(path / COMPLETE, json.dumps(record) + "\n")


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
        m = TAG_RE.match(p.name)
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


def damaged(ckpt_dir: Path) -> list[tuple[str, str]]:
    """(tag, why) of every checkpoint folder under `ckpt_dir` that has a COMPLETE marker but fails its size check or
    has no readable trainer state: written completely once, changed since. Such a folder is never resumed, never
    pruned and never replaced by the trainer (it may be the only copy of a long run): the operator moves it aside."""
    out = []
    for p in sorted(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []:
        marker = read_marker(p) if TAG_RE.match(p.name) and p.is_dir() else None
        if marker is None:
            continue
        why = check_files(p, marker, hashes=False)
        if why is None:
            try:
                read_state(p)
            except (OSError, ValueError):
                why = f"its {STATE_FILE} cannot be read"
        if why is not None:
            out.append((p.name, why))
    return out


def incomplete(ckpt_dir: Path) -> list[Path]:
    """Checkpoint folders without a COMPLETE marker: saves cut off before they finished, which never counted."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        p for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and p.is_dir() and read_marker(p) is None
    )


def set_aside(path: Path, label: str) -> Path:
    """Rename checkpoint folder `path` to `<name>.<label>-<n>` (the lowest free n): a name that is never listed,
    resumed or pruned, so its files stay for the operator to inspect or delete. Returns the new path."""
    n = 1
    while (dst := path.with_name(f"{path.name}.{label}-{n}")).exists() or dst.is_symlink():
        n += 1
    os.rename(path, dst)
    return dst


def move_aside_hint(ckpt_dir: Path, tags: list[str]) -> str:
    first = tags[0]
    return (
        f"move them out of the way (e.g. mv {ckpt_dir / first} {ckpt_dir / first}.damaged), or restore them from a "
        f"copy, then start again"
    )


@dataclass
class ResumeFindings:
    """What choosing a checkpoint to resume found on the way: notes to log, and the tags whose files failed their
    content check (never to be pruned or replaced by the run that resumes)."""

    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def resolve_resume(
    ckpt_dir: Path,
    which: str,
    world_size: int,
    *,
    verify: bool = False,
    findings: ResumeFindings | None = None,
) -> CheckpointRef:
    """Find the checkpoint `--resume which` means: `latest` (the newest intact one) or a tag; check the world size.

    `verify`: also compare every file with the content hash in its marker (trainer/checkpoint/integrity.py). With
    `latest`, a checkpoint that fails falls back to the next older intact one, and `findings` (when given) receives
    what was passed over and why; a named tag that fails is refused. Failing checkpoints are left as they are."""
    refs = list_complete(ckpt_dir)
    bad = dict(damaged(ckpt_dir))
    found = findings if findings is not None else ResumeFindings()
    if which == "latest":
        ref = _newest_intact(ckpt_dir, refs, bad, world_size, verify, found)
    else:
        path = ckpt_dir / which
        if not path.is_dir():
            names = ", ".join(r.tag for r in refs) or "none"
            raise ConfigError(
                f"--resume {which}: no checkpoint '{which}' in {ckpt_dir} (complete ones: {names})"
            )
        if which in bad:
            raise ConfigError(
                f"--resume {which}: {path} is damaged ({bad[which]}); not resumed and left as it is"
            )
        ref = next((r for r in refs if r.tag == which), None)
        if ref is None:
            raise ConfigError(
                f"--resume {which}: {path} is incomplete (no {COMPLETE} marker: its save was cut off)"
            )
        why = _content_problem(ref, verify)
        if why is not None:
            raise ConfigError(
                f"--resume {which}: {path} is damaged ({why}); not resumed and left as it is (train."
                f"verify_checkpoints=false skips this check)"
            )
    if not ref.universal and ref.world_size != world_size:
        if written_zero_stage(ref.path) == 0:
            # Nothing sharded: every rank loads the one complete state; only the data order and the per-rank RNG and
            # loader positions are functions of the world size (trainer/run/loop.py, trainer/checkpoint/checkpointing.py `load`).
            log.info(
                "checkpoint %s (ZeRO stage 0) was written by %d ranks and resumes on %d as it is; the epoch "
                "continues at the same fraction in the order of %d ranks",
                *(ref.tag, ref.world_size, world_size, world_size),
            )
            return ref
        raise ConfigError(
            f"checkpoint {ref.tag} was written by {ref.world_size} ranks and this run has {world_size}: "
            f"DeepSpeed cannot reshard it directly. Convert it once with\n"
            f"  python -m trainer.checkpoint to-universal --run-dir {ckpt_dir.parent} --tag {ref.tag}\n"
            f"then resume with --resume {ref.tag}{UNIVERSAL_SUFFIX}"
        )
    return ref


def _newest_intact(
    ckpt_dir: Path,
    refs: list[CheckpointRef],
    bad: dict[str, str],
    world_size: int,
    verify: bool,
    found: ResumeFindings,
) -> CheckpointRef:
    """`--resume latest`: the newest checkpoint whose files pass their checks; newer ones that fail are named in
    `found`. Of one step in both forms, the original where the world size matches comes first, else the universal
    copy."""
    failed = dict(bad)

    def preference(r: CheckpointRef) -> tuple[int, int]:
        return r.step, 2 if not r.universal and r.world_size == world_size else int(r.universal)

    order = sorted(refs, key=preference, reverse=True)
    for ref in order:
        why = _content_problem(ref, verify)
        if why is None:
            passed = [f"{tag} ({w})" for tag, w in failed.items() if _step_of(tag) >= ref.step]
            if passed:
                found.notes.append(
                    f"resuming from {ref.tag}, the newest intact checkpoint; passed over, left as they are: "
                    + "; ".join(passed)
                )
            return ref
        failed[ref.tag] = why
        found.failed.append(ref.tag)
    if not failed:
        raise ConfigError(
            f"--resume latest: no complete checkpoint in {ckpt_dir}{_incomplete_note(ckpt_dir)}"
        )
    raise ConfigError(
        f"no intact checkpoint in {ckpt_dir}: "
        + "; ".join(f"{tag} ({why})" for tag, why in sorted(failed.items(), key=lambda kv: _step_of(kv[0])))
        + f". Nothing was resumed, and they are left as they are: {move_aside_hint(ckpt_dir, sorted(failed))}"
    )


def _incomplete_note(ckpt_dir: Path) -> str:
    names = [p.name for p in incomplete(ckpt_dir)]
    if not names:
        return ""
    return f" (incomplete, never resumable: {', '.join(names)}; --resume auto starts afresh beside them)"


def _step_of(tag: str) -> int:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else -1


def _content_problem(ref: CheckpointRef, verify: bool) -> str | None:
    """Why `ref`'s files differ from its marker (None: intact, or not verified)."""
    if not verify:
        return None
    return check_files(ref.path, read_marker(ref.path) or {})


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
    """Why a stage-0 checkpoint is not converted: it resumes as it is on any number of ranks."""
    ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
    return (
        f"checkpoint {tag} (written by {ranks}) was written at ZeRO stage 0 (deepspeed_configs/README.md) and needs "
        f"no conversion: it holds the whole state, and resumes on any number of ranks with --resume {tag}"
    )
