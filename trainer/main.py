"""Entry point: parse, initialise the process group, build the run, train (or evaluate), close.

    deepspeed --num_gpus 8 trainer/main.py --preset vqa2-base --train-data D/train --val-data D/val --run-dir R
    deepspeed --hostfile H trainer/main.py ...        torchrun --nproc_per_node N trainer/main.py ...
    srun trainer/main.py ...    mpirun -x MASTER_ADDR=H -x MASTER_PORT=P trainer/main.py ...   (one task per rank)
    python trainer/main.py --preset tiny ...           (a plain single process, CPU or GPU)

Each launcher's rank variables are read by trainer/engine/dist.py (`world_info_from_env`). `--resume auto` resumes from the
newest complete checkpoint when the run folder has one and starts afresh otherwise: one command for the first start
of a job and all its restarts. Which weights a start begins from is decided before anything in the run folder is
written (trainer/run/start.py); a start that cannot resume the saved state changes nothing there.

`main(argv) -> int` is also called in-process by tests. Exit status: 0 done, 2 bad input (configuration, data,
checkpoint), 1 a failure while training (e.g. a non-finite loss), 128 + signal after a SIGTERM/SIGINT checkpoint.
A disk too full for the next checkpoint is a failure while training (exit 1, one line naming the folder, the free and
the needed space): the input was fine and the same command succeeds once there is room; the earlier checkpoints are
left intact (trainer/checkpoint/checkpointing.py).

The run folder (--run-dir) and what is in it (config, DeepSpeed config, answers, tokenizer) belong to
trainer/run/run_folder.py; trainer/run/run.py builds the run from the components; this file checks the input and runs it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__" and not __package__:
    # Run as a file (the deepspeed/torchrun convention): import the project as packages from the repository root,
    # and drop trainer/ itself from the path so that none of its modules can shadow a package of the same name.
    sys.path[0] = str(REPO_ROOT)

from trainer.engine.dist import LaunchError, world_info_from_env  # noqa: E402 - imports no torch


def ranks_on_this_host(env: Mapping[str, str] = os.environ) -> int:
    """How many ranks the launcher starts on this host (trainer/engine/dist.py `world_info_from_env`; 1 without a launcher,
    and where its variables are bad: the start refuses them later, in one line)."""
    try:
        return world_info_from_env(env).local_world_size
    except LaunchError:
        return 1


# Before torch loads OpenMP. Several ranks on one host's CPU: idle OpenMP threads sleep instead of spinning, or
# each rank's spinning threads take the cores the others need. One rank: OpenMP's default (spin a while, then
# sleep) keeps the cores warm between the many small ops of a tiny model. Figures: docs/training.md,
# OMP_WAIT_POLICY. The environment variable, when set, decides.
if ranks_on_this_host() > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Training never reaches the Hugging Face hub: pretrained weights are fetched beforehand (./launch.sh fetch-weights,
# trainer/modeling/weights.py), `check` makes sure they are on local disk, and offline mode keeps every library from trying
# the network. Set before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
from typing import Any  # noqa: E402

from trainer.run.logs import add_log_option, quiet_cpu_accelerator, setup_logging  # noqa: E402

quiet_cpu_accelerator()  # before DeepSpeed is imported (trainer.run.run below imports it)

from common.errors import is_bad_input  # noqa: E402
from data_pipeline.shards.sharding import check_image_size, open_folder  # noqa: E402
from trainer.checkpoint.checkpointing import CheckpointSpaceError  # noqa: E402
from trainer.config.config import ConfigError, RunConfig, apply_overrides, fields_help  # noqa: E402
from trainer.config.config_file import add_config_options, base_config, print_config  # noqa: E402
from trainer.config.presets import PRESETS  # noqa: E402
from trainer.engine import dist as D  # noqa: E402
from trainer.engine.engine import load_ds_config  # noqa: E402
from trainer.run.loop import NonFiniteLossError  # noqa: E402
from trainer.run.preemption import StopRequest  # noqa: E402
from trainer.run.run import Run, ds_config_path, lock_run_dir  # noqa: E402
from trainer.run.run_folder import CONFIG_FILE, RunFolder  # noqa: E402
from trainer.run.start import (  # noqa: E402
    RunRequest,
    check_same_model,
    resolve_auto_resume,
    resolve_eval_target,
    resolve_initial,
)

log = logging.getLogger("trainer.main")


# -- command line ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer/main.py",
        description="Train or evaluate the fused ViLT+CLIP VQA model with DeepSpeed ZeRO. Launch with "
        "`deepspeed --num_gpus N trainer/main.py ...`, `torchrun`, or plainly with `python trainer/main.py ...`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=fields_help(),
    )
    p.add_argument(
        "--preset",
        default=None,
        help=f"named configuration to start from: {', '.join(sorted(PRESETS))} (default: tiny; on --resume the "
        f"run's saved config.json is used instead). tiny checks the plumbing only: in its few steps it learns "
        f"nothing (on easy-VQA it answers 'yes' to everything); demo learns easy-VQA in minutes on a CPU",
    )
    p.add_argument(
        "--train-data", metavar="DIR", help="training shard folder written by data_pipeline.convert"
    )
    p.add_argument("--val-data", metavar="DIR", help="evaluation shard folder (same answer vocabulary)")
    p.add_argument(
        "--run-dir",
        metavar="DIR",
        default="runs/latest",
        help="where config, tokenizer, checkpoints, TensorBoard events and predictions go (default: runs/latest)",
    )
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (= --set train.max_steps=N)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="latest|auto|TAG|none",
        help="continue the run in --run-dir from its newest intact checkpoint (latest, the default) or a tag "
        "such as global_step1000 (or global_step1000_universal after `python -m trainer.checkpoint "
        "to-universal`, to resume on a different number of ranks). auto: resume from the newest complete "
        "checkpoint when there is one, else start a fresh run from --preset and the other options; one command "
        "for the first start and every restart (a requeued Slurm job, a restarted Kubernetes pod). none: with "
        "--eval-only, score freshly initialised weights",
    )
    add_config_options(p)
    add_log_option(p)
    _add_engine_options(p)
    return p


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """The options after the run's inputs: DeepSpeed's config, overrides, evaluation, the launchers' --local_rank."""
    p.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        metavar="FILE",
        help="DeepSpeed JSON (ZeRO stage, precision, communication, offload, gradient clipping); default "
        "deepspeed_configs/stage0_bf16.json on GPUs, stage0_fp32.json on CPU (deepspeed_configs/README.md)",
    )
    p.add_argument(
        "--deepspeed",
        action="store_true",
        help="accepted and ignored: DeepSpeed's examples pass it (deepspeed.add_config_arguments); this trainer "
        "always runs under DeepSpeed, configured by --deepspeed_config",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any configuration field (repeatable); fields are listed below",
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate a checkpoint on --val-data (--resume TAG, or the newest intact one) and write predictions and "
        "metrics under RUN/eval/<tag>/; no training, and nothing else in the run folder is written. --resume none "
        "scores freshly initialised weights (RUN/eval/initial/)",
    )
    p.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed/torch launchers; the LOCAL_RANK environment variable takes precedence",
    )


