"""Training order across epochs in a folder of one shard, where the shard order cannot vary: the within-shard shuffle
itself must follow the epoch (DALI's reader seed, the torch loader's buffer seed), and repeat for the same seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipeline.loaders.loader import LoaderSpec, build_loader, read_manifest
from tests.helpers.synthetic_shards import convert_synthetic


class _Tokens:
    def __call__(self, questions: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.ones(len(questions), 4, dtype=torch.long)
        return {"vilt_ids": ids, "vilt_mask": ids, "clip_ids": ids}


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = convert_synthetic(tmp_path_factory.mktemp("one_shard"), shard_size=1000, bad=False, n_images=8)
    assert len(read_manifest(folder)["shards"]) == 1
    return folder


def _order(folder: Path, kind: str, seed: int, epoch: int) -> list[int]:
    spec = LoaderSpec(
        tokenizer=_Tokens(),
        batch_size=2,
        image_size=16,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        train=True,
        seed=seed,
        epoch=epoch,
        kind=kind,
        num_workers=1 if kind == "dali" else 0,  # no forked worker after DALI's threads in this process
        shuffle_buffer=24,
        device=torch.device("cpu"),
    )
    return [q for b in build_loader(folder, spec) for q in b["question_id"].tolist()]


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_each_epoch_of_one_shard_has_its_own_order_and_a_seed_repeats_it(one_shard: Path, kind: str) -> None:
    first, second = _order(one_shard, kind, seed=3, epoch=0), _order(one_shard, kind, seed=3, epoch=1)
    assert len(first) == len(second) == 24
    assert first != second, f"{kind}: epochs 0 and 1 of one shard read in the same order"
    assert _order(one_shard, kind, seed=3, epoch=1) == second
    assert _order(one_shard, kind, seed=3, epoch=0) == first


def test_the_shard_order_follows_the_epoch(tmp_path: Path) -> None:
    from data_pipeline.shards.sharding import epoch_order, open_folder

    folder = open_folder(str(convert_synthetic(tmp_path, shard_size=3, bad=False, n_images=8)))
    assert len(folder.shards) >= 6
    orders = [[str(s.tar) for s in epoch_order(folder, train=True, seed=3, epoch=e)] for e in range(4)]
    assert len({tuple(o) for o in orders}) == 4  # every epoch its own order
    assert [str(s.tar) for s in epoch_order(folder, train=True, seed=3, epoch=2)] == orders[2]
    assert [str(s.tar) for s in epoch_order(folder, train=False, seed=3, epoch=2)] == sorted(orders[0])
