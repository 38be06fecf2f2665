"""Faults a long run meets at run time, through the real entry points in subprocesses with deadlines: a stop signal
in the middle of an evaluation, two multi-rank jobs on one host, a weights endpoint that never answers.

Each check fails if the old behaviour returns (waiting for the whole evaluation, a second job dying on the first
one's rendezvous port, a download that waits forever) instead of hanging the suite.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.launch_env import running_in_group, wait_for_output, wait_group
from tests.test_main_deepspeed import scalars
from trainer.main import REPO_ROOT

BIN = Path(sys.executable).parent
TINY = [
    "--preset", "tiny", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=8",
    "--set", "train.log_every=1", "--set", "train.progress_bar=false", "--set", "data.num_workers=1",
    "--set", "train.ckpt_every=0",
]  # fmt: skip
# A periodic evaluation at step 2 of one question per batch: thousands of batches, ~15 s on 2 CPU cores, so that a
# trainer that waits for it to finish is told apart from one that abandons it.
LONG_EVAL = ["--set", "train.eval_every=2", "--set", "train.eval_batch_size=1", "--max-steps", "1000"]
VAL_QUESTIONS = 2048
# From the logged SIGTERM to the logged checkpoint: one batch and the save (the log's clock has whole seconds). A
# trainer that waited for the evaluation would log it ~15 s later on an idle machine, longer on a loaded one.
SAVE_S = 5
# From SIGTERM to the exit of every process, the interpreter's teardown included: generous, since a loaded 2-core
# machine stretches the teardown of torch and DALI to seconds (docs/training.md has the figure measured idle).
EXIT_S = 60.0


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


@pytest.fixture(scope="module")
def long_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An easy-VQA shard folder of VAL_QUESTIONS questions (the converter's own API; about a second to write)."""
    from data_pipeline.convert import easyvqa
    from data_pipeline.convert.build import build_shard_folder

    out = tmp_path_factory.mktemp("long_val") / "val"
    spec = easyvqa.make_spec("train", out, shard_size=VAL_QUESTIONS // 2, seed=0, workers=1, progress=False)
    build_shard_folder(dataclasses.replace(spec, candidates=spec.candidates[:VAL_QUESTIONS]))
    return out


def _signalled_mid_eval(
    cmd: list[str], log_path: Path, *, only_rank: int | None = None
) -> tuple[int, float, str]:
    """Start `cmd` in its own process group, wait until the step-2 evaluation runs, send SIGTERM (to the group, or
    to the one rank `only_rank`), and wait for every process it started. Returns (exit status, seconds from the
    signal to the last exit, log)."""
    tag = f"VQA_FAULT_TEST={log_path}"  # finds the ranks, which torchrun starts in sessions of their own
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=_env(VQA_FAULT_TEST=str(log_path)), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_output(proc, log_path, "(eval)", timeout_s=240)  # the evaluation loader's line
        time.sleep(1.5)  # into the evaluation's batches
        t0 = time.monotonic()
        if only_rank is None:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            os.kill(_tagged(tag, rank=only_rank)[0], signal.SIGTERM)
        rc = wait_group(proc, timeout_s=120)
        while _tagged(tag):
            assert time.monotonic() - t0 < 120, f"ranks {_tagged(tag)} still run"
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
    finally:
        for pid in _tagged(tag):
            os.kill(pid, signal.SIGKILL)
        if running_in_group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return rc, elapsed, log_path.read_text(errors="replace")


def _tagged(tag: str, rank: int | None = None) -> list[int]:
    """Running processes with `tag` in their environment (and RANK=`rank`, where given)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes().split(b"\0")
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if tag.encode() in environ and state not in ("Z", "X"):
            if rank is None or f"RANK={rank}".encode() in environ:
                found.append(int(entry.name))
    assert rank is None or len(found) == 1, f"processes {found} have RANK={rank}"
    return found


def _logged_at(log: str, needle: str) -> int:
    """Seconds of the day of the first log line holding `needle` (the trainer logs HH:MM:SS)."""
    line = next(line for line in log.splitlines() if needle in line)
    h, m, sec = (int(x) for x in line[:8].split(":"))
    return h * 3600 + m * 60 + sec


def _assert_abandoned_and_saved(run_dir: Path, log: str, world_size: int) -> None:
    from trainer.checkpoint.layout import list_complete

    assert "received SIGTERM" in log, log[-5000:]
    assert "step 2: evaluation abandoned after" in log, log[-5000:]
    done, total = log.split("evaluation abandoned after ", 1)[1].split(" batches", 1)[0].split(" of ")
    assert int(done) < int(total), log[-5000:]
    refs = list_complete(run_dir / "checkpoints")
    assert [r.step for r in refs] == [2] and refs[0].world_size == world_size, log[-5000:]
    signalled, saved = (_logged_at(log, needle) for needle in ("received SIGTERM", "saved checkpoint"))
    assert saved - signalled <= SAVE_S, (
        f"{saved - signalled} s from SIGTERM to the checkpoint:\n{log[-3000:]}"
    )
    # No score of part of the split that would read as the whole: no results files, no val/ scalars.
    assert not list(run_dir.glob("eval/*step00000002*"))
    tags = scalars(run_dir)
    assert any(t.startswith("train/") for t in tags) and not [t for t in tags if t.startswith("val/")], tags


@pytest.mark.slow
def test_sigterm_mid_evaluation_checkpoints_within_seconds(
    tiny_easyvqa_shards: Path, long_val: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        *LONG_EVAL,
        "--train-data",
        str(tiny_easyvqa_shards / "train"),
        "--val-data",
        str(long_val),
    ]
    cmd = [sys.executable, "trainer/main.py", *args, "--run-dir", str(run_dir)]
    rc, elapsed, log = _signalled_mid_eval(cmd, tmp_path / "train.log")
    assert rc == 128 + signal.SIGTERM, log[-5000:]
    _assert_abandoned_and_saved(run_dir, log, world_size=1)
    assert elapsed < EXIT_S, f"{elapsed:.1f} s from SIGTERM to exit:\n{log[-3000:]}"


@pytest.mark.slow
def test_sigterm_mid_eval_only_writes_nothing_and_exits_143(
    tiny_easyvqa_shards: Path, long_val: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"  # freshly initialised weights: the train data only builds the tokenizer
    args = [*TINY, "--set", "train.eval_batch_size=1", "--train-data", str(tiny_easyvqa_shards / "train")]
    args += ["--val-data", str(long_val), "--eval-only", "--resume", "none"]
    cmd = [sys.executable, "trainer/main.py", *args, "--run-dir", str(run_dir)]
    rc, elapsed, log = _signalled_mid_eval(cmd, tmp_path / "eval.log")
    assert rc == 128 + signal.SIGTERM, log[-5000:]
    assert "step 0: evaluation abandoned after" in log and "after abandoning the evaluation" in log, log[
        -5000:
    ]
    # RUN/eval/initial/ holds the settings it ran with; no predictions, no metrics, no scalars
    assert not list(run_dir.glob("eval/**/val_*")), log[-5000:]
    assert not [tag for tag in scalars(run_dir / "eval" / "initial") if tag.startswith("val/")], log[-5000:]
    assert elapsed < EXIT_S, f"{elapsed:.1f} s from SIGTERM to exit:\n{log[-3000:]}"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_sigterm_to_one_rank_mid_evaluation_stops_both_ranks(
    tiny_easyvqa_shards: Path, long_val: Path, tmp_path: Path
) -> None:
    """Only rank 1 gets the signal: the ranks agree at a batch boundary, both leave the evaluation, both save."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        *LONG_EVAL,
        "--train-data",
        str(tiny_easyvqa_shards / "train"),
        "--val-data",
        str(long_val),
    ]
    args += ["--set", "train.micro_batch_size=4"]
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "trainer/main.py",
        *args,
    ]
    rc, elapsed, log = _signalled_mid_eval(
        [*cmd, "--run-dir", str(run_dir)], tmp_path / "train.log", only_rank=1
    )
    assert rc != 0, log[-5000:]  # torchrun reports its ranks' 143
    _assert_abandoned_and_saved(run_dir, log, world_size=2)
    assert elapsed < EXIT_S, f"{elapsed:.1f} s from SIGTERM to exit:\n{log[-3000:]}"
    assert (
        json.loads((run_dir / "checkpoints" / "global_step2" / "trainer_state.json").read_text())["step"] == 2
    )


