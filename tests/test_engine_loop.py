"""The training loop against a fake engine and loader (no DeepSpeed): resume position, non-finite losses,
host synchronisation only on logging steps, signals."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import torch

from trainer.config import apply_overrides
from trainer.dist import DistInfo
from trainer.loop import NonFiniteLossError, TrainLoop
from trainer.preemption import StopRequest
from trainer.presets import get_preset

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


def make_loader(epoch: int, skip: int):
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

    def save(self, step: int, state: dict[str, Any]) -> None:
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


class _WorkerSignalMask(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> list[int]:
        return sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_loader_workers_cannot_be_killed_by_a_signal_meant_for_the_trainer() -> None:
    from trainer.preemption import shielded

    loader = torch.utils.data.DataLoader(_WorkerSignalMask(), num_workers=1, batch_size=None)
    masks = list(shielded(loader))
    assert all({int(signal.SIGTERM), int(signal.SIGINT)} <= set(m) for m in masks)
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the trainer still receives it
