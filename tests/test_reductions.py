"""The cross-rank reductions behind logged and reported figures, with the reduction faked for a second rank in one
process: the logged training losses (trainer/run/loop.py) and the evaluation's sums (trainer/run/evaluation.py) must come out
per sample whatever the world size, not multiplied by it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers.logged_loss import QidLossEngine, Recorder, loader_of, train_config
from trainer.config.config import TrainConfig
from trainer.engine import dist as D
from trainer.engine.dist import DistInfo
from trainer.run.loop import TrainLoop


class _Engine(QidLossEngine):
    """Losses 1, 2, 3, ... per micro-batch; nothing to train."""

    def __init__(self) -> None:
        super().__init__(accum=2)
        self.n = 0

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.n += 1
        loss = torch.tensor(float(self.n))
        return {"loss": loss, "vqa_loss": loss / 2, "infonce_loss": loss / 4}


def _loader(epoch: int, skip: int, state: bytes | None = None) -> list[dict[str, Any]]:
    return [{"question_id": torch.tensor([100 * epoch + i])} for i in range(8)][skip:]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_logged_training_losses_are_per_sample_means_whatever_the_world_size(
    monkeypatch: pytest.MonkeyPatch, world: int
) -> None:
    """Every rank sees the same losses here, so the all-reduce sums `world` equal parts: the mean over ranks and
    micro-batches is this rank's mean, as one process on the same global batch logs it."""
    monkeypatch.setattr(D, "all_reduce_sum", lambda t: t * world)
    train = TrainConfig(
        global_batch_size=2 * world, micro_batch_size=1, max_steps=2, log_every=1, progress_bar=False
    )
    dist = DistInfo(rank=0, local_rank=0, world_size=world, device=torch.device("cpu"))
    recorder = Recorder()
    loop = TrainLoop(train, _Engine(), dist, make_loader=_loader, metrics=recorder)  # type: ignore[arg-type]
    assert loop.run() == "done"
    logged = {step: m for step, m in recorder.rows if "train/loss" in m}
    assert logged[1]["train/loss"] == pytest.approx(1.5)  # micro-batch losses 1 and 2
    assert logged[2]["train/loss"] == pytest.approx(3.5)
    assert logged[2]["train/vqa_loss"] == pytest.approx(1.75)
    assert logged[2]["train/infonce_loss"] == pytest.approx(0.875)


class _PickEngine:
    def train(self, mode: bool = True) -> None:
        pass

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"logits": torch.tensor([[2.0, 0.0]] * len(batch["question_id"]))}


def test_evaluation_sums_count_every_ranks_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks with the same 3 real samples each (and one padding row): 6 questions, the same mean loss and score."""
    from trainer.run import evaluation

    batch = {
        "question_id": torch.tensor([1, 2, 3, -1]),
        "targets": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]),
        "valid": torch.tensor([True, True, True, False]),
    }
    single = evaluation.evaluate(_PickEngine(), [batch], answers=["a", "b"], device=torch.device("cpu"))
    monkeypatch.setattr(evaluation.D, "all_reduce_sum", lambda t: t * 2)
    monkeypatch.setattr(evaluation.D, "gather_objects", lambda obj, dst=0: [obj, obj])
    monkeypatch.setattr(evaluation.D, "broadcast_object", lambda obj, src=0: obj)
    two = evaluation.evaluate(_PickEngine(), [batch], answers=["a", "b"], device=torch.device("cpu"))
    assert single.count == 3 and two.count == 6
    assert two.loss == pytest.approx(single.loss)
    assert two.vqa_score == pytest.approx(single.vqa_score) == pytest.approx(2 / 3)
    assert len(two.predictions) == 6


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_log_what_one_process_logs_for_the_same_global_batch(tmp_path) -> None:
    """The real all-reduce (gloo, 2 processes) under the real loop: rank 0's logged losses equal those of one process
    that accumulates both ranks' micro-batches of every step."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).parent / "helpers" / "logged_loss_worker.py"
    out = tmp_path / "logged.json"
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env["OMP_NUM_THREADS"] = "1"
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    two_ranks = {step: m for step, m in json.loads(out.read_text())}

    one = Recorder()
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    loop = TrainLoop(train_config(), QidLossEngine(accum=2), dist, make_loader=loader_of([0, 1]), metrics=one)
    assert loop.run() == "done"
    one_process = dict(one.rows)
    assert sorted(two_ranks) == sorted(one_process) == [1, 2, 3, 4]
    for step, m in one_process.items():
        for tag in ("train/loss", "train/vqa_loss", "train/infonce_loss"):
            assert two_ranks[step][tag] == pytest.approx(m[tag], rel=1e-6), (step, tag)
