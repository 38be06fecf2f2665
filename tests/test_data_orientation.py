"""One orientation rule for every image path: a photo's EXIF orientation tag is applied (as browsers and DALI do).

Tagged JPEGs are made here: an asymmetric square picture (four coloured quadrants) stored with EXIF orientation 1, 3
(upside down), 6 (to be turned 90 degrees clockwise) and 8 (90 degrees counter-clockwise). What every path must
give is computed without the code under test: the stored pixels as decoded with the tag ignored, turned with numpy.
The paths: the converter without --image-size (the file kept as it is, tag included) read by both loaders (DALI on
the CPU, PyTorch), the converter with --image-size (re-encoded upright, tag dropped) read by both loaders, and
trainer.serve.predict's preprocessing of the original file; DALI's GPU (nvJPEG) decoder where CUDA is present.

Tolerances: the loaders and predict decode the same JPEG bytes with libjpeg-turbo and the image size equals the
stored size (no resize), so they give the expected pixels within 1 of 255 levels (the normalisation's float
rounding); measured 0 for DALI 2.4.0's CPU decoder and PIL. A re-encoded JPEG (quality 95, 4:4:4) is within
JPEG_LEVELS of them. Each check also asserts that the unturned picture is far away (a wrong rotation moves whole
colour blocks: hundreds of levels), so that no tolerance can hide a rotation.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.convert import cli as convert
from data_pipeline.convert import synthetic
from data_pipeline.convert.images import EXIF_ORIENTATION, orientation
from data_pipeline.loaders.loader import LoaderSpec, build_loader

SIZE = 64
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
# numpy's turn that shows a picture stored with each EXIF orientation upright (np.rot90 turns counter-clockwise).
TURNS = {1: 0, 3: 2, 6: -1, 8: 1}
JPEG_LEVELS = 24  # re-encoding at quality 95 (4:4:4) of flat colour blocks: error at block edges only
FAR_LEVELS = 50  # the mean distance to a wrongly turned picture is far above this


def picture(seed: int) -> np.ndarray:
    """SIZE x SIZE RGB: four quadrants of four colours (any quarter or half turn moves every one onto another
    colour) and a white mark that differs per image."""
    h = SIZE // 2
    a = np.empty((SIZE, SIZE, 3), np.uint8)
    a[:h, :h], a[:h, h:] = (230, 20, 20), (20, 200, 20)
    a[h:, :h], a[h:, h:] = (230, 220, 30), (20, 40, 230)
    a[4 : 10 + 2 * seed, 4:10] = 255
    return a


def tagged_jpeg(pixels: np.ndarray, tag: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = tag
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    return buf.getvalue()


def stored_pixels(data: bytes) -> np.ndarray:
    """The JPEG's pixels as stored, the tag ignored."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A VQA v2-format raw folder whose four images carry orientations 1, 3, 6, 8; the converter's shard folders
    of it without and with --image-size; the expected upright pixels per question id."""
    root = tmp_path_factory.mktemp("orientation")
    raw = synthetic.write_vqa2(
        root / "raw", n_images=4, questions_per_image=2, bad=False, sizes=(SIZE, SIZE, SIZE, SIZE)
    )
    questions = json.loads(raw.questions.read_text())["questions"]
    files = sorted(raw.images.iterdir())
    expected_by_file, tags = {}, {}
    for i, (path, tag) in enumerate(zip(files, TURNS, strict=True)):
        data = tagged_jpeg(picture(i), tag)
        path.write_bytes(data)
        expected_by_file[path.name] = np.rot90(stored_pixels(data), TURNS[tag]).copy()
        tags[path.name] = tag
    image_file = {int(p.name.rsplit("_", 1)[1].split(".")[0]): p.name for p in files}
    expected = {q["question_id"]: expected_by_file[image_file[q["image_id"]]] for q in questions}
    folders = {}
    # 4:4:4: the tolerance below is for re-encoding, not for 4:2:0 chroma on the picture's sharp colour edges
    for name, extra in (
        ("verbatim", []),
        ("resized", ["--image-size", str(SIZE), "--chroma-subsampling", "4:4:4"]),
    ):
        out = root / name
        args = ["vqa2", "--questions", str(raw.questions), "--annotations", str(raw.annotations)]
        args += [
            "--images",
            str(raw.images),
            "--out",
            str(out),
            "--min-answer-count",
            "1",
            "--shard-size",
            "4",
        ]
        assert convert.main([*args, *extra, "--workers", "1", "--no-progress"]) == 0
        folders[name] = out
    return {"folders": folders, "expected": expected, "files": files, "tags": tags, "raw": raw}


def loaded(folder: Path, kind: str, device: str = "cpu") -> dict[int, np.ndarray]:
    """question id -> the loader's pixels, normalisation undone, HWC on the 0..255 scale."""
    spec = LoaderSpec(
        tokenizer=lambda qs: {k: torch.zeros(len(qs), 4, dtype=torch.long) for k in ("vilt_ids", "vilt_mask", "clip_ids")},
        batch_size=4, image_size=SIZE, mean=MEAN, std=STD, train=False, kind=kind, num_workers=0,
        device=torch.device(device),
    )  # fmt: skip
    out = {}
    for batch in build_loader(folder, spec):
        pixels = (batch["pixels"].float().cpu() * 0.5 + 0.5) * 255  # mean = std = 0.5
        valid = batch.get("valid", torch.ones(len(pixels), dtype=torch.bool)).bool()
        for qid, px, ok in zip(batch["question_id"].tolist(), pixels, valid.tolist(), strict=True):
            if ok:
                out[int(qid)] = px.permute(1, 2, 0).numpy()
    return out