# -- two multi-rank jobs on one host ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_a_second_two_rank_job_on_the_host_takes_another_rendezvous_port(
    tmp_path: Path, tiny_easyvqa_shards: Path
) -> None:
    """`./launch.sh train` of 2 CPU ranks through DeepSpeed's real launcher while port 29500 is listened on, as by a
    first job's rendezvous: the job trains on a port of its own instead of dying with EADDRINUSE (rank 0) and
    knocking at the other job's port (rank 1)."""
    from tests.helpers.launch_checkout import busy, make_checkout, with_real_trainer
    from trainer.checkpoint.layout import list_complete

    c, run_dir = with_real_trainer(make_checkout(tmp_path)), tmp_path / "run"
    with busy(29500):
        result = subprocess.run(
            [str(c.root / "launch.sh"), "train", "--num_gpus", "2", "--", *TINY, "--max-steps", "2",
             "--set", "train.micro_batch_size=4", "--train-data", str(tiny_easyvqa_shards / "train"),
             "--run-dir", str(run_dir)],
            env=c.env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
            cwd=c.tmp, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    ports = [line for line in result.stderr.splitlines() if line.startswith("launch.sh: rendezvous port")]
    assert len(ports) == 1 and "port 29500 " not in ports[0], log[-6000:]
    assert [(r.tag, r.world_size) for r in list_complete(run_dir / "checkpoints")] == [("global_step2", 2)]


# -- a weights endpoint that accepts connections and never answers ------------------------------------------------


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """http://127.0.0.1:PORT of a server that accepts every connection and never reads nor answers."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)  # the accepting thread looks at `stop` this often
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:  # closed at teardown
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=10)
        server.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize(
    "what",
    [
        pytest.param(["--vilt", "dandelin/vilt-b32-mlm", "--clip", "none"], id="vilt-snapshot"),
        pytest.param(
            ["--vilt", "none", "--clip", "hf-hub:org/name"], id="clip-open_clip", marks=pytest.mark.slow
        ),
    ],
)
def test_fetch_weights_gives_up_on_an_endpoint_that_never_answers(
    what: list[str], silent_endpoint: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in _env().items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=silent_endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    t0 = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "trainer.modeling.weights", "--cache", str(tmp_path / "weights"), "--timeout", "1", *what],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{silent_endpoint} did not answer within 1 s" in errors[0] and "--timeout" in errors[0], errors[0]
    assert result.stdout == ""  # no --set line for weights that are not there
    # Two timeouts of 1 s, a back-off of 1 s and the interpreter's start (open_clip's import takes seconds).
    assert elapsed < 60, f"{elapsed:.0f} s"
