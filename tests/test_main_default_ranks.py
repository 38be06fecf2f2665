"""`deepspeed --num_gpus 2 trainer/main.py` without --deepspeed_config on the CPU: the multi-rank default
(deepspeed_configs/stage0_fp32.json: ZeRO stage 0, the gradient all-reduce overlapped with backward) trains,
checkpoints, and a copy resumed from its step-2 checkpoint continues the same losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.test_main_deepspeed import TINY, copy_run, launch, scalars

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]


def test_two_ranks_run_the_stage0_default_and_resume_it(tiny_easyvqa_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    data = [
        "--train-data",
        str(tiny_easyvqa_shards / "train"),
        "--val-data",
        str(tiny_easyvqa_shards / "test"),
    ]
    args = [*TINY, *data, "--set", "train.ckpt_every=2", "--set", "train.eval_every=100"]
    log = launch([*args, "--run-dir", str(run_dir), "--max-steps", "4"])
    assert "DeepSpeed ZeRO stage 0, float32, gradient all-reduce: overlapped with backward" in log
    used = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert used["zero_optimization"]["stage"] == 0 and used["zero_optimization"]["overlap_comm"] is True
    losses = scalars(run_dir)["train/loss"]
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())

    resumed = copy_run(run_dir, tmp_path / "resumed")
    log = launch(["--run-dir", str(resumed), "--resume", "global_step2"])
    assert "gradient all-reduce: overlapped with backward" in log
    again = scalars(resumed)["train/loss"]
    assert [again[s] for s in (3, 4)] == pytest.approx([losses[3], losses[4]], rel=1e-5)
