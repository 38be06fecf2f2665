"""A checkpoint's contents against its COMPLETE marker: a content hash per file, written with the marker and checked
before a resume.

Sizes (trainer/checkpoint_layout.py `is_complete`) catch a file lost or cut short; a hash also catches bytes that
changed at the same size (a bad disk block, a copy that wrote garbage, a file edited by hand), which would otherwise
be resumed as if intact. SHA-256: on CPUs with the SHA extensions it is the fastest of hashlib's strong hashes
(docs/performance.md, "Figures behind choices in the code"). Files are read in 4 MiB chunks by a thread pool: hashlib
releases the interpreter lock while it
hashes, so a checkpoint of several files (one per rank and kind) uses every core.

The marker keeps `files` (name -> size, which markers have held since before hashes) and adds `sha256`
(name -> hex digest); a marker without `sha256` (written before hashes existed) is checked by size only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

HASH = "sha256"
CHUNK = 4 << 20  # bytes read per hash update: large enough that reading and hashing dominate the loop


class Verdict(NamedTuple):
    """What checking a checkpoint's files against its marker found: `problem` (None when intact), and whether
    the marker had hashes to check (False: sizes only, an older marker)."""

    problem: str | None
    hashed: bool


def file_digest(path: Path) -> str:
    h = hashlib.new(HASH)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def digests(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """Relative file name -> hex digest, for the files `names` under `folder`, hashed in parallel."""
    names = list(names)
    workers = max(1, min(len(names), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(lambda n: file_digest(folder / n), names), strict=True))


def check_files(folder: Path, marker: Mapping[str, Any], *, hashes: bool = True) -> Verdict:
    """Every file `marker` lists under `folder`, with its size and (where the marker has them and `hashes`) its
    digest; the first difference found, as words."""
    sizes = marker.get("files")
    if not isinstance(sizes, dict):
        return Verdict(None, False)  # a marker from before the file list: it vouches for the folder as it is
    for name, size in sizes.items():
        try:
            actual = (folder / name).stat().st_size
        except OSError:
            return Verdict(f"{name} is missing", False)
        if actual != size:
            return Verdict(f"{name} has {actual} bytes, its marker says {size}", False)
    recorded = marker.get(HASH)
    if not isinstance(recorded, dict) or not hashes:
        return Verdict(None, False)
    try:
        found = digests(folder, recorded)
    except OSError as exc:
        return Verdict(f"cannot be read ({exc.strerror or exc})", True)
    for name, digest in recorded.items():
        if found[name] != digest:
            return Verdict(f"{name} differs from its {HASH} in the marker (same size, other bytes)", True)
    return Verdict(None, True)
