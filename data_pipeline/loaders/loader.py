"""The training loop's entry to the data: `build_loader` picks DALI (GPU, else CPU) or the PyTorch fallback.

    spec = LoaderSpec(tokenizer=tok, batch_size=64, image_size=384, mean=MEAN, std=STD, train=True, seed=0,
                      rank=rank, world_size=world, device=torch.device("cuda", local_rank))
    loader = build_loader(shards_dir, spec.at(epoch=e, skip_batches=k))
    for batch in loader:            # one epoch; every rank yields exactly len(loader) batches
        ...

API (kept stable: the trainer calls exactly this):
- `LoaderSpec` (data_pipeline/loaders/spec.py): tokenizer, batch_size, image_size, mean, std, train, seed, rank,
  world_size, epoch, skip_batches, resume_state, kind, num_workers, shuffle_buffer, device, on_short_shard,
  host_workers, hw_decoder_load, prefetch_depth, questions; each field documented there and checked when the spec
  is made.
- `build_loader(shards_dir, spec) -> VQALoader`.
  - `kind`: "auto" (DALI on the GPU, else DALI on the CPU, else torch when DALI is not installed; one log line
    says which), "dali" (DALI, GPU or CPU), "torch" (webdataset + DataLoader workers + PIL)
  - `on_short_shard`: torch loader, a tar that ends before the samples its index and manifest count (a damaged
    member header): "error" (a DataError naming the tar and the samples lost) or "warn" (log it, read on; training
    rows of lost samples are filled from their batch). DALI reads through the index and loses nothing.
- Damaged data is a one-line `DataError` naming the shard (and, for a damaged image under DALI, the sample key).
- `VQALoader`: iterable over the batches of ONE epoch; `len()` = batches it yields (= `batches_per_epoch` -
  `skip_batches`); attributes `kind` ("dali-gpu" | "dali-cpu" | "torch"), `answers`, `n_answers`,
  `batches_per_epoch`, `skip_batches`, `manifest`, `corrupt_skipped`, `host_work`; `state(k)`: the position after
  k batches, to save with a checkpoint and resume from (`spec.at(e, k, resume_state=...)`: DALI then skips without
  decoding).
- `read_answers(shards_dir) -> list[str]`, `read_manifest(shards_dir) -> dict`,
  `read_sample_info(shards_dir) -> {question_id: sample json}` (answer types, raw answers, questions).

Batches follow the contract in data_pipeline/loaders/batch.py (pixels, vilt_ids, vilt_mask, clip_ids, targets,
question_id; plus `valid` when train=False).

Training: shuffled from (seed, epoch) only: the shard order is a seeded permutation per epoch and the sample order
within a rank a seeded buffer shuffle, so an epoch's batches on a rank depend only on (seed, epoch, rank,
world_size) (and, for the torch loader, num_workers). Resume at step k of epoch e with `spec.at(e, k)`.
The last partial batch is dropped; every rank yields floor(N / (world_size * batch_size)) batches.
Evaluation: no shuffling, every sample exactly once over all ranks, the last batches padded (`valid` False).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data_pipeline.loaders import dali_loader
from data_pipeline.loaders.spec import LoaderSpec
from data_pipeline.loaders.torch_loader import TorchBatches
from data_pipeline.shards import sharding
from data_pipeline.shards.sharding import DataError, read_answers, read_manifest, read_sample_info

__all__ = [
    "DataError",
    "LoaderSpec",
    "VQALoader",
    "build_loader",
    "read_answers",
    "read_manifest",
    "read_sample_info",
]

log = logging.getLogger(__name__)


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

    def state(self, consumed: int) -> bytes | None:
        """This epoch's position after `consumed` batches in a form to save with a checkpoint and pass back as
        `LoaderSpec.resume_state` (data_pipeline/loaders/loader_state.py): DALI's own checkpoint, which resumes without
        decoding the consumed batches. None where there is none (the torch loader, whose exact resume reads only
        the skipped samples' bytes; or a position the loader no longer holds); resuming is exact either way."""
        get = getattr(self._backend, "state", None)
        return get(consumed) if get is not None else None

    @property
    def host_work(self) -> tuple[float, int]:
        """DALI: (CPU seconds, batches) of the loader's host work in this process so far (copies out of DALI's
        buffers, ids, masks, targets); (0.0, 0) for the torch loader, whose host work runs in its workers."""
        return getattr(self._backend, "host_seconds", 0.0), getattr(self._backend, "host_batches", 0)

    @property
    def corrupt_skipped(self) -> int:
        """Corrupt samples the torch loader skipped in its last complete pass (DALI never skips: it would fail)."""
        return int(getattr(self._backend, "skipped", 0))


def build_loader(shards_dir: str | Path, spec: LoaderSpec) -> VQALoader:
    """One epoch's loader for one rank (`spec.epoch`, from batch `spec.skip_batches` on)."""
    folder = sharding.open_folder(shards_dir)
    n_batches = sharding.check_fits(
        folder, world_size=spec.world_size, batch_size=spec.batch_size, train=spec.train
    )
    if spec.skip_batches > n_batches:
        raise ValueError(
            f"skip_batches {spec.skip_batches} > {n_batches} batches in an epoch of {folder.folder}"
        )
    if spec.kind == "torch" or (spec.kind == "auto" and not dali_loader.available()):
        if spec.kind == "auto":
            log.info("data loader: DALI is not installed; using the PyTorch (webdataset + PIL) loader")
        backend: Any = TorchBatches(folder, spec, n_batches)
    else:
        if not dali_loader.available():
            raise DataError("kind='dali' but nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
        backend = dali_loader.DaliBatches(folder, spec, n_batches)
    if spec.rank == 0:
        log.info(
            "data loader %s: %s, %d samples, %d batches of %d per rank x %d ranks (%s)",
            *(backend.kind, folder.folder, folder.total, n_batches, spec.batch_size, spec.world_size),
            "train" if spec.train else "eval",
        )
    return VQALoader(backend, folder, n_batches, spec.skip_batches)
