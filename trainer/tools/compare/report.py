"""A comparison's outputs besides results.json: loss_curves.png (the paper's Figure 3 plus the validation VQA score)
and report.md, whose verdict table states what the numbers say about each claim (trainer/tools/compare/claims.py),
whichever way they fall."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import atomic
from trainer.tools.compare.claims import claims, summary_lines, verdict_table
from trainer.tools.compare.results import LOSS_CURVE, SMOOTH_STEPS, _val_curve, loss_band, validate_results


def validation_title(subset: dict[str, Any] | None) -> str:
    if subset is None:
        return "Validation VQA score (mean, min-max band)"
    # Two lines: one would run past the axes of the figure's right panel.
    return (
        f"Validation VQA score: fixed subset of {subset['size']:,} of {subset['of_samples']:,} questions\n"
        "(lines: mean, min-max band), whole split at the end (stars: mean, bars: min-max)"
    )


def plot(
    runs: dict[str, list[dict[str, Any]]],
    out: Path,
    window: int = SMOOTH_STEPS,
    subset: dict[str, Any] | None = None,
) -> None:
    """loss_curves.png from the runs' records (results.summarise_run, with their curves)."""
    summary = {
        v: {
            LOSS_CURVE: loss_band(rs, window),
            "val_curve": _val_curve(rs),
            "full_val_vqa_score": {"values": [r["full_val_vqa_score"] for r in rs]},
            "last_step": max((r["curves"]["step"][-1] for r in rs if r["curves"]["step"]), default=None),
        }
        for v, rs in runs.items()
    }
    draw(summary, out, window, subset)


def plot_results(results: dict[str, Any], out: Path) -> list[str]:
    """loss_curves.png from results.json alone; its variants must carry their loss curves (results.LOSS_CURVE)."""
    lacking = [v for v, e in results["variants"].items() if LOSS_CURVE not in e]
    if lacking:
        raise ValueError(
            f"results.json: variants {', '.join(lacking)} carry no {LOSS_CURVE} (written before the figure could be "
            "drawn from results.json): draw it from the run folders with the comparison's --report-only"
        )
    summary = {
        v: dict(e, last_step=e[LOSS_CURVE]["step"][-1] if e[LOSS_CURVE]["step"] else None)
        for v, e in results["variants"].items()
    }
    return draw(summary, out, results["smooth_steps"], results.get("val_subset"))


def draw(
    summary: dict[str, dict[str, Any]], out: Path, window: int, subset: dict[str, Any] | None = None
) -> list[str]:
    """Left: the smoothed training VQA loss per variant, mean over seeds with the min-max band. Right: the validation
    score during training (on the subset where there is one), mean with the min-max band, and with a subset the
    whole-split score at the end (star: mean; bar: min-max). One legend entry per variant, below both panels;
    returns the legend's labels."""
    # matplotlib (about 0.25 s to import) only where a figure is drawn: `python -m trainer.tools.compare --help` and the
    # table need not wait.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(13, 5.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for i, (variant, entry) in enumerate(summary.items()):
        c = colours[i % len(colours)]
        band = entry[LOSS_CURVE]
        seeds = len(entry["full_val_vqa_score"]["values"])
        (line,) = ax_loss.plot(
            band["step"],
            band["mean"],
            color=c,
            linewidth=1.8,
            label=f"{variant} ({seeds} seed{'s' * (seeds > 1)})",
        )
        handles.append(line)
        if seeds > 1:
            ax_loss.fill_between(band["step"], band["min"], band["max"], color=c, alpha=0.18, linewidth=0)
        curve = entry["val_curve"]
        if curve["step"]:
            points = [[v for v in p["values"] if v is not None] for p in curve["vqa_score"]]
            steps = [s for s, p in zip(curve["step"], points, strict=True) if p]
            points = [p for p in points if p]
            ax_val.plot(
                steps, [sum(p) / len(p) for p in points], color=c, marker="o", markersize=3, linewidth=1.6
            )
            if seeds > 1:
                ax_val.fill_between(
                    steps,
                    [min(p) for p in points],
                    [max(p) for p in points],
                    color=c,
                    alpha=0.18,
                    linewidth=0,
                )
        whole = [v for v in entry["full_val_vqa_score"]["values"] if v is not None]
        if subset is not None and whole and entry["last_step"] is not None:
            mean = sum(whole) / len(whole)
            dodge = (i - (len(summary) - 1) / 2) * 0.012 * entry["last_step"]  # side by side, not on top
            ax_val.errorbar(
                [entry["last_step"] + dodge],
                [mean],
                yerr=[[mean - min(whole)], [max(whole) - mean]],
                color=c,
                marker="*",
                markersize=11,
                capsize=3,
                linestyle="",
            )
    spread = (
        "mean over seeds, min-max band"
        if any(len(e["full_val_vqa_score"]["values"]) > 1 for e in summary.values())
        else "one seed"
    )
    ax_loss.set(
        title=f"Training VQA loss, local linear fit over {window} steps ({spread})",
        xlabel="step",
        ylabel="VQA loss (BCE x classes)",
    )
    ax_loss.set_yscale("log")
    ax_val.set(title=validation_title(subset), xlabel="step", ylabel="VQA score")
    for ax in (ax_loss, ax_val):
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3), fontsize=9, frameon=False)
    rows = (len(handles) + 2) // 3
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))  # room below the panels for the legend's rows
    with atomic.open_atomic(out) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return [h.get_label() for h in handles]


