"""`LoaderSpec`: how one rank reads a shard folder, in one typed value (what `build_loader` takes beside the folder).

The trainer builds one spec per run from its config (`train.micro_batch_size`, `model.image_size`, `data.*`) and
moves it from epoch to epoch with `at(epoch, skip_batches)`; the two loaders (DALI, PyTorch) read the fields they use
from it. Values are checked when the spec is made, each error naming its field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

# torch and the batch contract are imported where they are used: the trainer's config checks its data.* settings
# with `check_loader_settings` without loading torch.
if TYPE_CHECKING:
    import torch

    from data_pipeline.loaders import batch as contract
    from data_pipeline.loaders.questions import QuestionTable

KINDS = ("auto", "dali", "torch")
ON_SHORT_SHARD = ("error", "warn")
LOADER_SETTINGS = ("kind", "on_short_shard", "hw_decoder_load", "prefetch_depth", "host_workers")


def check_choice(name: str, value: str, choices: Sequence[str], error: type[Exception] = ValueError) -> None:
    """`error` with one line naming the setting `name` where `value` is not one of `choices`."""
    if value not in choices:
        raise error(f"{name}: '{value}' is not one of {', '.join(choices)}")


def check_loader_settings(
    values: Mapping[str, Any], names: Mapping[str, str] | None = None, error: type[Exception] = ValueError
) -> None:
    """The loader settings with a fixed set or range of values, for a LoaderSpec and for the trainer's config alike.
    `values`: LoaderSpec field -> value (any subset of kind, on_short_shard, hw_decoder_load, prefetch_depth,
    host_workers); each error is one line naming the setting as `names` calls it (the config's `data.*` fields),
    else by its LoaderSpec field."""
    names = names or {}

    def named(field: str) -> str:
        return names.get(field, field)

    for field, choices in (("kind", KINDS), ("on_short_shard", ON_SHORT_SHARD)):
        if field in values:
            check_choice(named(field), values[field], choices, error)
    if "hw_decoder_load" in values and not 0.0 <= values["hw_decoder_load"] <= 1.0:
        raise error(f"{named('hw_decoder_load')}: must be in [0, 1], got {values['hw_decoder_load']}")
    if "prefetch_depth" in values and not 1 <= values["prefetch_depth"] <= 8:
        raise error(f"{named('prefetch_depth')}: must be in 1..8, got {values['prefetch_depth']}")
    if "host_workers" in values and values["host_workers"] < 0:
        raise error(f"{named('host_workers')}: must be >= 0, got {values['host_workers']}")


@dataclass(frozen=True)
class LoaderSpec:
    tokenizer: contract.Tokenizer
    """A callable list[str] -> {"vilt_ids", "vilt_mask", "clip_ids"} (data_pipeline.text.QuestionTokenizer)."""
    batch_size: int
    """Samples per batch on this rank."""
    image_size: int
    """Square output resolution in pixels."""
    mean: Sequence[float]
    """3 values on the 0..1 scale (CLIP's for CLIP variants, (0.5,) * 3 for ViLT)."""
    std: Sequence[float]
    """3 positive values on the 0..1 scale."""
    train: bool
    """Training (seeded shuffle, the last partial batch dropped) or evaluation (every sample once, padded)."""
    seed: int = 0
    """Seed of the shard order and the within-rank shuffle."""
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    skip_batches: int = 0
    """Batches of this epoch already consumed (the resume point)."""
    resume_state: bytes | None = None
    """What `VQALoader.state(skip_batches)` returned when this position was saved (None: none saved). DALI restores
    its reader from it instead of decoding the skipped batches, where it was saved for this same reading."""
    kind: str = "auto"
    """auto (DALI on the GPU, else DALI on the CPU, else torch when DALI is not installed), dali, or torch."""
    num_workers: int = 2
    """DataLoader workers (torch) or DALI CPU threads."""
    shuffle_buffer: int = 1000
    """Samples held for shuffling when training (DALI's initial_fill; <= 1 disables the within-epoch shuffle)."""
    device: torch.device | None = None
    """Where DALI's GPU decoder runs (None = the current CUDA device; torch.device("cpu") = DALI's CPU mode)."""
    on_short_shard: str = "error"
    """torch loader, a tar shorter than its index: error (a DataError naming the tar) or warn (log it, read on)."""
    host_workers: int = 0
    """DALI loader: processes that parse and tokenise batches (data_pipeline/loaders/host_pool.py); 0 = a thread of this one.
    Not used with `questions`, whose batches take array operations only."""
    hw_decoder_load: float = 0.65
    """dali-gpu: share of JPEGs sent to the hardware JPEG decoder (A100/H100/H200) rather than nvJPEG's CUDA path."""
    prefetch_depth: int = 2
    """DALI's prefetch queue depth (batches its pipeline runs ahead), 1..8."""
    questions: QuestionTable | None = None
    """The folder's tokens and targets computed once (data_pipeline/loaders/questions.py): both loaders gather each batch's
    fields from it instead of tokenising; None = tokenise every batch with `tokenizer`. Built for the folder read."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.image_size < 1:
            raise ValueError(
                f"batch_size and image_size must be >= 1, got {self.batch_size} and {self.image_size}"
            )
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {self.rank} of {self.world_size}")
        check_loader_settings({field: getattr(self, field) for field in LOADER_SETTINGS})
        if self.skip_batches < 0 or self.num_workers < 0:
            raise ValueError(
                f"skip_batches and num_workers must be >= 0, got {self.skip_batches} and {self.num_workers}"
            )
        from data_pipeline.loaders.batch import normalisation

        normalisation(self.mean, self.std)  # 3 values each, std > 0

    def at(self, epoch: int, skip_batches: int = 0, resume_state: bytes | None = None) -> LoaderSpec:
        """The same reading at another position: epoch `epoch`, its first `skip_batches` batches consumed (and the
        loader state saved there, if any)."""
        return replace(self, epoch=epoch, skip_batches=skip_batches, resume_state=resume_state)

    @property
    def normalisation(self) -> tuple[list[float], list[float]]:
        """Mean and std on the 0..255 scale, as both loaders apply them."""
        from data_pipeline.loaders.batch import normalisation

        return normalisation(self.mean, self.std)
