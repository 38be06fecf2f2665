"""Evaluation arithmetic with a fake engine: the official soft score, padding, answer types, results format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from trainer.run.evaluation import Reference, evaluate, write_results

ANSWERS = ["yes", "no", "2", "red"]


class LogitsEngine:
    """Returns fixed logits per question id, records the train/eval mode switches."""

    def __init__(self, logits_by_qid: dict[int, list[float]]) -> None:
        self.logits_by_qid = logits_by_qid
        self.modes: list[bool] = []

    def train(self, mode: bool = True) -> None:
        self.modes.append(mode)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        rows = [self.logits_by_qid.get(int(q), [0.0] * len(ANSWERS)) for q in batch["question_id"]]
        return {"logits": torch.tensor(rows)}


def batch(qids: list[int], targets: list[list[float]], valid: list[bool]) -> dict[str, torch.Tensor]:
    return {
        "question_id": torch.tensor(qids),
        "targets": torch.tensor(targets),
        "valid": torch.tensor(valid),
    }


def test_score_is_the_soft_score_of_the_predicted_answer_and_padding_is_ignored(tmp_path: Path) -> None:
    engine = LogitsEngine({11: [5, 0, 0, 0], 12: [0, 0, 5, 0], 13: [0, 5, 0, 0]})
    batches = [
        batch([12, 11], [[0, 0, 0.3, 1.0], [1.0, 0, 0, 0]], [True, True]),
        # the last row is padding (question id -1, as the loaders pad): it must not count
        batch([13, -1], [[0, 0.6, 0, 0], [0, 0, 0, 0]], [True, False]),
    ]
    # Answer types without annotator answers: each question scores its stored target (easy-VQA's case).
    refs = {11: Reference((), "yes/no"), 12: Reference((), "number"), 13: Reference((), "yes/no")}
    result = evaluate(engine, batches, answers=ANSWERS, device=torch.device("cpu"), references=refs)
    assert result.count == 3
    assert result.vqa_score == pytest.approx((0.3 + 1.0 + 0.6) / 3)
    assert result.by_type == pytest.approx({"number": 0.3, "yes/no": 0.8})
    assert result.count_by_type == {"number": 1, "yes/no": 2}
    logits = torch.tensor([[0, 0, 5, 0], [5, 0, 0, 0], [0, 5, 0, 0]], dtype=torch.float)
    targets = torch.tensor([[0, 0, 0.3, 1.0], [1.0, 0, 0, 0], [0, 0.6, 0, 0]])
    vilt_loss = F.binary_cross_entropy_with_logits(logits, targets) * len(ANSWERS)  # ViLT's VQA loss
    assert result.loss == pytest.approx(float(vilt_loss))
    assert engine.modes == [False, True]  # evaluation mode, then back to training

    metrics = result.metrics()
    assert set(metrics) == {"val/vqa_score", "val/loss", "val/vqa_score/yes_no", "val/vqa_score/number"}
    pred_path, metrics_path = write_results(result, tmp_path, step=7)
    preds = json.loads(pred_path.read_text())
    assert preds == [
        {"question_id": 11, "answer": "yes"},
        {"question_id": 12, "answer": "2"},
        {"question_id": 13, "answer": "no"},
    ]
    assert json.loads(metrics_path.read_text())["step"] == 7


def test_split_without_answers_still_writes_predictions() -> None:
    engine = LogitsEngine({1: [0, 0, 0, 9]})
    result = evaluate(
        engine,
        [batch([1], [[0, 0, 0, 0]], [True])],
        answers=ANSWERS,
        device=torch.device("cpu"),
        has_answers=False,
    )
    assert result.vqa_score is None and result.metrics() == {}
    assert result.predictions == [{"question_id": 1, "answer": "red"}]


def test_a_stop_request_abandons_the_evaluation_at_the_next_batch_and_scores_nothing() -> None:
    engine = LogitsEngine({1: [5, 0, 0, 0]})
    closed: list[bool] = []

    def batches():  # a loader that must be released when abandoned
        try:
            for q in range(1, 6):
                yield batch([q], [[1.0, 0, 0, 0]], [True])
        finally:
            closed.append(True)

    asked: list[int] = []

    def stop() -> bool:  # the signal arrives while the third batch is fetched
        asked.append(1)
        return len(asked) >= 3

    result = evaluate(engine, batches(), answers=ANSWERS, device=torch.device("cpu"), stop=stop)
    assert result.abandoned and result.abandoned_after == 2
    assert (result.count, result.vqa_score, result.loss, result.predictions) == (0, None, None, [])
    assert result.metrics() == {}  # no val/ scalar of part of the split
    assert engine.modes == [False, True] and closed == [True]
    # Without a request the same loader runs to the end.
    whole = evaluate(engine, batches(), answers=ANSWERS, device=torch.device("cpu"), stop=lambda: False)
    assert not whole.abandoned and whole.count == 5 and whole.vqa_score == 1.0
