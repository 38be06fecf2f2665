"""The PyTorch fallback loader: the `webdataset` library in DataLoader workers, PIL decoding on the CPU.

A rank reads the same positions as DALI gives it (sharding.py). Those positions are cut into one contiguous
block per DataLoader worker, sized to the worker's share of the batches (batch k of worker w is the loader's batch
k * workers + w, the DataLoader's round-robin order), so every rank yields exactly the same number of batches.
Each worker streams its block's tar pieces with `webdataset`, shuffles them through a seeded buffer when training,
decodes with PIL and applies the EXIF orientation as DALI does (data_pipeline/convert/images.py `upright_rgb`), resizes to
S x S (bilinear, squash, no crop: the same pixels as DALI's resize within a few levels), tokenises the questions, and yields whole batches with uint8 pixels; the main process normalises them,
on the GPU when `device` is a CUDA device (then `pixels` arrives on the GPU, as from DALI).

A corrupt sample is skipped, counted and logged instead of ending the run: in training its row is filled with
another sample of the same batch (so batch boundaries, and exact resume, do not depend on decoding); in
evaluation it becomes a padding row (`valid = False`). `skip_batches` consumes the raw samples of skipped batches
without decoding them.

A damaged shard is a one-line DataError naming it, never an unnoticed loss: a tar that cannot be read on (cut short),
and a tar that ends before the samples its index and manifest count (Python's tarfile takes a damaged member header
for the end of the archive, which would silently drop the rest of the shard; `on_short_shard="warn"` logs and reads
on instead). Workers report such errors to the main process as one line, not as a cross-process traceback.

Worker shutdown is this loader's job on every exit path. The workers run with SIGTERM blocked (trainer.run.loop.shielded:
a SIGTERM to the trainer must not kill them mid-checkpoint), so the DataLoader's and multiprocessing's last resort,
terminate(), cannot end them; an exception whose traceback keeps the DataLoader iterator alive would then make the
interpreter wait for them forever at exit. So the loader stops its workers itself when an epoch ends for any reason
(asking them first, then SIGKILL), and, for an iterator still alive at interpreter exit, before multiprocessing's
exit handler joins them.
"""

from __future__ import annotations

import atexit
import io
import itertools
import logging
import multiprocessing.util  # noqa: F401  (its exit handler must be registered before ours, see _stop_all_at_exit)
import random
import weakref
from collections.abc import Generator, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data._utils import signal_handling

from data_pipeline.convert.images import upright_rgb
from data_pipeline.loaders import batch as contract
from data_pipeline.loaders import questions
from data_pipeline.loaders.spec import LoaderSpec
from data_pipeline.shards import sharding, storage

log = logging.getLogger(__name__)

SKIPPED = "_skipped"  # per-batch count of corrupt samples, removed by the loader before the batch is yielded
FAILED = "_failed"  # a worker's one-line DataError, raised again by the main process


def _reason(exc: BaseException) -> str:
    """One line for a read error; webdataset appends the stream's repr (" @ <_io.BufferedReader ...>")."""
    first = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    first = first.split(" @ ", 1)[0].strip().splitlines()
    return f"{exc.__class__.__name__}: {first[0]}" if first else exc.__class__.__name__


def _read_piece(tar: str, first: int, last: int, total: int) -> Generator[dict[str, Any], None, int]:
    """Samples [first, last) of one tar; returns how many it read. A read error is a DataError naming the tar."""
    # webdataset (over 1 s to import) only in the PyTorch loader's reads: DALI runs never load it.
    import webdataset as wds

    # Object storage: webdataset streams the tar through a pipe: URL (data_pipeline/shards/storage.py `cat`).
    remote = storage.is_remote(tar)
    url = storage.pipe_url(tar) if remote else tar
    # Splitting is ours (positions), not webdataset's: no node/worker splitters, no shard shuffling.
    ds = wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    samples, n = itertools.islice(ds, first, last), 0
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            return n
        except Exception as exc:  # tarfile/webdataset errors of a damaged file, or a failed download
            what = (
                "could not be read (the storage error is printed above)"
                if remote
                else "damaged shard, unreadable"
            )
            raise sharding.DataError(
                f"{tar}: {what} after sample {first + n} of {total} ({_reason(exc)}): "
                + ("check the URL and the AWS_* settings" if remote else "convert the data again")
            ) from None
        n += 1
        sample["__url__"] = tar  # errors name the shard, not the pipe command
        yield sample


def _short_shard(tar: str, read_to: int, total: int, on_short_shard: str) -> None:
    message = (
        f"{tar}: the tar ends after sample {read_to} of the {total} its index and manifest count: "
        f"{total - read_to} samples lost (a damaged member header reads as the end of the archive)"
    )
    if on_short_shard == "warn":
        log.warning("%s; reading on without them", message)
        return
    raise sharding.DataError(f"{message}: convert the data again")


