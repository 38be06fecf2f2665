"""Checkpoint bookkeeping without DeepSpeed: completeness markers, latest, keep-last-K, world-size checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.checkpoint.checkpointing import Checkpointer
from trainer.checkpoint.layout import COMPLETE, list_complete, resolve_resume
from trainer.config.config import ConfigError
from trainer.engine.dist import DistInfo

DIST = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


class FilesEngine:
    """Writes a file per save as DeepSpeed would write its shards; can die half-way like a killed process."""

    zero_stage = 2

    def __init__(self) -> None:
        self.die_on: str | None = None

    def save(self, save_dir: Path, tag: str) -> None:
        (save_dir / tag).mkdir(parents=True, exist_ok=True)
        (save_dir / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        if tag == self.die_on:
            raise KeyboardInterrupt("killed mid-save")


def test_only_complete_checkpoints_count_and_the_last_k_are_kept(tmp_path: Path) -> None:
    engine = FilesEngine()
    ck = Checkpointer(tmp_path, engine, DIST, every=2, keep_last=2)
    for step in (2, 4, 6):
        ck.save(step, {"step": step, "epoch": 0, "batch_in_epoch": step, "samples": step})
    tags = [r.tag for r in list_complete(ck.ckpt_dir)]
    assert tags == ["global_step4", "global_step6"]
    assert (ck.ckpt_dir / "latest").read_text() == "global_step6"
    assert json.loads((ck.ckpt_dir / "global_step6" / "trainer_state.json").read_text())["world_size"] == 1
    assert (ck.ckpt_dir / "global_step6" / "rng_rank0.pt").is_file()

    engine.die_on = "global_step8"  # a crash while writing step 8
    with pytest.raises(KeyboardInterrupt):
        ck.save(8, {"step": 8, "epoch": 0, "batch_in_epoch": 8, "samples": 8})
    assert (ck.ckpt_dir / "global_step8").is_dir() and not (ck.ckpt_dir / "global_step8" / COMPLETE).exists()
    assert resolve_resume(ck.ckpt_dir, "latest", 1).tag == "global_step6"
    assert (ck.ckpt_dir / "latest").read_text() == "global_step6"
    with pytest.raises(ConfigError, match="incomplete"):
        resolve_resume(ck.ckpt_dir, "global_step8", 1)

    # A resumed run passing step 6 again writes beside the good copy: dying there costs nothing.
    engine.die_on = "global_step6.partial"
    with pytest.raises(KeyboardInterrupt):
        ck.save(6, {"step": 6, "epoch": 1, "batch_in_epoch": 0, "samples": 6})
    assert resolve_resume(ck.ckpt_dir, "latest", 1).tag == "global_step6"
    assert json.loads((ck.ckpt_dir / "global_step6" / "trainer_state.json").read_text())["epoch"] == 0
    engine.die_on = None
    ck.save(
        6, {"step": 6, "epoch": 1, "batch_in_epoch": 0, "samples": 6}
    )  # succeeds: swapped in, leftovers gone
    assert json.loads((ck.ckpt_dir / "global_step6" / "trainer_state.json").read_text())["epoch"] == 1
    names = sorted(p.name for p in ck.ckpt_dir.iterdir() if p.is_dir())
    assert names == [
        "global_step4",
        "global_step6",
        "global_step8",
    ]  # step 8 is incomplete: rewritten when reached


def test_resume_checks_the_world_size_and_names_the_conversion(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, FilesEngine(), DIST, every=1, keep_last=3)
    ck.save(5, {"step": 5, "epoch": 0, "batch_in_epoch": 5, "samples": 5})
    with pytest.raises(
        ConfigError, match=r"(?s)written by 1 ranks and this run has 2.*to-universal .*--tag global_step5"
    ):
        resolve_resume(ck.ckpt_dir, "latest", 2)
    with pytest.raises(ConfigError, match="no checkpoint 'global_step9'"):
        resolve_resume(ck.ckpt_dir, "global_step9", 1)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_resume(tmp_path / "elsewhere", "latest", 1)


class Stage0FilesEngine(FilesEngine):
    """A single-rank run's engine: ZeRO stage 0, no optimizer shards beside the model states."""

    zero_stage = 0


