"""scripts/gpu_check.sh on the CPU: its options, its refusal without a GPU, and the training smoke's plumbing (shards,
a run killed with kill -9 after its half-way checkpoint, the resumed run, the verdict file) at the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "VQA_PYTHON": sys.executable}
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def test_help_and_bad_options() -> None:
    out = run("--help")
    assert out.returncode == 0 and "--budget" in out.stdout and "--stages" in out.stdout
    bad = run("--stages", "tests,nonsense")
    assert bad.returncode == 2 and "unknown stage 'nonsense'" in bad.stderr
    assert run("--steps", "6").returncode == 2  # too few steps for checkpoint, kill and resume
    assert run("--budget", "zero").returncode == 2


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the refusal on a machine without a GPU"
)
@pytest.mark.slow
def test_refuses_without_a_gpu_unless_asked(tmp_path: Path) -> None:
    out = run("--out", str(tmp_path / "r"))
    assert out.returncode == 2 and "torch sees no CUDA GPU" in out.stderr
    assert not (tmp_path / "r").exists()  # nothing written before the refusal


@pytest.mark.slow
@pytest.mark.timeout(900)  # the smoke stage's own budget is 500 s
def test_smoke_stage_kills_resumes_and_judges(tmp_path: Path) -> None:
    out_dir = tmp_path / "check"
    out = run(
        # 24 steps of 32 samples: after the checkpoint at step 12 the run has ~10 steps left in which the watcher
        # must see step 14 logged and kill it (a run that ends first fails the smoke, as it should).
        "--allow-cpu", "--no-compile", "--stages", "smoke", "--preset", "tiny", "--sizes", "32", "--batch", "32",
        "--samples", "256", "--steps", "24", "--workers", "1", "--budget", "500", "--out", str(out_dir),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    stages = (out_dir / "stages.tsv").read_text().splitlines()
    status = dict(line.split("\t")[:2] for line in stages[1:])
    assert status == {"shards": "ok", "compile": "ok", "smoke": "ok"}, stages
    first = (out_dir / "smoke" / "first.log").read_text()
    assert "killed (kill -9) after step 14 was logged" in first
    verdict = json.loads((out_dir / "smoke" / "smoke.json").read_text())
    assert verdict["resumed_from_step"] == 12 and verdict["first_run_killed_after_step"] == 14
    assert (
        verdict["loss_falls"]
        and verdict["resumed_continues_curve"]
        and verdict["resumed_starts_after_checkpoint"]
    )
    # On the CPU the resumed run repeats the killed run's steps exactly (same data order, same weights).
    assert all(gap < 1e-4 for gap in verdict["relative_difference_at_common_steps"].values())
    # Step 12 is mid-epoch (8 batches an epoch): the resumed run restored DALI's own checkpoint.
    assert not verdict["dali_gpu"] and verdict["dali_state_restored"]
    assert not (out_dir / "data").exists()  # the shards (gigabytes at the real size) are removed at the end
    assert "smoke:" in (out_dir / "summary.txt").read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ranks_stage_says_it_skipped_without_several_gpus(tmp_path: Path) -> None:
    """The multi-rank bench (`python -m trainer.tools.bench --ranks N`) runs only where there are 2 or more GPUs."""
    out_dir = tmp_path / "check"
    out = run("--allow-cpu", "--stages", "ranks", "--budget", "120", "--out", str(out_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("\t") for line in (out_dir / "stages.tsv").read_text().splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("ranks", "skipped")], rows
    assert "needs 2 or more" in rows[0][3]
    assert "ranks: skipped, 0 GPU(s) here" in out.stderr
