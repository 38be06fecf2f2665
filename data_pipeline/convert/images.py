"""Image checks at conversion time, easy-VQA's one-time PNG -> JPEG conversion, and the one orientation rule.

Every image is fully decoded before it goes into a shard because DALI's decoder aborts the whole pipeline on one
bad JPEG (measured; by design upstream): a shard must only hold images that decode. The functions here run in
worker processes (multiprocessing), take and return plain picklable values, and never raise on bad input: they
return a reason instead ("kind: detail", e.g. "undecodable image: x.jpg: image file is truncated"), which the
converter lists in the manifest and groups by kind in its summary.

Orientation: an image is used as it is meant to be seen, its EXIF orientation tag applied (as browsers do). DALI's
decoder applies the tag itself (`fn.decoders.image`, adjust_orientation=True: the same pixels as PIL's
`ImageOps.exif_transpose`, docs/data_pipeline.md, "Orientation"); every PIL path (the PyTorch loader,
trainer/serve/predict.py, the conversion here) goes through `upright_rgb`. A file stored verbatim keeps its tag, which the
loaders apply; a re-encoded file (`convert_to_jpeg`) is written upright without EXIF, so that nothing rotates it
twice.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from common import atomic

# Formats stored verbatim. DALI's decoders (CPU and nvJPEG-backed mixed) take both; GPU decoding is JPEG's.
VERBATIM_FORMATS = ("JPEG", "PNG")
JPEG_QUALITY = 95


EXIF_ORIENTATION = 0x0112
# Orientations 5-8 turn the picture by a quarter: width and height swap.
_QUARTER_TURNS = (5, 6, 7, 8)


def orientation(im: Image.Image) -> int:
    """The image's EXIF orientation (1, the default, when it has none)."""
    value = im.getexif().get(EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) else 1


def upright_rgb(im: Image.Image) -> Image.Image:
    """`im` as it is meant to be seen, in RGB: its EXIF orientation applied (the module docstring), as DALI does."""
    if orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    return im.convert("RGB")


@dataclass(frozen=True)
class CheckResult:
    path: str
    ok: bool
    reason: str = ""
    output: str = ""  # the file that goes into the shard: the source itself, or the converted JPEG
    width: int = 0
    height: int = 0


def _decode(data: bytes) -> tuple[Image.Image, str]:
    im = Image.open(io.BytesIO(data))
    fmt = im.format or "unknown"
    im.load()  # a full decode: truncated data raises here ("image file is truncated")
    return im, fmt


def _failure(path: str, exc: Exception) -> CheckResult:
    msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    return CheckResult(path, False, f"undecodable image: {Path(path).name}: {msg}")


def check_image(path: str) -> CheckResult:
    """Decode `path` fully; ok when it is a JPEG or PNG that decodes. The file is kept as it is."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return CheckResult(path, False, f"image missing: {path}")
    except OSError as exc:
        return CheckResult(path, False, f"unreadable image: {path}: {exc.strerror or exc}")
    if not data:
        return CheckResult(path, False, f"undecodable image: {Path(path).name}: empty file")
    try:
        im, fmt = _decode(data)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return _failure(path, exc)
    if fmt not in VERBATIM_FORMATS:
        return CheckResult(
            path, False, f"unsupported image format: {Path(path).name} is {fmt} (JPEG or PNG only)"
        )
    # The size as the loaders see it, the tag applied (the file keeps its tag: DALI and PIL apply it).
    w, h = (im.height, im.width) if orientation(im) in _QUARTER_TURNS else (im.width, im.height)
    return CheckResult(path, True, output=path, width=w, height=h)


def convert_to_jpeg(task: tuple[str, str, int | None, int, int]) -> CheckResult:
    """(source, destination, size, quality, subsampling): decode `source` (any format PIL reads), squash it to
    size x size when a size is given, write it as an RGB JPEG of that quality and chroma subsampling (PIL's: 0 = 4:4:4,
    2 = 4:2:0; BuildSpec.chroma_subsampling) to `destination`.

    The squash is the loaders' (data_pipeline/loaders/torch_loader.py, trainer/serve/predict.py: upright RGB, bilinear to a
    square), done once here so that training at that size decodes small files and resizes nothing. The EXIF
    orientation is applied before it and no EXIF is written: the loaders must not turn the result again. easy-VQA's
    64x64 images keep 4:4:4 chroma: they are flat colour shapes whose colour is half the task, and 4:2:0 would blur
    the colour edges.
    The JPEG is decoded again before it is accepted. Written atomically.
    """
    source, destination, size, quality, subsampling = task
    try:
        with open(source, "rb") as f:
            im, _ = _decode(f.read())
        buf = io.BytesIO()
        rgb = upright_rgb(im)
        if size is not None:
            rgb = rgb.resize((size, size), Image.BILINEAR)
        rgb.save(buf, format="JPEG", quality=quality, subsampling=subsampling)
        data = buf.getvalue()
        _decode(data)
    except FileNotFoundError:
        return CheckResult(source, False, f"image missing: {source}")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return _failure(source, exc)
    # No sync to disk: an intermediate file, which an interrupted conversion converts again.
    atomic.write_bytes(destination, data, fsync=False)
    return CheckResult(source, True, output=destination, width=rgb.width, height=rgb.height)