def _fmt(spread: dict[str, Any], digits: int = 3, integer: bool = False) -> str:
    if spread["mean"] is None:
        return "never" if integer else "-"
    missing = sum(v is None for v in spread["values"])
    mean = f"{spread['mean']:.0f}" if integer else f"{spread['mean']:.{digits}f}"
    text = (
        mean + (f" ± {spread['std']:.0f}" if integer else f" ± {spread['std']:.{digits}f}")
        if len(spread["values"]) > 1
        else mean
    )
    return text + (f" ({missing} never)" if missing else "")


def findings(summary: dict[str, Any], thresholds: list[float]) -> list[str]:
    """Plain statements of what the numbers show besides the verdicts, whichever way they fall."""
    lines = []
    scores = {
        v: s["full_val_vqa_score"]["mean"]
        for v, s in summary.items()
        if s["full_val_vqa_score"]["mean"] is not None
    }
    if scores:
        best = max(scores, key=scores.get)
        lines.append(
            f"Highest VQA score on the whole validation split at the end: **{best}** ({scores[best]:.4f}); "
            + ", ".join(f"{v} {s:.4f}" for v, s in sorted(scores.items(), key=lambda kv: -kv[1]) if v != best)
            + "."
        )
    for t in thresholds:
        reached = {v: s["steps_to_loss_below"][f"{t:g}"]["mean"] for v, s in summary.items()}
        got = {v: s for v, s in reached.items() if s is not None}
        if not got:
            lines.append(f"No variant's smoothed VQA loss stayed under {t:g}.")
            continue
        order = sorted(got, key=got.get)
        never = [v for v in reached if reached[v] is None]
        lines.append(
            f"VQA loss stays under {t:g} first for **{order[0]}** (step {got[order[0]]:.0f})"
            + "".join(f", then {v} ({got[v]:.0f})" for v in order[1:])
            + (f"; never for {', '.join(never)}" if never else "")
            + "."
        )
    seeds = max(len(s["runs"]) for s in summary.values())
    if seeds == 1:
        lines.append(
            "One seed per variant: no difference can be told from seed noise, so every verdict is 'not resolved'; "
            "run with `--seeds 0,1,2,3,4` for a spread."
        )
    return lines


def validation_table(summary: dict[str, Any]) -> str:
    """The evaluations during training: one row per variant, one column per step (mean ± std over seeds)."""
    steps = sorted({s for entry in summary.values() for s in entry["val_curve"]["step"]})
    if not steps:
        return "No evaluation during training."
    rows = []
    for v, entry in summary.items():
        at = dict(zip(entry["val_curve"]["step"], entry["val_curve"]["vqa_score"], strict=True))
        rows.append([f"`{v}`", *(_fmt(at[s], 3) if s in at else "" for s in steps)])
    head = ["variant", *(f"step {s}" for s in steps)]
    return "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        + ["| " + " | ".join(r) + " |" for r in rows]
    )


def _steps_run(results: dict[str, Any]) -> str:
    """The optimizer steps the runs were configured with (one number when all agree, as they do in a comparison)."""
    steps = {
        run["config"]["train"]["max_steps"]
        for variant in results["variants"].values()
        for run in variant["runs"]
        if run["config"]  # None where a run folder had no config.json
    }
    if not steps:
        return "the preset's" if results["steps"] is None else str(results["steps"])
    return ", ".join(str(s) for s in sorted(steps))


def _validation_setup(results: dict[str, Any]) -> str:
    every = {
        run["config"]["train"]["eval_every"]
        for variant in results["variants"].values()
        for run in variant["runs"]
        if run["config"]
    }
    if not every:  # no run folder kept its config.json
        when = "(cadence not recorded)"
    elif every == {0}:
        when = "at the end of training only"
    else:
        when = f"every {', '.join(str(e) for e in sorted(every - {0}))} steps and at the end"
    sub = results.get("val_subset")
    if sub is None:
        return f"Validation `{results['val_data']}` (the whole split), {when}. {_scoring(results)}"
    return (
        f"Validation during training {when} on a fixed subset of {sub['size']:,} of the {sub['of_samples']:,} "
        f"questions of `{results['val_data']}` (drawn with seed {sub['seed']}, shard folder `{sub['folder']}`); "
        f"each run's last checkpoint is then scored on the whole split by the trainer's `--eval-only`. "
        f"{_scoring(results)}"
    )


def _scoring(results: dict[str, Any]) -> str:
    """Which version of the official VQA accuracy scored the runs (results.py `scoring_rule`)."""
    rules = sorted(
        {run.get("vqa_rule") for variant in results["variants"].values() for run in variant["runs"]} - {None}
    )
    if not rules:
        return "VQA scores: the official accuracy (version not recorded)."
    mixed = (
        " (the runs were scored by different versions: their scores do not compare)" if len(rules) > 1 else ""
    )
    return f"VQA scores: the official accuracy, version {', '.join(f'`{r}`' for r in rules)}{mixed}."


