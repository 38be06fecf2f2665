"""The DALI loader: shards read by `fn.readers.webdataset`, JPEGs decoded on the GPU (nvJPEG), or on the CPU.

Pipeline per rank: `fn.readers.webdataset` (index files; shard_id/num_shards = rank/world size; random_shuffle with
`initial_fill` = shuffle_buffer when training) -> `fn.decoders.image(device="mixed", hw_decoder_load=...)` ->
`fn.resize` to S x S (linear, antialiased; squash, no crop) -> `fn.crop_mirror_normalize` (float, CHW) ->
`DALIGenericIterator`. The json component comes out padded with zeros (`fn.pad`) and is parsed on the host, where
the caller's tokenizer turns questions into ids (so shards do not depend on a tokenizer; the bench measures it).
That host work runs in a background thread, PREFETCH batches ahead of the training loop.

Mode: "dali-gpu" when the mixed decoder builds; when it raises (no GPU, no driver) the same pipeline is built in
DALI's CPU mode (`device_id=None`, decoder on "cpu") and one log line says so.

Per-epoch order: the pipeline is rebuilt for every epoch with the shard order and the reader seed derived from
(seed, epoch, rank), so an epoch's order on a rank depends only on (seed, epoch, rank, world_size). Resuming with
`skip_batches=k` runs the pipeline k times without host work: exact, at the cost of decoding those k batches.

DALI aborts on an undecodable image (no skip option), and its CPU decoder can crash the process while doing so:
the converter decodes every image, and before a pipeline is built the rank's shards are checked for damaged images
(integrity.py, once per shard per process), which are reported as a one-line DataError naming shard and sample.
Any other failure of DALI while reading or decoding is a one-line DataError naming the folder and the batch.
Batches are copied out of DALI's output buffers as soon as they arrive: those buffers are DALI's own (zero-copy),
reused by later runs and invalid after an error, while the host thread works two batches ahead.
"""

from __future__ import annotations

import logging
import queue
import threading
import warnings
from collections.abc import Generator, Iterator
from typing import TypeVar

import numpy as np
import torch

from data_pipeline import batch as contract
from data_pipeline import integrity, sharding
from data_pipeline.spec import LoaderSpec

log = logging.getLogger(__name__)

# Share of JPEGs sent to the hardware JPEG decoder (A100/H100) rather than nvJPEG's CUDA path; 0.65 is the value
# of NVIDIA's ResNet-50 DALI example (tuned there for A100). Not measured in this project yet.
HW_DECODER_LOAD = 0.65
PREFETCH = 2  # host-assembled batches kept ready ahead of the training loop

T = TypeVar("T")


def available() -> bool:
    try:
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
):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=reader_seed)
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
        if gpu:
            images = fn.decoders.image(
                jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=HW_DECODER_LOAD
            )
        else:
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        # uint8 output, like PIL's resize in the torch loader: both round the same way before normalising.
        images = fn.resize(
            images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR, antialias=True
        )
        pixels = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
        # Variable-length bytes cannot form a batch tensor for the iterator: pad with zeros (never inside JSON).
        return pixels, fn.pad(metas, fill_value=0)

    return vqa_pipeline()


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
        )
        self._pipe = self._build_first(spec.device)

    def _build_first(self, device: torch.device | None):
        if device is not None and device.type == "cpu":
            self.device_id = None
            log.info("DALI: CPU mode (device=cpu requested)")
            return self._build()
        self.device_id = (
            device.index if device is not None and device.index is not None else _current_cuda_device()
        )
        try:
            return self._build()
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            log.info("DALI: the GPU (mixed) decoder failed to build (%s); using DALI's CPU mode", first[:160])
            self.device_id = None
            return self._build()

    def _build(self):
        pipe = _pipeline(device_id=self.device_id, **self._args)
        pipe.build()
        return pipe

    @property
    def kind(self) -> str:
        return "dali-cpu" if self.device_id is None else "dali-gpu"

    def batches(self, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        pipe, self._pipe = self._pipe, None
        if pipe is None:  # a second pass over the same epoch: same seeds, same order
            pipe = self._build()
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
        return _in_background(self._produce(iterator, pipe, skip), PREFETCH)

    def _produce(self, iterator, pipe, skip: int) -> Generator[dict[str, torch.Tensor], None, None]:
        try:
            for i in range(self.n_batches):
                out = self._next(iterator, i)
                if out is None:
                    break
                if i < skip:
                    continue
                # Copies, now: the tensors are views of DALI's buffers, which the next run reuses (and an error
                # frees), while this batch waits in the queue for the training loop.
                pixels, raw = out[0]["pixels"].clone(), out[0]["json"].numpy().copy()
                del out
                yield self._assemble(i, pixels, raw)
        finally:
            del iterator, pipe  # the pipeline's threads and buffers go with the epoch

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
        return sharding.DataError(
            f"{self.folder.folder}: DALI failed on batch {index} of this rank ({reason}); its images passed the "
            "integrity check: try data.loader=torch, which names and skips undecodable samples"
        )

    def _assemble(self, index: int, pixels: torch.Tensor, rows: np.ndarray) -> dict[str, torch.Tensor]:
        metas = []
        for j in range(rows.shape[0]):
            position = index * self.batch_size + j
            if not self.train and position >= self.n_real:
                metas.append(None)  # evaluation padding: past this rank's own samples
                continue
            where = f"{self.folder.folder}: batch {index}, row {j}"
            metas.append(contract.parse_json(np.trim_zeros(rows[j], "b").tobytes(), where))
        return contract.assemble(pixels, metas, self.tokenizer, self.n_answers, evaluation=not self.train)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


def _in_background(items: Generator[T, None, None], depth: int) -> Iterator[T]:
    """Yield `items`, produced by a thread up to `depth` ahead; an error in the thread is raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x: object) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(_Failure(exc))
        finally:
            items.close()  # releases the DALI iterator and pipeline when the consumer stops early

    thread = threading.Thread(target=work, name="dali-host-batches", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


def _current_cuda_device() -> int:
    # Device 0 when torch sees no GPU: the build then fails and the CPU mode takes over.
    return torch.cuda.current_device() if torch.cuda.is_available() else 0