def assert_upright(got: np.ndarray, expected: np.ndarray, levels: float, what: str) -> None:
    diff = np.abs(got.astype(np.float64) - expected)
    assert diff.max() <= levels, f"{what}: {diff.max():.1f} levels from the upright picture"
    # A square picture turned otherwise is far away: the check cannot pass by tolerance.
    for k in (1, 2, 3):
        wrong = np.rot90(expected, k)
        assert np.abs(got.astype(np.float64) - wrong).mean() > FAR_LEVELS, f"{what}: looks turned by {90 * k}"


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_both_loaders_show_tagged_photos_upright(photos: dict, kind: str) -> None:
    expected = photos["expected"]
    for name, levels in (("verbatim", 1.0), ("resized", JPEG_LEVELS)):
        got = loaded(photos["folders"][name], kind)
        assert sorted(got) == sorted(expected), name
        for qid, pixels in got.items():
            assert_upright(pixels, expected[qid], levels, f"{kind} loader, {name} shards, question {qid}")


@pytest.mark.gpu
def test_dalis_gpu_decoder_shows_tagged_photos_upright(photos: dict) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the mixed (nvJPEG) decoder cannot run here")
    expected = photos["expected"]
    for name in ("verbatim", "resized"):
        got = loaded(photos["folders"][name], "dali", device="cuda")
        for qid, pixels in got.items():  # nvJPEG and libjpeg-turbo differ in IDCT rounding (4:4:4 here)
            assert_upright(
                pixels, expected[qid], JPEG_LEVELS, f"DALI GPU decoder, {name} shards, question {qid}"
            )


def test_the_loaders_agree_pixel_for_pixel_on_tagged_photos(photos: dict) -> None:
    verbatim = photos["folders"]["verbatim"]
    dali, torch_ = loaded(verbatim, "dali"), loaded(verbatim, "torch")
    for qid in dali:
        assert np.abs(dali[qid] - torch_[qid]).max() <= 1.0, qid


def test_the_converter_keeps_tagged_files_or_reencodes_them_upright_without_the_tag(photos: dict) -> None:
    import tarfile

    raw_bytes = {p.name: p.read_bytes() for p in photos["files"]}
    for name in ("verbatim", "resized"):
        stored = []
        for tar in sorted(photos["folders"][name].glob("*.tar")):
            with tarfile.open(tar) as t:
                stored += [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".jpg")]
        assert len(stored) == len(photos["expected"])
        for data in stored:
            with Image.open(io.BytesIO(data)) as im:
                tag = orientation(im)
            if name == "verbatim":  # kept as it is: the loaders apply its tag
                assert data in raw_bytes.values()
            else:  # turned once, here, and no tag left that a loader would apply again
                assert tag == 1 and EXIF_ORIENTATION not in Image.open(io.BytesIO(data)).getexif()


def test_the_converter_records_the_upright_size(tmp_path: Path) -> None:
    from data_pipeline.convert.images import check_image, convert_to_jpeg

    path = tmp_path / "wide.jpg"
    path.write_bytes(
        tagged_jpeg(np.zeros((20, 50, 3), np.uint8), 6)
    )  # 50 wide, 20 high, to be turned upright
    checked = check_image(str(path))
    assert checked.ok and (checked.width, checked.height) == (20, 50)
    converted = convert_to_jpeg((str(path), str(tmp_path / "out.jpg"), None, 95, 0))
    assert converted.ok and (converted.width, converted.height) == (20, 50)
    with Image.open(tmp_path / "out.jpg") as im:
        assert im.size == (20, 50) and orientation(im) == 1


def test_predict_preprocesses_tagged_photos_upright(photos: dict) -> None:
    from trainer.serve.predict import load_image

    for path in photos["files"]:
        x = load_image(path, SIZE, MEAN, STD)
        pixels = ((x * 0.5 + 0.5) * 255).permute(1, 2, 0).numpy()
        expected = np.rot90(stored_pixels(path.read_bytes()), TURNS[photos["tags"][path.name]])
        assert_upright(pixels, expected, 1.0, f"predict {path.name}")
