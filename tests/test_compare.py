"""The paper's comparison end to end on a few steps: real trainer processes, then results.json, PNG and report."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from trainer.tools.compare.claims import claims
from trainer.tools.compare.cli import DEFAULT_VARIANTS, build_parser, main
from trainer.tools.compare.report import plot, plot_results, write_report
from trainer.tools.compare.results import (
    RESULTS_SCHEMA_VERSION,
    aggregate,
    loss_noise,
    smooth,
    steps_to_stay_under,
    validate_results,
    verdict,
)
from trainer.tools.compare.runs import RunSpec, full_eval_command, trainer_command
from trainer.tools.compare.variants import VariantError, parse_variant, parse_variants


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


def _spread(values):
    vals = [v for v in values if v is not None]
    mean = sum(vals) / len(vals) if vals else None
    return {"mean": mean, "std": 0.0, "values": list(values)}


def _entry(steps, noise, score=0.9, model=None):
    """A results.json variant entry with per-seed values (lists of equal length, one per seed)."""
    return {
        "model_variant": model,
        "steps_to_loss_below": {"1": _spread(steps)},
        "loss_noise": _spread(noise),
        "full_val_vqa_score": _spread(score if isinstance(score, list) else [score] * len(steps)),
        "runs": [{"config": {"train": {"max_steps": 800}}} for _ in steps],
    }


def _by(found, variant, reference):
    return {c.measure: c.outcome for c in found if c.variant == variant and c.reference == reference}


def test_claims_say_not_resolved_with_one_seed():
    summary = {
        "baseline": _entry([500], [0.02], model="baseline"),
        "clip-no-infonce": _entry([450], [0.02], model="clip-no-infonce"),
        "clip-infonce-cos": _entry([300], [0.03], model="clip-infonce-cos"),
        "clip-infonce-dot": _entry([None], [0.01], model="clip-infonce-dot"),
        "clip-infonce-dot+dup-mask": _entry([200], [0.01], 0.99, model="clip-infonce-dot"),
    }
    found = claims(summary, [1.0])
    # CLIP's embedding against ViLT's (score) + 2 paper variants x 2 references + the steadiness claim + the
    # modifier against its plain variant (steps, score)
    assert len(found) == 1 + 4 + 1 + 2
    assert all(c.outcome == "not resolved" and c.diff is None for c in found)
    assert _by(found, "clip-infonce-dot+dup-mask", "clip-infonce-dot") == {
        "steps to VQA loss < 1": "not resolved",
        "VQA score, whole split, end": "not resolved",
    }
    assert _by(found, "clip-infonce-dot", "clip-no-infonce")  # the ablation is a reference
    # A modified variant is never checked against the paper's references, nor the plain one against itself.
    assert not _by(found, "clip-infonce-dot+dup-mask", "baseline")


def test_modifier_verdict_against_its_plain_variant_follows_the_noise_rule():
    plain = _entry([300, 310, 320], [0.02] * 3, [0.90, 0.91, 0.92], model="clip-infonce-dot")

    def verdicts(steps, scores):
        summary = {
            "clip-infonce-dot": plain,
            "clip-infonce-dot+dup-mask": _entry(steps, [0.02] * 3, scores, model="clip-infonce-dot"),
        }
        return _by(claims(summary, [1.0]), "clip-infonce-dot+dup-mask", "clip-infonce-dot")

    steps_key, score_key = "steps to VQA loss < 1", "VQA score, whole split, end"
    # Clearly apart (difference 100 steps / 0.05 against seed ranges of 20 / 0.02): verdicts either way.
    better = verdicts([200, 210, 220], [0.95, 0.96, 0.97])
    assert better == {steps_key: "supports", score_key: "supports"}
    worse = verdicts([400, 410, 420], [0.85, 0.86, 0.87])
    assert worse == {steps_key: "contradicts", score_key: "contradicts"}
    # A difference inside the seed range (15 steps against a range of 40; 0.01 against 0.04): not resolved.
    close = verdicts([295, 315, 335], [0.89, 0.92, 0.93])
    assert close == {steps_key: "not resolved", score_key: "not resolved"}
    # A run that never gets under the threshold counts as one step past the end, so it loses clearly.
    assert verdicts([None, None, None], [0.95, 0.96, 0.97])[steps_key] == "contradicts"


def test_variant_syntax():
    v = parse_variant("clip-infonce-dot+dup-mask")
    assert (v.name, v.model, v.modifiers) == ("clip-infonce-dot+dup-mask", "clip-infonce-dot", ("dup-mask",))
    assert v.overrides() == ["model.variant=clip-infonce-dot", "loss.duplicate_questions=mask"]
    assert parse_variant("clip-infonce-cos+dup-positive").settings == {"loss.duplicate_questions": "positive"}
    assert parse_variant(" baseline ").overrides() == [
        "model.variant=baseline",
        "loss.duplicate_questions=none",
    ]
    assert [v.name for v in parse_variants("baseline,clip-infonce-dot,clip-infonce-dot+dup-mask")] == [
        "baseline",
        "clip-infonce-dot",
        "clip-infonce-dot+dup-mask",
    ]
    bad = {
        "vilt-xl": "unknown model variant 'vilt-xl'",
        "clip-infonce-dot+dup-maks": "unknown modifier '+dup-maks'",
        "clip-infonce-dot+": "unknown modifier '+'",
        "baseline+dup-mask": "which baseline does not have",
        "clip-no-infonce+dup-positive": "which clip-no-infonce does not have",
        "clip-symmetric-ce+dup-mask": "which clip-symmetric-ce does not have",
        "clip-infonce-dot+dup-mask+dup-positive": "more than one modifier sets loss.duplicate_questions",
        "clip-infonce-dot,clip-infonce-dot": "clip-infonce-dot given more than once",
        " , ": "no variant given",
    }
    for text, message in bad.items():
        with pytest.raises(VariantError, match=message.replace("+", "\\+")):
            parse_variants(text)


def test_default_variants_are_the_papers_models_and_the_ablation():
    assert DEFAULT_VARIANTS == ("baseline", "clip-no-infonce", "clip-infonce-cos", "clip-infonce-dot")
    help_text = build_parser().format_help()
    assert "NAME[+MODIFIER]" in help_text and "clip-infonce-dot+dup-mask" in help_text


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    base = ["--train-data", str(tmp_path), "--val-data", str(tmp_path)]
    for value, message in (
        ("vilt-xl", "--variants 'vilt-xl': unknown model variant 'vilt-xl'"),
        ("baseline,clip-infonce-dot+dup-foo", "--variants 'clip-infonce-dot+dup-foo': unknown modifier"),
        ("baseline+dup-mask", "--variants 'baseline+dup-mask': +dup-mask changes the paper's InfoNCE"),
    ):
        assert main([*base, "--variants", value]) == 2
        err = capsys.readouterr().err
        assert err.startswith("compare: error: ") and message in err and err.count("\n") == 1
    assert main([*base, "--set", "loss.duplicate_questions=mask"]) == 2
    assert "per variant in --variants" in capsys.readouterr().err
    assert main([*base, "--val-subset", "0"]) == 2
    assert "--val-subset must be >= 1" in capsys.readouterr().err
    assert main(base) == 2
    assert "not a shard folder (no manifest.json)" in capsys.readouterr().err


def test_trainer_commands_carry_the_variant_and_the_validation_plan(tmp_path):
    args = build_parser().parse_args(
        [
            "--train-data",
            "T",
            "--val-data",
            "V",
            "--num-gpus",
            "0",
            "--set",
            "train.log_every=1",
            "--val-every",
            "100",
        ]
    )
    args.subset_dir = "S"

    def sets(cmd):
        return [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]

    dup = trainer_command(RunSpec(parse_variant("clip-infonce-dot+dup-mask"), 3, tmp_path / "r"), args, False)
    assert sets(dup) == [
        "train.eval_every=100",
        "train.log_every=1",
        "model.variant=clip-infonce-dot",
        "loss.duplicate_questions=mask",
        "train.seed=3",
    ]
    assert dup[dup.index("--val-data") + 1] == "S"  # training validates on the subset
    assert dup[dup.index("--run-dir") + 1] == str(tmp_path / "r")
    plain = trainer_command(RunSpec(parse_variant("clip-infonce-dot"), 3, tmp_path / "p"), args, True)
    assert "loss.duplicate_questions=none" in sets(plain) and plain[-2:] == ["--resume", "auto"]
    whole = full_eval_command(RunSpec(parse_variant("clip-infonce-dot"), 3, tmp_path / "p"), args)
    assert whole[whole.index("--val-data") + 1] == "V" and "--eval-only" in whole
    assert whole[whole.index("--run-dir") + 1] == str(tmp_path / "p" / "full_eval")
    args.subset_dir = None
    no_subset = trainer_command(RunSpec(parse_variant("baseline"), 0, tmp_path / "b"), args, False)
    assert no_subset[no_subset.index("--val-data") + 1] == "V"


def test_gpu_runs_take_a_free_rendezvous_port_of_their_slot(tmp_path):
    """A slot's port taken by another job's rendezvous: the run takes the next free one of its own (slot k searches
    k, k + PORT_STRIDE, ..., so that slots side by side never pick the same one)."""
    import socket

    from trainer.tools.compare.runs import PORT_STRIDE, free_port
    from trainer.tools.compare.schedule import Slot

    args = build_parser().parse_args(["--train-data", "T", "--val-data", "V"])
    spec = RunSpec(parse_variant("baseline"), 0, tmp_path / "b")
    base = free_port(29612, step=PORT_STRIDE)
    slot = Slot(0, 1, (0, 1), base)

    def port(cmd):
        assert cmd[1] == "--master_port" and "--num_gpus" not in cmd, cmd
        return int(cmd[2])

    assert port(trainer_command(spec, args, False, slot)) == base
    with socket.socket() as held:  # another job's rendezvous on the slot's own port
        held.bind(("", base))
        held.listen()
        taken = port(trainer_command(spec, args, False, slot))
        assert taken > base and (taken - base) % PORT_STRIDE == 0
        assert port(full_eval_command(spec, args, slot)) == taken


def _run_record(seed, val_steps, val_scores, whole, loss_shift=0.0):
    steps = list(range(5, 805, 5))
    vqa = [3.0 * 0.995**s + 0.1 + loss_shift for s in steps]
    return {
        "run_dir": f"r{seed}",
        "seed": seed,
        "full_val_vqa_score": whole,
        "final_val_vqa_score": val_scores[-1],
        "best_val_vqa_score": max(val_scores),
        "best_val_step": val_steps[val_scores.index(max(val_scores))],
        "final_train_vqa_loss": vqa[-1],
        "steps_to_loss_below": {"1": steps_to_stay_under(steps, smooth(steps, vqa), 1.0)},
        "loss_noise": 0.05,
        "wall_time_s": 100.0,
        "samples_per_second": 500.0,
        "config": {"train": {"max_steps": 800, "eval_every": 100}},
        "curves": {
            "step": steps,
            "vqa_loss": vqa,
            "loss": vqa,
            "infonce_loss": [],
            "val_step": val_steps,
            "val_vqa_score": val_scores,
        },
    }


def test_report_shows_the_subset_validation_curve_and_the_whole_split_score(tmp_path):
    val_steps = list(range(100, 900, 100))
    runs = {
        "clip-infonce-dot": [_run_record(0, val_steps, [0.5 + 0.05 * i for i in range(8)], 0.8711)],
        "clip-infonce-dot+dup-mask": [
            _run_record(0, val_steps, [0.6 + 0.04 * i for i in range(8)], 0.9322, 0.05)
        ],
    }
    variants = {v: parse_variant(v) for v in runs}
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "preset": "demo",
        "steps": None,
        "seeds": [0],
        "variants_order": list(runs),
        "train_data": "data/train",
        "val_data": "data/test",
        "val_subset": {"folder": "runs/x/val-subset-500", "size": 500, "seed": 0, "of_samples": 9673},
        "loss_thresholds": [1.0],
        "smooth_steps": 100,
        "machine": "CPU only, 2 cores (x86_64)",
        "date": "2026-11-28",
        "wall_time_s": 200.0,
        "variants": aggregate(runs, [1.0], variants),
    }
    validate_results(json.loads(json.dumps(results)))  # as written to and read from results.json
    entry = results["variants"]["clip-infonce-dot+dup-mask"]
    assert entry["model_variant"] == "clip-infonce-dot"
    assert entry["settings"] == {"loss.duplicate_questions": "mask"}
    assert "masked out of InfoNCE" in entry["paper_model"]
    assert entry["val_curve"]["step"] == val_steps
    assert entry["val_curve"]["vqa_score"][2]["mean"] == pytest.approx(0.68)

    write_report(results, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "fixed subset of 500 of the 9,673 questions of `data/test`" in report
    assert "every 100 steps and at the end" in report
    assert "| variant | step 100 | step 200 | step 300 |" in report
    assert (
        "| `clip-infonce-dot+dup-mask` | 0.600 | 0.640 | 0.680 |" in report
    )  # the subset curve, step by step
    assert "val VQA, whole split (end)" in report and "0.9322" in report and "0.8711" in report
    assert (
        "| the modifier scores higher | `clip-infonce-dot+dup-mask` | `clip-infonce-dot` | "
        "VQA score, whole split, end | - | - | not resolved |"
    ) in report
    assert "**clip-infonce-dot+dup-mask** (0.9322)" in report

    plot(runs, tmp_path / "curves.png", 100, results["val_subset"])
    with Image.open(tmp_path / "curves.png") as png:
        png.verify()

    broken = json.loads(json.dumps(results))
    del broken["variants"]["clip-infonce-dot"]["val_curve"]["vqa_score"][0]
    with pytest.raises(ValueError, match="val_curve"):
        validate_results(broken)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_comparison_end_to_end(tiny_easyvqa_shards, tmp_path):
    """Three variants, one with a modifier, validated on a 16-question subset of the 32-question test split every 2
    steps, then scored on the whole split by the trainer's --eval-only."""
    out = tmp_path / "cmp"
    variants = ["baseline", "clip-infonce-dot", "clip-infonce-dot+dup-mask"]
    argv = [
        "--preset", "tiny",
        "--train-data", str(tiny_easyvqa_shards / "train"),
        "--val-data", str(tiny_easyvqa_shards / "test"),
        "--run-dir", str(out),
        "--variants", ",".join(variants),
        "--steps", "4",
        "--val-subset", "16",
        "--val-every", "2",
        "--set", "train.log_every=1",
        "--set", "train.progress_bar=false",
        "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    assert results["schema_version"] == RESULTS_SCHEMA_VERSION
    assert results["variants_order"] == variants
    assert results["val_subset"] == {
        "folder": str(out / "val-subset-16"),
        "size": 16,
        "seed": 0,
        "of_samples": 32,
    }
    for variant in variants:
        entry = results["variants"][variant]
        (run,) = entry["runs"]
        run_dir = out / f"{variant}-seed0"
        assert run["run_dir"] == str(run_dir) and run["seed"] == 0
        assert run["config"]["model"]["variant"] == variant.split("+")[0]
        assert run["config"]["loss"]["duplicate_questions"] == ("mask" if "+dup-mask" in variant else "none")
        assert run["config"]["data"]["val_data"] == str(out / "val-subset-16")
        # During training: the subset at steps 2 and 4; at the end: the whole split, in its own folder.
        assert entry["val_curve"]["step"] == [2, 4]
        subset_eval = json.loads((run_dir / "eval" / "val_metrics_step00000004.json").read_text())
        whole_eval = json.loads(
            (run_dir / "full_eval" / "eval" / "global_step4" / "val_metrics_step00000004.json").read_text()
        )
        assert (subset_eval["count"], whole_eval["count"]) == (16, 32)
        assert entry["full_val_vqa_score"]["values"] == [whole_eval["vqa_score"]]
        assert entry["final_val_vqa_score"]["values"] == [pytest.approx(subset_eval["vqa_score"])]
        # TensorBoard events in each run folder itself (the runs show under their folders' names); the whole-split
        # evaluation writes under full_eval/eval/<tag>/ only
        assert list(run_dir.glob("events.out.tfevents.*"))
        assert list((run_dir / "full_eval" / "eval" / "global_step4").glob("events.out.tfevents.*"))
        assert not list((run_dir / "full_eval").glob("events.out.tfevents.*"))

    with Image.open(out / "loss_curves.png") as png:
        png.verify()
    report = (out / "report.md").read_text()
    for variant in variants:
        assert f"`{variant}`" in report
    assert "![loss curves](loss_curves.png)" in report
    assert "`tiny`, 4 optimizer steps" in report
    assert "fixed subset of 16 of the 32 questions" in report and "| step 2 | step 4 |" in report
    assert "| `clip-infonce-dot+dup-mask` | `clip-infonce-dot` | steps to VQA loss < 2 |" in report

    # A run folder without config.json (the schema allows config null) still gets a report.
    for entry in results["variants"].values():
        for run in entry["runs"]:
            run["config"] = None
    write_report(results, tmp_path / "no_config.md")
    assert "`tiny`, 4 optimizer steps" in (tmp_path / "no_config.md").read_text()

    # Finished runs and their whole-split scores are kept: a second call only rebuilds the outputs.
    kept = [
        out / "baseline-seed0" / "run_complete.json",
        out / "baseline-seed0" / "full_eval" / "config.json",
    ]
    before = [p.stat().st_mtime_ns for p in kept]
    assert main([*argv, "--report-only"]) == 0
    assert main(argv) == 0
    assert [p.stat().st_mtime_ns for p in kept] == before


def test_verdict_compares_with_the_larger_seed_range_at_the_boundaries():
    """The difference of means against the larger of the two ranges: equal to it is unresolved, beyond it resolves;
    between the smaller and the larger range stays unresolved."""
    a, b = [0.0, 10.0], [12.0, 14.0]  # means 5 and 13: 8 apart; ranges 10 and 2
    assert verdict(a, b) == ("unresolved", pytest.approx(-8.0), pytest.approx(10.0))
    assert verdict([0.0, 16.0], [23.0, 25.0]) == (
        "unresolved",
        pytest.approx(-16.0),
        pytest.approx(16.0),
    )  # equal
    assert verdict([0.0, 16.0], [23.0, 25.5])[0] == "a<b"  # 16.25 > 16
    assert verdict(b, a)[0] == "unresolved" and verdict([23.0, 25.5], [0.0, 16.0])[0] == "a>b"


def test_report_opens_with_a_verdict_per_claim_and_the_figure_draws_one_band_per_variant(tmp_path):
    """Three seeds per variant: CLIP's embedding clearly above ViLT's (resolved), the InfoNCE variant within the
    seed range of the ablation (not resolved); the figure from results.json alone, one legend entry per variant."""
    val_steps = [200, 400, 600, 800]
    runs = {
        "baseline": [
            _run_record(s, val_steps, [0.5, 0.6, 0.7, 0.80 + 0.01 * s], 0.85 + 0.01 * s, 0.3)
            for s in range(3)
        ],
        "clip-no-infonce": [
            _run_record(s, val_steps, [0.6, 0.7, 0.8, 0.93 + 0.01 * s], 0.95 + 0.01 * s) for s in range(3)
        ],
        "clip-infonce-dot": [
            _run_record(s, val_steps, [0.6, 0.7, 0.8, 0.92 + 0.02 * s], 0.94 + 0.02 * s, 0.01 * s)
            for s in range(3)
        ],
    }
    variants = {v: parse_variant(v) for v in runs}
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION, "preset": "demo", "steps": None, "seeds": [0, 1, 2],
        "variants_order": list(runs), "train_data": "data/train", "val_data": "data/test", "val_subset": None,
        "loss_thresholds": [1.0], "smooth_steps": 100, "machine": "CPU only, 2 cores (x86_64)", "date": "2026-12-07",
        "wall_time_s": 900.0, "variants": aggregate(runs, [1.0], variants, 100),
    }  # fmt: skip
    results = json.loads(json.dumps(results))  # as written to and read from results.json
    validate_results(results)
    band = results["variants"]["clip-infonce-dot"]["loss_curve"]
    i = band["step"].index(400)
    smoothed = [smooth(r["curves"]["step"], r["curves"]["vqa_loss"])[79] for r in runs["clip-infonce-dot"]]
    assert (band["min"][i], band["max"][i]) == pytest.approx((min(smoothed), max(smoothed)), abs=1e-5)
    assert band["mean"][i] == pytest.approx(sum(smoothed) / 3, abs=1e-5)

    write_report(results, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    opening = report.split("## Question")[0]
    assert opening.startswith("# Comparison report: demo preset\n\n## Verdicts in brief")
    assert (
        "**CLIP's visual embedding scores higher than ViLT's (ablation)**: `clip-no-infonce` against `baseline`: "
        "**supported**." in opening
    )
    assert "VQA score, whole split, end: 0.9600 (0.9500-0.9700) vs 0.8600 (0.8500-0.8700)." in opening
    assert "`clip-infonce-dot` against `clip-no-infonce`: **not resolved**." in opening
    # resolved claims come first; three lines each
    first = opening.split("\n\n")[2].splitlines()
    assert len(first) == 3 and "supported" in first[0]

    labels = plot_results(results, tmp_path / "loss_curves.png")
    assert labels == [f"{v} (3 seeds)" for v in runs]
    with Image.open(tmp_path / "loss_curves.png") as png:
        png.verify()
    old = json.loads(json.dumps(results))
    del old["variants"]["baseline"]["loss_curve"]  # a results.json written before the curves were kept
    validate_results(old)
    with pytest.raises(ValueError, match="draw it from the run folders"):
        plot_results(old, tmp_path / "old.png")
