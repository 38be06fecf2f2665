"""The training loop against a fake engine and loader (no DeepSpeed): resume position, non-finite losses,
host synchronisation only on logging steps, signals."""

from __future__ import annotations

import gc
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.config.config import apply_overrides
from trainer.config.presets import get_preset
from trainer.engine.dist import DistInfo
from trainer.run.loop import NonFiniteLossError, TrainLoop
from trainer.run.preemption import StopRequest

DIST = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
EPOCH_LEN = 5  # micro-batches per epoch: with accumulation 2 an optimizer step straddles the epoch boundary


class FakeEngine:
    """A scalar 'model' whose loss depends on its weight and the batch, so that order and state both matter."""

    grad_accum = 2

    def __init__(self, nan_qids: set[int] = frozenset()) -> None:
        self.w = torch.zeros(())
        self.grad = torch.zeros(())
        self.nan_qids = nan_qids
        self.seen: list[int] = []
        self.losses: list[float] = []
        self.micro = 0

    def train(self, mode: bool = True) -> None:
        pass

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        qid = int(batch["question_id"][0])
        self.seen.append(qid)
        x = torch.tensor(float(qid % 7))
        loss = (self.w - x) ** 2
        if qid in self.nan_qids:
            loss = loss * float("nan")
        self._x = x
        return {"loss": loss, "vqa_loss": loss, "infonce_loss": torch.zeros(()), "logits": torch.zeros(1, 3)}

    def backward(self, loss: torch.Tensor) -> None:
        self.losses.append(float(loss))
        self.grad += 2 * (self.w - self._x)

    def step(self, *, measure_grad_norm: bool = False) -> None:
        self.micro += 1
        if self.micro % self.grad_accum == 0:
            self.w -= 0.05 * self.grad
            self.grad.zero_()

    def lr(self) -> float:
        return 1e-4

    def grad_norm(self) -> float | None:
        return 1.0


def make_loader(epoch: int, skip: int, state: bytes | None = None):
    return [{"question_id": torch.tensor([100 * epoch + i])} for i in range(EPOCH_LEN)][skip:]


class Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hparams(self, hparams: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class FakeCheckpointer:
    def __init__(self, engine: FakeEngine, every: int = 0) -> None:
        self.engine, self.every, self.saved = engine, every, []

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: dict[str, Any], loader_state: bytes | None = None) -> None:
        self.saved.append((step, dict(state), float(self.engine.w)))


def loop_for(
    engine: FakeEngine, *overrides: str, every: int = 0, stop: StopRequest | None = None
) -> TrainLoop:
    cfg = apply_overrides(
        get_preset("tiny"),
        ["train.global_batch_size=2", "train.micro_batch_size=1", "train.progress_bar=false", *overrides],
    )
    return TrainLoop(
        cfg.train,
        engine,
        DIST,
        make_loader=make_loader,
        metrics=Recorder(),
        checkpointer=FakeCheckpointer(engine, every),
        stop=stop,
    )


def test_resume_from_a_state_dict_continues_the_same_batches_and_losses() -> None:
    full = FakeEngine()
    loop = loop_for(full, "train.max_steps=7", "train.log_every=1")
    assert loop.run() == "done"
    assert full.seen[:6] == [0, 1, 2, 3, 4, 100]  # epoch 0 then epoch 1 inside one optimizer step

    first = FakeEngine()
    part = loop_for(first, "train.max_steps=3", "train.log_every=1")
    assert part.run() == "done"  # ends with its final checkpoint
    step, state, w = part.checkpointer.saved[-1]
    assert step == 3 and state["epoch"] == 1 and state["batch_in_epoch"] == 1 and state["samples"] == 6

    resumed = FakeEngine()
    resumed.w = torch.tensor(w)
    loop2 = loop_for(resumed, "train.max_steps=7", "train.log_every=1")
    loop2.load_state_dict(dict(state, world_size=1))
    assert loop2.run() == "done"
    assert first.seen + resumed.seen == full.seen
    assert first.losses + resumed.losses == full.losses
    assert loop2.state_dict()["step"] == 7


def test_nonfinite_loss_stops_with_step_and_question_ids_and_writes_no_checkpoint() -> None:
    engine = FakeEngine(nan_qids={3})  # micro-batch 4 of epoch 0 -> optimizer step 2
    loop = loop_for(engine, "train.max_steps=8", "train.log_every=4", every=2)
    with pytest.raises(NonFiniteLossError, match=r"step 2 \(question ids on rank 0: \[3\]\)"):
        loop.run()
    assert loop.checkpointer.saved == []  # the step-2 checkpoint is checked first and refused


