"""`./launch.sh tensorboard`: TensorBoard for every run under the log folder, on loopback unless told."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence

from trainer.launch.context import Context, is_uint, split_launch_args
from trainer.launch.help import TENSORBOARD_HELP
from trainer.launch.hosts import LaunchError


def tensorboard(args: Sequence[str], ctx: Context) -> int:
    """`./launch.sh tensorboard ARGS`: TensorBoard for every run under the log folder, on loopback unless told."""
    launch_args, rest = split_launch_args(
        args, "tensorboard", valued=("--logdir", "--host", "--port"), flags=("--help", "-h")
    )
    if any(arg in ("--help", "-h") for arg in launch_args):
        print("" if ctx.check_only else TENSORBOARD_HELP, end="")
        return 0
    given = dict(arg.split("=", 1) for arg in launch_args if "=" in arg)
    logdir = given.get("--logdir") or ctx.env.get("VQA_RUNS_DIR") or f"{ctx.root}/runs"
    port = given.get("--port", "6006")
    if not is_uint(port, 1, 65535):
        raise LaunchError(f"tensorboard: --port must be a number from 1 to 65535, got '{port}'")
    if not (ctx.caller_dir / logdir).is_dir():
        raise LaunchError(
            f"tensorboard: log folder '{logdir}' does not exist (train first, or give --logdir)"
        )
    if ctx.check_only:
        return 0
    command = [f"{ctx.venv}/bin/tensorboard", "--logdir", logdir, "--host", given.get("--host", "127.0.0.1")]
    command += ["--port", port, *rest]
    if ctx.dry_run:
        print(shlex.join(command), flush=True)
        return 0
    os.chdir(ctx.caller_dir)  # a relative --logdir is the caller's
    os.execve(command[0], command, ctx.env)
    return 127  # not reached: exec replaces this process
