"""Checkpoint bookkeeping without DeepSpeed: completeness markers, latest, keep-last-K, world-size checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.checkpointing import COMPLETE, Checkpointer, list_complete, resolve_resume
from trainer.config import ConfigError
from trainer.dist import DistInfo

DIST = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


class FilesEngine:
    """Writes a file per save as DeepSpeed would write its shards; can die half-way like a killed process."""

    zero_stage = 2

    def __init__(self) -> None:
        self.die_on: str | None = None

    def save(self, save_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        (save_dir / tag).mkdir(parents=True, exist_ok=True)
        (save_dir / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        if tag == self.die_on:
            raise KeyboardInterrupt("killed mid-save")


def test_only_complete_checkpoints_count_and_the_last_k_are_kept(tmp_path: Path) -> None:
    engine = FilesEngine()
    ck = Checkpointer(tmp_path, engine, DIST, every=2, keep_last=2)
    for step in (2, 4, 6):
        ck.save(step, {"step": step, "epoch": 0, "batch_in_epoch": step, "samples": step})
    tags = [r.tag for r in list_complete(ck.ckpt_dir)]
    assert tags == ["global_step4", "global_step6"]
    assert (ck.ckpt_dir / "latest").read_text() == "global_step6"
    assert json.loads((ck.ckpt_dir / "global_step6" / "trainer_state.json").read_text())["world_size"] == 1
    assert (ck.ckpt_dir / "global_step6" / "rng_rank0.pt").is_file()

    engine.die_on = "global_step8"  # a crash while writing step 8
    with pytest.raises(KeyboardInterrupt):
        ck.save(8, {"step": 8, "epoch": 0, "batch_in_epoch": 8, "samples": 8})
    assert (ck.ckpt_dir / "global_step8").is_dir() and not (ck.ckpt_dir / "global_step8" / COMPLETE).exists()
    assert resolve_resume(ck.ckpt_dir, "latest", 1).tag == "global_step6"
    assert (ck.ckpt_dir / "latest").read_text() == "global_step6"
    with pytest.raises(ConfigError, match="incomplete"):
        resolve_resume(ck.ckpt_dir, "global_step8", 1)

    # A resumed run passing step 6 again writes beside the good copy: dying there costs nothing.
    engine.die_on = "global_step6.partial"
    with pytest.raises(KeyboardInterrupt):
        ck.save(6, {"step": 6, "epoch": 1, "batch_in_epoch": 0, "samples": 6})
    assert resolve_resume(ck.ckpt_dir, "latest", 1).tag == "global_step6"
    assert json.loads((ck.ckpt_dir / "global_step6" / "trainer_state.json").read_text())["epoch"] == 0
    engine.die_on = None
    ck.save(
        6, {"step": 6, "epoch": 1, "batch_in_epoch": 0, "samples": 6}
    )  # succeeds: swapped in, leftovers gone
    assert json.loads((ck.ckpt_dir / "global_step6" / "trainer_state.json").read_text())["epoch"] == 1
    names = sorted(p.name for p in ck.ckpt_dir.iterdir() if p.is_dir())
    assert names == [
        "global_step4",
        "global_step6",
        "global_step8",
    ]  # step 8 is incomplete: rewritten when reached


def test_resume_checks_the_world_size_and_names_the_conversion(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, FilesEngine(), DIST, every=1, keep_last=3)
    ck.save(5, {"step": 5, "epoch": 0, "batch_in_epoch": 5, "samples": 5})
    with pytest.raises(
        ConfigError, match=r"(?s)written by 1 ranks and this run has 2.*to-universal .*--tag global_step5"
    ):
        resolve_resume(ck.ckpt_dir, "latest", 2)
    with pytest.raises(ConfigError, match="no checkpoint 'global_step9'"):
        resolve_resume(ck.ckpt_dir, "global_step9", 1)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_resume(tmp_path / "elsewhere", "latest", 1)
