"""Faults an operator meets, through the real entry point: a NaN loss, two jobs in one run folder, a killed job's lock.

Every process-level check runs the trainer in a subprocess with a deadline, so that a regression fails instead of
hanging the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.main import REPO_ROOT, main
from trainer.runlock import LOCK_FILE, RunLock, RunLockedError

TINY = [
    "--preset", "tiny", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=8",
    "--set", "train.log_every=1", "--set", "train.progress_bar=false", "--set", "data.num_workers=1",
    "--set", "train.ckpt_every=0",
]  # fmt: skip


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def test_nan_loss_is_a_one_line_error_with_exit_1(
    tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.task import VQATask

    forward = VQATask.forward

    def nan_forward(self: VQATask, batch: dict) -> dict:
        out = forward(self, batch)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(VQATask, "forward", nan_forward)
    run_dir = tmp_path / "run"
    rc = main(
        [
            *TINY,
            "--train-data",
            str(tiny_easyvqa_shards / "train"),
            "--run-dir",
            str(run_dir),
            "--max-steps",
            "3",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss" in errors[0], err[-3000:]
    assert "Traceback" not in err
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        holder = json.loads((run_dir / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        # Another process is refused, with this process named.
        probe = (
            "import sys; from pathlib import Path; from trainer.runlock import RunLock, RunLockedError\n"
            "try:\n    RunLock(Path(sys.argv[1])).acquire()\nexcept RunLockedError as e:\n    print(e); sys.exit(3)"
        )
        other = subprocess.run(
            [sys.executable, "-c", probe, str(run_dir)],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=60,
        )
        assert other.returncode == 3 and f"pid {os.getpid()}" in other.stdout, other.stdout + other.stderr
    # A holder killed with SIGKILL leaves the file but not the lock.
    holder_code = (
        "import sys, time; from pathlib import Path; from trainer.runlock import RunLock\n"
        "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {child.pid}"):
            RunLock(run_dir).acquire()
    finally:
        child.kill()
        child.wait(timeout=60)
    lock = RunLock(run_dir)
    lock.acquire()  # no stale lock
    lock.release()


@pytest.mark.slow
def test_second_job_in_a_run_folder_is_refused_and_a_killed_job_blocks_nothing(
    tiny_easyvqa_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [*TINY, "--train-data", str(tiny_easyvqa_shards / "train"), "--run-dir", str(run_dir)]
    cmd = [sys.executable, "trainer/main.py", *args]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [*cmd, "--max-steps", "100000"], cwd=REPO_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while (
            "step 1/100000" not in (tmp_path / "first.log").read_text()
        ):  # lock held, config written, training
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        config_before = (run_dir / "config.json").read_bytes()
        second = subprocess.run(
            [*cmd, "--max-steps", "2"], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=180
        )
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert (
            len(errors) == 1 and "is in use by another run" in errors[0] and f"pid {first.pid}" in errors[0]
        )
        assert (run_dir / "config.json").read_bytes() == config_before  # nothing of the first run overwritten
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # no chance to clean up: the lock must still end with it
        first.wait(timeout=60)
        log.close()
    third = subprocess.run(
        [*cmd, "--max-steps", "2"], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert third.returncode == 0, third.stderr[-3000:]
