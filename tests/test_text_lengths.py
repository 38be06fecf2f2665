"""Start-up (trainer/modeling/text_lengths.py): the run's question tables and the text lengths of its model follow the data,
a configured length that cuts questions is reported once with their count, and a run trains on them end to end."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from data_pipeline.loaders.questions import round_up
from data_pipeline.shards.sharding import iter_sample_json, open_folder
from data_pipeline.text import QuestionTokenizer
from trainer.config.config import DataConfig, RunConfig
from trainer.config.presets import get_preset
from trainer.modeling import text_lengths
from trainer.modeling.model import FusedViltClip


def _setup(shards: Path, tmp_path: Path, **model) -> tuple[RunConfig, QuestionTokenizer, FusedViltClip]:
    base = get_preset("tiny")
    cfg = RunConfig(
        model=dataclasses.replace(base.model, **model),
        data=DataConfig(train_data=str(shards / "train"), val_data=str(shards / "test")),
    )
    questions = [m["question"] for m in iter_sample_json(open_folder(shards / "train"))]
    tok = QuestionTokenizer.build(
        questions, tmp_path, clip_arch=cfg.model.clip_arch, max_text_len=cfg.model.max_text_len,
        clip_context_length=cfg.model.clip_context_length, vocab_size=cfg.model.wordpiece_vocab_size,
    )  # fmt: skip
    model = FusedViltClip(cfg.model, n_answers=13, vilt_vocab_size=tok.vilt_vocab_size)
    return cfg, tok, model


def test_lengths_follow_the_data(tiny_easyvqa_shards: Path, tmp_path: Path, caplog) -> None:
    cfg, tok, model = _setup(tiny_easyvqa_shards, tmp_path)
    with caplog.at_level(logging.INFO, logger="trainer.modeling.text_lengths"):
        tables = text_lengths.prepare(cfg, tok, model, is_main=True)
    assert set(tables) == {True, False}
    vilt_long = max(int(t.vilt_lengths.max()) for t in tables.values())
    clip_long = max(int(t.clip_lengths.max()) for t in tables.values())
    # easy-VQA's questions: at most 12 WordPiece and 13 BPE tokens with their start and end tokens.
    assert vilt_long <= cfg.model.max_text_len and clip_long < cfg.model.clip_context_length
    assert (
        model.vilt_text_len
        == min(cfg.model.max_text_len, round_up(vilt_long))
        == tables[True].vilt_ids.shape[1]
    )
    assert (
        model.clip_text_len
        == round_up(clip_long)
        == tables[False].clip_ids.shape[1]
        < cfg.model.clip_context_length
    )
    assert not [
        r
        for r in caplog.records
        if r.name == "trainer.modeling.text_lengths" and r.levelno >= logging.WARNING
    ]
    # Every question's end-of-text token is inside the cut: CLIP pools at the same token as at full length.
    full = tok(["what color is the shape?"])["clip_ids"]
    assert int(full.argmax()) < model.clip_text_len


def test_a_question_over_the_configured_cut_is_reported_once(
    tiny_easyvqa_shards: Path, tmp_path: Path, caplog
):
    cfg, tok, model = _setup(tiny_easyvqa_shards, tmp_path, text_len=6, clip_text_len=7)
    with caplog.at_level(logging.INFO, logger="trainer.modeling.text_lengths"):
        tables = text_lengths.prepare(cfg, tok, model, is_main=True)
    over = sum(int((t.vilt_lengths > 6).sum()) for t in tables.values())
    over_clip = sum(int((t.clip_lengths > 7).sum()) for t in tables.values())
    assert over > 0 and over_clip > 0
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "trainer.modeling.text_lengths" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{over} questions are longer than model.text_len=6 WordPiece tokens")
    assert f"{over_clip} longer than model.clip_text_len=7 BPE tokens" in warnings[0]
    assert (model.vilt_text_len, model.clip_text_len) == (6, 7)
    assert tables[True].vilt_ids.shape[1] == 6 and tables[True].clip_ids.shape[1] == 7


def test_variants_without_a_text_tower_keep_clip_ids_whole(tiny_easyvqa_shards: Path, tmp_path: Path):
    cfg, tok, model = _setup(tiny_easyvqa_shards, tmp_path, variant="clip-no-infonce")
    tables = text_lengths.prepare(cfg, tok, model, is_main=False)
    assert model.clip_text_len is None
    assert tables[True].clip_ids.shape[1] == cfg.model.clip_context_length


@pytest.mark.slow
def test_a_run_trains_and_evaluates_from_the_tables(
    tiny_easyvqa_shards: Path, tmp_path: Path, caplog
) -> None:
    """A shard folder as every converter wrote it (the format is unchanged) trains with the text cut short."""
    from trainer.main import main

    args = [
        "--preset", "tiny", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=8",
        "--set", "train.progress_bar=false", "--set", "data.num_workers=1", "--set", "model.text_len=8",
        "--train-data", str(tiny_easyvqa_shards / "train"), "--val-data", str(tiny_easyvqa_shards / "test"),
        "--run-dir", str(tmp_path / "run"), "--max-steps", "2",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert any("question text runs at 8 WordPiece tokens" in r.getMessage() for r in caplog.records)
    assert list((tmp_path / "run" / "eval").glob("*"))


@pytest.mark.slow
def test_the_bench_counts_flops_at_the_lengths_of_the_data(tiny_easyvqa_shards: Path, tmp_path: Path) -> None:
    from trainer.modeling.task import build_task
    from trainer.tools.bench.cells import synthetic_batch
    from trainer.tools.bench.measure import count_step_flops

    cfg, tok, _ = _setup(tiny_easyvqa_shards, tmp_path)
    fixed = text_lengths.fixed_from_data(cfg, tok, str(tiny_easyvqa_shards / "train"))
    assert 0 < fixed.model.text_len <= cfg.model.max_text_len
    assert 0 < fixed.model.clip_text_len < cfg.model.clip_context_length
    counts = []
    for c in (cfg, fixed):
        torch.manual_seed(0)
        task = build_task(c, n_answers=13, vilt_vocab_size=tok.vilt_vocab_size)
        batch = synthetic_batch(
            c, n_answers=13, vilt_vocab=tok.vilt_vocab_size, batch_size=4, device=torch.device("cpu")
        )
        counts.append(count_step_flops(task, batch))
    assert counts[1] < counts[0]
