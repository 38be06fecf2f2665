"""What a conversion is asked to do (`BuildSpec`, made by a reader: data_pipeline/convert/vqa2.py, easyvqa.py), the samples it
may write (`Candidate`), what it did (`Summary`), and its error (`ConversionError`); data_pipeline/convert/build.py does it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import BadInputError
from data_pipeline.convert.images import JPEG_QUALITY

CHROMA_SUBSAMPLING = {"4:4:4": 0, "4:2:0": 2}  # PIL's `subsampling` values

DEFAULT_SHARD_SIZE = 1000


class ConversionError(BadInputError):
    """Bad input or a refused operation; the message is one line naming the file (and field) at fault."""


@dataclass
class Candidate:
    meta: dict[str, Any]
    """The sample json: question_id, image_id, question, answers, labels, scores (+ answer_type when known)."""
    image: str
    """Path of the source image file."""


@dataclass
class BuildSpec:
    out: Path
    source: str
    """Source data set name recorded in the manifest: vqa2 | easyvqa."""
    split: str
    candidates: list[Candidate]
    rejected: list[dict[str, Any]]
    """Questions the reader already left out: {question_id, image_id, reason}."""
    answers: list[str]
    answers_source: str
    has_answers: bool
    image_mode: str = "verbatim"
    """verbatim: store the source bytes (JPEG/PNG); jpeg: convert once to JPEG (easy-VQA's PNGs; any image_size)."""
    image_size: int | None = None
    """Store every image squashed to image_size x image_size (the loaders' bilinear squash), re-encoded as JPEG."""
    jpeg_quality: int = JPEG_QUALITY
    chroma_subsampling: str | None = None
    """Chroma of re-encoded JPEGs: 4:2:0 (half-resolution colour, as cameras store photos: smaller files, faster
    decoding) or 4:4:4. None: 4:4:4 for easy-VQA, whose flat colour shapes make colour half the task, 4:2:0 else."""
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    workers: int = 1
    strict: bool = False
    overwrite: bool = False
    progress: bool = True
    inputs: dict[str, Any] = field(default_factory=dict)
    """Input files and settings that define the output (manifest + resume fingerprint)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More manifest fields from the reader (e.g. questions filtered out on purpose)."""
    notes: list[str] = field(default_factory=list)
    """Input findings that are not rejections, appended to the summary line (e.g. unreferenced annotations)."""
    command: str = ""

    def __post_init__(self) -> None:
        if self.image_size is not None:
            if self.image_size < 1:
                raise ConversionError(f"--image-size must be >= 1, got {self.image_size}")
            self.image_mode = "jpeg"
        if self.chroma_subsampling is None:
            self.chroma_subsampling = "4:4:4" if self.source == "easyvqa" else "4:2:0"
        if self.chroma_subsampling not in CHROMA_SUBSAMPLING:
            raise ConversionError(
                f"--chroma-subsampling: '{self.chroma_subsampling}' is not one of {', '.join(CHROMA_SUBSAMPLING)}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise ConversionError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")


@dataclass
class Summary:
    out: Path
    split: str
    written: int
    rejected: list[dict[str, Any]]
    shards: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        text = f"{self.split}: {self.written} written in {self.shards} shards, {len(self.rejected)} rejected"
        if self.rejected:
            kinds = Counter(r["reason"].split(":", 1)[0] for r in self.rejected)
            text += ": " + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        text += "".join(f"; {note}" for note in self.notes)
        return text + f" ({self.seconds:.1f} s) -> {self.out}"
