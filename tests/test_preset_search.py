"""trainer.tools.preset_search: the search tool behind the demo preset runs the project's model on easy-VQA and reports
scores per question type; a derived CLIP tower is built as asked; grid mode appends one line per run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.tools import preset_search

REPO = Path(__file__).resolve().parents[1]


def test_question_types_cover_easy_vqa_answers():
    from data_pipeline.convert.easyvqa import answer_list

    types = {a: preset_search.question_type(a) for a in answer_list()}
    assert {t for t in types.values()} == set(preset_search.QUESTION_TYPES)
    assert [a for a, t in types.items() if t == "shape"] == sorted(preset_search.SHAPES)
    assert types["yes"] == types["no"] == "yes/no" and types["teal"] == "colour"


@pytest.mark.slow
def test_one_run_reports_scores_per_type_and_builds_the_derived_tower(capsys):
    rc = preset_search.main(
        ["--device", "cpu", "--threads", "1", "--steps", "3", "--evals", "2", "--eval-limit", "256"]
        + ["--variant", "clip-infonce-dot", "--clip-vision", "width=8", "--set", "optim.lr=7e-4"]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["variant"] == "clip-infonce-dot" and result["clip_vision"] == ["width=8"]
    assert result["steps"] == 3 and result["batch"] == 64 and result["samples_per_s"] > 0
    assert [e["step"] for e in result["evals"]] == [2, 3]
    for entry in result["evals"]:
        assert entry["loss"] > 0
        for split in ("test", "train"):
            scores = entry[split]
            assert set(scores) == {"all", *preset_search.QUESTION_TYPES}
            assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_derived_tower_rejects_an_unknown_field():
    with pytest.raises(SystemExit, match="--clip-vision 'depth=3'.*width"):
        preset_search.derive_clip_arch("RN-tiny", ["depth=3"])


@pytest.mark.slow
def test_grid_mode_appends_one_line_per_run(tmp_path):
    grid = tmp_path / "grid.txt"
    grid.write_text("# one tiny run\n--steps 1 --eval-limit 64 --threads 1 --variant baseline\n")
    out = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.tools.preset_search",
            "--device",
            "cpu",
            "--grid",
            str(grid),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["variant"] == "baseline"
    assert "run 1/1 done" in proc.stderr
