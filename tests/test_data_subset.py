"""A fixed validation subset (data_pipeline/convert/subset.py): deterministic, a valid shard folder the loader reads, its
command line, and how the comparison writes it once and keeps it."""

from __future__ import annotations

import argparse

import pytest
import torch

from data_pipeline.convert import cli as convert
from data_pipeline.convert.build import ConversionError
from data_pipeline.convert.subset import select, subset_record, write_subset
from data_pipeline.loaders.loader import LoaderSpec, build_loader
from data_pipeline.shards.sharding import read_sample_info
from data_pipeline.shards.verify import verify


class Tokenizer:
    """Ids from the question's characters: enough for the loader's batch contract."""

    def __call__(self, questions: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[ord(c) for c in q[:8].ljust(8)] for q in questions], dtype=torch.long)
        return {"vilt_ids": ids, "vilt_mask": torch.ones_like(ids), "clip_ids": ids[:, :5].clone()}


def _read_all(folder, world_size: int = 1) -> list[int]:
    qids = []
    for rank in range(world_size):
        spec = LoaderSpec(
            tokenizer=Tokenizer(),
            batch_size=4,
            image_size=32,
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            train=False,
            rank=rank,
            world_size=world_size,
            num_workers=0,
            kind="torch",
        )
        for batch in build_loader(folder, spec):
            qids += batch["question_id"][batch["valid"].bool()].tolist()
    return qids


def test_subset_is_deterministic_and_a_valid_shard_folder(tiny_easyvqa_shards, tmp_path):
    src = tiny_easyvqa_shards / "test"
    write_subset(src, tmp_path / "a", count=10, seed=0, n_shards=2)
    write_subset(src, tmp_path / "b", count=10, seed=0, n_shards=2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [
        "answers.json",
        "manifest.json",
        "shard-000000.idx",
        "shard-000000.tar",
        "shard-000001.idx",
        "shard-000001.tar",
    ]
    for name in names:  # byte for byte, the manifest included
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    source_info, info = read_sample_info(src), read_sample_info(tmp_path / "a")
    assert sorted(info) == select(list(source_info), 10, 0) and len(info) == 10
    assert all(info[q] == source_info[q] for q in info)  # the source's own samples
    assert (tmp_path / "a" / "answers.json").read_bytes() == (src / "answers.json").read_bytes()
    record = subset_record(tmp_path / "a")
    assert (record["count"], record["seed"], record["of_samples"]) == (10, 0, 32)

    problems, summary = verify(tmp_path / "a")
    assert problems == [] and summary.endswith("intact")
    # The loader reads every question once, on one rank or split over two.
    assert sorted(_read_all(tmp_path / "a")) == sorted(info)
    assert sorted(_read_all(tmp_path / "a", world_size=2)) == sorted(info)

    write_subset(src, tmp_path / "other", count=10, seed=1)
    assert sorted(read_sample_info(tmp_path / "other")) != sorted(info)  # another seed, another draw
    write_subset(src, tmp_path / "one", count=10, seed=0, n_shards=1)
    assert sorted(read_sample_info(tmp_path / "one")) == sorted(
        info
    )  # the shard count does not change the draw


def test_subset_refusals_are_one_line_errors(tiny_easyvqa_shards, tmp_path, capsys):
    src = tiny_easyvqa_shards / "test"
    with pytest.raises(ConversionError, match="between 1 and the source's 32 questions"):
        write_subset(src, tmp_path / "big", count=33)
    assert not (tmp_path / "big").exists()
    with pytest.raises(ConversionError, match="into its source folder"):
        write_subset(src, src, count=3)
    out = str(tmp_path / "s")
    argv = ["subset", "--source", str(src), "--count", "5", "--out", out]
    assert convert.main(argv) == 0
    assert capsys.readouterr().out.startswith("subset: 5 of 32 questions written in 1 shards")
    assert convert.main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a finished shard folder" in err and err.count("\n") == 1
    assert convert.main([*argv, "--overwrite", "--seed", "4"]) == 0
    assert subset_record(out)["seed"] == 4


def test_comparison_writes_the_subset_once_and_refuses_another_draw(tiny_easyvqa_shards, tmp_path):
    from trainer.tools.compare.results import CompareError
    from trainer.tools.compare.runs import prepare_val_subset

    def args(val_data: str, n: int) -> argparse.Namespace:
        return argparse.Namespace(val_data=val_data, val_subset=n, num_gpus=0)

    test = str(tiny_easyvqa_shards / "test")
    folder = prepare_val_subset(args(test, 8), tmp_path)
    assert folder == tmp_path / "val-subset-8" and subset_record(folder)["count"] == 8
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert prepare_val_subset(args(test, 8), tmp_path) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # kept, not rewritten
    with pytest.raises(CompareError, match="holds another subset"):
        prepare_val_subset(args(str(tiny_easyvqa_shards / "train"), 8), tmp_path)
    with pytest.raises(CompareError, match="--val-subset 99: --count 99"):
        prepare_val_subset(args(test, 99), tmp_path)
