"""The paper's comparison end to end on a few steps: real trainer processes, then results.json, PNG and report."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from trainer.tools.compare.cli import DEFAULT_VARIANTS, main
from trainer.tools.compare.report import claim_lines, write_report
from trainer.tools.compare.results import loss_noise, smooth, steps_to_stay_under, validate_results, verdict


def test_steps_to_stay_under_needs_the_curve_to_stay_below():
    steps = [10, 20, 30, 40, 50]
    assert steps_to_stay_under(steps, [3.0, 0.9, 1.2, 0.8, 0.7], 1.0) == 40
    assert steps_to_stay_under(steps, [3.0, 2.0, 1.2, 1.1, 0.7], 0.5) is None
    assert steps_to_stay_under(steps, [0.1] * 5, 1.0) == 10


def _ema(values, weight=0.9):
    """The smoothing this module used before: a debiased EMA per logged point (as TensorBoard's slider)."""
    out, acc = [], 0.0
    for n, v in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**n))
    return out


def test_smoother_returns_a_ramp_unchanged_and_crosses_a_step_where_it_happens():
    steps = list(range(10, 810, 10))
    ramp = [5.0 - 0.005 * s for s in steps]
    assert smooth(steps, ramp, 100) == pytest.approx(ramp, abs=1e-9)  # no lag anywhere, the ends included
    step_fn = [2.0 if s < 400 else 0.5 for s in steps]
    crossing = steps_to_stay_under(steps, smooth(steps, step_fn, 100), 1.25)
    assert crossing is not None and abs(crossing - 400) <= 10
    # The check has teeth: the old EMA crosses the same step change ~70 steps late.
    assert steps_to_stay_under(steps, _ema(step_fn), 1.25) >= 450


def test_loss_noise_ranks_noise_and_ignores_slope():
    import math
    import random

    rng = random.Random(0)
    wiggle = [rng.gauss(0, 1) for _ in range(200)]
    steps = range(200)

    def curve(rate, amplitude):
        return [3.0 * math.exp(-rate * s + amplitude * w) for s, w in zip(steps, wiggle, strict=True)]

    slow, fast = loss_noise(curve(0.001, 0.02)), loss_noise(curve(0.01, 0.02))
    assert slow == pytest.approx(fast, rel=1e-9)  # equal noise, different slopes: equal
    assert loss_noise(curve(0.005, 0.01)) < loss_noise(curve(0.005, 0.03))  # equal slope, more noise: larger
    assert loss_noise([1.0, 0.9]) is None  # too short to say


def test_verdict_claims_a_difference_only_beyond_the_seed_spread():
    assert verdict([100.0], [200.0])[0] == "unresolved"  # one seed
    assert verdict([100.0, 180.0], [150.0, 210.0])[0] == "unresolved"  # 55 apart, ranges 80 and 60
    outcome, diff, spread = verdict([100.0, 110.0, 120.0], [200.0, 190.0, 210.0])
    assert outcome == "a<b" and diff == pytest.approx(-90.0) and spread == pytest.approx(20.0)
    assert verdict([0.5, 0.51], [0.3, 0.31])[0] == "a>b"


def test_claims_say_not_resolved_with_one_seed():
    def entry(steps, noise):
        spread = lambda v: {"mean": v, "std": 0.0, "values": [v]}  # noqa: E731
        return {
            "steps_to_loss_below": {"1": spread(steps)},
            "loss_noise": spread(noise),
            "runs": [{"config": {"train": {"max_steps": 800}}}],
        }

    summary = {
        "baseline": entry(500, 0.02),
        "clip-no-infonce": entry(450, 0.02),
        "clip-infonce-cos": entry(300, 0.03),
        "clip-infonce-dot": entry(None, 0.01),
    }
    lines = claim_lines(summary, [1.0])
    assert len(lines) == 5  # 2 variants x 2 references + the steadiness claim
    assert all("not resolved" in line for line in lines)
    assert any("clip-infonce-dot against clip-no-infonce" in line for line in lines)


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