def test_a_stage0_checkpoint_resumes_on_any_world_size_and_to_universal_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from trainer.checkpoint.universal import main, to_universal

    ck = Checkpointer(tmp_path, Stage0FilesEngine(), DIST, every=1, keep_last=3)
    ck.save(3, {"step": 3, "epoch": 0, "batch_in_epoch": 3, "samples": 3})
    # Nothing sharded: one rank, or any other number, resumes it as it is (a ZeRO one needs to-universal first).
    assert [resolve_resume(ck.ckpt_dir, "latest", n).tag for n in (1, 2, 8)] == ["global_step3"] * 3
    with pytest.raises(ConfigError, match="needs no conversion"):
        to_universal(tmp_path, "global_step3")
    assert main(["to-universal", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(
        "error: checkpoint global_step3 (written by 1 rank) was written at"
    )
    assert [p.name for p in ck.ckpt_dir.iterdir() if p.is_dir()] == ["global_step3"]  # nothing converted


def test_stage0_weights_are_read_safely_and_in_fp32(tmp_path: Path) -> None:
    from trainer.serve.export import stage0_state_dict

    weights = {"a": torch.randn(3, dtype=torch.bfloat16), "index": torch.arange(4)}
    states = {"module": weights, "optimizer": {"state": {}}, "ds_config": {"zero_optimization": {"stage": 0}}}
    torch.save(states, tmp_path / "mp_rank_00_model_states.pt")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in stage0_state_dict(tmp_path).items()}
    assert torch.equal(sd["a"], weights["a"].float()) and torch.equal(sd["index"], weights["index"])

    # Any pickled object other than tensors and plain containers is refused, not unpickled.
    torch.save({"module": weights, "extra": FilesEngine()}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError, match="holds objects other than tensors"):
        stage0_state_dict(tmp_path)
    with pytest.raises(ConfigError, match="not a DeepSpeed checkpoint"):
        stage0_state_dict(tmp_path / "elsewhere")


# -- safe loading, interrupted pruning, disk space ---------------------------------------------------------------


class MkdirPayload:
    """A pickled object that runs code when unpickled: os.mkdir(path). Loading it must never create the path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import os

        return os.mkdir, (str(self.path),)


def _save_step(ck: Checkpointer, step: int) -> None:
    ck.save(step, {"step": step, "epoch": 0, "batch_in_epoch": step, "samples": step})


def test_rng_files_hold_plain_data_and_others_are_refused_unloaded(tmp_path: Path) -> None:
    import random

    import numpy as np

    from trainer.checkpoint.safety import load_rng_file, set_rng_state

    ck = Checkpointer(tmp_path, FilesEngine(), DIST, every=1, keep_last=2)
    _save_step(ck, 1)
    rng_file = ck.ckpt_dir / "global_step1" / "rng_rank0.pt"
    assert (
        torch.serialization.get_unsafe_globals_in_checkpoint(rng_file) == []
    )  # tensors, lists, numbers only
    expected = (torch.rand(2), np.random.rand(2), random.random())
    set_rng_state(load_rng_file(rng_file))
    again = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]

    # Numpy's and python's own tuples (an ndarray inside) are not this trainer's format: refused, not unpickled.
    tuples = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(tuples, rng_file)
    with pytest.raises(ConfigError, match=r"rng_rank0.pt: holds objects other than tensors .*numpy"):
        load_rng_file(rng_file)
    # Plain data in another layout: one line naming the file.
    torch.save({"torch": torch.get_rng_state(), "numpy": [1], "python": [2]}, rng_file)
    with pytest.raises(ConfigError, match=r"rng_rank0.pt: not an RNG file of format 'vqa-align/rng/2'"):
        load_rng_file(rng_file)

    # A file that would run code is refused from its opcodes: nothing of it is unpickled.
    target = tmp_path / "created_by_unpickling"
    torch.save({"torch": torch.get_rng_state(), "numpy": MkdirPayload(target)}, rng_file)
    with pytest.raises(ConfigError, match=r"rng_rank0.pt: holds objects other than tensors .*posix.mkdir"):
        load_rng_file(rng_file)
    rng_file.write_text("not a torch file")
    with pytest.raises(ConfigError, match="rng_rank0.pt: "):
        load_rng_file(rng_file)
    assert not target.exists()


class KilledMidDelete(BaseException):
    """Stands for kill -9 in the middle of a deletion (a BaseException: nothing in the trainer catches it)."""


def _dying_rmtree(calls: list[str]) -> Any:
    """An rmtree that deletes every file of a folder but its COMPLETE marker, then dies: the worst order a real
    deletion cut short can leave behind."""

    def rmtree(path: Any, ignore_errors: bool = False, **_: Any) -> None:
        path = Path(path)
        if not path.is_dir():
            return
        calls.append(path.name)
        for f in path.iterdir():
            if f.name != COMPLETE:
                f.unlink()
        raise KilledMidDelete(path.name)

    return rmtree


def test_an_interrupted_prune_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    from trainer.checkpoint import checkpointing, universal

    ck = Checkpointer(tmp_path, FilesEngine(), DIST, every=1, keep_last=1)
    _save_step(ck, 1)
    calls: list[str] = []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(checkpointing.shutil, "rmtree", _dying_rmtree(calls))
    with pytest.raises(KilledMidDelete):
        _save_step(ck, 2)  # complete, then pruning step 1 dies half-way
    monkeypatch.setattr(checkpointing.shutil, "rmtree", real_rmtree)
    assert calls == ["global_step1.deleting"]  # renamed away before a single file went
    assert (ck.ckpt_dir / "global_step1.deleting" / COMPLETE).is_file()

    assert universal.main(["list", "--run-dir", str(tmp_path)]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["global_step2"]
    with pytest.raises(ConfigError, match="no checkpoint 'global_step1'.*complete ones: global_step2"):
        resolve_resume(ck.ckpt_dir, "global_step1", 1)
    _save_step(ck, 3)  # the next save removes the leftover
    assert sorted(p.name for p in ck.ckpt_dir.iterdir() if p.is_dir()) == ["global_step3"]


def test_a_checkpoint_missing_a_file_its_marker_lists_is_not_complete(tmp_path: Path) -> None:
    from trainer.checkpoint.layout import is_complete

    ck = Checkpointer(tmp_path, FilesEngine(), DIST, every=1, keep_last=3)
    _save_step(ck, 1)
    _save_step(ck, 2)
    marker = json.loads((ck.ckpt_dir / "global_step1" / COMPLETE).read_text())
    assert set(marker["files"]) == {"mp_rank_00_model_states.pt", "rng_rank0.pt", "trainer_state.json"}
    # The state a deletion that removed files before the marker leaves (e.g. one by an older version of the trainer).
    (ck.ckpt_dir / "global_step1" / "mp_rank_00_model_states.pt").unlink()
    assert not is_complete(ck.ckpt_dir / "global_step1")
    assert [r.tag for r in list_complete(ck.ckpt_dir)] == ["global_step2"]
    with pytest.raises(
        ConfigError, match=r"global_step1 is damaged \(mp_rank_00_model_states.pt is missing\)"
    ):
        resolve_resume(ck.ckpt_dir, "global_step1", 1)
    (ck.ckpt_dir / "global_step2" / "rng_rank0.pt").write_bytes(b"torn")  # a size that differs counts too
    assert not is_complete(ck.ckpt_dir / "global_step2")
    # A checkpoint that was complete once and fails its checks now is never pruned: it may be all there is.
    _save_step(ck, 3)
    assert sorted(p.name for p in ck.ckpt_dir.iterdir() if p.is_dir()) == [
        "global_step1",
        "global_step2",
        "global_step3",
    ]


def _usage(free: int) -> Any:
    import shutil

    return shutil._ntuple_diskusage(10**12, 10**12 - free, free)  # type: ignore[attr-defined]


def test_a_save_that_cannot_fit_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.checkpoint import checkpointing
    from trainer.checkpoint.checkpointing import CheckpointSpaceError, human_bytes

    ck = Checkpointer(tmp_path, FilesEngine(), DIST, every=1, keep_last=2)
    _save_step(ck, 1)
    size = sum(f.stat().st_size for f in (ck.ckpt_dir / "global_step1").iterdir())
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda _: _usage(size - 1))
    with pytest.raises(CheckpointSpaceError) as info:
        _save_step(ck, 2)
    msg = str(info.value)
    assert "\n" not in msg and f"not enough disk space for checkpoint global_step2 in {ck.ckpt_dir}" in msg
    assert f"{human_bytes(size - 1)} free, about {human_bytes(size)} needed (the size of global_step1)" in msg
    assert "train.keep_last=2 keeps 2 checkpoints" in msg and "needs room for 3" in msg
    assert not (ck.ckpt_dir / "global_step2").exists()
    assert [r.tag for r in list_complete(ck.ckpt_dir)] == ["global_step1"]
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda _: _usage(size))
    _save_step(ck, 2)  # exactly enough room is enough


class FullDiskEngine(FilesEngine):
    """Runs out of space half-way through writing its files, as torch.save or the OS reports it."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.full = False

    def save(self, save_dir: Path, tag: str) -> None:
        super().save(save_dir, tag)
        if self.full:
            raise self.error


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1536 vs 1466"),
    ],
    ids=["ENOSPC", "torch-unexpected-pos"],
)
def test_running_out_of_space_mid_save_is_named_and_costs_no_earlier_checkpoint(
    tmp_path: Path, error: Exception
) -> None:
    from trainer.checkpoint.checkpointing import CheckpointSpaceError

    engine = FullDiskEngine(error)
    ck = Checkpointer(tmp_path, engine, DIST, every=1, keep_last=2)
    _save_step(ck, 1)
    engine.full = True
    with pytest.raises(CheckpointSpaceError) as info:
        _save_step(ck, 2)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(
        f"disk full while writing checkpoint global_step2 in {ck.ckpt_dir}"
    )
    assert "earlier checkpoints are intact" in msg and "needs room for 3" in msg
    assert sorted(p.name for p in ck.ckpt_dir.iterdir()) == [
        "global_step1",
        "latest",
    ]  # no half-written folder
    assert (ck.ckpt_dir / "latest").read_text() == "global_step1"
    assert resolve_resume(ck.ckpt_dir, "latest", 1).tag == "global_step1"
    engine.full = False
    with pytest.raises(RuntimeError, match="not about space"):  # other errors are not renamed
        engine.error, engine.full = RuntimeError("not about space"), True
        _save_step(ck, 2)


