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
from pathlib import Path

import pytest

from tests.helpers.launch_env import wait_for_output
from trainer.main import REPO_ROOT, main
from trainer.run.runlock import LOCK_FILE, RunLock, RunLockedError

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
    from trainer.modeling.task import VQATask

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
            "import sys; from pathlib import Path; from trainer.run.runlock import RunLock, RunLockedError\n"
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
        "import sys, time; from pathlib import Path; from trainer.run.runlock import RunLock\n"
        "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)"
    )
    log = tmp_path / "holder.log"
    with log.open("w") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", holder_code, str(run_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    try:
        wait_for_output(child, log, "held", timeout_s=60)
        with pytest.raises(RunLockedError, match=f"pid {child.pid}"):
            RunLock(run_dir).acquire()
    finally:
        child.kill()
        child.wait(timeout=60)
    lock = RunLock(run_dir)
    lock.acquire()  # no stale lock
    lock.release()


@pytest.mark.slow
@pytest.mark.timeout(900)  # three trainer runs, each with its own deadline
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
        # Training: the lock is held and config.json written.
        wait_for_output(first, tmp_path / "first.log", "step 1/100000", timeout_s=180)
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


# -- checkpoints and exports: unsafe files, interrupted pruning, a full disk; predict's bad input ----------------


