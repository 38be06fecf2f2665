"""Environments without any launcher's variables, for tests that start or imitate launchers themselves."""

from __future__ import annotations

import os

LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "MPI_LOCAL")
TORCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any launcher's variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in TORCH_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    return {**env, **(extra or {})}
