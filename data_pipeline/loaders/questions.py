"""Every sample's token ids, masks and answer targets of a shard folder, computed once: `QuestionTable`.

Why: a question's tokens never change during a run, but tokenising them batch after batch (ViLT's WordPiece and
open_clip's BPE, much of it Python) and parsing every sample json cost the training process most of a DALI batch's
host time (docs/data_pipeline.md, "Tokenisation on the host"). With a table, a DALI batch
costs a handful of array operations: the question ids are read out of the padded json bytes by `question_ids`
(vectorised, no json parsing), the rows found by binary search, and ids, masks and targets gathered from the table.

The table is built when a run starts, from the json components of the folder (read through the index files, as
`read_sample_info` does) and the run's own tokenizer, so shard folders do not depend on a tokenizer and folders
converted before keep working. Distinct questions are tokenised once (VQA v2 repeats many). Its token columns can be
cut to the length the questions need (`trimmed`): the model then runs its text at that length (trainer/modeling/model.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_pipeline.loaders import batch as contract
from data_pipeline.loaders import loader_state
from data_pipeline.shards import sharding

log = logging.getLogger(__name__)

_KEY = np.frombuffer(b'"question_id":', dtype=np.uint8)
_DIGITS = 19  # an int64 has at most 19 digits
_POW10 = 10 ** np.arange(_DIGITS, dtype=np.int64)
TOKENISE_CHUNK = 4096


def round_up(n: int, multiple: int = 8) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class QuestionTable:
    """One shard folder's questions as arrays, sorted by question id; the last row is an empty question (the tokens of
    evaluation's padding rows)."""

    folder: str
    fingerprint: str
    """loader_state.folder_fingerprint of the folder's manifest: a table serves only the folder it was built from."""
    qids: np.ndarray
    """int64 [N], sorted."""
    question_row: torch.Tensor
    """int64 [N + 1]: each sample's row in the token tensors (its distinct question); the last: the empty question."""
    vilt_ids: torch.Tensor
    """int64 [D + 1, L]: one row per distinct question (VQA v2 repeats many), the empty question last."""
    vilt_mask: torch.Tensor
    clip_ids: torch.Tensor
    """int64 [D + 1, C]"""
    labels: torch.Tensor
    """int64 [N, K]: answer indices, padded with 0 (score 0)."""
    scores: torch.Tensor
    """float32 [N, K]"""
    vilt_lengths: np.ndarray
    """int64 [N]: each question's length in WordPiece tokens, [CLS] and [SEP] included (untrimmed)."""
    clip_lengths: np.ndarray
    """int64 [N]: each question's length in BPE tokens, start and end of text included (untrimmed)."""

    @classmethod
    def build(
        cls, shards_dir: str, tokenizer: contract.Tokenizer, n_answers: int | None = None
    ) -> QuestionTable:
        """Read every sample json of `shards_dir` and tokenise its distinct questions with `tokenizer`."""
        folder = sharding.open_folder(shards_dir)
        n_answers = len(folder.answers) if n_answers is None else n_answers
        by_qid: dict[int, dict[str, Any]] = {}
        for meta in sharding.iter_sample_json(folder):
            by_qid[int(meta["question_id"])] = meta
        qids = np.array(sorted(by_qid), dtype=np.int64)
        metas = [by_qid[int(q)] for q in qids]
        distinct = sorted({m["question"] for m in metas})
        tokens = _tokenise([*distinct, ""], tokenizer)  # "" last: the padding rows' question
        row = {q: i for i, q in enumerate(distinct)}
        index = torch.tensor([row[m["question"]] for m in metas] + [len(distinct)], dtype=torch.long)
        k = max([len(m.get("labels") or []) for m in metas], default=0) or 1
        labels = torch.zeros(len(metas), k, dtype=torch.long)
        scores = torch.zeros(len(metas), k, dtype=torch.float32)
        for i, m in enumerate(metas):
            ls = contract.checked_labels(m, n_answers)
            if ls:
                labels[i, : len(ls)] = torch.tensor(ls, dtype=torch.long)
                scores[i, : len(ls)] = torch.tensor(m["scores"], dtype=torch.float32)
        samples = index[:-1]
        return cls(
            folder=str(folder.folder),
            fingerprint=loader_state.folder_fingerprint(folder.manifest),
            qids=qids,
            question_row=index,
            vilt_ids=tokens["vilt_ids"],
            vilt_mask=tokens["vilt_mask"],
            clip_ids=tokens["clip_ids"],
            labels=labels,
            scores=scores,
            vilt_lengths=tokens["vilt_mask"].sum(1).index_select(0, samples).numpy().astype(np.int64),
            clip_lengths=_clip_lengths(tokens["clip_ids"]).index_select(0, samples).numpy().astype(np.int64),
        )

    def __len__(self) -> int:
        return len(self.qids)

    def trimmed(self, vilt_len: int, clip_len: int) -> QuestionTable:
        """The same table with its token columns cut to `vilt_len` and `clip_len` (lengths stay untrimmed)."""
        return QuestionTable(
            **{
                **self.__dict__,
                "vilt_ids": self.vilt_ids[:, :vilt_len].contiguous(),
                "vilt_mask": self.vilt_mask[:, :vilt_len].contiguous(),
                "clip_ids": self.clip_ids[:, :clip_len].contiguous(),
            }
        )

    def check_folder(self, folder: sharding.ShardFolder) -> None:
        if loader_state.folder_fingerprint(folder.manifest) != self.fingerprint:
            raise ValueError(f"the question table of {self.folder} does not belong to {folder.folder}")

    def fields(self, qids: np.ndarray, real: np.ndarray, n_answers: int) -> dict[str, torch.Tensor]:
        """`batch.host_fields`' tensors for the samples `qids` (rows where `real` is False: padding)."""
        pos = np.searchsorted(self.qids, qids)
        pos = np.minimum(pos, len(self.qids) - 1)
        found = self.qids[pos] == qids
        if not bool(found[real].all()):
            missing = qids[real & ~found][:3].tolist()
            raise sharding.DataError(f"{self.folder}: question ids {missing} are not in its question table")
        rows = torch.from_numpy(np.where(real, pos, len(self.qids)))
        valid = torch.from_numpy(np.asarray(real, dtype=bool))
        # index_select, not tensor[rows]: advanced indexing runs on the intra-op thread pool, far slower on a busy
        # CPU (docs/performance.md, "Figures behind choices in the code").
        sample = rows.clamp(max=len(self.qids) - 1)
        scores = self.scores.index_select(0, sample) * valid[:, None]
        targets = torch.zeros(len(rows), n_answers, dtype=torch.float32)
        # Labels are distinct within a question (padding: score 0), so the sum is the assignment of batch.host_fields.
        targets.scatter_add_(1, self.labels.index_select(0, sample), scores)
        question = self.question_row.index_select(0, rows)
        return {
            "vilt_ids": self.vilt_ids.index_select(0, question),
            "vilt_mask": self.vilt_mask.index_select(0, question),
            "clip_ids": self.clip_ids.index_select(0, question),
            "targets": targets,
            "question_id": torch.from_numpy(np.where(real, qids, -1).astype(np.int64)),
            "valid": valid,
        }