def test_nonfinite_loss_can_skip_the_batch_instead() -> None:
    engine = FakeEngine(nan_qids={3})
    loop = loop_for(engine, "train.max_steps=4", "train.log_every=1", "train.on_nonfinite=skip")
    assert loop.run() == "done"
    assert 3 in engine.seen and loop.skipped == 1
    assert all(torch.isfinite(torch.tensor(x)) for x in engine.losses) and len(engine.losses) == 8
    rows = loop.metrics.rows
    assert [s for s, _ in rows] == [1, 2, 3, 4]


def test_host_reads_only_on_logging_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine()
    loop = loop_for(engine, "train.max_steps=6", "train.log_every=3")
    reads: list[int] = []
    for name in ("item", "tolist", "cpu", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, _original=original, **k):
            reads.append(loop.step)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    engine_backward = engine.backward
    monkeypatch.setattr(engine, "backward", lambda loss: None)  # the fake's own float() is not the loop's
    assert loop.run() == "done"
    monkeypatch.undo()
    engine.backward = engine_backward
    assert set(reads) <= {3, 6}, sorted(set(reads))
    assert [s for s, _ in loop.metrics.rows] == [3, 6]
    expected = {
        "train/loss",
        "train/vqa_loss",
        "train/infonce_loss",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_second",
        "train/data_wait_fraction",
        "train/samples_seen",
    }
    assert set(loop.metrics.rows[0][1]) == expected


def test_sigterm_saves_after_the_current_step_and_reports_interrupted() -> None:
    engine = FakeEngine()
    stop = StopRequest().install()
    try:
        loop = loop_for(engine, "train.max_steps=100", "train.log_every=50", stop=stop)
        original = engine.step

        def step_then_signal(**kwargs: Any) -> None:
            original(**kwargs)
            if engine.micro == 5:  # inside optimizer step 3
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)  # a forwarded duplicate is ignored

        engine.step = step_then_signal
        assert loop.run() == "interrupted"
    finally:
        stop.uninstall()
    assert stop.signum == signal.SIGTERM
    assert [s for s, _, _ in loop.checkpointer.saved] == [3]


# -- loader workers: they outlive a signal meant for the trainer, and never outlive the loop ----------------------


def _live_children() -> set[int]:
    """Child processes of this process that are still running (not exited, not zombies)."""
    me, found = os.getpid(), set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == me and state not in ("Z", "X"):
            found.add(int(entry.name))
    return found


