"""VQA evaluation on all ranks from sufficient statistics, and the official results file.

Every rank runs forward on its share of the evaluation set (ZeRO-3 needs all ranks in every forward, and the
contrastive loss all-gathers inside forward, so every rank sees the same number of batches; the loader pads the last
ones and marks padding with `valid` = 0). Each rank sums the VQA scores, per-sample losses and counts of its real
samples; one all-reduce of those sums (float64) gives the global metrics, identical whatever the world size.

Metrics:
- `val/vqa_score`: the official VQA accuracy (`vqaEval.py` of the VQA API, data_pipeline/answers.py `vqa_score`):
  rank 0 scores every prediction against the annotators' raw answers that the shards keep in each sample's json
  (`read_references`), with the official script's normalisation, quirks included, in the version `train.vqa_rule`
  names (vqa-2021 by default; recorded in the metrics file as `vqa_rule`). Data with one answer per question
  (easy-VQA), where the 10-annotator formula does not apply, scores the stored target of the predicted answer (1 for
  the right answer, else 0).
- `val/loss`: ViLT's VQA loss (binary cross-entropy with logits summed over answers) averaged over real samples.
  The contrastive term is left out: it depends on which samples share a batch, and padding would distort it.
- `val/vqa_score/<type>`: the same per answer type (yes/no, number, other) where the sample json has
  `answer_type` (VQA v2; easy-VQA has none), computed from the gathered per-question scores.

The predictions file follows the official VQA results format, `[{"question_id": int, "answer": str}, ...]`, and is
also written for splits without answers (test-dev/test), whose score is then not reported.

A stop request (SIGTERM/SIGINT) abandons an evaluation at the next batch boundary, so that the trainer's checkpoint
is written within a container's stop grace period instead of after the whole evaluation: before each batch every
rank asks `stop()` and agrees over the control group (one integer all-reduce, the same one the training loop uses
per step), so all ranks leave at the same batch and none waits in a collective that the others skip. An abandoned
evaluation returns `EvalResult.abandoned` with no score: no `val/` scalars and no results files, rather than a
score of part of the split that would read as the whole.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common import atomic
from common.progress import progress_bar
from data_pipeline.answers import (
    check_rule,
    compared_prediction,
    normalises_prediction,
    reference_answers,
    score_against,
)
from data_pipeline.shards.sharding import iter_sample_json, open_folder
from trainer.engine import dist as D

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reference:
    """What the official accuracy of one question needs: its annotators' answers as the official script compares them
    (data_pipeline/answers.py `reference_answers`), and its answer type where the data has one."""

    answers: tuple[str, ...]
    answer_type: str | None = None
    normalise_prediction: bool = True
    """Whether the rule normalises the prediction for this question (answers.py `normalises_prediction`)."""


def read_references(folder: str, rule: str = "vqa-2021") -> dict[int, Reference]:
    """question_id -> Reference for every question of a shard folder with several annotator answers (VQA v2); an
    answer type alone for data with one answer per question and a type; {} for easy-VQA (neither). Rank 0 reads it
    once per run: the sample json of every question (the shards' `answers` field keeps the raw strings), processed
    as version `rule` of the official script does."""
    check_rule(rule, "train.vqa_rule")
    out: dict[int, Reference] = {}
    for meta in iter_sample_json(open_folder(folder)):
        raw = [str(a) for a in meta.get("answers") or ()]
        kind = meta.get("answer_type") or None
        if len(raw) > 1 or kind:
            several = len(raw) > 1
            refs = reference_answers(raw, rule) if several else ()
            out[int(meta["question_id"])] = Reference(
                refs, kind, not several or normalises_prediction(raw, rule)
            )
    return out


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
    vqa_rule: str = "vqa-2021"
    """The version of the official accuracy that scored it (data_pipeline/answers.py `VQA_RULES`)."""
    # Batches run of this rank's `total` when a stop request abandoned the evaluation (then nothing is scored).
    abandoned_after: int | None = None

    @property
    def abandoned(self) -> bool:
        return self.abandoned_after is not None

    def metrics(self) -> dict[str, float]:
        """TensorBoard scalars (`val/...`); empty for a split without answers and for an abandoned evaluation."""
        if self.vqa_score is None or self.abandoned:
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
            "vqa_rule": self.vqa_rule,
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
    references: Mapping[int, Reference] | None = None,
    has_answers: bool = True,
    progress: bool = False,
    total: int | None = None,
    vqa_rule: str = "vqa-2021",
    stop: Callable[[], bool] | None = None,
) -> EvalResult:
    """Run the whole evaluation loader through the engine on every rank and reduce the sufficient statistics.

    `references` (rank 0; `read_references`): the annotators' answers and answer type of each question, from which
    the official accuracy is computed; a question without annotator answers scores its stored target.
    `vqa_rule`: the version of the official accuracy the references were read with (recorded in the result).
    `progress`: a progress bar of this rank's `total` batches (rank 0 passes True; every rank runs as many).
    `stop`: this rank's stop request; asked at every batch and agreed across ranks, true on any rank abandons the
    evaluation on all (the module docstring). Every rank passes one or none.
    """
    t0 = time.perf_counter()
    engine.train(False)
    # [loss sum, count]: float64 so that the sums do not depend on how samples fall on ranks.
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    rows: list[torch.Tensor] = []
    bar = progress_bar(progress, total=total, desc="eval", unit="batch", leave=False)
    try:
        abandoned_after = _run_batches(engine, batches, device, sums, rows, bar, stop)
    finally:
        bar.close()
    if abandoned_after is not None:
        engine.train(True)
        return EvalResult(0, None, None, seconds=time.perf_counter() - t0, abandoned_after=abandoned_after)
    sums = D.all_reduce_sum(sums).cpu()
    engine.train(True)

    # Predictions (and per-type sums) from the (question_id, answer, score) rows gathered on rank 0.
    local = torch.cat(rows).tolist() if rows else []
    parts = D.gather_objects(local)
    gathered = sorted((row for part in parts or () for row in part), key=lambda r: r[0])
    predictions = [{"question_id": int(q), "answer": answers[int(p)]} for q, p, _ in gathered]

    count = int(sums[1].item())
    result = EvalResult(count=count, vqa_score=None, loss=None, predictions=predictions, vqa_rule=vqa_rule)
    if has_answers and count > 0:
        result.loss = float(sums[0] / count)
        scores = _official_scores(gathered, answers, references or {}) if parts is not None else None
        # Rank 0 scored the gathered predictions; every rank reports the same numbers.
        result.vqa_score, result.by_type, result.count_by_type = D.broadcast_object(scores)  # type: ignore[misc]
    result.seconds = time.perf_counter() - t0
    return result


def _run_batches(
    engine: Any,
    batches: Iterable[Mapping[str, Any]],
    device: torch.device,
    sums: torch.Tensor,
    rows: list[torch.Tensor],
    bar: Any,
    stop: Callable[[], bool] | None,
) -> int | None:
    """Every batch through `_eval_batch`; None when all ran, else the count run when a stop request came."""
    it = iter(batches)
    done = 0
    try:
        while (batch := next(it, None)) is not None:
            # Every rank has as many batches (padded), so every rank asks as often: the all-reduces pair up.
            if stop is not None and D.any_rank(stop()):
                return done
            _eval_batch(engine, batch, device, sums, rows)
            done += 1
            bar.update(1)
        return None
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # an abandoned loader's workers go now, not at garbage collection


def _eval_batch(
    engine: Any, batch: Mapping[str, Any], device: torch.device, sums: torch.Tensor, rows: list[torch.Tensor]
) -> None:
    """Forward one batch; add its real samples' loss and count to `sums`, its (qid, answer, stored score) to `rows`."""
    out = engine.forward(batch)
    logits = out["logits"].float()
    targets = batch["targets"].to(device).float()
    valid = batch.get("valid")
    valid = torch.ones(logits.shape[0], device=device) if valid is None else valid.to(device).float()
    pred = logits.argmax(dim=1)
    score = targets.gather(1, pred[:, None]).squeeze(1).double() * valid
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1).double() * valid
    sums[0] += loss.sum()
    sums[1] += valid.sum()
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


def _official_scores(
    gathered: list[list[float]], answers: Sequence[str], references: Mapping[int, Reference]
) -> tuple[float, dict[str, float], dict[str, int]]:
    """Rank 0: (overall accuracy, accuracy per answer type, questions per type) of the gathered (question id,
    predicted answer index, stored soft score) rows: the official accuracy where the question has annotator answers,
    else its stored score."""
    # Once per vocabulary answer, not per question: as compared where the rule normalises it, and where not.
    forms = {n: [compared_prediction(a, n) for a in answers] for n in (True, False)}
    total, type_sums = 0.0, {}
    for q, p, stored in gathered:
        ref = references.get(int(q))
        if ref is not None and ref.answers:
            score = score_against(forms[ref.normalise_prediction][int(p)], ref.answers)
        else:
            score = stored
        total += score
        if ref is not None and ref.answer_type:
            acc = type_sums.setdefault(ref.answer_type, [0.0, 0])
            acc[0] += score
            acc[1] += 1
    by_type = {kind: type_sums[kind][0] / type_sums[kind][1] for kind in sorted(type_sums)}
    counts = {kind: int(type_sums[kind][1]) for kind in sorted(type_sums)}
    return total / max(1, len(gathered)), by_type, counts
