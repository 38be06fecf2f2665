"""A loader's saved position: DALI's pipeline checkpoint in an envelope that says which reading it belongs to.

DALI's checkpoint (`Pipeline.checkpoint()`, a few hundred bytes) holds the reader's position and its shuffle RNG and
restores them by fast-forwarding the reader, so a resumed epoch skips its consumed batches without reading or decoding
their images (the exact path runs the pipeline once per skipped batch). The checkpoint itself does not say which
shards, rank or batch size it was taken with; restoring one from another reading would silently give other batches.
So it is stored with the reading's key (the folder's shard list, epoch, position, rank, world size, batch size, seed,
shuffle buffer, DALI version) and used only when the resumed reading has the same key. Otherwise the loader resumes
by the exact path and says why: a different world size, say, has another per-rank order anyway.

Layout: one line of JSON (the key), a newline, then DALI's bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

MAGIC = "vqa-loader-state"


def folder_fingerprint(manifest: dict[str, Any]) -> str:
    """The identity of a shard folder's content as the reader sees it: the manifest's shard list (files, sample
    counts, sizes and, where recorded, digests)."""
    rows = json.dumps(manifest.get("shards", []), sort_keys=True)
    return hashlib.sha256(rows.encode()).hexdigest()[:24]


def pack(key: dict[str, Any], checkpoint: bytes) -> bytes:
    header = json.dumps({"format": MAGIC, **key}, sort_keys=True)
    return header.encode() + b"\n" + checkpoint


def unpack(blob: bytes, key: dict[str, Any]) -> tuple[bytes | None, str]:
    """(DALI's checkpoint, "") when `blob` was saved for exactly this reading, else (None, why not)."""
    head, sep, checkpoint = blob.partition(b"\n")
    try:
        saved = json.loads(head) if sep else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        saved = None
    if not isinstance(saved, dict) or saved.pop("format", None) != MAGIC:
        return None, "not a saved loader state"
    differ = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
    if differ:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {key.get(k)!r}" for k in differ)
        return None, f"saved for another reading ({shown})"
    return checkpoint, ""
