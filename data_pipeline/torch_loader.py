"""The PyTorch fallback loader: the `webdataset` library in DataLoader workers, PIL decoding on the CPU.

A rank reads the same positions as DALI gives it (sharding.py). Those positions are cut into one contiguous
block per DataLoader worker, sized to the worker's share of the batches (batch k of worker w is the loader's batch
k * workers + w, the DataLoader's round-robin order), so every rank yields exactly the same number of batches.
Each worker streams its block's tar pieces with `webdataset`, shuffles them through a seeded buffer when training,
decodes with PIL, resizes to S x S (bilinear, squash, no crop: the same pixels as DALI's resize within a few
levels), tokenises the questions, and yields whole batches with uint8 pixels; the main process normalises them,
on the GPU when `device` is a CUDA device (then `pixels` arrives on the GPU, as from DALI).

A corrupt sample is skipped, counted and logged instead of ending the run: in training its row is filled with
another sample of the same batch (so batch boundaries, and exact resume, do not depend on decoding); in
evaluation it becomes a padding row (`valid = False`). `skip_batches` consumes the raw samples of skipped batches
without decoding them.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipeline import batch as contract
from data_pipeline import sharding

log = logging.getLogger(__name__)

SKIPPED = "_skipped"  # per-batch count of corrupt samples, removed by the loader before the batch is yielded


def _raw_samples(pieces: list[tuple[str, int, int]]) -> Iterator[dict[str, Any]]:
    import webdataset as wds

    for tar, first, last in pieces:
        # Splitting is ours (positions), not webdataset's: no node/worker splitters, no shard shuffling.
        ds = wds.WebDataset(
            [tar], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        yield from itertools.islice(ds, first, last)


def _buffer_shuffle(samples: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buffer: list[Any] = []
    for s in samples:
        if len(buffer) < size:
            buffer.append(s)
            continue
        i = rng.randrange(size)
        buffer[i], s = s, buffer[i]
        yield s
    rng.shuffle(buffer)
    yield from buffer


class _EpochBlocks(torch.utils.data.IterableDataset):
    """Yields the batches of one worker's block (or of the whole rank when there are no workers)."""

    def __init__(
        self,
        plans: list[dict[str, Any]],
        *,
        tokenizer: contract.Tokenizer,
        n_answers: int,
        image_size: int,
        train: bool,
        batch_size: int,
        shuffle_buffer: int,
    ) -> None:
        self.plans = plans
        self.tokenizer = tokenizer
        self.n_answers = n_answers
        self.image_size = image_size
        self.train = train
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        plan = self.plans[info.id if info is not None else 0]
        samples: Iterator[dict[str, Any] | None] = _raw_samples(plan["pieces"])
        if self.train and self.shuffle_buffer > 1:
            samples = _buffer_shuffle(samples, self.shuffle_buffer, random.Random(plan["seed"]))
        # Evaluation blocks end with padding positions past the rank's own samples.
        samples = itertools.chain(samples, itertools.repeat(None))
        for k in range(plan["batches"]):
            rows = list(itertools.islice(samples, self.batch_size))
            if k < plan["skip"]:
                continue
            yield self._batch(rows)

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]] | None:
        where = f"{sample.get('__url__')}/{sample.get('__key__')}"
        try:
            meta = contract.parse_json(sample["json"], where)
            with Image.open(io.BytesIO(sample["jpg"])) as im:
                rgb = im.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
            pixels = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
        except Exception as exc:  # any failure to decode one sample: skip it, never end the epoch
            log.warning(
                "skipping corrupt sample %s: %s", where, str(exc).splitlines()[0] if str(exc) else exc
            )
            return None
        return pixels, meta

    def _batch(self, rows: list[dict[str, Any] | None]) -> dict[str, Any]:
        decoded = [self._decode(r) if r is not None else None for r in rows]
        skipped = sum(1 for r, d in zip(rows, decoded, strict=True) if r is not None and d is None)
        if self.train and skipped:
            good = [d for d in decoded if d is not None]
            if not good:
                raise RuntimeError(
                    f"every sample of a batch failed to decode (e.g. {rows[0].get('__url__')}): the shards are damaged; "
                    "convert the data again"
                )
            decoded = [d if d is not None else good[i % len(good)] for i, d in enumerate(decoded)]
        size = (3, self.image_size, self.image_size)
        pixels = torch.stack(
            [d[0] if d is not None else torch.zeros(size, dtype=torch.uint8) for d in decoded]
        )
        # uint8 crosses the process boundary (4x less than float32); the loader normalises in the main process.
        metas = [d[1] if d is not None else None for d in decoded]
        out = contract.assemble(pixels, metas, self.tokenizer, self.n_answers, evaluation=not self.train)
        out[SKIPPED] = skipped
        return out