def _tokenise(questions: list[str], tokenizer: contract.Tokenizer) -> dict[str, torch.Tensor]:
    parts = [tokenizer(questions[i : i + TOKENISE_CHUNK]) for i in range(0, len(questions), TOKENISE_CHUNK)]
    return {key: torch.cat([p[key].long() for p in parts]) for key in contract.TOKEN_KEYS}


def _clip_lengths(clip_ids: torch.Tensor) -> torch.Tensor:
    """Up to and including the end-of-text token, the largest id of a row (where open_clip's CLIP pools)."""
    return clip_ids.argmax(dim=1) + 1


def question_ids(rows: np.ndarray, where: str) -> np.ndarray:
    """The question_id of each zero-padded json row (uint8 [B, W]), with array operations: the first
    `"question_id":` key and the digits after it. Rows where that does not give one plain integer (no such key, a
    second one, a sign, a number of 19 digits or more) are parsed as json instead."""
    b, w = rows.shape
    k = len(_KEY)
    out = np.full(b, -1, dtype=np.int64)
    if w <= k:
        return _parse_rows(rows, np.arange(b), out, where)
    # The converters write question_id as the first key: rows[:, 1:1+k] is the key in every row of their shards.
    if bool((rows[:, 1 : 1 + k] == _KEY).all()):
        starts = np.full(b, 1 + k, dtype=np.int64)
        single = np.ones(b, dtype=bool)
    else:
        hit = rows[:, : w - k + 1] == _KEY[0]
        for j in range(1, k):
            hit &= rows[:, j : w - k + 1 + j] == _KEY[j]
        single = hit.sum(axis=1) == 1
        starts = hit.argmax(axis=1).astype(np.int64) + k
    cols = np.minimum(starts[:, None] + np.arange(_DIGITS + 1), w - 1)
    digits = np.take_along_axis(rows, cols, axis=1).astype(np.int64) - ord("0")
    is_digit = (digits >= 0) & (digits <= 9)
    run = np.logical_and.accumulate(is_digit, axis=1)
    n = run.sum(axis=1)
    exps = np.clip(n[:, None] - 1 - np.arange(_DIGITS + 1), 0, _DIGITS - 1)
    values = np.where(run, digits * _POW10[exps], 0).sum(axis=1)
    plain = single & (n >= 1) & (n < _DIGITS) & (starts + n < w)
    out[plain] = values[plain]
    return _parse_rows(rows, np.flatnonzero(~plain), out, where)