class _Tokenizer:
    """Ids from the question's length; with `fail_after`, raises in the worker on that call (a loader error)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after, self.calls = fail_after, 0

    def __call__(self, questions: list[str]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("tokenizer exploded")
        ids = torch.tensor([[2, 5 + len(q) % 40, 3, 0] for q in questions])
        return {"vilt_ids": ids, "vilt_mask": (ids > 0).long(), "clip_ids": ids.clone()}


def _survives_sigterm(pid: int, grace_s: float = 2.0) -> bool:
    """Whether the process `pid`, just sent SIGTERM, is still running after it: True at once when the signal is seen
    pending (blocked, it can no longer end the process), else after `grace_s` seconds alive."""
    deadline = time.monotonic() + grace_s
    while pid in _live_children():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # ended meanwhile
            return False
        pending = next(line for line in status.splitlines() if line.startswith("ShdPnd:")).split()[1]
        if int(pending, 16) & (1 << (signal.SIGTERM - 1)) or time.monotonic() > deadline:
            return True
        time.sleep(0.02)
    return False


EXIT_PATHS = ["done", "interrupted", "error in the loop", "loader error"]


@pytest.mark.parametrize("path", EXIT_PATHS)
def test_loader_workers_survive_a_signal_meant_for_the_trainer_and_end_with_the_loop(
    path: str, tiny_easyvqa_shards: Path
) -> None:
    """The real torch loader with 2 workers under the loop. At the first batch, SIGTERM reaches every worker, as a
    signal to the trainer's process group does: they must survive it (a dead worker ends the run with "worker
    killed"). Whichever way the loop ends, its workers are gone when `run` returns or raises, not later at garbage
    collection: pytest.raises keeps the traceback, and with it the frames that hold the loader, alive."""
    from data_pipeline.loaders.loader import LoaderSpec, build_loader

    tokenizer = _Tokenizer(fail_after=3 if path == "loader error" else None)

    def make_loader(epoch: int, skip: int, state: bytes | None = None):
        spec = LoaderSpec(
            tokenizer=tokenizer, batch_size=4, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, rank=0,
            world_size=1, train=True, seed=0, epoch=epoch, skip_batches=skip, kind="torch", num_workers=2,
        )  # fmt: skip
        return build_loader(tiny_easyvqa_shards / "train", spec)

    before = _live_children()
    workers: set[int] = set()
    survived: list[bool] = []
    engine = FakeEngine()
    forward = engine.forward

    def forward_and_signal(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        n = len(engine.seen)
        if n == 0:
            workers.update(_live_children() - before)
            assert len(workers) == 2, workers
            assert signal.SIGTERM not in signal.pthread_sigmask(
                signal.SIG_BLOCK, []
            )  # the trainer still gets it
            for pid in workers:
                os.kill(pid, signal.SIGTERM)
            survived.extend(_survives_sigterm(pid) for pid in workers)
            if path == "interrupted":
                os.kill(os.getpid(), signal.SIGTERM)
        if path == "error in the loop" and n == 3:
            raise RuntimeError("the engine failed")
        return forward(batch)

    engine.forward = forward_and_signal
    stop = StopRequest().install() if path == "interrupted" else None
    # 3 steps (6 batches) end in the middle of the first epoch (32 batches of 4), and so do the errors: no path ends
    # the workers by exhausting the data.
    max_steps = 3 if path in ("done", "interrupted") else 32
    loop = loop_for(engine, f"train.max_steps={max_steps}", "train.log_every=8", stop=stop)
    loop.make_loader = make_loader
    raised = None
    try:
        if path in ("done", "interrupted"):
            assert loop.run() == path
        else:
            match = "the engine failed" if path == "error in the loop" else "tokenizer exploded"
            with pytest.raises(RuntimeError, match=match) as raised:
                loop.run()
            assert raised.tb is not None  # the traceback, and the loader in its frames, are still alive here
        assert survived == [True, True], "a loader worker died of the SIGTERM meant for the trainer"
        assert 0 < len(engine.seen) < 32
        still_running = workers & _live_children()
        assert not still_running, f"{path}: loader workers {sorted(still_running)} outlive the loop"
    finally:
        if stop is not None:
            stop.uninstall()
        # Never leave a worker behind for the next test: without the traceback, the DataLoader's own shutdown ends
        # any that a failure above kept (SIGKILL would make its SIGCHLD handler fail a later test instead).
        raised = None
        gc.collect()


def test_a_bar_into_a_log_file_also_logs_a_line_per_logged_step(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """A batch job's stderr is a file: every train.log_every steps a log line, beside a labelled bar."""
    import logging

    from common.progress import logs_lines, progress_bar

    loop = loop_for(FakeEngine(), "train.max_steps=4", "train.log_every=2", "train.progress_bar=true")
    with caplog.at_level(logging.INFO, logger="trainer.run.loop"):
        assert loop.run() == "done"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" loss")[0] for line in lines] == ["step 2/4", "step 4/4"], lines
    assert all("samples/s" in line for line in lines)
    err = capsys.readouterr().err  # pytest's capture is not a terminal: the bar is drawn there rarely
    assert "train:" in err and "samples/s=" in err and "sps=" not in err, err

    class Terminal:
        def isatty(self) -> bool:
            return True

        def write(self, s: str) -> None:
            pass

        def flush(self) -> None:
            pass

    assert not logs_lines(progress_bar(True, file=Terminal(), total=3))  # a terminal keeps its bar alone
    assert logs_lines(progress_bar(False, file=Terminal(), total=3))  # no bar: the lines are the progress


def test_samples_seen_is_logged_beside_the_step_and_events_go_in_the_run_folder(tmp_path: Path) -> None:
    """train/samples_seen: step x global batch; TensorBoard events in the run folder itself, so that
    `tensorboard --logdir runs` names each run after its folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.run.metrics import TRAIN_TAGS, build_logger

    loop = loop_for(FakeEngine(), "train.max_steps=4", "train.log_every=2")
    assert loop.run() == "done"
    assert [(step, m["train/samples_seen"]) for step, m in loop.metrics.rows] == [(2, 4.0), (4, 8.0)]
    assert "train/samples_seen" in TRAIN_TAGS

    run_dir = tmp_path / "my-run"
    logger = build_logger(run_dir, is_main=True)
    logger.log({"train/samples_seen": 8.0}, 4)
    logger.close()
    assert [p.parent for p in tmp_path.rglob("events.out.tfevents.*")] == [run_dir]
    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/samples_seen")] == [(4, 8.0)]
