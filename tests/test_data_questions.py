"""The question table (data_pipeline/loaders/questions.py): question ids read from json bytes with array operations, and both
loaders' batches from the table equal to the batches tokenised per batch, in training and padded evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.loaders import questions
from data_pipeline.loaders.loader import DataError, read_sample_info
from data_pipeline.loaders.questions import QuestionTable, question_ids, text_lengths
from tests.helpers.synthetic_shards import convert_synthetic
from tests.test_data_loader import FakeTokenizer, load


def _rows(texts: list[bytes], width: int | None = None) -> np.ndarray:
    width = width or max(len(t) for t in texts) + 3
    out = np.zeros((len(texts), width), dtype=np.uint8)
    for i, t in enumerate(texts):
        out[i, : len(t)] = np.frombuffer(t, dtype=np.uint8)
    return out


def _compact(meta: dict) -> bytes:  # as the converters write a sample json (data_pipeline/convert/build.py)
    return json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()


def test_question_ids_from_converter_rows():
    metas = [
        {"question_id": q, "image_id": 7, "question": 'what is "question_id":3?'}
        for q in (0, 9, 123456789012)
    ]
    assert question_ids(_rows([_compact(m) for m in metas]), "here").tolist() == [0, 9, 123456789012]


def test_question_ids_anywhere_in_the_row_and_odd_rows_parsed_as_json():
    rows = [
        _compact({"image_id": 1, "question": "q", "question_id": 42}),
        b'{"image_id": 1, "question_id":   77, "question": "x"}',
        b'{"question": "a \\"question_id\\":5", "question_id": 8}',  # the key inside a string is not a key
        _compact({"question_id": 10**18 + 5, "question": "long id"}),  # 19 digits: parsed as json
        b'{"question_id":"12"}',  # a string: parsed as json, int("12")
    ]
    assert question_ids(_rows(rows), "here").tolist() == [42, 77, 8, 10**18 + 5, 12]
    with pytest.raises(DataError, match="here, row 0: sample json has no integer question_id"):
        question_ids(_rows([b'{"id": 3}']), "here")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_synthetic(tmp_path_factory.mktemp("questions"))


@pytest.mark.parametrize("kind", ["dali", "torch"])
@pytest.mark.parametrize("train", [False, True])
def test_batches_from_the_table_equal_tokenised_batches(folder: Path, kind: str, train: bool):
    table = QuestionTable.build(str(folder), FakeTokenizer())
    workers = 0 if kind == "dali" else 1
    plain = load(folder, kind, train=train, num_workers=workers)
    from_table = load(folder, kind, train=train, num_workers=workers, questions=table)
    assert len(plain) == len(from_table) > 0
    for a, b in zip(plain, from_table, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key != "pixels":
                assert torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype, key


def test_table_lengths_trim_and_cut_report(folder: Path):
    tok = FakeTokenizer()
    table = QuestionTable.build(str(folder), tok)
    info = read_sample_info(folder)
    assert len(table) == len(info) and table.qids.tolist() == sorted(info)
    expected = [int(tok([info[q]["question"]])["vilt_mask"].sum()) for q in sorted(info)]
    assert table.vilt_lengths.tolist() == expected
    # FakeTokenizer's clip ids are the last 5 characters: the largest code marks "end of text" here.
    vilt, clip, over = text_lengths([table], vilt_fixed=0, clip_fixed=0, vilt_max=8, clip_max=5)
    assert (vilt, clip) == (8, 5) and over == {"vilt": 0, "clip": 0}
    assert questions.describe_cut(vilt, clip, over, [table]) is None
    vilt, clip, over = text_lengths([table], vilt_fixed=4, clip_fixed=0, vilt_max=8, clip_max=5)
    assert over["vilt"] == sum(n > 4 for n in expected) > 0
    line = questions.describe_cut(vilt, clip, over, [table])
    assert line and line.startswith(f"{over['vilt']} questions are longer than model.text_len=4")
    short = table.trimmed(4, 3)
    assert short.vilt_ids.shape[1] == 4 and short.clip_ids.shape[1] == 3
    assert torch.equal(short.vilt_ids, table.vilt_ids[:, :4])


def test_a_table_serves_only_its_own_folder(folder: Path, tmp_path: Path):
    other = convert_synthetic(tmp_path, n_images=3)
    table = QuestionTable.build(str(folder), FakeTokenizer())
    with pytest.raises(ValueError, match="does not belong to"):
        load(other, "torch", questions=table)


def test_dali_counts_its_host_work_per_batch(folder: Path):
    from data_pipeline.loaders.loader import LoaderSpec, build_loader
    from tests.test_data_loader import MEAN, STD

    table = QuestionTable.build(str(folder), FakeTokenizer())
    spec = LoaderSpec(
        tokenizer=FakeTokenizer(), batch_size=4, image_size=32, mean=MEAN, std=STD, train=True,
        num_workers=1, kind="dali", questions=table, prefetch_depth=1,
    )  # fmt: skip
    loader = build_loader(folder, spec)
    assert loader.host_work == (0.0, 0)
    n = sum(1 for _ in loader)
    seconds, batches = loader.host_work
    assert batches == n == len(loader) and seconds > 0
