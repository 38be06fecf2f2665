"""Metrics behind one small interface, `log(metrics, step)`: TensorBoard on rank 0, nothing elsewhere.

Tags are namespaced `train/...` and `val/...` (the exact names scripts and checks read are listed in TRAIN_TAGS and
VAL_TAGS). Callers hand over plain floats: reductions and host synchronisation happen only on logging steps, in the
loop, never here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from trainer.modeling.loss_names import LOSS_NAMES, loss_tag

log = logging.getLogger(__name__)


TRAIN_TAGS = (
    *(loss_tag(name) for name in LOSS_NAMES),
    "train/lr",
    "train/grad_norm",
    "train/samples_per_second",
    "train/data_wait_fraction",
    "train/samples_seen",
)
GPU_TAGS = ("train/gpu_memory_gb",)  # logged only where there is a GPU
VAL_TAGS = ("val/vqa_score", "val/loss")


class MetricsLogger(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_hparams(self, hparams: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    """What every rank but 0 gets."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        return None

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"variant": "x"}} -> {"model.variant": "x"}; values TensorBoard's hparams cannot hold become str."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        else:
            out[key] = "none" if v is None else str(v)
    return out


EVENTS_GLOB = "events.out.tfevents.*"  # TensorBoard's event files (in the run folder itself)


class TensorBoardLogger:
    """Event files in the run folder itself, written by rank 0: TensorBoard names a run after the folder holding its
    events, so `tensorboard --logdir runs` lists each run under its run folder's name (not `<run>/tensorboard`)."""

    def __init__(self, log_dir: Path) -> None:
        # TensorBoard is imported where events are written (rank 0), here and below: the other ranks and main.py
        # --help never load it.
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Record the resolved configuration in the HParams plugin (linked to the val/ metrics) and as text.

        Written into this run's own event file rather than through `SummaryWriter.add_hparams`, which would start a
        second run in a timestamped subfolder.
        """
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        flat = flatten(hparams)
        exp, ssi, sei = hparams_summary(flat, {tag: 0.0 for tag in VAL_TAGS})
        fw = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(hparams, indent=2, default=str) + "\n```", 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def build_logger(run_dir: Path, is_main: bool) -> MetricsLogger:
    if not is_main:
        return NullLogger()
    return TensorBoardLogger(run_dir)
