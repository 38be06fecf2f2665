"""Faults that could damage a run folder, through the real entry points: every test starts the trainer (in this
process through `main(argv)`, or as the comparison does, in a subprocess) on a copy of one trained run and checks
that the run's files and everything beside the run folder are byte for byte as they were, apart from what the
command is allowed to write, and that a refusal is one `error:` line.

docs/faults.md lists these faults and what the user sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainer.checkpoint.layout import COMPLETE
from trainer.main import REPO_ROOT, main

TINY = [
    "--preset", "tiny", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=8",
    "--set", "train.log_every=1", "--set", "train.progress_bar=false", "--set", "data.num_workers=1",
    "--set", "train.ckpt_every=1",
]  # fmt: skip
MODEL_FILE = "mp_rank_00_model_states.pt"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def trained(tiny_easyvqa_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-rank run with complete checkpoints at steps 1 and 2 (train.keep_last=2), trained once per module."""
    run_dir = tmp_path_factory.mktemp("run_folder_faults") / "run"
    args = [*TINY, "--train-data", str(tiny_easyvqa_shards / "train"), "--run-dir", str(run_dir)]
    assert main([*args, "--max-steps", "2"]) == 0
    return run_dir


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run in tmp_path/run, beside a file that no command may touch (tmp_path/outside.txt)."""
    (tmp_path / "outside.txt").write_text("not the trainer's\n")
    return Path(shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns(".lock")))


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` -> the SHA-256 of its bytes ("dir" for a folder, "-> target" for a link)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def changes(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def one_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def train_args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [*TINY, "--train-data", str(shards / "train"), "--run-dir", str(run_dir), *extra]


def flip_a_byte(file: Path) -> None:
    """Change one byte in the middle of `file`, keeping its size: what a bad block or a careless copy leaves."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def refused(argv: list[str], capsys: pytest.CaptureFixture, root: Path, *, locked: bool = False) -> str:
    """Run `main(argv)`: it must exit 2 with one error line and change nothing under `root` (`locked`: but the run
    folder's lock file, for a refusal that needs the folder's lock first); the line."""
    before = snapshot(root)
    capsys.readouterr()
    assert main(argv) == 2
    line = one_error(capsys.readouterr().err)
    changed = changes(before, snapshot(root)) - ({"run/.lock"} if locked else set())
    assert not changed, changed
    return line


