"""The DALI loader: shards read by `fn.readers.webdataset`, JPEGs decoded on the GPU (nvJPEG), or on the CPU.

Pipeline per rank: `fn.readers.webdataset` (index files; shard_id/num_shards = rank/world size; random_shuffle with
`initial_fill` = shuffle_buffer when training) -> `fn.decoders.image(device="mixed", hw_decoder_load=...)` (EXIF
orientation applied) ->
`fn.resize` to S x S (linear, antialiased; squash, no crop) -> `fn.crop_mirror_normalize` (float, CHW) ->
`DALIGenericIterator`. The json component comes out padded with zeros (`fn.pad`). With the folder's question table
(`LoaderSpec.questions`, data_pipeline/loaders/questions.py; the trainer builds it at start-up) the host reads the question
ids out of those bytes and gathers ids, masks and targets from the table: array operations, no Python per sample.
Without one, the json is parsed on the host and the caller's tokenizer turns questions into ids (so shards do not
depend on a tokenizer); that work runs in a background thread, PREFETCH batches ahead of the training loop, or,
with `host_workers` > 0, in spawned processes (host_pool.py) that the thread only feeds, out of the trainer's GIL.

Mode: "dali-gpu" when the mixed decoder builds; when it raises (no GPU, no driver) the same pipeline is built in
DALI's CPU mode (`device_id=None`, decoder on "cpu") and one log line says so.

Per-epoch order: the pipeline is rebuilt for every epoch with the shard order and the reader seed derived from
(seed, epoch, rank), so an epoch's order on a rank depends only on (seed, epoch, rank, world_size). Resuming with
`skip_batches=k` restores DALI's own checkpoint of that position where one was saved for the same reading
(`resume_state`, see loader_state.py): the reader fast-forwards without reading or decoding the k batches. Without
one (another world size, a run saved before, a torch-loader run), the pipeline runs k times without host work:
exact too, at the cost of decoding those k batches. Both give the same batches (tests/test_data_loader.py).

DALI aborts on an undecodable image (no skip option), and its CPU decoder can crash the process while doing so:
the converter decodes every image, and before a pipeline is built the rank's shards are checked for damaged images
(integrity.py, once per shard per process), which are reported as a one-line DataError naming shard and sample.
Any other failure of DALI while reading or decoding is a one-line DataError naming the folder and the batch.
Batches are copied out of DALI's output buffers as soon as they arrive: those buffers are DALI's own (zero-copy),
reused by later runs and invalid after an error, while the host thread works two batches ahead.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future

import numpy as np
import torch

from data_pipeline.loaders import batch as contract
from data_pipeline.loaders import host_pool, loader_state, questions
from data_pipeline.loaders.background import in_background
from data_pipeline.loaders.spec import LoaderSpec
from data_pipeline.shards import integrity, sharding, storage

log = logging.getLogger(__name__)

PREFETCH = 2  # host-assembled batches kept ready ahead of the training loop
POOL_AHEAD = 2  # batches in the host workers while the oldest is waited for (host_workers > 0)
# Saved positions kept per epoch: the training loop is at most PREFETCH (+ DALI's own queue) behind the producer.
KEPT_STATES = 16


def available() -> bool:
    try:
        # DALI is imported where it is used, here and below: it is optional (a host without it uses the PyTorch
        # loader).
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _pipeline(
    *,
    tars: list[str],
    indexes: list[str],
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    rank: int,
    world_size: int,
    shuffle: bool,
    initial_fill: int,
    reader_seed: int,
    image_size: int,
    mean: list[float],
    std: list[float],
    hw_decoder_load: float,
    prefetch_depth: int,
    checkpoint: bytes | None = None,
):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    # Checkpoints cost nothing per batch and little to take: docs/performance.md, "Figures behind choices in the code".
    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=reader_seed,
        enable_checkpointing=True,
        prefetch_queue_depth=prefetch_depth,
    )
    def vqa_pipeline():
        jpegs, metas = fn.readers.webdataset(
            paths=tars,
            index_paths=indexes,
            ext=["jpg", "json"],
            missing_component_behavior="error",
            shard_id=rank,
            num_shards=world_size,
            random_shuffle=shuffle,
            initial_fill=initial_fill,
            seed=reader_seed,
            # Each pipeline serves one epoch of one rank: it must read its own positions only.
            stick_to_shard=True,
            pad_last_batch=False,
            name="reader",
        )
        # EXIF orientation applied (DALI's default, pinned): the project's one rule, data_pipeline/convert/images.py.
        device = {"device": "mixed", "hw_decoder_load": hw_decoder_load} if gpu else {"device": "cpu"}
        images = fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=True, **device)
        # uint8 output, like PIL's resize in the torch loader: both round the same way before normalising.
        images = fn.resize(
            images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR, antialias=True
        )
        pixels = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
        # Variable-length bytes cannot form a batch tensor for the iterator: pad with zeros (never inside JSON).
        return pixels, fn.pad(metas, fill_value=0)

    return vqa_pipeline() if checkpoint is None else vqa_pipeline(checkpoint=checkpoint)


class DaliBatches:
    """One epoch of one rank through DALI; `kind` is "dali-gpu" or "dali-cpu" once constructed."""

    def __init__(self, folder: sharding.ShardFolder, spec: LoaderSpec, n_batches: int) -> None:
        self.folder = folder
        self.tokenizer = spec.tokenizer
        self.batch_size = spec.batch_size
        self.train = spec.train
        self.n_batches = n_batches
        self.n_answers = len(folder.answers)
        order = sharding.epoch_order(folder, train=spec.train, seed=spec.seed, epoch=spec.epoch)
        start, stop = sharding.rank_range(folder.total, spec.rank, spec.world_size)
        self.n_real = stop - start
        integrity.check_shards(s for s, _, _ in sharding.segments(order, start, stop))
        mean, std = spec.normalisation
        self._args = dict(
            tars=[str(s.tar) for s in order],
            indexes=[str(s.index) for s in order],
            batch_size=spec.batch_size,
            num_threads=max(1, spec.num_workers),
            rank=spec.rank,
            world_size=spec.world_size,
            shuffle=spec.train and spec.shuffle_buffer > 1,
            initial_fill=max(1, spec.shuffle_buffer),
            reader_seed=sharding.derive_seed(spec.seed, spec.epoch, spec.rank),
            image_size=spec.image_size,
            mean=mean,
            std=std,
            hw_decoder_load=spec.hw_decoder_load,
            prefetch_depth=spec.prefetch_depth,
        )
        self._key = {
            "folder": loader_state.folder_fingerprint(folder.manifest),
            **{k: self._args[k] for k in ("batch_size", "rank", "world_size", "initial_fill", "reader_seed")},
            "shuffle": self._args["shuffle"],
            "epoch": spec.epoch,
            "dali": _dali_version(),
        }
        self._restore = self._restore_point(spec)
        # CPU time of the host work per batch in this process (copies out of DALI, ids, masks, targets), for the bench.
        self.host_seconds, self.host_batches = 0.0, 0
        self._states: dict[int, bytes] = {}  # batches consumed -> DALI's checkpoint there (the last few only)
        self.table = spec.questions
        if self.table is not None:
            self.table.check_folder(folder)
        # With the question table a batch's host work is a few array operations: no process pool to feed.
        use_pool = spec.host_workers > 0 and self.table is None
        self._pool = host_pool.shared(spec.tokenizer, spec.host_workers) if use_pool else None
        self._pipe = self._build_first(spec.device)

    def _restore_point(self, spec: LoaderSpec) -> bytes | None:
        """DALI's checkpoint at `spec.skip_batches`, when `spec.resume_state` was saved for this same reading."""
        if spec.resume_state is None or spec.skip_batches == 0:
            return None
        checkpoint, why = loader_state.unpack(spec.resume_state, {**self._key, "batch": spec.skip_batches})
        if checkpoint is None:
            log.info(
                "DALI: resuming by decoding %d batches: the saved loader state is %s", spec.skip_batches, why
            )
        return checkpoint

    def _build_first(self, device: torch.device | None):
        """The GPU (mixed) pipeline, else DALI's CPU mode; each restored from the saved state, else not restored."""
        if device is not None and device.type == "cpu":
            log.info("DALI: CPU mode (device=cpu requested)")
            modes: list[int | None] = [None]
        else:
            gpu = device.index if device is not None and device.index is not None else _current_cuda_device()
            modes = [gpu, None]
        restores = [self._restore, None] if self._restore is not None else [None]
        attempts = [(device_id, restore) for device_id in modes for restore in restores]
        # Messages only: a kept exception's traceback would keep the failed pipeline (and DALI's threads) alive,
        # and a process forked later (DataLoader workers) then hangs or crashes.
        failures: list[str] = []
        for n, (device_id, restore) in enumerate(attempts):
            self.device_id = device_id
            try:
                pipe = self._build(restore)
            except RuntimeError as exc:
                if n == len(attempts) - 1:
                    raise
                failures.append(_first(exc))
                continue
            if restore is not None:
                log.info("DALI: resuming from the saved loader state, without decoding the batches before it")
            elif self._restore is not None:  # this mode builds, but not from the state
                log.info(
                    "DALI: the saved loader state did not restore (%s); resuming by decoding", failures[-1]
                )
                self._restore = None
            if device_id is None and len(modes) > 1:
                log.info(
                    "DALI: the GPU (mixed) decoder failed to build (%s); using DALI's CPU mode", failures[0]
                )
            return pipe
        raise AssertionError("unreachable: the last attempt raises")

    def _build(self, restore: bytes | None = None):
        pipe = _pipeline(device_id=self.device_id, checkpoint=restore, **self._args)
        pipe.build()
        return pipe

    @property
    def kind(self) -> str:
        return "dali-cpu" if self.device_id is None else "dali-gpu"

    def state(self, consumed: int) -> bytes | None:
        """The saved form of this epoch's position after `consumed` batches (None where none was taken)."""
        checkpoint = self._states.get(consumed)
        if checkpoint is None:
            return None
        return loader_state.pack({**self._key, "batch": consumed}, checkpoint)

    def batches(self, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if skip >= self.n_batches:  # resumed at the epoch's end: nothing left to read
            return iter(())
        pipe, self._pipe = self._pipe, None
        if pipe is None:  # a second pass over the same epoch: same seeds, same order, from its start
            self._restore = None
            pipe = self._build()
        # A restored pipeline starts after the skipped batches (its iterator's count is in the checkpoint too).
        first = skip if self._restore is not None else 0
        self._restore = None
        with warnings.catch_warnings():
            # DALI suggests `reader_name` over `size`; `size` is deliberate: with reader_name the iterator would
            # count each rank's own shard (sizes differ by one) and ranks could yield different batch counts.
            warnings.filterwarnings("ignore", message=".*reader_name.*")
            try:  # the iterator runs the first batch here
                iterator = DALIGenericIterator(
                    pipe,
                    ["pixels", "json"],
                    size=self.n_batches * self.batch_size,
                    last_batch_policy=LastBatchPolicy.FILL,
                    auto_reset=False,
                )
            except RuntimeError as exc:
                raise self._failure(exc, 0) from None
        # JSON parsing and tokenisation run on the host; a thread keeps them PREFETCH batches ahead, so they
        # overlap the training step (which releases the GIL while it waits on the GPU or a collective).
        return in_background(self._produce(iterator, pipe, first, skip), PREFETCH)

    def _produce(
        self, iterator, pipe, first: int, skip: int
    ) -> Generator[dict[str, torch.Tensor], None, None]:
        pending: deque[tuple[torch.Tensor, Future]] = deque()  # batches in the host workers, oldest first
        try:
            for i in range(first, self.n_batches):
                t0 = time.thread_time()  # the iterator's own host work counts too; waiting for DALI does not
                out = self._next(iterator, i)
                if out is None:
                    break
                if i < skip:
                    continue  # decoded and dropped: the exact resume without a saved state
                if self.train:
                    self._keep_state(i + 1, iterator.checkpoints()[0])
                # Copies, now: the tensors are views of DALI's buffers, which the next run reuses (and an error
                # frees), while this batch waits in the queue for the training loop.
                pixels, raw = out[0]["pixels"].clone(), out[0]["json"].numpy().copy()
                del out
                if self._pool is None:
                    batch = self._assemble(i, pixels, raw)
                    self._count_host(t0, batches=1)
                    yield batch
                    continue
                pending.append((pixels, self._pool.submit(*self._host_job(i, raw))))
                self._count_host(t0, batches=0)
                if len(pending) > POOL_AHEAD:
                    yield self._finish(*pending.popleft())
            while pending:
                yield self._finish(*pending.popleft())
        finally:
            for _, job in pending:
                job.cancel()
            del iterator, pipe  # the pipeline's threads and buffers go with the epoch

    def _count_host(self, t0: float, batches: int) -> None:
        """The host thread's CPU time since `t0` (DALI's own threads decode: not counted, nor is waiting)."""
        self.host_seconds += time.thread_time() - t0
        self.host_batches += batches

    def _keep_state(self, consumed: int, checkpoint: bytes) -> None:
        self._states[consumed] = checkpoint
        self._states.pop(consumed - KEPT_STATES, None)

    def _next(self, iterator, index: int):
        try:
            return next(iterator)
        except StopIteration:
            return None
        except RuntimeError as exc:
            raise self._failure(exc, index) from None

    def _failure(self, exc: RuntimeError, index: int) -> sharding.DataError:
        """DALI's multi-line pipeline error as one line naming the folder and the batch."""
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # DALI's message: "... encountered:", the operator's own error, then "pipeline ... no longer valid" lines.
        after = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.endswith("encountered:")]
        reason = after[-1] if after else (lines[0] if lines else exc.__class__.__name__)
        # In object storage the store is the likely cause (credentials, endpoint, a missing object).
        if storage.is_remote(self.folder.folder):
            hint = "check the AWS_* settings and the objects; data.loader=torch names the failing object"
        else:
            hint = "its images passed the integrity check: try data.loader=torch, which names and skips undecodable samples"
        return sharding.DataError(
            f"{self.folder.folder}: DALI failed on batch {index} of this rank ({reason}); {hint}"
        )

    def _host_job(self, index: int, rows: np.ndarray) -> tuple[np.ndarray, list[bool], str, int]:
        # Evaluation rows past this rank's own samples are padding (no json to parse).
        real = [self.train or index * self.batch_size + j < self.n_real for j in range(rows.shape[0])]
        return rows, real, f"{self.folder.folder}: batch {index}", self.n_answers

    def _assemble(self, index: int, pixels: torch.Tensor, rows: np.ndarray) -> dict[str, torch.Tensor]:
        if self.table is not None:  # array operations only (data_pipeline/loaders/questions.py)
            where = f"{self.folder.folder}: batch {index}"
            real = np.arange(index * self.batch_size, (index + 1) * self.batch_size) < self.n_real
            real |= self.train
            qids = questions.question_ids(rows, where)
            fields = self.table.fields(qids, real[: rows.shape[0]], self.n_answers)
        else:
            rows, real_rows, where, n_answers = self._host_job(index, rows)
            fields = host_pool.fields_from_rows(rows, real_rows, where, self.tokenizer, n_answers)
        return contract.attach(pixels, fields, evaluation=not self.train)

    def _finish(self, pixels: torch.Tensor, job: Future) -> dict[str, torch.Tensor]:
        fields = job.result()
        t0 = time.thread_time()
        batch = contract.attach(pixels, fields, evaluation=not self.train)
        self._count_host(t0, batches=1)
        return batch


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else exc.__class__.__name__


def _dali_version() -> str:
    import nvidia.dali

    return str(nvidia.dali.__version__)


def _current_cuda_device() -> int:
    # Device 0 when torch sees no GPU: the build then fails and the CPU mode takes over.
    return torch.cuda.current_device() if torch.cuda.is_available() else 0
