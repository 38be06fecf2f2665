"""Atomic file writes: a reader sees a file's old content or its new content, never a torn one.

Every file the project writes for another process or a later run to read (shards and their side files, tokenizer
files, checkpoint side files, evaluation results, comparison reports) goes through this module: the content is
written to a temporary file beside the target, flushed to disk, and renamed over the target with `os.replace`
(atomic on POSIX within one file system). A write that fails (a full disk) removes its temporary file; one that is
killed leaves `.<name>.tmp-<pid>`, which folder listings skip (a leading dot) and `TEMP_GLOB` finds for clean-up.

It lives in `common`, so that the data pipeline and the trainer share it without either importing the other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_GLOB = "*.tmp-*"
"""Matches the temporary files of interrupted writes (`Path.glob` matches names with a leading dot too)."""


def temp_path(path: Path) -> Path:
    """The temporary name `path` is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; when the block ends without an error, that file replaces `path`.

    For writers that take a file name (torch.save, whose zip writer reports a full disk in its own words); otherwise
    prefer `open_atomic`, which also syncs the data to disk before the rename."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a write that failed leaves no temporary file behind


@contextmanager
def open_atomic(path: str | Path, mode: str = "wb", *, fsync: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; it replaces `path` when the block ends without an error.

    `fsync=False` skips the sync to disk, for intermediate files that a crash would have the writer redo anyway."""
    with replacing(path) as tmp, open(tmp, mode) as f:
        yield f
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    with open_atomic(path, "wb", fsync=fsync) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    """`obj` as UTF-8 JSON (non-ASCII characters kept as they are) with a final newline."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)`, atomically."""
    import torch  # here, not at the top: the data pipeline's conversion tools do not need torch

    with replacing(path) as tmp:
        torch.save(obj, tmp)