def worker_plans(
    folder: sharding.ShardFolder,
    *,
    rank: int,
    world_size: int,
    train: bool,
    seed: int,
    epoch: int,
    batch_size: int,
    n_batches: int,
    workers: int,
    skip_batches: int,
) -> list[dict[str, Any]]:
    """Per worker: its tar pieces, batch count, batches to skip and shuffle seed for this epoch of this rank."""
    order = sharding.epoch_order(folder, train=train, seed=seed, epoch=epoch)
    start, stop = sharding.rank_range(folder.total, rank, world_size)
    plans, position = [], start
    for w, quota in enumerate(sharding.worker_quotas(n_batches, workers)):
        block_end = position + quota * batch_size
        pieces = [(str(s.tar), a, b) for s, a, b in sharding.segments(order, position, min(block_end, stop))]
        plans.append(
            {
                "pieces": pieces,
                "batches": quota,
                "skip": len(range(w, min(skip_batches, n_batches), workers)),
                "seed": sharding.derive_seed(seed, epoch, rank, w),
            }
        )
        position = block_end
    return plans


class TorchBatches:
    kind = "torch"

    def __init__(
        self,
        folder: sharding.ShardFolder,
        *,
        tokenizer: contract.Tokenizer,
        batch_size: int,
        image_size: int,
        mean: list[float],
        std: list[float],
        rank: int,
        world_size: int,
        train: bool,
        seed: int,
        epoch: int,
        num_workers: int,
        shuffle_buffer: int,
        device: torch.device | None,
        n_batches: int,
    ) -> None:
        self.folder = folder
        self.num_workers = num_workers
        self.n_batches = n_batches
        # Normalising on the GPU when training there: uint8 crosses PCIe (4x less) and the host does no float work.
        self.device = device if device is not None and device.type == "cuda" else torch.device("cpu")
        self.pin_memory = self.device.type == "cuda"
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.skipped = 0
        self._plan_args = dict(
            rank=rank, world_size=world_size, train=train, seed=seed, epoch=epoch, batch_size=batch_size
        )
        self._dataset_args = dict(
            tokenizer=tokenizer,
            n_answers=len(folder.answers),
            image_size=image_size,
            train=train,
            batch_size=batch_size,
            shuffle_buffer=shuffle_buffer,
        )

    def batches(self, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        workers = max(1, self.num_workers)
        plans = worker_plans(
            self.folder, n_batches=self.n_batches, workers=workers, skip_batches=skip, **self._plan_args
        )
        dataset = _EpochBlocks(plans, **self._dataset_args)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory
        )
        skipped = 0
        for batch in loader:
            skipped += int(batch.pop(SKIPPED))
            pixels = batch["pixels"].to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
            if "valid" in batch and not bool(batch["valid"].all()):
                pixels[~batch["valid"].to(self.device)] = 0  # padding rows are 0 after normalising too
            batch["pixels"] = pixels
            yield batch
        self.skipped = skipped
        if skipped:
            log.warning(
                "torch loader: skipped %d corrupt samples in %s this epoch", skipped, self.folder.folder
            )
