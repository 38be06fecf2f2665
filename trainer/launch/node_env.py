"""The environment every node's processes get besides DeepSpeed's own (RANK, MASTER_ADDR, ...), and the level
DeepSpeed's launcher logs at. `./launch.sh train --help` and docs/cluster.md say what each variable is for."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from trainer.launch.hosts import LaunchError

NODE_ENV_NAMES = (
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "VQA_TRAIN_DATA",
    "VQA_VAL_DATA",
    "VQA_RUN_DIR",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TORCH_HOME",
    "OMP_NUM_THREADS",
    "VQA_LOG_LEVEL",
)
# NCCL's own default logs nothing of a failure; WARN names it. A failed or hung collective aborts the job.
NODE_ENV_DEFAULTS = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
_ENV_LINE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def is_env_assignment(text: str) -> bool:
    """Whether TEXT is NAME=VALUE with a shell variable's NAME."""
    return _ENV_LINE.match(text) is not None


def node_env_lines(env: Mapping[str, str], extra_names: Sequence[str] = ()) -> list[str]:
    """NAME=VALUE for every variable of ENV that goes to every node: NCCL_*, NODE_ENV_NAMES and EXTRA_NAMES (the
    --env ones), sorted by name (byte order)."""
    wanted = set(NODE_ENV_NAMES) | set(extra_names)
    return [f"{name}={env[name]}" for name in sorted(env) if name.startswith("NCCL_") or name in wanted]


def unsafe_over_ssh(lines: Sequence[str]) -> str | None:
    """The name of the first variable that cannot go to the other nodes over ssh: DeepSpeed's runner exports them in
    its pdsh command line, wrapping values in double quotes, which a quote, $, ` or backslash would break."""
    for line in lines:
        name, _, value = line.partition("=")
        if any(c in value for c in '"$`\\'):
            return name
    return None


def user_deepspeed_env_lines(env: Mapping[str, str], root: Path) -> list[str]:
    """The NAME=VALUE lines of the user's own DeepSpeed environment files, which DeepSpeed would read if the launch
    did not point DS_ENV_FILE at its own file: $HOME/NAME, then ROOT/NAME, NAME being $DS_ENV_FILE or .deepspeed_env
    (an absolute $DS_ENV_FILE: that file alone)."""
    name = env.get("DS_ENV_FILE") or ".deepspeed_env"
    files = [Path(name)] if name.startswith("/") else [Path(env.get("HOME", "")) / name, root / name]
    lines: list[str] = []
    for file in files:
        if file.is_file():
            lines += [
                line for line in file.read_text(errors="replace").splitlines() if is_env_assignment(line)
            ]
    return lines


def ds_log_level(env: Mapping[str, str]) -> str:
    """DeepSpeed's runner and per-node launcher log at INFO by default (the command lines, the world info as base64,
    the environment): WARNING unless VQA_LOG_LEVEL asks for more."""
    given = env.get("VQA_LOG_LEVEL") or "warning"
    if given.lower() not in LOG_LEVELS:
        raise LaunchError(f"VQA_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}; got '{given}'")
    return given.lower()
