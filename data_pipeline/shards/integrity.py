"""A quick check that a shard's images are whole, run before DALI decodes them.

Why: DALI cannot skip an undecodable image, and its CPU decoder (DALI 2.4.0) does worse than fail: a decode error
while other samples are in flight (several batches ahead, or the same image twice in one padded evaluation batch)
crashes the process with a segmentation fault in DALI's own threads, before Python can report anything. The
converter decodes every image, so such an image means a shard damaged afterwards (a disk or copy error); this check
finds the common damage (an overwritten or cut-short file) and names the shard and sample instead.

The check reads only the first and last bytes of each image through the index (a JPEG starts with SOI and ends
with EOI within its last few KiB; a PNG starts with its signature and ends with IEND). An image that fails it is
decoded with PIL before it is declared damaged, so an unusual but valid file is never refused. Each shard is
checked once per process (keyed by path, size and modification time).

Shards in object storage (s3://) get only the cheap part: the object's size against the end of its index (a cut-short
upload), one HEAD and one index read per shard. The byte checks are skipped there, with one log line, because they
would cost two range requests per image on every rank at every start (about 900,000 for VQA v2's training split);
check a folder with `python -m data_pipeline.shards.verify` before uploading it instead.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
from collections.abc import Iterable

from PIL import Image

from data_pipeline.shards import format as shards
from data_pipeline.shards import storage
from data_pipeline.shards.sharding import DataError, Shard, read_index

log = logging.getLogger(__name__)

_JPEG_START, _JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
_PNG_START, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND"
TAIL = 4096  # bytes searched for the end marker: room for trailing metadata some writers leave after EOI
_checked: set[tuple[str, int, int]] = set()


def _looks_whole(view: mmap.mmap, offset: int, size: int) -> bool:
    head = view[offset : offset + 8]
    tail = view[max(offset, offset + size - TAIL) : offset + size]
    if head.startswith(_JPEG_START):
        return _JPEG_END in tail
    if head.startswith(_PNG_START):
        return _PNG_END in tail
    return False


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception:  # any failure to decode: the image is damaged
        return False
    return True


def _describe(data: bytes) -> str:
    if not data.startswith((_JPEG_START, _PNG_START)):
        return f"not a JPEG or PNG (starts with {data[:4].hex(' ')})"
    return "cut short or overwritten (no end-of-image marker, and it does not decode)"


def check_shard(shard: Shard) -> None:
    """Raise a one-line DataError naming the shard and sample key of the first damaged image in `shard`."""
    if isinstance(shard.tar, storage.ObjectPath):
        _check_object_size(shard)
        return
    stat = os.stat(shard.tar)
    token = (str(shard.tar), stat.st_size, stat.st_mtime_ns)
    if token in _checked:
        return
    entries = read_index(shard)
    if stat.st_size == 0:
        raise DataError(f"{shard.tar}: the file is empty: convert the data again")
    with open(shard.tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        for n, entry in enumerate(entries):
            offset, size = entry.get("jpg", (0, 0))
            if offset + size > stat.st_size:
                raise DataError(
                    f"{shard.tar}: truncated: sample {_key(shard, n)} lies past the end of the file "
                    f"({stat.st_size} bytes, its index expects {offset + size}): convert the data again"
                )
            if _looks_whole(view, offset, size) or _decodes(view[offset : offset + size]):
                continue
            raise DataError(
                f"{shard.tar}: sample {_key(shard, n)}: damaged image, {_describe(view[offset : offset + 8])}; "
                "DALI cannot skip it: convert the data again (data.loader=torch skips such samples)"
            )
    _checked.add(token)


def _check_object_size(shard: Shard) -> None:
    """A shard in object storage: its size must cover every sample its index lists (see the module docstring)."""
    size = storage.size(shard.tar)
    token = (str(shard.tar), size, 0)
    if token in _checked:
        return
    folder = str(shard.tar).rsplit("/", 1)[0]
    if (folder, -1, -1) not in _checked:
        _checked.add((folder, -1, -1))
        log.info(
            "integrity: %s is in object storage: image bytes are not pre-checked there (sizes only); "
            "run python -m data_pipeline.shards.verify on the folder before uploading it",
            folder,
        )
    for n, entry in enumerate(read_index(shard)):
        end = max((offset + length for offset, length in entry.values()), default=0)
        if end > size:
            raise DataError(
                f"{shard.tar}: truncated: sample {n} lies past the end of the object ({size} bytes, its index "
                f"expects {end}): upload the folder again"
            )
    _checked.add(token)


def _key(shard: Shard, n: int) -> str:
    return shards.read_index_keys(shard.index)[n]


def check_shards(used: Iterable[Shard]) -> None:
    for shard in dict.fromkeys(used):  # each once, in order
        check_shard(shard)