# -- 1. --eval-only writes only its own folder; a resume that changes the model changes nothing ------------------
def test_eval_only_without_resume_scores_the_newest_checkpoint_in_its_own_folder(
    run: Path, tiny_easyvqa_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = snapshot(tmp_path)
    caplog.set_level(logging.INFO)
    argv = ["--run-dir", str(run), "--val-data", str(tiny_easyvqa_shards / "test"), "--eval-only"]
    assert main([*argv, "--set", "train.progress_bar=false"]) == 0
    assert "evaluating the newest intact checkpoint" in caplog.text
    assert (
        f"evaluating checkpoint global_step2 (step 2); results in {run / 'eval' / 'global_step2'}"
        in caplog.text
    )
    changed = changes(before, snapshot(tmp_path))
    assert changed and all(
        p in ("run/eval", "run/eval/global_step2") or p.startswith("run/eval/global_step2/") for p in changed
    )
    out = run / "eval" / "global_step2"
    metrics = json.loads((out / "val_metrics_step00000002.json").read_text())
    assert metrics["step"] == 2 and metrics["count"] == 32
    assert list(out.glob("events.out.tfevents.*")) and (out / "config.json").is_file()


def test_eval_only_of_a_folder_without_checkpoints_is_refused_unless_asked_for_initial_weights(
    tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty"
    argv = [*TINY, "--train-data", str(tiny_easyvqa_shards / "train"), "--run-dir", str(empty)]
    argv += ["--val-data", str(tiny_easyvqa_shards / "test"), "--eval-only"]
    line = refused(argv, capsys, tmp_path)
    assert f"no complete checkpoint in {empty / 'checkpoints'}" in line and "--resume none" in line
    assert not empty.exists()
    assert main([*argv, "--resume", "none"]) == 0
    assert sorted(p.name for p in empty.iterdir()) == ["eval"]  # nothing of a run's own files
    metrics = json.loads((empty / "eval" / "initial" / "val_metrics_step00000000.json").read_text())
    assert metrics["count"] == 32


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("model.variant=baseline", "model.variant=baseline (saved: clip-infonce-dot)"),
        ("model.clip_arch=ViT-B-32", "model.clip_arch=ViT-B-32 (saved: ViT-tiny-"),
        ("model.num_layers=3", "model.num_layers=3 (saved: 2)"),
    ],
)
def test_a_resume_that_changes_the_model_is_refused_before_anything_changes(
    setting: str,
    named: str,
    run: Path,
    tiny_easyvqa_shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    argv = train_args(run, tiny_easyvqa_shards, "--resume", "--max-steps", "3", "--set", setting)
    line = refused(argv, capsys, tmp_path)
    assert named in line and "nothing was changed" in line
    # The refusal broke nothing: the same run continues.
    assert main(train_args(run, tiny_easyvqa_shards, "--resume", "--max-steps", "3")) == 0


# -- 2. content hashes ---------------------------------------------------------------------------------------------
def test_a_checkpoint_with_changed_bytes_is_passed_over_and_kept(
    run: Path, tiny_easyvqa_shards: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpts = run / "checkpoints"
    marker = json.loads((ckpts / "global_step2" / COMPLETE).read_text())
    assert set(marker["sha256"]) == set(marker["files"]) and MODEL_FILE in marker["sha256"]
    flip_a_byte(ckpts / "global_step2" / MODEL_FILE)
    damaged = snapshot(ckpts / "global_step2")
    caplog.set_level(logging.INFO)
    assert main(train_args(run, tiny_easyvqa_shards, "--resume", "--max-steps", "3")) == 0
    assert f"resumed from {ckpts / 'global_step1'} (step 1" in caplog.text
    assert f"global_step2 ({MODEL_FILE} differs from its sha256" in caplog.text
    # Its own step 2 was saved beside the damaged copy, which keeps every byte under a name never resumed.
    assert snapshot(ckpts / "global_step2.damaged-1") == damaged
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [
        "global_step2",
        "global_step2.damaged-1",
        "global_step3",
    ]


def test_a_named_damaged_checkpoint_is_refused_and_verification_can_be_turned_off(
    run: Path, tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    ckpts = run / "checkpoints"
    flip_a_byte(ckpts / "global_step2" / MODEL_FILE)
    argv = train_args(run, tiny_easyvqa_shards, "--resume", "global_step2", "--max-steps", "3")
    line = refused(argv, capsys, tmp_path, locked=True)  # checked under the lock: no other job is writing it
    assert f"{ckpts / 'global_step2'} is damaged ({MODEL_FILE} differs" in line and "left as it is" in line
    caplog.set_level(logging.INFO)
    assert main([*argv, "--set", "train.verify_checkpoints=false"]) == 0  # the operator's explicit choice
    assert "without checking its content hashes" in caplog.text
    assert f"resumed from {ckpts / 'global_step2'}" in caplog.text


def test_a_marker_without_hashes_is_a_damaged_checkpoint(
    run: Path, tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpts = run / "checkpoints"
    marker_file = ckpts / "global_step2" / COMPLETE
    marker = json.loads(marker_file.read_text())
    marker_file.write_text(
        json.dumps({k: v for k, v in marker.items() if k != "sha256"})
    )  # not this trainer's
    argv = train_args(run, tiny_easyvqa_shards, "--resume", "global_step2", "--max-steps", "3")
    line = refused(argv, capsys, tmp_path, locked=True)
    assert (
        f"{ckpts / 'global_step2'} is damaged (its marker lists no files with their sizes and sha256" in line
    )


# -- 3. damaged checkpoints are never started over nor pruned --------------------------------------------------------
@pytest.mark.parametrize("damage", ["bytes", "size"])
def test_resume_auto_over_only_damaged_checkpoints_is_refused(
    damage: str, run: Path, tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpts = run / "checkpoints"
    for tag in ("global_step1", "global_step2"):
        file = ckpts / tag / MODEL_FILE
        flip_a_byte(file) if damage == "bytes" else file.write_bytes(file.read_bytes()[:-7])
    argv = train_args(run, tiny_easyvqa_shards, "--resume", "auto", "--max-steps", "3")
    line = refused(argv, capsys, tmp_path, locked=damage == "bytes")  # sizes are checked before the lock
    assert "global_step1 (" in line and "global_step2 (" in line and f"mv {ckpts / 'global_step1'}" in line


def test_pruning_never_removes_a_damaged_checkpoint(run: Path, tiny_easyvqa_shards: Path) -> None:
    ckpts = run / "checkpoints"
    file = ckpts / "global_step1" / MODEL_FILE
    file.write_bytes(file.read_bytes()[:-7])  # its marker no longer matches
    damaged = snapshot(ckpts / "global_step1")
    argv = train_args(run, tiny_easyvqa_shards, "--resume", "--max-steps", "4", "--set", "train.keep_last=1")
    assert main(argv) == 0
    assert snapshot(ckpts / "global_step1") == damaged
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["global_step1", "global_step4"]


# -- 4. symbolic links and folders that cannot be written ---------------------------------------------------------
def test_a_lock_that_is_a_symbolic_link_is_refused_and_its_target_untouched(
    run: Path, tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    os.symlink(tmp_path / "outside.txt", run / ".lock")
    line = refused(train_args(run, tiny_easyvqa_shards, "--resume", "--max-steps", "3"), capsys, tmp_path)
    assert ".lock is a symbolic link" in line and str(tmp_path / "outside.txt") in line
    assert (tmp_path / "outside.txt").read_text() == "not the trainer's\n"


def test_a_checkpoint_folder_that_cannot_be_written_stops_the_start_and_the_preflight(
    tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_launcher: pytest.MonkeyPatch
) -> None:
    from trainer.tools.preflight import cli as preflight

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink(tmp_path / "gone", run_dir / "checkpoints")  # a link to a volume that is not mounted
    line = refused(train_args(run_dir, tiny_easyvqa_shards, "--max-steps", "2"), capsys, tmp_path)
    assert (
        f"{run_dir / 'checkpoints'} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in line
    )
    rc = preflight.main(["--run-dir", str(run_dir), "--sizes", "1KiB"])
    out, err = capsys.readouterr()
    assert rc != 0 and "checkpoints cannot be written" in out + err and "which does not exist" in out + err
    assert not (tmp_path / "gone").exists()


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` made unwritable: mode 0555, or for root (whom modes do not stop) the immutable attribute."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    made = chattr and subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode == 0
    if not made:
        pytest.skip(
            "root writes into a mode 0555 folder, and this file system has no immutable attribute (chattr)"
        )
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def test_a_read_only_checkpoint_folder_stops_the_start(
    tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with read_only(run_dir / "checkpoints"):
        line = refused(train_args(run_dir, tiny_easyvqa_shards, "--max-steps", "2"), capsys, tmp_path)
    assert f"cannot write in {run_dir / 'checkpoints'}" in line


# -- 5. a comparison killed during a run's first checkpoint save continues -----------------------------------------
KILL_AT_FIRST_MARKER = """\
import os, signal
import trainer.checkpoint.layout as layout

def killed(path, marker):  # every file of the first checkpoint is written; the process dies before its marker
    os.kill(os.getpid(), signal.SIGKILL)

layout.write_complete_marker = killed
"""


@pytest.mark.slow
def test_a_comparison_killed_during_the_first_save_continues_with_the_same_command(
    tiny_easyvqa_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        KILL_AT_FIRST_MARKER
    )  # imported by every Python the comparison starts
    out = tmp_path / "cmp"
    cmd = [
        sys.executable, "-m", "trainer.tools.compare", "--preset", "tiny", "--variants", "baseline", "--steps", "2",
        "--train-data", str(tiny_easyvqa_shards / "train"), "--val-data", str(tiny_easyvqa_shards / "test"),
        "--run-dir", str(out), "--num-gpus", "0", "--quiet",
        *(x for s in TINY[2:] for x in ("--set", s) if s != "--set"),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    path = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    first = subprocess.run(
        cmd, cwd=REPO_ROOT, env=dict(env, PYTHONPATH=f"{hook}{os.pathsep}{path}"), capture_output=True,
        text=True, timeout=240,
    )  # fmt: skip
    assert first.returncode != 0 and "exit -9" in first.stderr + first.stdout, first.stderr[-3000:]
    ckpts = out / "baseline-seed0" / "checkpoints"
    assert [p.name for p in ckpts.iterdir() if p.is_dir()] == [
        "global_step1"
    ]  # written, never marked complete
    again = subprocess.run(
        cmd, cwd=REPO_ROOT, env=dict(env, PYTHONPATH=path), capture_output=True, text=True, timeout=240
    )
    assert again.returncode == 0, again.stderr[-3000:] + again.stdout[-3000:]
    assert (out / "results.json").is_file()
    log = (out / "baseline-seed0" / "train.log").read_text()
    assert "--resume auto" in again.stdout and "set aside" in log and "global_step1.incomplete-1" in log
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["global_step1", "global_step2"]
