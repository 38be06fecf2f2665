"""Which weights a start begins from, decided from the command line and the run folder before anything in the folder
is written: `--resume auto` (resume or start afresh), `--eval-only` (which checkpoint, or initial weights with
`--resume none`), and whether the settings can resume the saved state at all (the model must be the saved one).

trainer/main.py builds a `RunRequest` from the command line and calls these in its `check`, on every rank and before
any process group exists; each returns the request with its decision in it (the request itself never changes), and
each refusal is a one-line `ConfigError` (exit 2) that leaves the run folder as it was.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, replace

from trainer.checkpoint.layout import damaged, incomplete, list_complete, move_aside_hint
from trainer.config.config import ConfigError, RunConfig
from trainer.run.run_folder import RunFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRequest:
    """What the command line asks of one start (trainer/main.py's options), and what was decided from the run folder
    about which weights it begins from."""

    run_dir: str
    preset: str | None = None
    config: str | None = None
    train_data: str | None = None
    val_data: str | None = None
    max_steps: int | None = None
    overrides: tuple[str, ...] = ()
    """--set SECTION.FIELD=VALUE, in order."""
    resume: str | None = None
    """--resume as given (latest, auto, none, a tag), then as resolved: latest, a tag, or None (a fresh start)."""
    eval_only: bool = False
    deepspeed_config: str | None = None
    local_rank: int | None = None
    initial: bool = False
    """--eval-only --resume none: score freshly initialised weights."""
    auto_resume: bool = False
    """--resume auto was given (and resolved to `latest` or to a fresh start)."""
    auto_fresh: bool = False
    """--resume auto found none: a fresh start, beside whatever incomplete checkpoints the folder holds."""


def resolve_auto_resume(req: RunRequest, folder: RunFolder) -> RunRequest:
    """`--resume auto`: becomes `--resume latest` where the run folder holds a complete checkpoint, else a fresh
    start (`resume` None); says which. Checkpoints without their COMPLETE marker (a save cut off before the
    first one finished) cannot be resumed: the fresh run sets them aside (trainer/checkpoint/checkpointing.py
    `set_aside_incomplete`). A folder whose checkpoints were complete once but all fail their checks now is
    refused: a fresh run would bury them under its own saves."""
    if req.resume != "auto":
        return req
    ckpt_dir = folder.path / "checkpoints"
    refs = list_complete(ckpt_dir)
    if refs:
        log.info(
            "--resume auto: resuming %s from its newest complete checkpoint (step %d)",
            folder.path,
            refs[-1].step,
        )
        return replace(req, resume="latest", auto_resume=True)
    bad = damaged(ckpt_dir)
    if bad:
        raise ConfigError(
            f"--resume auto: no intact checkpoint in {ckpt_dir}, and a fresh start would write over the damaged "
            f"ones: {'; '.join(f'{tag} ({why})' for tag, why in bad)}; "
            f"{move_aside_hint(ckpt_dir, [tag for tag, _ in bad])}"
        )
    leftovers = [p.name for p in incomplete(ckpt_dir)]
    log.info(
        "--resume auto: no complete checkpoint in %s: starting a fresh run (preset %s)%s",
        *(folder.path, req.preset or "tiny"),
        f"; its incomplete ones ({', '.join(leftovers)}) cannot be resumed and are set aside"
        if leftovers
        else "",
    )
    return replace(req, resume=None, auto_resume=True, auto_fresh=True)


def resolve_initial(req: RunRequest) -> RunRequest:
    """`--resume none` (with --eval-only only): score freshly initialised weights; `initial` says so."""
    if req.resume != "none":
        return req
    if not req.eval_only:
        raise ConfigError(
            "--resume none: only with --eval-only (to score initial weights); a training run without --resume "
            "starts afresh"
        )
    return replace(req, resume=None, initial=True)


def resolve_eval_target(req: RunRequest, folder: RunFolder) -> RunRequest:
    """Which weights `--eval-only` scores. Without --resume: the newest intact checkpoint of a run folder that has
    one (named in the log and in its output folder, RUN/eval/<tag>/): a trained run's weights are what an
    evaluation of that folder means, and the name keeps the result from being taken for another's. A folder with no
    complete checkpoint is refused: scoring untrained weights must be asked for (--resume none)."""
    if req.initial or req.resume not in (None, "auto"):
        return req
    ckpt_dir = folder.path / "checkpoints"
    if list_complete(ckpt_dir):
        if req.resume is None:
            log.info(
                "--eval-only without --resume: evaluating the newest intact checkpoint of %s (--resume TAG for "
                "another, --resume none for freshly initialised weights)",
                folder.path,
            )
        return replace(req, resume="latest")
    raise ConfigError(
        f"--eval-only: no complete checkpoint in {ckpt_dir} to evaluate: pass --run-dir of a trained run, or "
        f"--resume none to score freshly initialised weights"
    )


# Model settings a resumed run may change: none of them changes the shapes or names of the saved weights.
RESUMABLE_MODEL_FIELDS = frozenset({"dropout", "attention", "compile", "init_std"})


def check_same_model(cfg: RunConfig, folder: RunFolder) -> None:
    """A resumed run (or an evaluation of a checkpoint) keeps the model its checkpoints hold: another variant,
    tower, size or vocabulary cannot load them. Refused here, before the folder's config.json is rewritten."""
    saved = folder.read_config().model
    changed = [
        f"model.{f.name}={getattr(cfg.model, f.name)} (saved: {getattr(saved, f.name)})"
        for f in dataclasses.fields(saved)
        if f.name not in RESUMABLE_MODEL_FIELDS and getattr(cfg.model, f.name) != getattr(saved, f.name)
    ]
    if changed:
        raise ConfigError(
            f"--resume: {', '.join(changed)}: the checkpoints in {folder.path} hold the saved model's weights, "
            f"which another model cannot load; nothing was changed: drop those --set options, or start a new "
            f"--run-dir"
        )
