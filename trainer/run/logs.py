"""The trainer's console: its own log lines at INFO on rank 0 (WARNING elsewhere), every other library's below
WARNING unless asked for.

Third-party start-up lines drown the trainer's on every rank: open_clip logs each model it builds on the root logger
(`root: Loaded ViT-... model config`, `... bicubic, resize_mode shortest`, which describes open_clip's own
preprocessing, not the loaders' bilinear squash that the model is fed), DeepSpeed its accelerator choice and
configuration, torch a FutureWarning per rank. `--log-level` (or VQA_LOG_LEVEL) lowers the threshold for all of them
when they are wanted.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path

LEVELS = ("debug", "info", "warning", "error")
ENV = "VQA_LOG_LEVEL"
PROJECT_LOGGERS = ("trainer", "data_pipeline")


def add_log_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        choices=LEVELS,
        type=str.lower,
        default=None,
        help=f"threshold for other libraries' log lines (DeepSpeed, open_clip, torch): default warning, or ${ENV}; "
        "the trainer's own lines stay at info on rank 0",
    )


def third_party_level(arg: str | None) -> int:
    """The level asked for by --log-level, else VQA_LOG_LEVEL, else WARNING. A bad VQA_LOG_LEVEL falls back to
    WARNING with a warning (the environment is shared with launch.sh, which refuses it before any rank starts)."""
    name = (arg or os.environ.get(ENV) or "warning").lower()
    if name not in LEVELS and name != "critical":
        logging.getLogger(__name__).warning(
            "%s=%s is not one of %s: using warning", ENV, name, ", ".join(LEVELS)
        )
        name = "warning"
    return getattr(logging, name.upper())


def quiet_cpu_accelerator() -> None:
    """On a machine without an NVIDIA driver, tell DeepSpeed its accelerator is the CPU before it is imported: its
    auto-detection would print "Setting accelerator to CPU ... we were unable to detect it" as a WARNING in every
    process (runner, launcher, each rank). Where a driver exists, DeepSpeed detects as usual."""
    if "DS_ACCELERATOR" not in os.environ and not Path("/proc/driver/nvidia/gpus").is_dir():
        os.environ["DS_ACCELERATOR"] = "cpu"


def setup_logging(rank: int, level_arg: str | None = None) -> None:
    """Rank 0 logs the project's INFO lines; other libraries log at `third_party_level` on every rank."""
    third = third_party_level(level_arg)
    logging.basicConfig(
        level=third,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    own = logging.INFO if rank == 0 else logging.WARNING
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(min(own, third))
    # DeepSpeed's logger carries its own level and handler (deepspeed.utils.logging): INFO lines such as its
    # configuration dumps and per-step timers.
    logging.getLogger("DeepSpeed").setLevel(third)
    if third >= logging.WARNING:
        # torch's deprecation notices for the collectives DeepSpeed calls (all_gather_into_tensor's), once per
        # rank: nothing a user of the trainer can act on.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
        )
