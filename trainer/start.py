"""Which weights a start begins from, decided from the command line and the run folder before anything in the folder
is written: `--resume auto` (resume or start afresh), `--eval-only` (which checkpoint, or initial weights with
`--resume none`), and whether the settings can resume the saved state at all (the model must be the saved one).

trainer/main.py calls these in its `check`, on every rank and before any process group exists; each refusal is a
one-line `ConfigError` (exit 2) that leaves the run folder as it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from trainer.checkpoint_layout import damaged, incomplete, list_complete, move_aside_hint
from trainer.config import ConfigError, RunConfig
from trainer.run_folder import RunFolder

log = logging.getLogger(__name__)


def resolve_auto_resume(args: argparse.Namespace, folder: RunFolder) -> None:
    """`--resume auto`: becomes `--resume latest` where the run folder holds a complete checkpoint, else a fresh
    start (`args.resume = None`); says which. Checkpoints without their COMPLETE marker (a save cut off before the
    first one finished) cannot be resumed: the fresh run sets them aside (trainer/checkpointing.py
    `set_aside_incomplete`). A folder whose checkpoints were complete once but all fail their checks now is
    refused: a fresh run would bury them under its own saves."""
    args.auto_fresh, args.auto_resume = False, args.resume == "auto"
    if not args.auto_resume:
        return
    ckpt_dir = folder.path / "checkpoints"
    refs = list_complete(ckpt_dir)
    if refs:
        args.resume = "latest"
        log.info(
            "--resume auto: resuming %s from its newest complete checkpoint (step %d)",
            folder.path,
            refs[-1].step,
        )
        return
    bad = damaged(ckpt_dir)
    if bad:
        raise ConfigError(
            f"--resume auto: no intact checkpoint in {ckpt_dir}, and a fresh start would write over the damaged "
            f"ones: {'; '.join(f'{tag} ({why})' for tag, why in bad)}; "
            f"{move_aside_hint(ckpt_dir, [tag for tag, _ in bad])}"
        )
    args.resume, args.auto_fresh = None, True
    leftovers = [p.name for p in incomplete(ckpt_dir)]
    log.info(
        "--resume auto: no complete checkpoint in %s: starting a fresh run (preset %s)%s",
        *(folder.path, args.preset or "tiny"),
        f"; its incomplete ones ({', '.join(leftovers)}) cannot be resumed and are set aside"
        if leftovers
        else "",
    )


def resolve_initial(args: argparse.Namespace) -> None:
    """`--resume none` (with --eval-only only): score freshly initialised weights; `args.initial` says so."""
    args.initial = args.resume == "none"
    if not args.initial:
        return
    if not args.eval_only:
        raise ConfigError(
            "--resume none: only with --eval-only (to score initial weights); a training run without --resume "
            "starts afresh"
        )
    args.resume = None


def resolve_eval_target(args: argparse.Namespace, folder: RunFolder) -> None:
    """Which weights `--eval-only` scores. Without --resume: the newest intact checkpoint of a run folder that has
    one (named in the log and in its output folder, RUN/eval/<tag>/): a trained run's weights are what an
    evaluation of that folder means, and the name keeps the result from being taken for another's. A folder with no
    complete checkpoint is refused: scoring untrained weights must be asked for (--resume none)."""
    if args.initial or args.resume not in (None, "auto"):
        return
    ckpt_dir = folder.path / "checkpoints"
    if list_complete(ckpt_dir):
        if args.resume is None:
            log.info(
                "--eval-only without --resume: evaluating the newest intact checkpoint of %s (--resume TAG for "
                "another, --resume none for freshly initialised weights)",
                folder.path,
            )
        args.resume = "latest"
        return
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
