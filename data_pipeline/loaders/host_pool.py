"""The DALI loader's host work (sample JSON parsing, tokenising, targets) in worker processes (`LoaderSpec.host_workers`).

Why: the DALI loader decodes on the GPU, but its host share of a batch (tokenising with ViLT's WordPiece and
open_clip's BPE, much of it Python) runs in a thread of the training process, where it competes with the training
loop's own host work for the interpreter lock: on a GPU the step grew when batches came from shards although the
loader was always ahead (docs/performance.md, "On one GPU: NVIDIA H200", "The goals, and what the profiles say"). In
worker processes that work
holds no lock of the trainer's: the loader's thread only sends the padded JSON rows and receives the tensors.

The workers are spawned (never forked: the training process holds CUDA and DALI threads) once per process and
tokenizer and serve every epoch's loader after that; each gets the tokenizer once, at start. They inherit the
signal mask of the thread that starts them (trainer/run/preemption.py `shielded` blocks SIGTERM/SIGINT while a loader
starts), so a stop signal meant for the trainer does not kill them mid-epoch; they end with the process.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from data_pipeline.loaders import batch as contract

_tokenizer: contract.Tokenizer | None = None  # each worker's own, set once by _start


def _start(tokenizer: contract.Tokenizer) -> None:
    global _tokenizer
    _tokenizer = tokenizer
    torch.set_num_threads(1)  # one core per worker: its tensors are small


def fields_from_rows(
    rows: np.ndarray, real: list[bool], where: str, tokenizer: contract.Tokenizer, n_answers: int
) -> dict[str, torch.Tensor]:
    """Every field of a batch but its pixels, from DALI's zero-padded JSON rows (`real[j]` False: a padding row)."""
    metas: list[dict[str, Any] | None] = []
    for j in range(rows.shape[0]):
        if not real[j]:
            metas.append(None)
            continue
        metas.append(contract.parse_json(np.trim_zeros(rows[j], "b").tobytes(), f"{where}, row {j}"))
    return contract.host_fields(metas, tokenizer, n_answers)


def _in_worker(rows: np.ndarray, real: list[bool], where: str, n_answers: int) -> dict[str, torch.Tensor]:
    assert _tokenizer is not None, "a host worker runs only after _start"
    return fields_from_rows(rows, real, where, _tokenizer, n_answers)


class HostPool:
    """`workers` spawned processes computing `fields_from_rows` for the batches submitted to them."""

    def __init__(self, tokenizer: contract.Tokenizer, workers: int) -> None:
        self.tokenizer = tokenizer
        self.workers = workers
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(tokenizer,),
        )

    def submit(self, rows: np.ndarray, real: list[bool], where: str, n_answers: int) -> Future:
        return self._executor.submit(_in_worker, rows, real, where, n_answers)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


_pools: list[HostPool] = []


def shared(tokenizer: contract.Tokenizer, workers: int) -> HostPool:
    """The process's pool for this tokenizer and size, started on first use and kept for later epochs."""
    for pool in _pools:
        if pool.tokenizer is tokenizer and pool.workers == workers:
            return pool
    pool = HostPool(tokenizer, workers)
    _pools.append(pool)
    return pool