class ModuleStatesEngine(Stage0FilesEngine):
    """Writes real module states (a float weight, an integer buffer) as DeepSpeed does at stage 0."""

    def save(self, save_dir: Path, tag: str) -> None:
        (save_dir / tag).mkdir(parents=True, exist_ok=True)
        module = {
            "w": torch.randn(2, 3, dtype=torch.bfloat16),
            "ids": torch.arange(5),
            "seen": torch.tensor(7),
        }
        torch.save(
            {"module": module, "optimizer": {"state": {}}}, save_dir / tag / "mp_rank_00_model_states.pt"
        )


def test_the_export_keeps_integer_buffers(tmp_path: Path) -> None:
    """The exported state dict holds every entry of the module's: floating weights in fp32, integer buffers (position
    ids, compact vocabulary maps) as they are; strict loading needs both."""
    from trainer.serve.export import fp32_state_dict

    Checkpointer(tmp_path, ModuleStatesEngine(), DIST, every=1, keep_last=1).save(
        2, {"step": 2, "epoch": 0, "batch_in_epoch": 2, "samples": 2}
    )
    sd = fp32_state_dict(tmp_path, "global_step2")
    assert set(sd) == {"w", "ids", "seen"}
    assert sd["w"].dtype == torch.float32
    assert sd["ids"].dtype == torch.int64 and torch.equal(sd["ids"], torch.arange(5))
    assert int(sd["seen"]) == 7
