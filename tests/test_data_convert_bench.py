"""`python -m data_pipeline.tools.convert_bench` on a tiny set: the report agrees with the converter's own manifests and
files, the question count follows --questions-per-image, and the projection is the stated arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline.tools import convert_bench


def test_convert_bench_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work, out = tmp_path / "work", tmp_path / "report.json"
    argv = ["--images", "20", "--questions-per-image", "5.4", "--workers", "1", "--sizes", "64",
            "--decode-samples", "10", "--work-dir", str(work), "--keep", "--json", str(out), "--no-progress"]  # fmt: skip
    assert convert_bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["data"]["images"] == 20 and report["data"]["questions"] == 108  # 20 x 5.4
    assert [r["setting"] for r in report["results"]] == ["as is", "--image-size 64"]
    for r, folder in zip(report["results"], ("shards-as-is", "shards-64"), strict=True):
        manifest = json.loads((work / folder / "manifest.json").read_text())
        tars = sorted((work / folder).glob("shard-*.tar"))
        assert r["shard_bytes"] == manifest["totals"]["bytes"] == sum(t.stat().st_size for t in tars)
        assert r["questions"] == manifest["totals"]["samples"] == 108 and r["images"] == 20
        assert r["bytes_per_question"] == pytest.approx(r["shard_bytes"] / 108)
        assert r["questions_per_s"] == pytest.approx(108 / r["wall_s"])
        assert r["images_per_s"] == pytest.approx(20 / r["wall_s"])
        assert r["peak_process_bytes"] > 10 * 2**20 and r["decode_us"] > 0 and r["decode_sample"] == 10
        assert r["command"].startswith("python -m data_pipeline.convert vqa2 --questions ")
        for split, (questions, images) in convert_bench.FULL_VQA2.items():
            p = r["projection"][split]
            assert (p["questions"], p["images"]) == (questions, images)
            assert p["bytes"] == pytest.approx(r["bytes_per_question"] * questions)
            assert p["seconds"] == pytest.approx(r["wall_s"] / 108 * questions)
            assert p["seconds_16_cores_estimate"] == pytest.approx(p["seconds"] / 16)  # 1 worker -> 16 cores
        total = r["projection"]["total"]
        assert total["bytes"] == pytest.approx(
            r["projection"]["train2014"]["bytes"] + r["projection"]["val2014"]["bytes"]
        )
        assert total["questions"] == 443_757 + 214_354
    as_is, small = report["results"]
    assert as_is["stored_wh"] == [640, 480] and small["stored_wh"] == [64, 64]
    assert set(as_is["decode_squash_us"]) == {"64"} == set(small["decode_squash_us"])
    assert small["shard_bytes"] < as_is["shard_bytes"]
    assert (work / "raw" / "params.json").is_file()  # --keep keeps the set (and a rerun reuses it)

    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| --image-size 64 |"))
    assert (
        f"| {small['questions_per_s']:.0f} |" in row
        and f"| {small['bytes_per_question'] / 1024:.1f} |" in row
    )
    assert "projected full VQA v2 (train2014 443,757 questions / 82,783 images" in table
    assert f"results: {out}" in table


def test_convert_bench_refuses_keep_without_work_dir() -> None:
    with pytest.raises(SystemExit, match="--keep needs --work-dir"):
        convert_bench.main(["--keep"])