def run_request(args: argparse.Namespace) -> RunRequest:
    """The parsed command line as the run's request (the Namespace is only read)."""
    return RunRequest(
        run_dir=args.run_dir, preset=args.preset, config=args.config, train_data=args.train_data,
        val_data=args.val_data, max_steps=args.max_steps, overrides=tuple(args.set), resume=args.resume,
        eval_only=args.eval_only, deepspeed_config=args.deepspeed_config, local_rank=args.local_rank,
    )  # fmt: skip


def resolve_config(req: RunRequest, folder: RunFolder) -> RunConfig:
    """Preset, with --config FILE on top (or the run's saved config on --resume), then --train-data/--val-data/
    --max-steps, then --set."""
    if req.resume:
        if not folder.config_file.is_file():
            raise ConfigError(f"--resume: {folder.path} has no {CONFIG_FILE} (not a run folder?)")
        ignored = " and ".join(f"--{k} {v}" for k, v in (("preset", req.preset), ("config", req.config)) if v)
        if ignored:
            # Expected with --resume auto (one command for the first start and the restarts): no warning then.
            level = logging.INFO if req.auto_resume else logging.WARNING
            log.log(level, "%s ignored: a resumed run continues with its saved %s", ignored, CONFIG_FILE)
        cfg = folder.read_config()
    else:
        cfg = base_config(req.preset, req.config)
    overrides = [f"data.train_data={req.train_data}"] if req.train_data else []
    if req.val_data:
        overrides.append(f"data.val_data={req.val_data}")
    if req.max_steps is not None:
        overrides.append(f"train.max_steps={req.max_steps}")
    return apply_overrides(cfg, overrides + list(req.overrides))


# -- checks before any process group exists ----------------------------------------------------------------------
def check_same_start(req: RunRequest) -> None:
    """After `--resume auto`, every rank must have decided as rank 0 did (a run folder that is not one shared
    filesystem would have some ranks resume and others start afresh)."""
    differs = D.broadcast_object(req.resume) != req.resume
    if D.any_rank(differs):
        raise ConfigError(
            f"--resume auto: the ranks see different checkpoints in {req.run_dir}: the run folder must be one "
            f"shared filesystem, mounted at the same path on every node"
        )


