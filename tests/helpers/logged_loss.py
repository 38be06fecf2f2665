"""What tests/test_reductions.py and its 2-rank worker share: an engine whose losses are fixed functions of the
question ids, per-rank loaders of known question ids, and the training config of the check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from trainer.config.config import TrainConfig

MICRO_BATCHES = 6  # per rank and epoch


class QidLossEngine:
    """No model: the loss of a micro-batch is a fixed function of its question id."""

    def __init__(self, accum: int) -> None:
        self.grad_accum = accum

    def train(self, mode: bool = True) -> None:
        pass

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        q = float(batch["question_id"][0])
        return {
            "loss": torch.tensor(q % 13 + 0.25),
            "vqa_loss": torch.tensor(q % 7 + 0.5),
            "infonce_loss": torch.tensor(q % 5 / 8),
        }

    def backward(self, loss: torch.Tensor) -> None:
        pass

    def step(self, *, measure_grad_norm: bool = False) -> None:
        pass

    def lr(self) -> float:
        return 1e-4

    def grad_norm(self) -> float | None:
        return None


class Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))


def loader_of(ranks: list[int]) -> Callable[[int, int, bytes | None], list[dict[str, Any]]]:
    """One epoch of micro-batches of one question each: rank r's i-th has question id 1000 r + 17 i + epoch; a
    process standing for several ranks reads their i-th micro-batches one after the other."""

    def make(epoch: int, skip: int, state: bytes | None = None) -> list[dict[str, Any]]:
        batches = [
            {"question_id": torch.tensor([1000 * r + 17 * i + epoch])}
            for i in range(MICRO_BATCHES)
            for r in ranks
        ]
        return batches[skip:]

    return make


def train_config() -> TrainConfig:
    """Global batch 2 of 1-sample micro-batches (2 ranks x 1, or 1 process x 2 accumulated), 4 steps, all logged."""
    return TrainConfig(global_batch_size=2, micro_batch_size=1, max_steps=4, log_every=1, progress_bar=False)
