"""A checkpoint's contents against its COMPLETE marker: a content hash per file, written with the marker and checked
before a resume.

Sizes (trainer/checkpoint/layout.py `is_complete`) catch a file lost or cut short; a hash also catches bytes that
changed at the same size (a bad disk block, a copy that wrote garbage, a file edited by hand), which would otherwise
be resumed as if intact. SHA-256: on CPUs with the SHA extensions it is the fastest of hashlib's strong hashes
(docs/performance.md, "Figures behind choices in the code"). Files are read in 4 MiB chunks by a thread pool: hashlib
releases the interpreter lock while it
hashes, so a checkpoint of several files (one per rank and kind) uses every core.

The marker holds `files` (name -> size) and `sha256` (name -> hex digest); a marker without both is no marker this
trainer wrote, and its folder counts as damaged.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HASH = "sha256"
CHUNK = 4 << 20  # bytes read per hash update: large enough that reading and hashing dominate the loop


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


def check_files(folder: Path, marker: Mapping[str, Any], *, hashes: bool = True) -> str | None:
    """Every file `marker` lists under `folder`, with its size and (with `hashes`) its digest; the first difference
    found, as words (None: intact)."""
    sizes, recorded = marker.get("files"), marker.get(HASH)
    if not isinstance(sizes, dict) or not isinstance(recorded, dict):
        return f"its marker lists no files with their sizes and {HASH} (not written by this trainer)"
    for name, size in sizes.items():
        try:
            actual = (folder / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, its marker says {size}"
    if not hashes:
        return None
    try:
        found = digests(folder, recorded)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    for name, digest in recorded.items():
        if found[name] != digest:
            return f"{name} differs from its {HASH} in the marker (same size, other bytes)"
    return None