def _parse_rows(rows: np.ndarray, which: Sequence[int], out: np.ndarray, where: str) -> np.ndarray:
    for j in which:
        meta = contract.parse_json(np.trim_zeros(rows[j], "b").tobytes(), f"{where}, row {j}")
        try:
            out[j] = int(meta["question_id"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise sharding.DataError(f"{where}, row {j}: sample json has no integer question_id") from None
    return out


def longest(tables: Sequence[QuestionTable]) -> tuple[int, int]:
    """The longest question of `tables` in WordPiece and in BPE tokens."""
    vilt = max((int(t.vilt_lengths.max(initial=0)) for t in tables), default=0)
    clip = max((int(t.clip_lengths.max(initial=0)) for t in tables), default=0)
    return vilt, clip


def text_lengths(
    tables: Sequence[QuestionTable], *, vilt_fixed: int, clip_fixed: int, vilt_max: int, clip_max: int
) -> tuple[int, int, dict[str, int]]:
    """The lengths the text runs at: `*_fixed` where set (> 0), else the data's longest question rounded up to a
    multiple of 8, at most the full length `*_max`; and how many questions of `tables` are longer than each."""
    vilt_long, clip_long = longest(tables)
    vilt = vilt_fixed or min(vilt_max, round_up(max(vilt_long, 1)))
    clip = clip_fixed or min(clip_max, round_up(max(clip_long, 1)))
    over = {
        "vilt": sum(int((t.vilt_lengths > vilt).sum()) for t in tables),
        "clip": sum(int((t.clip_lengths > clip).sum()) for t in tables),
    }
    return vilt, clip, over


def describe_cut(vilt: int, clip: int, over: dict[str, int], tables: Sequence[QuestionTable]) -> str | None:
    """One line for questions longer than the lengths the text runs at (None when all fit)."""
    if not any(over.values()):
        return None
    vilt_long, clip_long = longest(tables)
    return (
        f"{over['vilt']} questions are longer than model.text_len={vilt} WordPiece tokens (longest {vilt_long}) and "
        f"{over['clip']} longer than model.clip_text_len={clip} BPE tokens (longest {clip_long}): they are cut "
        f"there; set model.text_len / model.clip_text_len to 0 to follow the data"
    )


def fields_from_metas(
    metas: Sequence[dict[str, Any] | None], table: QuestionTable, n_answers: int
) -> dict[str, torch.Tensor]:
    """`batch.host_fields` for parsed sample jsons (None: a padding row), from the table (the torch loader's path)."""
    real = np.array([m is not None for m in metas], dtype=bool)
    qids = np.array([int(m["question_id"]) if m is not None else -1 for m in metas], dtype=np.int64)
    return table.fields(qids, real, n_answers)