class MkdirPayload:
    """A pickled object that runs os.mkdir(path) when unpickled; no loader of the project may ever create the path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.path),)


@pytest.fixture(scope="module")
def tiny_run(tiny_easyvqa_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-rank run with complete checkpoints at steps 1 and 2 (train.keep_last=2), trained in this process."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    args = [*TINY, "--train-data", str(tiny_easyvqa_shards / "train"), "--run-dir", str(run_dir)]
    assert main([*args, "--max-steps", "2", "--set", "train.ckpt_every=1"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.serve import export

    out = tmp_path_factory.mktemp("export") / "model"
    assert export.main(["--run-dir", str(tiny_run), "--out", str(out)]) == 0
    return out


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("events.out.tfevents.*", ".lock"))
    return dst


def _resume(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [*TINY, "--train-data", str(shards / "train"), "--run-dir", str(run_dir), "--resume", *extra]


def _one_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def _listed(run_dir: Path, capsys: pytest.CaptureFixture) -> list[str]:
    from trainer.checkpoint import universal

    capsys.readouterr()
    assert universal.main(["list", "--run-dir", str(run_dir)]) == 0
    return [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]


def test_an_rng_file_that_would_run_code_is_refused_on_resume(
    tiny_run: Path, tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import torch

    from trainer.checkpoint.layout import COMPLETE, write_complete_marker

    run_dir = _copy(tiny_run, tmp_path)
    target = tmp_path / "created_by_unpickling"
    rng_file = run_dir / "checkpoints" / "global_step2" / "rng_rank0.pt"
    torch.save({"torch": torch.get_rng_state(), "numpy": MkdirPayload(target)}, rng_file)
    # A crafted checkpoint comes with a marker that vouches for it (otherwise it is merely incomplete).
    marker = json.loads((rng_file.parent / COMPLETE).read_text())
    write_complete_marker(rng_file.parent, {k: v for k, v in marker.items() if k != "files"})
    capsys.readouterr()
    assert main(_resume(run_dir, tiny_easyvqa_shards, "--max-steps", "3")) == 2
    error = _one_error(capsys.readouterr().err)
    assert "rng_rank0.pt: holds objects other than tensors" in error and "posix.mkdir" in error
    assert not target.exists()
    assert not (run_dir / "checkpoints" / "global_step3").exists()


@pytest.mark.slow
def test_a_weights_file_that_would_run_code_is_refused_by_predict(tmp_path: Path) -> None:
    import pickle

    import torch

    image = tmp_path / "image.png"
    _write_image(image)
    target = tmp_path / "created_by_unpickling"
    crafted = tmp_path / "crafted.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": MkdirPayload(target)}, crafted)  # a torch file
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(MkdirPayload(target)))  # a plain pickle, no torch zip around it
    for weights in (crafted, raw):
        out = subprocess.run(
            [sys.executable, "-m", "trainer.serve.predict", "--weights", str(weights), "--image", str(image),
             "--question", "what shape is it?"],
            cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr[-3000:]
        error = _one_error(out.stderr)
        assert error.startswith(f"error: {weights}: a file, not an export folder"), error
        assert not target.exists() and out.stdout == ""  # refused unread: an export is a folder


def _write_image(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)


@pytest.mark.parametrize(
    "case",
    ["text-as-image", "text-as-weights", "top-k-0", "empty-question"],
)
def test_predict_bad_input_is_one_line_and_exit_2(
    case: str, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from trainer.serve import predict

    image, text = tmp_path / "image.png", tmp_path / "notes.txt"
    _write_image(image)
    text.write_text("not an image, not a torch file\n")
    args = {"--weights": str(exported), "--image": str(image), "--question": "what shape is it?"}
    expected = {
        "text-as-image": f"--image {text}: not an image file that can be read",
        "text-as-weights": f"{text}: a file, not an export folder",
        "top-k-0": "argument --top-k: must be at least 1, got 0",
        "empty-question": "--question number 1 is empty",
    }[case]
    extra: list[str] = []
    if case == "text-as-image":
        args["--image"] = str(text)
    elif case == "text-as-weights":
        args["--weights"] = str(text)
    elif case == "top-k-0":
        extra = ["--top-k", "0"]
    else:
        args["--question"] = ""
    capsys.readouterr()
    assert predict.main([*(x for kv in args.items() for x in kv), *extra]) == 2
    captured = capsys.readouterr()
    error = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(error) == 1 and expected in error[0] and "Traceback" not in captured.err, captured.err
    assert captured.out == ""  # nothing answered
    if case == "empty-question":  # the same file answers a real question
        args["--question"] = "what shape is it?"
        assert predict.main([*(x for kv in args.items() for x in kv)]) == 0
        assert json.loads(capsys.readouterr().out)["question"] == "what shape is it?"


class KilledMidDelete(BaseException):
    """Stands for kill -9 during a deletion: a BaseException, which nothing in the trainer catches."""


def test_a_prune_cut_short_is_never_listed_nor_resumed(
    tiny_run: Path,
    tiny_easyvqa_shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    from trainer.checkpoint import checkpointing

    run_dir = _copy(tiny_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    real_rmtree = shutil.rmtree

    def dying_rmtree(path: object, ignore_errors: bool = False, **kw: object) -> None:
        p = Path(str(path))
        if p.parent != ckpts or not p.is_dir():
            return real_rmtree(p, ignore_errors=ignore_errors)
        for f in p.iterdir():  # every file but the marker, then the process dies
            if f.name != "COMPLETE":
                real_rmtree(f) if f.is_dir() else f.unlink()
        raise KilledMidDelete(p.name)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", dying_rmtree)
    with pytest.raises(
        KilledMidDelete
    ):  # step 3 completes; pruning to keep_last=1 dies in its first deletion
        main(_resume(run_dir, tiny_easyvqa_shards, "--max-steps", "3", "--set", "train.keep_last=1"))
    monkeypatch.setattr(checkpointing.shutil, "rmtree", real_rmtree)
    assert (ckpts / "global_step1.deleting" / "COMPLETE").is_file()
    assert _listed(run_dir, capsys) == ["global_step2", "global_step3"]
    assert main(_resume(run_dir, tiny_easyvqa_shards, "global_step1", "--max-steps", "4")) == 2
    assert "no checkpoint 'global_step1'" in _one_error(capsys.readouterr().err)
    # The newest resumes, and its next save removes what the cut-short deletion left.
    assert main(_resume(run_dir, tiny_easyvqa_shards, "--max-steps", "4", "--set", "train.keep_last=1")) == 0
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["global_step4"]


def test_a_disk_too_full_for_the_next_checkpoint_is_named_before_writing(
    tiny_run: Path,
    tiny_easyvqa_shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    run_dir = _copy(tiny_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    real_usage = shutil.disk_usage

    def full(path: object) -> object:
        usage = real_usage(path)
        if not str(path).startswith(str(run_dir)):
            return usage
        return type(usage)(usage.total, usage.total - 4096, 4096)

    monkeypatch.setattr(shutil, "disk_usage", full)
    capsys.readouterr()
    assert main(_resume(run_dir, tiny_easyvqa_shards, "--max-steps", "3")) == 1
    error = _one_error(capsys.readouterr().err)
    assert f"not enough disk space for checkpoint global_step3 in {ckpts}: 4.0 KiB free, about" in error
    assert "(the size of global_step2)" in error and "train.keep_last=2" in error and "room for 3" in error
    assert _listed(run_dir, capsys) == ["global_step1", "global_step2"]
    assert not (ckpts / "global_step3").exists()


def test_a_disk_filling_up_mid_save_is_one_line_and_keeps_the_earlier_checkpoints(
    tiny_run: Path,
    tiny_easyvqa_shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    run_dir = _copy(tiny_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    real_save = torch.save

    def save(obj: object, f: object, *args: object, **kw: object) -> None:
        if "global_step3" not in str(f):
            return real_save(obj, f, *args, **kw)
        Path(str(f)).write_bytes(b"PK\x03\x04 torn")  # what a full disk leaves: the start of the file
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1536 vs 1466")

    monkeypatch.setattr(torch, "save", save)
    capsys.readouterr()
    assert main(_resume(run_dir, tiny_easyvqa_shards, "--max-steps", "3")) == 1
    error = _one_error(capsys.readouterr().err)
    assert error.startswith(f"error: disk full while writing checkpoint global_step3 in {ckpts} ("), error
    assert "unexpected pos" in error and "earlier checkpoints are intact" in error and "room for 3" in error
    assert _listed(run_dir, capsys) == ["global_step1", "global_step2"]
    assert (ckpts / "latest").read_text() == "global_step2"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["global_step1", "global_step2"]
