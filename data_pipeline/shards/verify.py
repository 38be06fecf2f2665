"""`python -m data_pipeline.shards.verify DIR`: is a shard folder exactly what its converter wrote?

Checks, shard by shard: the tar and index exist and have the manifest's size; their sha256 digests match the
manifest's (a copy cut short, a bad disk or a flipped bit shows here even where the image still decodes); the index
agrees with the tar (as many samples as the manifest counts, every component inside the tar, the index's member list
equal to the tar's own); and, unless --no-decode, every image decodes. One line per problem, naming the shard (and
the sample key where one is to blame), then a summary. Exit status 0 when the folder is intact, 2 when it is not.

A folder converted before digests were recorded is checked for everything else and says so.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from common.progress import progress_bar
from data_pipeline.shards import format as shards
from data_pipeline.shards import storage
from data_pipeline.shards.sharding import DataError, read_manifest


def check_shard(folder: Path, entry: dict[str, Any], decode: bool) -> list[str]:
    """The problems of one manifest shard entry, as one-line messages (empty when the shard is intact)."""
    tar, idx = folder / entry["tar"], folder / entry["index"]
    problems = [f"{p}: missing" for p in (tar, idx) if not p.is_file()]
    if problems:
        return problems
    if tar.stat().st_size != entry["bytes"]:
        problems.append(f"{tar}: {tar.stat().st_size} bytes, the manifest records {entry['bytes']}")
    for path, key in ((tar, "sha256"), (idx, "index_sha256")):
        if key in entry and shards.file_sha256(path) != entry[key]:
            problems.append(f"{path}: sha256 differs from the manifest's (the file changed after conversion)")
    try:
        index = shards.read_index(idx)
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        return [*problems, f"{idx}: not a readable DALI index ({str(exc).splitlines()[0]})"]
    if len(index) != entry["samples"]:
        problems.append(f"{idx}: {len(index)} samples, the manifest counts {entry['samples']}")
    size = tar.stat().st_size
    keys = shards.read_index_keys(idx)
    outside = [
        k for k, comps in zip(keys, index, strict=False) if any(o + n > size for o, n in comps.values())
    ]
    if outside:
        problems.append(f"{idx}: {len(outside)} samples point past the end of the tar (first: {outside[0]})")
    try:
        if shards.index_lines(tar) != _index_body(idx):
            problems.append(f"{idx}: does not match the tar's own members (re-index or re-convert the shard)")
    except Exception as exc:  # noqa: BLE001 - a tar that cannot be walked is damaged, whatever the reason
        problems.append(f"{tar}: not a readable tar ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        return problems
    if decode and not outside:
        problems += _undecodable(tar, keys, index)
    return problems


def _index_body(idx: Path) -> list[str]:
    with open(idx) as f:
        f.readline()
        return [line.rstrip("\n") for line in f if line.strip()]


def _undecodable(tar: Path, keys: list[str], index: list[dict[str, tuple[int, int]]]) -> list[str]:
    bad = []
    with open(tar, "rb") as f:
        for key, comps in zip(keys, index, strict=True):
            for ext in ("jpg", "png"):
                if ext not in comps:
                    continue
                offset, n = comps[ext]
                f.seek(offset)
                try:
                    with Image.open(io.BytesIO(f.read(n))) as im:
                        im.load()
                except Exception as exc:  # noqa: BLE001 - any decode failure is the finding
                    bad.append(f"{tar}: sample {key}: image does not decode ({type(exc).__name__}: {exc})")
    return bad


def _check(task: tuple[str, dict[str, Any], bool]) -> tuple[str, list[str]]:
    folder, entry, decode = task
    return entry["tar"], check_shard(Path(folder), entry, decode)


def _mapped(fn: Callable, tasks: list, workers: int) -> Iterator:
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        yield from pool.map(fn, tasks)


def verify(
    folder: Path, *, decode: bool = True, workers: int = 1, progress: bool = False
) -> tuple[list[str], str]:
    """All problems of the folder, and a summary line."""
    manifest = read_manifest(folder)
    entries = manifest["shards"]
    digests = sum("sha256" in e for e in entries)
    tasks = [(str(folder), e, decode) for e in entries]
    problems: list[str] = []
    for _, found in progress_bar(
        progress, iterable=_mapped(_check, tasks, workers), total=len(tasks), unit="shard"
    ):
        problems += found
    checked = "sizes, digests, index" if digests == len(entries) else "sizes, index (no digests recorded)"
    summary = (
        f"{folder}: {len(entries)} shards, {sum(e['samples'] for e in entries)} samples; checked {checked}"
        + (", every image decoded" if decode else "")
        + (f": {len(problems)} problem(s)" if problems else ": intact")
    )
    return problems, summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.shards.verify",
        description="Check a shard folder against its manifest: sizes, sha256 digests, index consistency and (unless "
        "--no-decode) that every image decodes. Exit 0 when intact, 2 when not.",
    )
    p.add_argument("folder", metavar="DIR", help="a shard folder written by python -m data_pipeline.convert")
    p.add_argument(
        "--no-decode", dest="decode", action="store_false", help="skip decoding the images (faster)"
    )
    p.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes (default: up to 8 cores)"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    try:
        folder = storage.require_local(args.folder, "python -m data_pipeline.shards.verify")
        problems, summary = verify(folder, decode=args.decode, workers=args.workers, progress=args.progress)
    except (DataError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    print(summary)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