def check(req: RunRequest, folder: RunFolder) -> tuple[RunRequest, RunConfig]:
    """Everything that can be checked without a process group fails here, in seconds, before anything in the run
    folder changes; returns the request as resolved (which weights the start begins from) and the run's config."""
    req = resolve_initial(req)
    if req.eval_only:
        req = resolve_eval_target(req, folder)
    req = resolve_auto_resume(req, folder)
    cfg = resolve_config(req, folder)
    if req.resume:
        check_same_model(cfg, folder)
    world = D.env_world_size()
    check_data(cfg.data.train_data, "train_data", world, not req.eval_only, cfg.model.image_size)
    check_data(cfg.data.val_data, "val_data", world, req.eval_only, cfg.model.image_size)
    cfg.train.grad_accum(world)
    load_ds_config(ds_config_path(req.deepspeed_config))
    # Here, not at the top: trainer.modeling.weights brings the hub's HTTP client (~0.1 s), which --help need not wait for.
    from trainer.modeling.weights import check_available

    check_available(cfg.model, req.preset)  # on local disk, or one line naming ./launch.sh fetch-weights
    if not (req.resume or req.eval_only or req.auto_fresh):
        folder.check_fresh()
    folder.check_tokenizer_source(cfg)
    if not req.eval_only:
        problem = folder.write_problem()
        if problem:
            raise ConfigError(f"--run-dir {folder.path}: checkpoints cannot be written: {problem}")
    return req, cfg


def check_data(
    folder: str | None, what: str, world_size: int, required: bool, image_size: int = 0
) -> dict[str, Any] | None:
    """Fail before start-up on a missing or damaged folder (open_folder: every listed file there with the manifest's
    size), fewer shards than ranks, or images stored smaller than `image_size`; returns the folder's manifest."""
    if folder is None:
        if required:
            raise ConfigError(f"{what}: no shard folder given (--{what.replace('_', '-')} DIR)")
        return None
    manifest = open_folder(folder).manifest
    n_shards = sum(1 for s in manifest["shards"] if s.get("samples", 0) > 0)
    if n_shards < world_size:
        raise ConfigError(
            f"--{what.replace('_', '-')} {folder}: {n_shards} shard(s) for {world_size} ranks; every rank needs at "
            f"least one: convert again with a smaller --shard-size"
        )
    check_image_size(folder, manifest, image_size)
    return manifest


# -- running (the run itself is built by trainer/run/run.py) ---------------------------------------------------------
def train_or_evaluate(run: Run, stop: Any) -> int:
    """Train (or, with --eval-only, evaluate), then close the metrics; the exit status."""
    run.log_hparams()
    if run.request.eval_only:
        if run.request.initial:
            log.warning("--eval-only --resume none: evaluating freshly initialised weights")
        run.stop = stop
        run.evaluate(run.current_step())
        reason = "interrupted" if run.eval_abandoned else "done"
    else:
        reason = run.train(stop)
    run.metrics.close()
    if reason == "interrupted":
        assert stop.signum is not None
        done = (
            "abandoning the evaluation (nothing written)" if run.request.eval_only else "saving a checkpoint"
        )
        log.warning("stopped by signal %d after %s", stop.signum, done)
        return 128 + stop.signum
    return 0


# -- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Parse, check (before any process group exists), build the run, train or evaluate, close. An error that means
    "the input is wrong" (a one-line message, exit 2) rather than "the program failed" (a traceback) subclasses
    common.errors.BadInputError; `is_bad_input` decides by type."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own message for an unknown option
        return int(exc.code or 0)
    setup_logging(
        D.env_rank(), args.log_level
    )  # the rank whichever launcher started it gave (trainer/engine/dist.py)
    if (
        args.print_config
    ):  # what this command would run with, as config.json holds it; nothing checked or started
        folder, req = RunFolder(args.run_dir), run_request(args)
        return print_config(lambda: resolve_config(resolve_auto_resume(req, folder), folder))
    folder = RunFolder(args.run_dir)
    stop = StopRequest()
    lock = None
    try:
        req, cfg = check(run_request(args), folder)
        # Installed before any loader worker is forked, so that workers inherit it instead of dying on SIGTERM.
        stop.install()
        dist = D.init_distributed(local_rank_arg=req.local_rank)
        if req.auto_resume:
            check_same_start(req)
        if not req.eval_only:  # evaluation may run beside the training job (it writes only eval/ files)
            lock = lock_run_dir(folder.path, dist)
        return train_or_evaluate(Run(req, cfg, folder, dist), stop)
    except (NonFiniteLossError, CheckpointSpaceError) as exc:  # before `Exception`, which they also are
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if not is_bad_input(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        stop.uninstall()
        if lock is not None:
            lock.release()
        D.destroy()


if __name__ == "__main__":
    sys.exit(main())
