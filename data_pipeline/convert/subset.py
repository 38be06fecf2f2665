"""A fixed subset of a shard folder, written as a shard folder of its own (manifest, answers, tars, indexes).

    python -m data_pipeline.convert subset --source data/easy-vqa/test --count 500 --out data/easy-vqa/test-500

`count` questions are drawn from the source folder with `random.Random(seed)` from its question ids in increasing
order, and written in increasing question id over `shards` balanced shards, each sample's components copied byte
for byte from the source tar. The same source, count, seed and shard count give byte-identical files, manifest
included: the manifest records the source's manifest digest instead of a creation time. Validating on such a folder
during training (`--val-data`) scores every evaluation on the same questions, at a fraction of the whole split's cost.

The folder is written as a conversion writes one: tars and indexes atomically, answers.json, then manifest.json last;
a finished folder is refused unless `overwrite`. Its manifest carries a `subset` record (`of`, `of_manifest_sha256`,
`of_samples`, `count`, `seed`, `question_ids_sha256`) that `subset_record` reads back.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import atomic
from data_pipeline.convert.build import ConversionError, clear_output, is_finished
from data_pipeline.shards import format as shards
from data_pipeline.shards import storage
from data_pipeline.shards.sharding import open_folder, read_index


@dataclass
class SubsetSummary:
    out: Path
    count: int
    of: int
    shards: int
    seconds: float

    def line(self) -> str:
        return (
            f"subset: {self.count} of {self.of} questions written in {self.shards} shards "
            f"({self.seconds:.1f} s) -> {self.out}"
        )


def select(question_ids: list[int], count: int, seed: int) -> list[int]:
    """The `count` question ids of the subset, in increasing order (a seeded draw from the sorted ids)."""
    ordered = sorted(question_ids)
    if not 1 <= count <= len(ordered):
        raise ConversionError(f"--count {count}: must be between 1 and the source's {len(ordered)} questions")
    return sorted(random.Random(seed).sample(ordered, count))


def subset_record(folder: str | Path) -> dict[str, Any] | None:
    """The `subset` record of a finished subset folder; None where the folder holds no finished subset."""
    path = Path(folder) / shards.MANIFEST
    if not path.is_file():
        return None
    record = json.loads(path.read_text()).get("subset")
    return record if isinstance(record, dict) else None


def _locate(source: Path) -> tuple[dict[str, Any], dict[int, tuple[Path, str, dict[str, tuple[int, int]]]]]:
    """The source's manifest and, per question id, (tar, sample key, index entry)."""
    folder = open_folder(source)
    where: dict[int, tuple[Path, str, dict[str, tuple[int, int]]]] = {}
    for shard in folder.shards:
        keys = shards.read_index_keys(shard.index)
        with open(shard.tar, "rb") as f:
            for key, entry in zip(keys, read_index(shard), strict=True):
                if "json" not in entry:
                    raise ConversionError(f"{shard.index}: sample {key} has no json component")
                offset, size = entry["json"]
                f.seek(offset)
                qid = int(json.loads(f.read(size))["question_id"])
                if qid in where:
                    raise ConversionError(f"{source}: question {qid} appears twice")
                where[qid] = (shard.tar, key, entry)
    return folder.manifest, where


def _write_shards(
    out: Path,
    chosen: list[int],
    where: dict[int, tuple[Path, str, dict[str, tuple[int, int]]]],
    n_shards: int,
) -> list[dict[str, Any]]:
    """The chosen samples in increasing question id over `n_shards` balanced shards; their manifest entries."""
    records, start = [], 0
    base, extra = divmod(len(chosen), n_shards)
    for i in range(n_shards):
        members = chosen[start : start + base + (1 if i < extra else 0)]
        start += len(members)
        name = shards.shard_name(i)
        tar, idx = out / f"{name}.tar", out / f"{name}.idx"
        samples = []
        for qid in members:
            src_tar, key, entry = where[qid]
            samples.append(
                (key, {ext: shards.read_component(src_tar, o, n) for ext, (o, n) in entry.items()})
            )
        n = shards.write_shard(tar, idx, samples)
        records.append(
            {
                "tar": tar.name,
                "index": idx.name,
                "samples": n,
                "bytes": tar.stat().st_size,
                "sha256": shards.file_sha256(tar),
                "index_sha256": shards.file_sha256(idx),
            }
        )
    return records


def _local(where: str | Path) -> Path:
    """A subset is made from local files by byte offsets: a folder in object storage is refused with one line."""
    if storage.is_remote(where):
        raise ConversionError(
            f"{where}: convert subset reads and writes local folders only: copy the folder to local disk first "
            "(e.g. aws s3 sync URL DIR), then upload the subset"
        )
    return Path(where)


def write_subset(
    source: str | Path,
    out: str | Path,
    *,
    count: int,
    seed: int = 0,
    n_shards: int = 1,
    overwrite: bool = False,
    command: str = "",
) -> SubsetSummary:
    """Write the subset folder (module docstring); returns its summary."""
    t0 = time.perf_counter()
    source, out = _local(source), _local(out)
    if n_shards < 1:
        raise ConversionError(f"--shards must be >= 1, got {n_shards}")
    if out.resolve() == source.resolve():
        raise ConversionError(f"{out}: the subset cannot be written into its source folder")
    if is_finished(out):
        if not overwrite:
            raise ConversionError(
                f"{out}: already holds a finished shard folder ({shards.MANIFEST}); pass --overwrite to replace it"
            )
        clear_output(out)
    manifest, where = _locate(source)
    chosen = select(list(where), count, seed)
    if n_shards > count:
        raise ConversionError(f"--shards {n_shards}: more shards than the {count} questions of the subset")
    out.mkdir(parents=True, exist_ok=True)
    shards.remove_temporaries(out)
    records = _write_shards(out, chosen, where, n_shards)
    atomic.write_bytes(out / shards.ANSWERS, (source / shards.ANSWERS).read_bytes())
    record = {
        "of": str(source),
        "of_manifest_sha256": shards.file_sha256(source / shards.MANIFEST),
        "of_samples": len(where),
        "count": count,
        "seed": seed,
        "question_ids_sha256": hashlib.sha256(json.dumps(chosen).encode()).hexdigest(),
    }
    totals = {"questions": count, "samples": sum(r["samples"] for r in records), "rejected": 0}
    totals |= {"shards": len(records), "bytes": sum(r["bytes"] for r in records)}
    atomic.write_json(
        out / shards.MANIFEST,
        {
            "format": shards.FORMAT_NAME,
            "version": shards.FORMAT_VERSION,
            "source": manifest.get("source"),
            "split": manifest.get("split"),
            "command": command,
            "inputs": {"subset_of": str(source)},
            "settings": {"shard_size": -(-count // n_shards), "seed": seed},
            "answers": manifest.get("answers"),
            "has_answers": manifest.get("has_answers", True),
            "totals": totals,
            "shards": records,
            "rejected": [],
            "subset": record,
        },
    )
    return SubsetSummary(out, count, len(where), len(records), time.perf_counter() - t0)