def write_report(results: dict[str, Any], out: Path) -> None:
    s = results["variants"]
    th = results["loss_thresholds"]
    subset = results.get("val_subset") is not None
    during = "subset VQA" if subset else "val VQA"
    head = [
        "variant",
        "paper model",
        "val VQA, whole split (end)",
        *([f"{during} (end)"] if subset else []),
        f"best {during}",
        *[f"steps to loss < {t:g}" for t in th],
        "loss noise",
        "samples/s",
        "wall time (s)",
    ]
    rows = [
        [
            f"`{v}`",
            r["paper_model"],
            _fmt(r["full_val_vqa_score"], 4),
            *([_fmt(r["final_val_vqa_score"], 4)] if subset else []),
            _fmt(r["best_val_vqa_score"], 4),
            *[_fmt(r["steps_to_loss_below"][f"{t:g}"], integer=True) for t in th],
            _fmt(r["loss_noise"], 4),
            _fmt(r["samples_per_second"], 1),
            _fmt(r["wall_time_s"], 0),
        ]
        for v, r in s.items()
    ]
    table = "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        + ["| " + " | ".join(r) + " |" for r in rows]
    )
    found = claims(s, th)
    verdicts = "\n".join(
        (line + "  " if (i % 3) != 2 else line + "\n") for i, line in enumerate(summary_lines(found))
    ).rstrip()
    seeds = len(results["seeds"])
    text = (
        f"""# Comparison report: {results["preset"]} preset

## Verdicts in brief
{seeds} seed{"s" * (seeds > 1)} per variant; a claim is supported or contradicted only where the means differ by more than the
seed-to-seed range (max - min), else it is not resolved. The tables below give every measure.

{verdicts if found else "No claim can be checked with these variants."}

## Question
Does replacing ViLT's visual embedding with CLIP and aligning CLIP's image and question features with InfoNCE before
fusion make VQA fine-tuning converge in fewer steps (Takahira et al.)? And is the inner-product InfoNCE (eq. 2)
steadier than the cosine one (eq. 1)? A variant with a modifier (`NAME+MODIFIER`, e.g. `clip-infonce-dot+dup-mask`)
is also checked against the plain variant it modifies.

## Setup
- Preset `{results["preset"]}`, {_steps_run(results)} optimizer steps, seeds {", ".join(map(str, results["seeds"]))};
  every variant with the same seeds, data order and hyperparameters.
- Training data `{results["train_data"]}`. {_validation_setup(results)}
- Machine: {results["machine"]}; date {results["date"]}; total wall time {results["wall_time_s"]:.0f} s.
- The loss compared is the VQA loss (BCE x number of answers), the part all variants share; its smoothed curve is
  a local linear fit over a centred window of {results["smooth_steps"]} steps (no lag: the figure shows it running
  through the raw points). "Steps to loss < t" is the first logged step from which the smoothed loss stays below t.
  "Loss noise" is the standard deviation of successive differences of log(VQA loss) over the second half of
  training, divided by sqrt(2); the slope of the curve does not enter it.
- Mean ± standard deviation over seeds where there is more than one. A claim is "supported" or "contradicted" only
  when the two means differ by more than the larger of the two seed ranges (max - min); otherwise, and with one
  seed, it is "not resolved". A run that never reaches a threshold counts as one step past the end.

## Results
{table}

![loss curves](loss_curves.png)

## Validation during training ({"fixed subset" if subset else "whole split"}, VQA score)
{validation_table(s)}

## Verdicts, measure by measure
{verdict_table(found) if found else "No claim can be checked with these variants."}

"Difference" is the mean of the variant minus the mean of the one it is checked against (steps, noise or score),
"seed range" the larger of their two ranges over seeds.

## What the numbers say
"""
        + "\n".join(f"- {line}" for line in findings(s, th))
        + """

These are measurements of this run on this data, not a verdict on the method in general.
"""
    )
    atomic.write_text(out, text)


def main(argv: list[str] | None = None) -> int:
    """Rebuild report.md (and loss_curves.png, where results.json carries the loss curves) beside a results.json."""
    p = argparse.ArgumentParser(
        prog="python -m trainer.tools.compare.report",
        description="Write report.md and loss_curves.png next to a comparison's results.json, from it alone.",
    )
    p.add_argument("results", type=Path, help="a comparison's results.json")
    args = p.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
        validate_results(results)
    except (OSError, ValueError) as exc:
        print(f"error: {args.results}: {exc}", file=sys.stderr)
        return 2
    write_report(results, args.results.parent / "report.md")
    print(f"wrote {args.results.parent / 'report.md'}")
    try:
        plot_results(results, args.results.parent / "loss_curves.png")
    except ValueError as exc:
        print(f"loss_curves.png left as it is: {exc}", file=sys.stderr)
        return 0
    print(f"wrote {args.results.parent / 'loss_curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