def _raw_samples(pieces: list[tuple[str, int, int, int]], on_short_shard: str) -> Iterator[dict[str, Any]]:
    for tar, first, last, total in pieces:
        n = yield from _read_piece(tar, first, last, total)
        if n < last - first:
            _short_shard(tar, first + n, total, on_short_shard)


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
        table: questions.QuestionTable | None,
        n_answers: int,
        image_size: int,
        train: bool,
        batch_size: int,
        shuffle_buffer: int,
        on_short_shard: str,
    ) -> None:
        self.plans = plans
        self.on_short_shard = on_short_shard
        self.tokenizer = tokenizer
        self.table = table
        self.n_answers = n_answers
        self.image_size = image_size
        self.train = train
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        plan = self.plans[info.id if info is not None else 0]
        try:
            yield from self._batches(plan)
        except sharding.DataError as exc:
            # One line for the main process: a worker's exception would arrive there wrapped in its traceback.
            yield {FAILED: str(exc)}

    def _batches(self, plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
        samples: Iterator[dict[str, Any] | None] = _raw_samples(plan["pieces"], self.on_short_shard)
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
            with Image.open(
                io.BytesIO(sample["jpg"])
            ) as im:  # upright: EXIF orientation applied, as DALI does
                rgb = upright_rgb(im).resize((self.image_size, self.image_size), Image.BILINEAR)
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
        # Training rows never stay empty: a corrupt sample, or one a short shard lost (on_short_shard="warn").
        if self.train and any(d is None for d in decoded):
            good = [d for d in decoded if d is not None]
            if not good:
                where = next((r.get("__url__") for r in rows if r is not None), None) or "the shards"
                raise sharding.DataError(
                    f"{where}: every sample of a batch failed to decode or is missing: the shards are damaged; "
                    "convert the data again"
                )
            decoded = [d if d is not None else good[i % len(good)] for i, d in enumerate(decoded)]
        size = (3, self.image_size, self.image_size)
        pixels = torch.stack(
            [d[0] if d is not None else torch.zeros(size, dtype=torch.uint8) for d in decoded]
        )
        # uint8 crosses the process boundary (4x less than float32); the loader normalises in the main process.
        metas = [d[1] if d is not None else None for d in decoded]
        if self.table is not None:
            fields = questions.fields_from_metas(metas, self.table, self.n_answers)
        else:
            fields = contract.host_fields(metas, self.tokenizer, self.n_answers)
        out = contract.attach(pixels, fields, evaluation=not self.train)
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
        segments = sharding.segments(order, position, min(block_end, stop))
        pieces = [(str(s.tar), a, b, s.samples) for s, a, b in segments]
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

    def __init__(self, folder: sharding.ShardFolder, spec: LoaderSpec, n_batches: int) -> None:
        self.folder = folder
        if spec.questions is not None:
            spec.questions.check_folder(folder)
        self.num_workers = spec.num_workers
        self.n_batches = n_batches
        # Normalising on the GPU when training there: uint8 crosses PCIe (4x less) and the host does no float work.
        device = spec.device
        self.device = device if device is not None and device.type == "cuda" else torch.device("cpu")
        self.pin_memory = self.device.type == "cuda"
        mean, std = spec.normalisation
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.skipped = 0
        self._plan_args = dict(
            rank=spec.rank,
            world_size=spec.world_size,
            train=spec.train,
            seed=spec.seed,
            epoch=spec.epoch,
            batch_size=spec.batch_size,
        )
        self._dataset_args = dict(
            tokenizer=spec.tokenizer,
            table=spec.questions,
            n_answers=len(folder.answers),
            image_size=spec.image_size,
            train=spec.train,
            batch_size=spec.batch_size,
            shuffle_buffer=spec.shuffle_buffer,
            on_short_shard=spec.on_short_shard,
        )

    def batches(self, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        workers = max(1, self.num_workers)
        plans = worker_plans(
            self.folder, n_batches=self.n_batches, workers=workers, skip_batches=skip, **self._plan_args
        )
        dataset = _EpochBlocks(plans, **self._dataset_args)
        a = self._plan_args
        # DataLoader draws its workers' base seed from this generator when it starts; without one it would draw from
        # the global torch RNG, and a resumed run (whose RNG state was just restored) would continue the model's
        # random stream (dropout) on a different draw than the uninterrupted run did.
        generator = torch.Generator().manual_seed(
            sharding.derive_seed(a["seed"], a["epoch"], a["rank"], skip)
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,
        )
        skipped = 0
        it = iter(loader)  # workers start here
        _live.add(it)
        try:
            for batch in it:
                if FAILED in batch:
                    raise sharding.DataError(batch[FAILED])
                skipped += int(batch.pop(SKIPPED))
                yield self._normalise(batch)
        finally:
            _stop_workers(it)
        self.skipped = skipped
        if skipped:
            log.warning(
                "torch loader: skipped %d corrupt samples in %s this epoch", skipped, self.folder.folder
            )

    def _normalise(self, batch: dict[str, Any]) -> dict[str, Any]:
        pixels = batch["pixels"].to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        if "valid" in batch and not bool(batch["valid"].all()):
            pixels[~batch["valid"].to(self.device)] = 0  # padding rows are 0 after normalising too
        batch["pixels"] = pixels
        return batch


# DataLoader iterators whose workers may still run (see the module docstring).
_live: weakref.WeakSet = weakref.WeakSet()
JOIN_TIMEOUT_S = 5.0


def _stop_workers(it: Any) -> None:
    """Stop a DataLoader iterator's workers now: the DataLoader's own orderly stop, then SIGKILL for any left."""
    _live.discard(it)
    try:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:  # absent without workers (num_workers=0)
            shutdown()
    finally:
        _kill_workers(it)


def _kill_workers(it: Any) -> None:
    alive = [w for w in getattr(it, "_workers", ()) if w.is_alive()]
    if not alive:
        return
    if getattr(it, "_worker_pids_set", False):
        # Forget the pids first: the DataLoader's SIGCHLD handler would take their death for a crash.
        signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False
    for w in alive:
        w.kill()  # SIGKILL: the workers block SIGTERM
    for w in alive:
        w.join(JOIN_TIMEOUT_S)


@atexit.register
def _stop_all_at_exit() -> None:
    """Registered after multiprocessing's exit handler (imported above), so it runs before that one joins workers."""
    for it in list(_live):
        _stop_workers(it)
