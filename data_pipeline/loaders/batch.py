"""The batch contract shared by every loader: turning decoded pixels and sample jsons into one dict of tensors.

    pixels      float32 B x 3 x S x S  normalised: (x/255 - mean) / std; the image squashed to S x S (no crop)
    vilt_ids    int64   B x L          from the caller's tokenizer, on the sample's `question`
    vilt_mask   int64   B x L          1 = real token
    clip_ids    int64   B x C
    targets     float32 B x n_answers  soft scores scattered from the json's labels/scores (all 0 without answers)
    question_id int64   B
    valid       bool    B              evaluation batches only: False for padding rows (drop them when scoring)

Padding rows (evaluation only) have pixels 0, targets 0, question_id -1 and the tokens of an empty question.
`pixels` is on the GPU for the dali-gpu loader, and for the torch loader when `device` is a CUDA device; on the CPU
otherwise. Every other tensor is on the CPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch

from data_pipeline.shards.sharding import DataError

Tokenizer = Callable[[list[str]], dict[str, torch.Tensor]]
TOKEN_KEYS = ("vilt_ids", "vilt_mask", "clip_ids")


def checked_labels(meta: dict[str, Any], n_answers: int) -> list[int]:
    """A sample's answer indices, each below `n_answers`, else the one-line error that the shards and the answer list
    do not belong together."""
    labels = meta.get("labels") or []
    if labels and max(labels) >= n_answers:
        raise ValueError(
            f"question {meta['question_id']}: answer index {max(labels)} >= {n_answers} answers: "
            "the shards and answers.json do not belong together"
        )
    return labels


def parse_json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: sample json is not valid JSON ({exc})") from None
    return meta


def normalisation(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    """Mean and std on the 0..255 scale (what DALI's crop_mirror_normalize and the torch loader apply)."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {list(std)}")
    return [float(m) * 255.0 for m in mean], [float(s) * 255.0 for s in std]


def assemble(
    pixels: torch.Tensor,
    metas: Sequence[dict[str, Any] | None],
    tokenizer: Tokenizer,
    n_answers: int,
    *,
    evaluation: bool,
) -> dict[str, torch.Tensor]:
    """One batch from pixels and per-row sample jsons (None = a padding row, evaluation only)."""
    return attach(pixels, host_fields(metas, tokenizer, n_answers), evaluation=evaluation)


def host_fields(
    metas: Sequence[dict[str, Any] | None], tokenizer: Tokenizer, n_answers: int
) -> dict[str, torch.Tensor]:
    """Every field of a batch but its pixels (tokens, targets, question ids, `valid`): the host's share of a batch,
    which the DALI loader may compute in another process (data_pipeline/loaders/host_pool.py)."""
    b = len(metas)
    questions = [m["question"] if m is not None else "" for m in metas]
    tokens = tokenizer(questions)
    missing = [k for k in TOKEN_KEYS if k not in tokens]
    if missing:
        raise KeyError(f"the tokenizer's output lacks {missing}: it must return {list(TOKEN_KEYS)}")
    targets = torch.zeros(b, n_answers, dtype=torch.float32)
    qids = torch.full((b,), -1, dtype=torch.int64)
    valid = torch.zeros(b, dtype=torch.bool)
    for i, m in enumerate(metas):
        if m is None:
            continue
        valid[i] = True
        qids[i] = int(m["question_id"])
        labels = checked_labels(m, n_answers)
        if labels:
            targets[i, torch.tensor(labels, dtype=torch.long)] = torch.tensor(
                m["scores"], dtype=torch.float32
            )
    return {
        "vilt_ids": tokens["vilt_ids"].long(),
        "vilt_mask": tokens["vilt_mask"].long(),
        "clip_ids": tokens["clip_ids"].long(),
        "targets": targets,
        "question_id": qids,
        "valid": valid,
    }


def attach(
    pixels: torch.Tensor, fields: dict[str, torch.Tensor], *, evaluation: bool
) -> dict[str, torch.Tensor]:
    """The batch: `pixels` (padding rows zeroed) with `host_fields`' tensors; `valid` kept in evaluation only."""
    valid = fields["valid"]
    if not bool(valid.all()):
        pixels[~valid.to(pixels.device)] = 0
    batch = {"pixels": pixels, **{k: v for k, v in fields.items() if k != "valid"}}
    if evaluation:
        batch["valid"] = valid
    return batch
