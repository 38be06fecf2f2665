"""`deepspeed --num_gpus 2 trainer/main.py` without --deepspeed_config on the CPU: the multi-rank default
(deepspeed_configs/stage0_fp32.json: ZeRO stage 0, the gradient all-reduce overlapped with backward) trains,
checkpoints, a copy resumed from its step-2 checkpoint continues the same losses, and the checkpoints resume on
one rank as they are."""

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

    # Nothing sharded at stage 0: the 2-rank checkpoint resumes on 1 rank as it is. Its evaluation there scores exactly
    # what the 2 ranks scored at that step (the score does not depend on the number of ranks), and training continues.
    on_one = copy_run(run_dir, tmp_path / "on_one")
    log = launch(["--run-dir", str(on_one), "--eval-only", "--resume", "global_step4"], ranks=1)
    assert "was written by 2 ranks and resumes on 1 as it is" in log
    ours = json.loads((on_one / "eval" / "global_step4" / "val_metrics_step00000004.json").read_text())
    theirs = json.loads((run_dir / "eval" / "val_metrics_step00000004.json").read_text())
    assert ours["count"] == theirs["count"] and ours["vqa_score"] == theirs["vqa_score"]
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    log = launch(["--run-dir", str(on_one), "--resume", "global_step2"], ranks=1)
    continued = scalars(on_one)["train/loss"]
    assert {3, 4} <= set(continued) and all(math.isfinite(v) for v in continued.values())
