"""Resuming mid-epoch from DALI's own checkpoint gives the batches the exact path gives, without running the pipeline
for the skipped batches; a state saved for another reading is refused and the exact path taken, saying why; the
trainer saves each rank's loader position with its checkpoint and a resumed DALI run continues the uninterrupted
run's losses.

DALI runs in its CPU mode here (device=cpu); the checkpoint holds the reader's position and shuffle state only, which
do not depend on where the images are decoded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from test_data_loader import MEAN, STD, FakeTokenizer, folder  # noqa: F401  (the module's shard folder fixture)

from data_pipeline.loaders import dali_loader, loader_state
from data_pipeline.loaders.loader import LoaderSpec, build_loader

pytest.importorskip(
    "nvidia.dali", reason="DALI is pinned in pyproject.toml; without it there is no DALI state"
)

K = 4  # batches consumed before the position is saved


def spec(**kw) -> LoaderSpec:
    args = dict(
        tokenizer=FakeTokenizer(),
        batch_size=2,
        image_size=48,
        mean=MEAN,
        std=STD,
        train=True,
        seed=7,
        num_workers=2,
        shuffle_buffer=6,
        kind="dali",
        device=torch.device("cpu"),
    )
    args.update(kw)
    return LoaderSpec(**args).at(1)


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    keys = ("pixels", "question_id", "vilt_ids", "targets")
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in keys)


def saved_after(s: LoaderSpec, folder: Path, k: int) -> bytes:  # noqa: F811
    """Read k batches of an epoch, as a training run does before a checkpoint, and take the loader's position."""
    loader = build_loader(folder, s)
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = loader.state(k)
    it.close()
    assert state is not None
    return state


@pytest.fixture
def pipeline_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the pipeline's runs (each reads and decodes one batch) through the loader's own `_next`."""
    runs: list[int] = []
    original = dali_loader.DaliBatches._next

    def counted(self, iterator, index):
        out = original(self, iterator, index)
        if out is not None:
            runs.append(index)
        return out

    monkeypatch.setattr(dali_loader.DaliBatches, "_next", counted)
    return runs


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_resume_from_dali_state_equals_the_exact_path_and_decodes_nothing_skipped(
    folder: Path,  # noqa: F811
    rank: int,
    world_size: int,
    pipeline_runs: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = spec(rank=rank, world_size=world_size)
    full = list(build_loader(folder, s))
    state = saved_after(s, folder, K)
    pipeline_runs.clear()
    exact = list(build_loader(folder, s.at(1, K)))
    assert pipeline_runs == list(range(len(full)))  # the exact path runs the skipped batches too
    pipeline_runs.clear()
    with caplog.at_level(logging.INFO, logger="data_pipeline.loaders.dali_loader"):
        restored = list(build_loader(folder, s.at(1, K, state)))
    assert pipeline_runs == list(range(K, len(full)))  # only the remaining ones
    assert "resuming from the saved loader state" in caplog.text
    assert len(full) > K and same(exact, full[K:]) and same(restored, full[K:])


def test_a_state_from_another_reading_is_refused_and_the_exact_path_taken(
    folder: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = spec()
    full = list(build_loader(folder, s))
    state = saved_after(s, folder, K)
    cases = {
        "batch 4 -> 5": s.at(1, K + 1, state),  # another position
        "epoch 1 -> 2": s.at(2, K, state),
        "batch_size 2 -> 3": dataclasses.replace(s, batch_size=3).at(1, K, state),
        "not a saved loader state": s.at(1, K, b"junk"),
    }
    for why, other in cases.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="data_pipeline.loaders.dali_loader"):
            batches = list(build_loader(folder, other))
        assert why in caplog.text and "resuming by decoding" in caplog.text, (why, caplog.text)
        if other.epoch == 1 and other.batch_size == 2:
            assert same(batches, full[other.skip_batches :])


def test_envelope_keys_and_the_torch_loader_has_no_state(folder: Path) -> None:  # noqa: F811
    key = {"epoch": 1, "batch": 3}
    blob = loader_state.pack(key, b"\x00dali\nbytes")
    assert loader_state.unpack(blob, key) == (b"\x00dali\nbytes", "")
    assert loader_state.unpack(blob, {"epoch": 1, "batch": 3, "rank": 0})[0] is None
    loader = build_loader(folder, spec(kind="torch", num_workers=0))
    next(iter(loader))
    assert loader.state(1) is None


@pytest.mark.slow
def test_trainer_saves_loader_positions_and_a_resumed_dali_run_continues_the_losses(
    tiny_easyvqa_shards: Path, tmp_path: Path, no_launcher, caplog: pytest.LogCaptureFixture
) -> None:
    from test_train_precision_rng import CONFIGS, assert_resumed_equal, resume, train

    ds_json = CONFIGS / "zero2_fp32.json"
    batches = ["--set", "train.global_batch_size=16", "--set", "train.micro_batch_size=16"]
    data = tiny_easyvqa_shards / "train"  # 128 questions: 8 batches an epoch, so step 2 is mid-epoch
    # With the host work in a worker process (data.host_workers), which the resumed run keeps from the run's config.
    dali = ["--set", "data.loader=dali", "--set", "data.host_workers=1"]
    run_dir = train(tmp_path / "run", data, ds_json, *batches, *dali)
    assert json.loads((run_dir / "config.json").read_text())["data"]["host_workers"] == 1
    ckpt = run_dir / "checkpoints" / "global_step2"
    assert (ckpt / "loader_rank0.bin").is_file()
    assert b'"batch": 2' in (ckpt / "loader_rank0.bin").read_bytes().partition(b"\n")[0]
    with caplog.at_level(logging.INFO, logger="data_pipeline.loaders.dali_loader"):
        resumed = resume(run_dir, tmp_path / "resumed", ds_json)
    assert "resuming from the saved loader state" in caplog.text
    assert_resumed_equal(run_dir, resumed)


@pytest.mark.parametrize("train", [True, False])
def test_host_workers_give_the_same_batches(folder: Path, train: bool) -> None:  # noqa: F811
    """data.host_workers: the host share of each batch (JSON, tokens, targets) computed in spawned processes."""
    s = spec(
        train=train, batch_size=4 if train else 7
    )  # evaluation: 7 does not divide the 24 samples (padding)
    in_thread = list(build_loader(folder, s))
    in_workers = list(build_loader(folder, dataclasses.replace(s, host_workers=1)))
    keys = ("pixels", "question_id", "vilt_ids", "vilt_mask", "clip_ids", "targets") + (
        () if train else ("valid",)
    )
    assert len(in_workers) == len(in_thread) > 0
    for a, b in zip(in_thread, in_workers, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in keys)


def test_an_error_in_a_host_worker_reaches_the_training_loop(folder: Path) -> None:  # noqa: F811
    from test_data_loader import BrokenTokenizer

    loader = build_loader(folder, spec(tokenizer=BrokenTokenizer(), host_workers=1))
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        list(loader)
