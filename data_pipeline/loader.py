"""The training loop's entry to the data: `build_loader` picks DALI (GPU, else CPU) or the PyTorch fallback.

    loader = build_loader(shards_dir, tokenizer=tok, batch_size=64, image_size=384, mean=MEAN, std=STD,
                          rank=rank, world_size=world, train=True, seed=0, epoch=e, skip_batches=k,
                          kind="auto", num_workers=2, shuffle_buffer=1000, device=torch.device("cuda", local_rank))
    for batch in loader:            # one epoch; every rank yields exactly len(loader) batches
        ...

API (kept stable: the trainer calls exactly this):
- `build_loader(shards_dir, *, tokenizer, batch_size, image_size, mean, std, rank, world_size, train, seed,
  epoch=0, skip_batches=0, kind="auto", num_workers=2, shuffle_buffer=1000, device=None,
  on_short_shard="error") -> VQALoader`
  - `tokenizer`: a callable list[str] -> {"vilt_ids", "vilt_mask", "clip_ids"} (data_pipeline.text.QuestionTokenizer)
  - `mean`, `std`: 3 values on the 0..1 scale (CLIP's for CLIP variants, (0.5,) * 3 for ViLT)
  - `kind`: "auto" (DALI on the GPU, else DALI on the CPU, else torch when DALI is not installed; one log line
    says which), "dali" (DALI, GPU or CPU), "torch" (webdataset + DataLoader workers + PIL)
  - `num_workers`: DataLoader workers (torch) or DALI CPU threads; `shuffle_buffer`: samples held for shuffling
    when training (DALI's `initial_fill`; <= 1 disables shuffling within the epoch's shard order)
  - `device`: where the DALI GPU decoder runs (None = the current CUDA device; torch.device("cpu") = DALI CPU)
  - `on_short_shard`: torch loader, a tar that ends before the samples its index and manifest count (a damaged
    member header): "error" (a DataError naming the tar and the samples lost) or "warn" (log it, read on; training
    rows of lost samples are filled from their batch). DALI reads through the index and loses nothing.
- Damaged data is a one-line `DataError` naming the shard (and, for a damaged image under DALI, the sample key).
- `VQALoader`: iterable over the batches of ONE epoch; `len()` = batches it yields (= `batches_per_epoch` -
  `skip_batches`); attributes `kind` ("dali-gpu" | "dali-cpu" | "torch"), `answers`, `n_answers`,
  `batches_per_epoch`, `manifest`, `corrupt_skipped`.
- `read_answers(shards_dir) -> list[str]`, `read_manifest(shards_dir) -> dict`,
  `read_sample_info(shards_dir) -> {question_id: sample json}` (answer types, raw answers, questions).

Batches follow the contract in data_pipeline/batch.py (pixels, vilt_ids, vilt_mask, clip_ids, targets,
question_id; plus `valid` when train=False).

Training: shuffled from (seed, epoch) only: the shard order is a seeded permutation per epoch and the sample order
within a rank a seeded buffer shuffle, so an epoch's batches on a rank depend only on (seed, epoch, rank,
world_size) (and, for the torch loader, num_workers). Resume at step k of epoch e with `epoch=e, skip_batches=k`.
The last partial batch is dropped; every rank yields floor(N / (world_size * batch_size)) batches.
Evaluation: no shuffling, every sample exactly once over all ranks, the last batches padded (`valid` False).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from data_pipeline import batch as contract
from data_pipeline import dali_loader, sharding
from data_pipeline.sharding import DataError, read_answers, read_manifest, read_sample_info
from data_pipeline.torch_loader import ON_SHORT_SHARD, TorchBatches

__all__ = ["DataError", "VQALoader", "build_loader", "read_answers", "read_manifest", "read_sample_info"]

log = logging.getLogger(__name__)

KINDS = ("auto", "dali", "torch")


class VQALoader:
    """The batches of one epoch of one rank (see the module docstring)."""

    def __init__(
        self, backend: Any, folder: sharding.ShardFolder, batches_per_epoch: int, skip_batches: int
    ) -> None:
        self._backend = backend
        self.kind: str = backend.kind
        self.answers: list[str] = folder.answers
        self.n_answers: int = len(folder.answers)
        self.manifest: dict[str, Any] = folder.manifest
        self.batches_per_epoch = batches_per_epoch
        self.skip_batches = skip_batches

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._backend.batches(self.skip_batches)

    @property
    def corrupt_skipped(self) -> int:
        """Corrupt samples the torch loader skipped in its last complete pass (DALI never skips: it would fail)."""
        return int(getattr(self._backend, "skipped", 0))


def _check_args(
    batch_size: int,
    image_size: int,
    rank: int,
    world_size: int,
    kind: str,
    skip_batches: int,
    num_workers: int,
    on_short_shard: str,
) -> None:
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size and image_size must be >= 1, got {batch_size} and {image_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got '{kind}'")
    if skip_batches < 0 or num_workers < 0:
        raise ValueError(f"skip_batches and num_workers must be >= 0, got {skip_batches} and {num_workers}")
    if on_short_shard not in ON_SHORT_SHARD:
        raise ValueError(f"on_short_shard must be one of {', '.join(ON_SHORT_SHARD)}, got '{on_short_shard}'")


def build_loader(
    shards_dir: str | Path,
    *,
    tokenizer: contract.Tokenizer,
    batch_size: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    rank: int,
    world_size: int,
    train: bool,
    seed: int,
    epoch: int = 0,
    skip_batches: int = 0,
    kind: str = "auto",
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    device: torch.device | None = None,
    on_short_shard: str = "error",
) -> VQALoader:
    """One epoch's loader for one rank; see the module docstring for every argument."""
    _check_args(batch_size, image_size, rank, world_size, kind, skip_batches, num_workers, on_short_shard)
    mean255, std255 = contract.normalisation(mean, std)
    folder = sharding.open_folder(shards_dir)
    n_batches = sharding.check_fits(folder, world_size=world_size, batch_size=batch_size, train=train)
    if skip_batches > n_batches:
        raise ValueError(f"skip_batches {skip_batches} > {n_batches} batches in an epoch of {folder.folder}")
    args: dict[str, Any] = dict(
        tokenizer=tokenizer,
        batch_size=batch_size,
        image_size=image_size,
        mean=mean255,
        std=std255,
        rank=rank,
        world_size=world_size,
        train=train,
        seed=seed,
        epoch=epoch,
        shuffle_buffer=shuffle_buffer,
        device=device,
        n_batches=n_batches,
    )
    if kind == "torch" or (kind == "auto" and not dali_loader.available()):
        if kind == "auto":
            log.info("data loader: DALI is not installed; using the PyTorch (webdataset + PIL) loader")
        backend: Any = TorchBatches(folder, num_workers=num_workers, on_short_shard=on_short_shard, **args)
    else:
        if not dali_loader.available():
            raise DataError("kind='dali' but nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
        backend = dali_loader.DaliBatches(folder, num_threads=num_workers, **args)
    if rank == 0:
        log.info(
            "data loader %s: %s, %d samples, %d batches of %d per rank x %d ranks (%s)",
            backend.kind,
            folder.folder,
            folder.total,
            n_batches,
            batch_size,
            world_size,
            "train" if train else "eval",
        )
    return VQALoader(backend, folder, n_batches, skip_batches)
