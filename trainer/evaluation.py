"""VQA evaluation on all ranks from sufficient statistics, and the official results file.

Every rank runs forward on its share of the evaluation set (ZeRO-3 needs all ranks in every forward, and the
contrastive loss all-gathers inside forward, so every rank sees the same number of batches; the loader pads the last
ones and marks padding with `valid` = 0). Each rank sums the VQA scores, per-sample losses and counts of its real
samples; one all-reduce of those sums (float64) gives the global metrics, identical whatever the world size.

Metrics:
- `val/vqa_score`: the official VQA accuracy. The shards store each answer's soft score (the average over the 10
  choose 9 annotator subsets of min(1, matches/3)), so the score of a prediction is the target's soft score at the
  predicted answer; answers outside the vocabulary score 0 as they would officially.
- `val/loss`: ViLT's VQA loss (binary cross-entropy with logits summed over answers) averaged over real samples.
  The contrastive term is left out: it depends on which samples share a batch, and padding would distort it.
- `val/vqa_score/<type>`: the same per answer type (yes/no, number, other) where the sample json has
  `answer_type` (VQA v2; easy-VQA has none), computed from the gathered per-question scores.

The predictions file follows the official VQA results format, `[{"question_id": int, "answer": str}, ...]`, and is
also written for splits without answers (test-dev/test), whose score is then not reported.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data_pipeline import atomic
from trainer import dist as D

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Global evaluation results: count, score and loss on every rank; predictions and by_type on rank 0."""

    count: int
    vqa_score: float | None
    loss: float | None
    by_type: dict[str, float] = field(default_factory=dict)
    count_by_type: dict[str, int] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        """TensorBoard scalars (`val/...`); empty for a split without answers."""
        if self.vqa_score is None:
            return {}
        m = {"val/vqa_score": self.vqa_score}
        if self.loss is not None:
            m["val/loss"] = self.loss
        for name, score in self.by_type.items():
            m[f"val/vqa_score/{name.replace('/', '_').replace(' ', '_')}"] = score
        return m

    def summary(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "vqa_score": self.vqa_score,
            "loss": self.loss,
            "vqa_score_by_type": self.by_type,
            "count_by_type": self.count_by_type,
            "seconds": self.seconds,
        }


@torch.no_grad()
def evaluate(
    engine: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    answers: Sequence[str],
    device: torch.device,
    answer_type_of: Mapping[int, str] | None = None,
    has_answers: bool = True,
    progress: bool = False,
    total: int | None = None,
) -> EvalResult:
    """Run the whole evaluation loader through the engine on every rank and reduce the sufficient statistics.

    `answer_type_of` maps question ids to their answer type (from the shards' sample json, where the data has one).
    `progress`: a progress bar of this rank's `total` batches (rank 0 passes True; every rank runs as many).
    """
    from trainer.progress import progress_bar

    t0 = time.perf_counter()
    engine.train(False)
    # [score sum, loss sum, count]: float64 so that the sums do not depend on how samples fall on ranks.
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    rows: list[torch.Tensor] = []
    bar = progress_bar(progress, total=total, desc="eval", unit="batch", leave=False)
    try:
        for batch in batches:
            _eval_batch(engine, batch, device, sums, rows)
            bar.update(1)
    finally:
        bar.close()
    sums = D.all_reduce_sum(sums).cpu()
    engine.train(True)

    # Predictions (and per-type sums) from the (question_id, answer, score) rows gathered on rank 0.
    local = torch.cat(rows).tolist() if rows else []
    parts = D.gather_objects(local)
    gathered = sorted((row for part in parts or () for row in part), key=lambda r: r[0])
    predictions = [{"question_id": int(q), "answer": answers[int(p)]} for q, p, _ in gathered]

    count = int(sums[2].item())
    result = EvalResult(count=count, vqa_score=None, loss=None, predictions=predictions)
    if has_answers and count > 0:
        result.vqa_score = float(sums[0] / count)
        result.loss = float(sums[1] / count)
        if answer_type_of:
            type_sums: dict[str, list[float]] = {}
            for q, _, sc in gathered:
                kind = answer_type_of.get(int(q))
                if kind is not None:
                    acc = type_sums.setdefault(kind, [0.0, 0])
                    acc[0] += sc
                    acc[1] += 1
            for kind in sorted(type_sums):
                total, n = type_sums[kind]
                result.by_type[kind] = total / n
                result.count_by_type[kind] = int(n)
    result.seconds = time.perf_counter() - t0
    return result


def _eval_batch(
    engine: Any, batch: Mapping[str, Any], device: torch.device, sums: torch.Tensor, rows: list[torch.Tensor]
) -> None:
    """Forward one batch; add its real samples' score, loss and count to `sums`, its (qid, answer, score) to `rows`."""
    out = engine.forward(batch)
    logits = out["logits"].float()
    targets = batch["targets"].to(device).float()
    valid = batch.get("valid")
    valid = torch.ones(logits.shape[0], device=device) if valid is None else valid.to(device).float()
    pred = logits.argmax(dim=1)
    score = targets.gather(1, pred[:, None]).squeeze(1).double() * valid
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1).double() * valid
    sums[0] += score.sum()
    sums[1] += loss.sum()
    sums[2] += valid.sum()
    qid = torch.as_tensor(batch["question_id"]).reshape(-1).double()
    keep = valid.bool().cpu()
    rows.append(torch.stack([qid, pred.cpu().double(), score.cpu()], dim=1)[keep])


def write_results(result: EvalResult, out_dir: Path, step: int, split_name: str = "val") -> tuple[Path, Path]:
    """Rank 0: the official-format predictions file and a metrics summary, both written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / f"{split_name}_predictions_step{step:08d}.json"
    atomic.write_text(pred_path, json.dumps(result.predictions) + "\n")
    metrics_path = out_dir / f"{split_name}_metrics_step{step:08d}.json"
    atomic.write_text(metrics_path, json.dumps(dict(result.summary(), step=step), indent=2) + "\n")
    return pred_path, metrics_path
