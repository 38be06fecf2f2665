"""Re-encoded JPEGs' chroma subsampling (`--chroma-subsampling`): 4:2:0 for photos by default, 4:4:4 for easy-VQA's
flat colour shapes, either on request; recorded in the manifest."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image, JpegImagePlugin

from data_pipeline.convert import cli as convert
from data_pipeline.convert import synthetic
from data_pipeline.convert.buildspec import BuildSpec, ConversionError
from tests.helpers.synthetic_shards import convert_synthetic


def _samplings(folder: Path) -> set[int]:
    import tarfile

    found = set()
    for tar in folder.glob("*.tar"):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                if member.name.endswith(".jpg"):
                    im = Image.open(io.BytesIO(t.extractfile(member).read()))
                    found.add(JpegImagePlugin.get_sampling(im))
    return found


@pytest.mark.parametrize(
    ("extra", "chroma", "sampling"), [((), "4:2:0", 2), (("--chroma-subsampling", "4:4:4"), "4:4:4", 0)]
)
def test_image_size_re_encodes_with_the_chroma_asked_for(tmp_path: Path, extra, chroma, sampling) -> None:
    raw = synthetic.write_vqa2(tmp_path / "raw", n_images=3, bad=False)
    out = tmp_path / "out"
    argv = [
        "vqa2",
        "--questions",
        str(raw.questions),
        "--annotations",
        str(raw.annotations),
        "--images",
        str(raw.images),
    ]
    argv += [
        "--out",
        str(out),
        "--min-answer-count",
        "1",
        "--workers",
        "1",
        "--no-progress",
        "--image-size",
        "32",
    ]
    assert convert.main([*argv, *extra]) == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["chroma_subsampling"] == chroma
    assert _samplings(out) == {sampling}


def test_chroma_defaults_by_source_and_bad_values(tmp_path: Path) -> None:
    kw = dict(
        out=tmp_path,
        split="train",
        candidates=[],
        rejected=[],
        answers=[],
        answers_source="",
        has_answers=True,
    )
    assert BuildSpec(source="easyvqa", **kw).chroma_subsampling == "4:4:4"
    assert BuildSpec(source="vqa2", **kw).chroma_subsampling == "4:2:0"
    with pytest.raises(ConversionError, match="--chroma-subsampling: '4:2:2' is not one of"):
        BuildSpec(source="vqa2", chroma_subsampling="4:2:2", **kw)


def test_folders_kept_as_they_are_record_no_chroma(tmp_path: Path) -> None:
    folder = convert_synthetic(tmp_path, n_images=3, bad=False)
    assert json.loads((folder / "manifest.json").read_text())["settings"]["chroma_subsampling"] is None
