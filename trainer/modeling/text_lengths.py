"""The question tables of a run and the text lengths its model runs at, decided once at start-up.

Every question of the training and validation folders is tokenised once (data_pipeline/loaders/questions.py). The model's
text then runs at model.text_len / model.clip_text_len tokens, or, where those are 0, at the longest question of the
data rounded up to a multiple of 8 (VQA v2's questions are far shorter than ViLT's 40 and CLIP's 77 tokens); the
tables hold their tokens at that length, so the batches are that short already. Questions longer than a configured
length are counted in one warning, never cut silently.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from data_pipeline.loaders.questions import QuestionTable, describe_cut, text_lengths
from trainer.config.config import RunConfig

log = logging.getLogger(__name__)


def prepare(cfg: RunConfig, tokenizer: Any, model: Any, *, is_main: bool) -> dict[bool, QuestionTable]:
    """The question table of the training (key True) and validation (key False) folders, trimmed to the lengths set
    on `model` (a FusedViltClip) here."""
    folders = {True: cfg.data.train_data, False: cfg.data.val_data}
    tables = {train: QuestionTable.build(folder, tokenizer) for train, folder in folders.items() if folder}
    if not tables:
        return {}
    m = cfg.model
    vilt, clip, over = text_lengths(
        list(tables.values()),
        vilt_fixed=m.text_len,
        clip_fixed=m.clip_text_len,
        vilt_max=m.max_text_len,
        clip_max=m.clip_context_length,
    )
    model.set_text_lengths(vilt, clip)
    # CLIP's ids stay at full length where its tower cannot run shorter (no text tower, or one that is not causal).
    clip = model.clip_text_len or m.clip_context_length
    line = describe_cut(vilt, clip, over, list(tables.values()))
    if is_main:
        if line:
            log.warning("%s", line)
        log.info(
            "question text runs at %d WordPiece tokens (model.max_text_len %d) and %d BPE tokens "
            "(model.clip_context_length %d)",
            *(vilt, m.max_text_len, clip, m.clip_context_length),
        )
    return {train: table.trimmed(vilt, clip) for train, table in tables.items()}


def fixed_from_data(cfg: RunConfig, tokenizer: Any, folder: str) -> RunConfig:
    """`cfg` with model.text_len / model.clip_text_len, where 0, fixed at what `folder`'s questions need (the
    benchmark's cells then run, and count FLOPs, at the lengths a training run on that folder would)."""
    m = cfg.model
    table = QuestionTable.build(folder, tokenizer)
    vilt, clip, _ = text_lengths(
        [table],
        vilt_fixed=m.text_len,
        clip_fixed=m.clip_text_len,
        vilt_max=m.max_text_len,
        clip_max=m.clip_context_length,
    )
    return dataclasses.replace(cfg, model=dataclasses.replace(m, text_len=vilt, clip_text_len=clip))
