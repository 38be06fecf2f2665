"""The paper's comparison end to end on a few steps: real trainer processes, then results.json, PNG and report."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from trainer.compare import (
    DEFAULT_VARIANTS,
    ema,
    main,
    steps_to_stay_under,
    validate_results,
    write_report,
)


def test_steps_to_stay_under_needs_the_curve_to_stay_below():
    steps = [10, 20, 30, 40, 50]
    assert steps_to_stay_under(steps, [3.0, 0.9, 1.2, 0.8, 0.7], 1.0) == 40
    assert steps_to_stay_under(steps, [3.0, 2.0, 1.2, 1.1, 0.7], 0.5) is None
    assert steps_to_stay_under(steps, [0.1] * 5, 1.0) == 10


def test_ema_is_debiased():
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert main(["--train-data", str(tmp_path), "--val-data", str(tmp_path), "--variants", "vilt-xl"]) == 2
    assert "unknown ['vilt-xl']" in capsys.readouterr().err
    assert main(["--train-data", str(tmp_path), "--val-data", str(tmp_path)]) == 2
    assert "not a shard folder (no manifest.json)" in capsys.readouterr().err


@pytest.mark.slow
def test_comparison_end_to_end(tiny_easyvqa_shards, tmp_path):
    out = tmp_path / "cmp"
    argv = [
        "--preset", "tiny",
        "--train-data", str(tiny_easyvqa_shards / "train"),
        "--val-data", str(tiny_easyvqa_shards / "test"),
        "--run-dir", str(out),
        "--steps", "4",
        "--set", "train.log_every=1",
        "--set", "train.eval_every=2",
        "--set", "train.progress_bar=false",
        "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    assert results["variants_order"] == list(DEFAULT_VARIANTS)
    for variant in DEFAULT_VARIANTS:
        entry = results["variants"][variant]
        (run,) = entry["runs"]
        assert run["config"]["model"]["variant"] == variant and run["seed"] == 0
        assert 0.0 <= entry["final_val_vqa_score"]["mean"] <= 1.0
        assert (out / f"{variant}-seed0" / "tensorboard").is_dir()

    with Image.open(out / "loss_curves.png") as png:
        png.verify()
    report = (out / "report.md").read_text()
    for variant in DEFAULT_VARIANTS:
        assert f"`{variant}`" in report
    assert "![loss curves](loss_curves.png)" in report
    assert "`tiny`, 4 optimizer steps" in report

    # A run folder without config.json (the schema allows config null) still gets a report.
    for entry in results["variants"].values():
        for run in entry["runs"]:
            run["config"] = None
    write_report(results, tmp_path / "no_config.md")
    assert "`tiny`, 4 optimizer steps" in (tmp_path / "no_config.md").read_text()

    # Finished runs are kept: a second call only rebuilds the outputs.
    before = (out / "baseline-seed0" / "run_complete.json").read_text()
    assert main(argv) == 0
    assert (out / "baseline-seed0" / "run_complete.json").read_text() == before
