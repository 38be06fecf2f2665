"""The on-disk format of a shard folder: WebDataset tar shards, their DALI index files, and atomic side files.

A shard folder holds `shard-NNNNNN.tar` (WebDataset: one `<key>.jpg` and one `<key>.json` per sample, in that
order), `shard-NNNNNN.idx` (DALI's webdataset index, the format `wds2idx` writes), `answers.json` (the answer
list: index -> answer string) and `manifest.json` (written last: its presence means the folder is finished).

Every file is written atomically (`common.atomic`: a temporary name, then `os.replace`), so that an
interrupted conversion never leaves a half-written file under a final name: a `.tar` that exists is a complete one.
Tar members get fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same input gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

from common import atomic

INDEX_VERSION = "v1.2"
MANIFEST = "manifest.json"
ANSWERS = "answers.json"
FORMAT_NAME = "vqa-align-webdataset"
FORMAT_VERSION = 1


def shard_name(number: int) -> str:
    return f"shard-{number:06d}"


def sample_key(question_id: int) -> str:
    # Keys must not contain dots (WebDataset and DALI split the extension at the first dot of the file name).
    return f"{question_id:012d}"


def remove_temporaries(folder: Path) -> int:
    """Delete the leftovers of an interrupted write (`*.tmp-<pid>`); returns how many were removed."""
    removed = 0
    for p in folder.glob(atomic.TEMP_GLOB):
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_shard(
    tar_path: str | Path, idx_path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]]
) -> int:
    """Write (key, {ext: bytes}) samples into a tar and its DALI index, each atomically; returns the sample count.

    Components are written in the order of each dict (the converter puts `jpg` before `json`). The index is
    computed while writing (the offsets are known), not by reading the tar back; it equals `wds2idx`'s output.
    """
    tar_path, idx_path = Path(tar_path), Path(idx_path)
    lines = []
    with atomic.open_atomic(tar_path) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, components in samples:
                if "." in key or "/" in key:
                    raise ValueError(f"sample key '{key}' must not contain '.' or '/'")
                parts = []
                for ext, data in components.items():
                    name = f"{key}.{ext}"
                    tar.addfile(_member(name, len(data)), io.BytesIO(data))
                    # After addfile, tar.offset is past the data's 512-byte padding: step back over it.
                    offset = tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    parts.append(f"{ext} {offset} {len(data)} {name}")
                lines.append(" ".join(parts))
        if not lines:
            # Raised inside the block: the temporary tar is removed and nothing is renamed into place.
            raise ValueError(f"{tar_path}: no samples to write")
        # Index first, then the tar (renamed into place as this block ends): a tar under its final name always has
        # its index beside it.
        atomic.write_bytes(idx_path, _index_text(lines).encode())
    return len(lines)


def _index_text(lines: list[str]) -> str:
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def index_lines(tar_path: str | Path) -> list[str]:
    """DALI index lines of a tar: one line per sample, `ext offset size name` per component (as `wds2idx`)."""
    samples: list[list[str]] = []
    last_base = None
    with tarfile.open(tar_path, mode="r:") as tar:
        for m in tar:
            if not m.isreg():
                continue
            name = m.name
            slash = name.rfind("/")
            dot = name.find(".", slash + 1)
            base, ext = (name[:dot], name[dot + 1 :]) if dot >= 0 else (name, "")
            if not base or base.endswith("/"):
                continue  # hidden files, as wds2idx
            component = f"{ext} {m.offset_data} {m.size} {name}"
            if base != last_base:
                samples.append([component])
                last_base = base
            else:
                samples[-1].append(component)
    return [" ".join(s) for s in samples]


def read_index(idx_path: str | Path) -> list[dict[str, tuple[int, int]]]:
    """Parse a DALI index file: per sample, {ext: (data offset, size)}."""
    with open(idx_path) as f:
        return parse_index(f, idx_path)


def parse_index(lines: Iterable[str], name: str | Path) -> list[dict[str, tuple[int, int]]]:
    """Parse the lines of a DALI index (a file, or text fetched from object storage); `name` is for errors."""
    it = iter(lines)
    header = next(it, "").split()
    if len(header) != 2 or header[0] != INDEX_VERSION:
        raise ValueError(f"{name}: not a DALI {INDEX_VERSION} index (header {' '.join(header)!r})")
    out = []
    for line in it:
        fields = line.split()
        out.append({fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)})
    if len(out) != int(header[1]):
        raise ValueError(f"{name}: header says {header[1]} samples, found {len(out)}")
    return out


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (shards run to hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_component(tar_path: str | Path, offset: int, size: int) -> bytes:
    with open(tar_path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def read_index_keys(idx_path: str | Path) -> list[str]:
    """The sample key of every index line (the member name before its first dot), to name samples in errors."""
    with open(idx_path) as f:
        f.readline()
        return [line.split()[3].split(".", 1)[0] for line in f if line.strip()]
