"""Shared pytest fixtures. Append new fixtures; keep each small and documented."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Tests never reach the network: any hub lookup must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _destroy_process_group():
    """A test that initialises torch.distributed in-process must not leak the group into the next test."""
    yield
    from trainer.engine import dist

    # The project's teardown releases DeepSpeed's cached world group too, not only torch's.
    dist.destroy()


@pytest.fixture(scope="session")
def tiny_easyvqa_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real easy-VQA shard set, converted once per session: train/ (128 questions in 2 shards) and test/
    (32 questions in 2 shards), so that 2 ranks each get a shard of every split. Uses the converter's own API on the
    first questions of each split (the full set takes minutes to convert on 2 cores)."""
    import dataclasses

    from data_pipeline.convert import easyvqa
    from data_pipeline.convert.build import build_shard_folder

    root = tmp_path_factory.mktemp("easyvqa_tiny")
    for split, n, shard_size in (("train", 128, 64), ("test", 32, 16)):
        spec = easyvqa.make_spec(
            split, root / split, shard_size=shard_size, seed=0, workers=1, progress=False
        )
        build_shard_folder(dataclasses.replace(spec, candidates=spec.candidates[:n]))
    return root


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """This test's process without any launcher's variables (restored afterwards)."""
    from tests.helpers.launch_env import LAUNCHER_PREFIXES, TORCH_VARS

    for name in list(os.environ):
        if name in TORCH_VARS or name.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    return monkeypatch
