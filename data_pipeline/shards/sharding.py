"""Which samples each rank reads in an epoch, and how many batches it yields: shared by both loaders.

The folder's shards are concatenated (in a per-epoch seeded order when training, in file order for evaluation)
into one sequence of N samples, and rank r of W reads positions [N*r // W, N*(r+1) // W): exactly the split that
DALI's `fn.readers.webdataset(shard_id=r, num_shards=W)` makes, so both loaders give a rank the same samples, the
ranks never overlap, and any shard sizes work (a rank is not tied to whole tar files).

Batches per rank are the same on every rank (a rank that runs out early would hang the others in a collective):
- training: floor(N / (W * batch)), dropping the remainder (every rank has at least that many full batches);
- evaluation: ceil(ceil(N / W) / batch); positions past a rank's own samples are padding, marked `valid = 0`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import BadInputError
from data_pipeline.shards import format as shards
from data_pipeline.shards import storage


class DataError(BadInputError, ValueError):
    """A shard folder that cannot be read, or a setting it cannot serve; the message is one line naming it."""


@dataclass(frozen=True)
class Shard:
    tar: storage.Location  # a Path, or an ObjectPath (s3://...) for a folder in object storage
    index: storage.Location
    samples: int


@dataclass(frozen=True)
class ShardFolder:
    folder: storage.Location
    shards: tuple[Shard, ...]
    answers: list[str]
    manifest: dict[str, Any]

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)


def read_manifest(shards_dir: str | Path | storage.ObjectPath) -> dict[str, Any]:
    folder = storage.location(shards_dir)
    if isinstance(folder, Path) and not folder.is_dir():
        raise DataError(f"{folder}: no such shard folder")
    path = folder / shards.MANIFEST
    if not storage.exists(path):
        unfinished = isinstance(folder, Path) and (folder / ".work").is_dir()
        hint = " (an unfinished conversion: rerun it)" if unfinished else ""
        raise DataError(f"{folder}: not a finished shard folder, {shards.MANIFEST} is missing{hint}")
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != shards.FORMAT_NAME
        or "shards" not in manifest
    ):
        raise DataError(f"{path}: not a manifest written by data_pipeline.convert (field 'format'/'shards')")
    _check_shard_entries(manifest["shards"], path)
    return manifest


def _check_shard_entries(entries: Any, path: storage.Location) -> None:
    """Every shard entry names its tar and index and counts its samples: the loaders plan positions from them."""
    if not isinstance(entries, list):
        raise DataError(f"{path}: field 'shards' must be a list, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        where = f"{path}: shards[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
        for name, kind in (("tar", str), ("index", str), ("samples", int)):
            if name not in entry:
                raise DataError(f"{where}: missing field '{name}'")
            value = entry[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise DataError(
                    f"{where}: field '{name}' must be {kind.__name__}, got {type(value).__name__}"
                )
        if entry["samples"] < 0:
            raise DataError(f"{where}: field 'samples' must be >= 0, got {entry['samples']}")


def read_answers(shards_dir: str | Path | storage.ObjectPath) -> list[str]:
    folder = storage.location(shards_dir)
    path = folder / shards.ANSWERS
    if not storage.exists(path):
        raise DataError(f"{folder}: {shards.ANSWERS} is missing")
    try:
        answers = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({_json_reason(exc)})") from None
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers) or not answers:
        raise DataError(f"{path}: must be a non-empty JSON list of answer strings")
    return answers


def open_folder(shards_dir: str | Path | storage.ObjectPath) -> ShardFolder:
    """Read and check a finished shard folder (manifest, answers, every listed tar and index present)."""
    folder = storage.location(shards_dir)
    manifest = read_manifest(folder)
    # In object storage, one listing of the prefix instead of a request per file.
    present = storage.listing(folder) if isinstance(folder, storage.ObjectPath) else None
    found = []
    for entry in manifest["shards"]:
        tar, idx = folder / entry["tar"], folder / entry["index"]
        for p in (tar, idx):
            if not (p.is_file() if isinstance(p, Path) else p.name in (present or {})):
                raise DataError(f"{folder}: {p.name} is listed in {shards.MANIFEST} but missing")
        _check_size(folder, tar, entry, present)
        if entry["samples"] > 0:
            found.append(Shard(tar, idx, int(entry["samples"])))
    if not found:
        raise DataError(f"{folder}: the shard folder holds no samples")
    return ShardFolder(folder, tuple(found), read_answers(folder), manifest)


def _check_size(folder: Any, tar: Any, entry: dict[str, Any], present: dict[str, int] | None) -> None:
    """A tar whose size differs from the manifest's (a copy cut short, a file changed after conversion): named before
    any reader meets it mid-run. A stat per shard (one listing in object storage): cheap enough for every start."""
    expected = entry.get("bytes")
    if not isinstance(expected, int):
        return  # not recorded (an older folder): the loaders' own checks still apply
    actual = tar.stat().st_size if isinstance(tar, Path) else (present or {}).get(tar.name)
    if actual != expected:
        fix = (
            "upload the folder again (python -m data_pipeline.shards.verify checks the local copy first)"
            if storage.is_remote(folder)
            else f"check the folder with python -m data_pipeline.shards.verify {folder}"
        )
        raise DataError(
            f"{tar}: {actual} bytes, {shards.MANIFEST} records {expected} (cut short or changed after conversion): "
            + fix
        )


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (Python's hash() of ints is stable, but this reads plainly everywhere)."""
    digest = hashlib.sha256(json.dumps(list(parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def epoch_order(folder: ShardFolder, *, train: bool, seed: int, epoch: int) -> list[Shard]:
    """The order in which the shards are concatenated this epoch: seeded per epoch for training, file order else."""
    order = list(folder.shards)
    if train:
        random.Random(derive_seed(seed, epoch, 0x5AD)).shuffle(order)
    return order


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Positions [start, stop) of rank's samples: DALI's reader sharding formula."""
    return total * rank // world_size, total * (rank + 1) // world_size


def batches_per_rank(total: int, *, world_size: int, batch_size: int, train: bool) -> int:
    if train:
        return total // (world_size * batch_size)
    return math.ceil(math.ceil(total / world_size) / batch_size)


def check_fits(folder: ShardFolder, *, world_size: int, batch_size: int, train: bool) -> int:
    """Batches per rank, or a one-line error when the folder cannot give every rank a batch."""
    n = batches_per_rank(folder.total, world_size=world_size, batch_size=batch_size, train=train)
    if train and n == 0:
        raise DataError(
            f"{folder.folder}: {folder.total} samples cannot give each of {world_size} ranks one full batch of "
            f"{batch_size} (need at least {world_size * batch_size})"
        )
    if not train and folder.total < world_size:
        raise DataError(
            f"{folder.folder}: {folder.total} samples for {world_size} ranks: every rank needs one"
        )
    return n


def segments(order: list[Shard], start: int, stop: int) -> list[tuple[Shard, int, int]]:
    """The pieces (shard, first, last) of the concatenated sequence covering positions [start, stop)."""
    out, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + shard.samples)
        if lo < hi:
            out.append((shard, lo - offset, hi - offset))
        offset += shard.samples
        if offset >= stop:
            break
    return out


def worker_quotas(n_batches: int, workers: int) -> list[int]:
    """Batches per DataLoader worker: its k-th batch is the loader's batch k * workers + w (round-robin order)."""
    return [len(range(w, n_batches, workers)) for w in range(workers)]


def read_sample_info(shards_dir: str | Path) -> dict[int, dict[str, Any]]:
    """question_id -> the sample json (question, answers, answer_type, ...) of every sample in a folder.

    Reads only the json components through the index files; for the evaluator (answer types, raw answers for
    `answers.vqa_score`, question text in result files).
    """
    out: dict[int, dict[str, Any]] = {}
    for meta in iter_sample_json(open_folder(shards_dir)):
        out[int(meta["question_id"])] = meta
    return out


def _json_reason(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno} column {exc.colno}: {exc.msg}"
    return str(exc).splitlines()[0]


def read_index(shard: Shard) -> list[dict[str, tuple[int, int]]]:
    """A shard's index entries, or a one-line error naming the index file."""
    try:
        if isinstance(shard.index, Path):
            return shards.read_index(shard.index)
        return shards.parse_index(storage.read_text(shard.index).splitlines(), shard.index)
    except storage.StorageError:
        raise
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise DataError(f"{shard.index}: not a readable DALI index ({str(exc).splitlines()[0]})") from None


def iter_sample_json(folder: ShardFolder) -> Iterator[dict[str, Any]]:
    """Every sample json of a folder, read through the index files; a damaged shard is a one-line DataError."""
    for shard in folder.shards:
        spans = []
        for n, entry in enumerate(read_index(shard)):
            if "json" not in entry:
                raise DataError(f"{shard.index}: sample {n} has no json component")
            spans.append(entry["json"])
        # Ranged reads: seeks in a local file, concurrent range requests in object storage.
        for n, ((offset, size), raw) in enumerate(
            zip(spans, storage.read_ranges(shard.tar, spans), strict=True)
        ):
            if len(raw) < size:
                # The index points past the end of the tar: the file was cut short after conversion.
                raise DataError(
                    f"{shard.tar}: truncated: sample {n} of {shard.samples} lies past the end of the file "
                    f"(its index expects byte {offset + size}): convert the data again"
                )
            try:
                yield json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(
                    f"{shard.tar}: sample {n}: its json is damaged ({_json_reason(exc)}): convert the data again"
                ) from None


def check_image_size(shards_dir: str | Path, manifest: dict[str, Any], image_size: int) -> None:
    """Refuse a folder whose images were stored smaller than the training resolution (`--image-size` at conversion):
    the loaders would upsample them, silently training on blurred images."""
    stored = (manifest.get("settings") or {}).get("image_size")
    if stored is not None and int(stored) < image_size:
        raise DataError(
            f"{shards_dir}: images stored at {stored} x {stored} px (converted with --image-size {stored}) but "
            f"model.image_size is {image_size}: convert again with --image-size {image_size} (or larger, or without "
            f"it), or train at {stored}"
        )
