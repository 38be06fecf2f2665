"""The paper's experiment as one command: train every variant with the same seeds, data order and hyperparameters,
then write `results.json`, `loss_curves.png` (the paper's Figure 3, plus validation VQA score) and `report.md`.

    python -m trainer.compare --preset demo --train-data data/easy-vqa/train --val-data data/easy-vqa/test \
        --run-dir runs/demo --variants baseline,clip-infonce-cos,clip-infonce-dot --seeds 0

Each run goes through the real stack (shards -> loader -> DeepSpeed engine -> TensorBoard) as its own process:
`deepspeed --num_gpus N trainer/main.py` where there are GPUs, `python trainer/main.py` (one CPU rank) otherwise.
A comparison is resumable: finished runs are kept, interrupted ones continue from their last checkpoint.

What is compared: the VQA loss (comparable across variants; the total loss of the InfoNCE variants also holds
lambda * InfoNCE), the step from which its smoothed curve stays under each threshold, validation VQA score, and the
step-to-step noise of the loss late in training (the paper's "steadier").

How, so that the numbers can carry a verdict:
- Smoothing without lag: a local linear fit over a centred window of `--smooth-steps` training steps (a straight
  line through the raw points around each step, read at that step). A ramp comes back unchanged and a step change is
  crossed where it happens, so "steps until the loss stays under t" measures the run, not the filter. (An EMA of
  weight 0.9 per logged point lags by about ten logging intervals on a falling curve.)
- Noise ("steadiness"): the standard deviation of successive differences of log(VQA loss) over the second half of
  training, divided by sqrt(2): the noise of one logged point, in relative terms. A trend adds the same amount to
  every difference, so the slope of the curve does not enter it.
- Verdicts: a difference between two variants is claimed ("supports" / "contradicts") only when the difference of
  their means over seeds is larger than the larger of their two seed ranges (max - min); otherwise, and always with
  one seed, it is "not resolved". The training-time claim is checked against ViLT (`baseline`) and against the
  ablation without InfoNCE (`clip-no-infonce`), which isolates the alignment from the CLIP tower.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline import atomic

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ("baseline", "clip-infonce-cos", "clip-infonce-dot")
PAPER_MODEL = {
    "baseline": "(1) ViLT",
    "clip-infonce-cos": "(2) CLIP + InfoNCE, cosine (eq. 1)",
    "clip-infonce-dot": "(3) CLIP + InfoNCE, inner product (eq. 2)",
    "clip-no-infonce": "ablation: CLIP embedding, no InfoNCE",
    "clip-symmetric-ce": "CLIP's symmetric cross-entropy",
}
SMOOTH_STEPS = 100  # default width of the centred smoothing window, in training steps
DONE_FILE = "run_complete.json"
RESULTS_SCHEMA_VERSION = 2


# results.json, documented: top-level keys and their types; every variant entry; every spread ({mean, std, values}).
RESULTS_SCHEMA: dict[str, Any] = {
    "schema_version": int,
    "preset": str,
    "steps": (int, type(None)),
    "seeds": list,
    "variants_order": list,
    "train_data": str,
    "val_data": str,
    "loss_thresholds": list,
    "smooth_steps": int,
    "machine": str,
    "date": str,
    "wall_time_s": (int, float),
    "variants": dict,
}
VARIANT_SCHEMA: dict[str, str] = {
    "paper_model": "str",
    "final_val_vqa_score": "spread",  # last evaluation of each run
    "best_val_vqa_score": "spread",  # best evaluation of each run
    "steps_to_loss_below": "spread per threshold",  # first step from which the smoothed VQA loss stays below
    "loss_noise": "spread",  # std of successive differences of log VQA loss / sqrt(2), second half of training
    "wall_time_s": "spread",
    "samples_per_second": "spread",  # median of the logged train/samples_per_second
    "runs": "list of per-run records (seed, run_dir, the numbers above, the configuration used)",
}


def validate_results(results: dict[str, Any]) -> None:
    """Raise ValueError naming the first field of results.json that does not follow the documented schema."""

    def spread(value: Any, where: str) -> None:
        if not isinstance(value, dict) or set(value) != {"mean", "std", "values"}:
            raise ValueError(f"results.json: {where} is not a {{mean, std, values}} spread")

    for key, typ in RESULTS_SCHEMA.items():
        if key not in results or not isinstance(results[key], typ):
            raise ValueError(f"results.json: '{key}' missing or not {typ}")
    for variant, entry in results["variants"].items():
        missing = set(VARIANT_SCHEMA) - set(entry)
        if missing:
            raise ValueError(f"results.json: variants.{variant} lacks {sorted(missing)}")
        for key, kind in VARIANT_SCHEMA.items():
            if kind == "spread":
                spread(entry[key], f"variants.{variant}.{key}")
        for t in results["loss_thresholds"]:
            spread(
                entry["steps_to_loss_below"].get(f"{t:g}"), f"variants.{variant}.steps_to_loss_below.{t:g}"
            )
        for run in entry["runs"]:
            for key in (
                "seed",
                "run_dir",
                "final_val_vqa_score",
                "best_val_vqa_score",
                "config",
                "wall_time_s",
            ):
                if key not in run:
                    raise ValueError(f"results.json: a run of {variant} lacks '{key}'")


class CompareError(RuntimeError):
    """A comparison that cannot run or whose runs failed; the message names the run and its log."""


# -- reading a finished run ------------------------------------------------------------------------------------
def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """All scalars of a run's TensorBoard event files: tag -> [(step, value, wall_time)], sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, tuple[float, float]]] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for e in acc.Scalars(tag):
                series.setdefault(tag, {})[e.step] = (
                    e.value,
                    e.wall_time,
                )  # a resumed run rewrites its steps
    return {tag: sorted((s, v, w) for s, (v, w) in points.items()) for tag, points in series.items()}


def smooth(steps: list[int], values: list[float], window: int = SMOOTH_STEPS) -> list[float]:
    """Local linear fit over the points within window/2 steps of each step, read at that step (no lag on a trend)."""
    out = []
    for s0 in steps:
        pts = [(s - s0, v) for s, v in zip(steps, values, strict=True) if abs(s - s0) <= window / 2]
        n = len(pts)
        mean_x = sum(x for x, _ in pts) / n
        mean_y = sum(y for _, y in pts) / n
        sxx = sum((x - mean_x) ** 2 for x, _ in pts)
        if n < 3 or sxx == 0:
            out.append(mean_y)
            continue
        slope = sum((x - mean_x) * (y - mean_y) for x, y in pts) / sxx
        out.append(mean_y - slope * mean_x)  # the fitted line at x = 0, i.e. at s0
    return out


def steps_to_stay_under(steps: list[int], smoothed: list[float], threshold: float) -> int | None:
    """First logged step from which the smoothed loss stays below `threshold` to the end (None if it never does)."""
    first = None
    for step, value in zip(steps, smoothed, strict=True):
        if value < threshold:
            first = step if first is None else first
        else:
            first = None
    return first


def loss_noise(values: list[float]) -> float | None:
    """Noise of the logged loss over the second half of training, independent of its slope (module docstring)."""
    late = [math.log(v) for v in values[len(values) // 2 :] if v > 0]
    if len(late) < 4:
        return None
    diffs = [b - a for a, b in zip(late, late[1:], strict=False)]
    return statistics.pstdev(diffs) / math.sqrt(2)


def verdict(a: list[float], b: list[float]) -> tuple[str, float | None, float | None]:
    """Whether means over seeds differ by more than the seed-to-seed spread: ("a<b" | "a>b" | "unresolved", the
    difference of means a - b, the spread it is compared with: the larger of the two ranges)."""
    if len(a) < 2 or len(b) < 2:
        return "unresolved", None, None
    diff = statistics.fmean(a) - statistics.fmean(b)
    spread = max(max(a) - min(a), max(b) - min(b))
    if abs(diff) <= spread:
        return "unresolved", diff, spread
    return ("a<b" if diff < 0 else "a>b"), diff, spread


def summarise_run(run_dir: Path, thresholds: list[float], window: int = SMOOTH_STEPS) -> dict[str, Any]:
    from trainer.run_folder import RunFolder

    scalars = read_scalars(run_dir)
    if "train/vqa_loss" not in scalars:
        raise CompareError(f"{run_dir}: no train/vqa_loss in its TensorBoard events (did the run log?)")
    steps = [s for s, _, _ in scalars["train/vqa_loss"]]
    vqa = [v for _, v, _ in scalars["train/vqa_loss"]]
    smoothed = smooth(steps, vqa, window)
    val = scalars.get("val/vqa_score", [])
    best = max(val, key=lambda p: p[1]) if val else None
    sps = [v for _, v, _ in scalars.get("train/samples_per_second", [])]
    done = json.loads((run_dir / DONE_FILE).read_text())
    config_file = RunFolder(run_dir).config_file
    return {
        "run_dir": str(run_dir),
        "seed": done["seed"],
        "final_val_vqa_score": val[-1][1] if val else None,
        "best_val_vqa_score": best[1] if best else None,
        "best_val_step": best[0] if best else None,
        "final_train_vqa_loss": smoothed[-1],
        "steps_to_loss_below": {f"{t:g}": steps_to_stay_under(steps, smoothed, t) for t in thresholds},
        "loss_noise": loss_noise(vqa),
        "wall_time_s": done["wall_time_s"],
        "samples_per_second": statistics.median(sps) if sps else None,
        "config": json.loads(config_file.read_text()) if config_file.is_file() else None,
        "curves": {
            "step": steps,
            "vqa_loss": vqa,
            "loss": [v for _, v, _ in scalars.get("train/loss", [])],
            "infonce_loss": [v for _, v, _ in scalars.get("train/infonce_loss", [])],
            "val_step": [s for s, _, _ in val],
            "val_vqa_score": [v for _, v, _ in val],
        },
    }


def _spread(values: list[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "values": values}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
        "values": values,
    }


def aggregate(runs: dict[str, list[dict[str, Any]]], thresholds: list[float]) -> dict[str, Any]:
    out = {}
    for variant, rs in runs.items():
        out[variant] = {
            "paper_model": PAPER_MODEL.get(variant, variant),
            "final_val_vqa_score": _spread([r["final_val_vqa_score"] for r in rs]),
            "best_val_vqa_score": _spread([r["best_val_vqa_score"] for r in rs]),
            "steps_to_loss_below": {
                f"{t:g}": _spread([r["steps_to_loss_below"][f"{t:g}"] for r in rs]) for t in thresholds
            },
            "loss_noise": _spread([r["loss_noise"] for r in rs]),
            "wall_time_s": _spread([r["wall_time_s"] for r in rs]),
            "samples_per_second": _spread([r["samples_per_second"] for r in rs]),
            "runs": [{k: v for k, v in r.items() if k != "curves"} for r in rs],
        }
    return out


# -- running ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    variant: str
    seed: int
    run_dir: Path


def local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch CUDA runtime: CPU
        return 0


def trainer_command(spec: RunSpec, args: argparse.Namespace, resume: bool) -> list[str]:
    gpus = args.num_gpus if args.num_gpus is not None else local_gpu_count()
    if gpus > 0:
        launcher = [
            shutil.which("deepspeed") or "deepspeed",
            "--num_gpus",
            str(gpus),
            "--master_port",
            str(args.master_port),
        ]
    else:
        launcher = [sys.executable]
    cmd = [
        *launcher,
        str(REPO / "trainer" / "main.py"),
        "--preset",
        args.preset,
        "--run-dir",
        str(spec.run_dir),
    ]
    cmd += ["--train-data", args.train_data, "--val-data", args.val_data]
    if args.steps is not None:
        cmd += ["--max-steps", str(args.steps)]
    for item in [*args.set, f"model.variant={spec.variant}", f"train.seed={spec.seed}"]:
        cmd += ["--set", item]
    if resume:
        cmd += ["--resume", "latest"]
    return cmd


def run_one(spec: RunSpec, args: argparse.Namespace) -> None:
    """Train one variant/seed unless it already finished; continue it if it was interrupted."""
    if (spec.run_dir / DONE_FILE).is_file():
        log.info("%s seed %d: already complete, kept", spec.variant, spec.seed)
        return
    ckpts = spec.run_dir / "checkpoints"
    resume = ckpts.is_dir() and any(ckpts.iterdir())
    cmd = trainer_command(spec, args, resume)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    log_file = spec.run_dir / "train.log"
    print(
        f"[compare] {spec.variant} seed {spec.seed}{' (resuming)' if resume else ''}: {' '.join(cmd)}",
        flush=True,
    )
    start = time.time()
    with log_file.open("a") as fh:
        # stderr carries the progress bar: shown live; stdout (log lines) goes to the run's log file too.
        proc = subprocess.run(
            cmd, cwd=REPO, stdout=fh, stderr=None if args.show_progress else fh, check=False
        )
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise CompareError(
            f"{spec.variant} seed {spec.seed} failed (exit {proc.returncode}); log: {log_file}\n{tail}"
        )
    done = {"variant": spec.variant, "seed": spec.seed, "wall_time_s": round(time.time() - start, 1)}
    atomic.write_text(spec.run_dir / DONE_FILE, json.dumps(done) + "\n")


# -- outputs ---------------------------------------------------------------------------------------------------
def plot(runs: dict[str, list[dict[str, Any]]], out: Path, window: int = SMOOTH_STEPS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(13, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (variant, rs) in enumerate(runs.items()):
        c = colours[i % len(colours)]
        for j, r in enumerate(rs):
            cur = r["curves"]
            label = f"{variant}" + (f" (seed {r['seed']})" if len(rs) > 1 else "")
            ax_loss.plot(cur["step"], cur["vqa_loss"], color=c, alpha=0.2, linewidth=0.8)
            style = ["-", "--", ":", "-."][j % 4]  # seeds of one variant share a colour
            ax_loss.plot(
                cur["step"],
                smooth(cur["step"], cur["vqa_loss"], window),
                color=c,
                linewidth=1.6,
                label=label,
                linestyle=style,
            )
            if cur["val_step"]:
                ax_val.plot(
                    cur["val_step"],
                    cur["val_vqa_score"],
                    color=c,
                    marker="o",
                    markersize=3,
                    linestyle=style,
                    label=label,
                )
    ax_loss.set(
        title=f"Training VQA loss (raw, faint; local linear fit over {window} steps, solid)",
        xlabel="step",
        ylabel="VQA loss (BCE x classes)",
    )
    ax_loss.set_yscale("log")
    ax_val.set(title="Validation VQA score", xlabel="step", ylabel="VQA score")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic.open_atomic(out) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


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
    """Plain statements of what the numbers say about the paper's claims, whichever way they fall."""
    lines = []
    scores = {
        v: s["best_val_vqa_score"]["mean"]
        for v, s in summary.items()
        if s["best_val_vqa_score"]["mean"] is not None
    }
    if scores:
        best = max(scores, key=scores.get)
        lines.append(
            f"Best validation VQA score: **{best}** ({scores[best]:.4f}); "
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
    lines += claim_lines(summary, thresholds)
    seeds = max(len(s["runs"]) for s in summary.values())
    if seeds == 1:
        lines.append(
            "One seed per variant: no difference can be told from seed noise, so every verdict is 'not resolved'; "
            "run with `--seeds 0,1,2,3,4` for a spread."
        )
    return lines


def _values(spread: dict[str, Any], never: float) -> list[float]:
    """A spread's per-seed values; a run that never reached a threshold counts as `never` (past its last step)."""
    return [never if v is None else v for v in spread["values"]]


def _say(outcome: str, claim_holds_when: str) -> str:
    if outcome == "unresolved":
        return "not resolved"
    return "supports" if outcome == claim_holds_when else "contradicts"


def claim_lines(summary: dict[str, Any], thresholds: list[float]) -> list[str]:
    """The paper's two claims, each verdict by the noise rule of the module docstring."""
    lines = []
    last_step = max(
        (max(r["config"]["train"]["max_steps"] for r in s["runs"] if r["config"]) for s in summary.values()
         if any(r["config"] for r in s["runs"])),
        default=0,
    )  # fmt: skip
    never = float(last_step + 1)
    references = [r for r in ("baseline", "clip-no-infonce") if r in summary]
    for v in ("clip-infonce-cos", "clip-infonce-dot"):
        if v not in summary:
            continue
        for ref in references:
            parts = []
            for t in thresholds:
                key = f"{t:g}"
                a = _values(summary[v]["steps_to_loss_below"][key], never)
                b = _values(summary[ref]["steps_to_loss_below"][key], never)
                outcome, diff, spread = verdict(a, b)
                detail = "" if diff is None else f", {diff:+.0f} steps against a seed range of {spread:.0f}"
                parts.append(f"< {t:g}: {_say(outcome, 'a<b')}{detail}")
            lines.append(
                f"Claim 'converges in fewer steps' for {v} against {ref} (steps until the VQA loss stays under each "
                f"threshold): " + "; ".join(parts) + "."
            )
    if "clip-infonce-cos" in summary and "clip-infonce-dot" in summary:
        dot = [v for v in summary["clip-infonce-dot"]["loss_noise"]["values"] if v is not None]
        cos = [v for v in summary["clip-infonce-cos"]["loss_noise"]["values"] if v is not None]
        outcome, diff, spread = verdict(dot, cos)
        detail = "" if diff is None else f" (difference {diff:+.4f} against a seed range of {spread:.4f})"
        if dot and cos:
            lines.append(
                f"Claim '(3) is steadier than (2)': late-training loss noise {statistics.fmean(dot):.4f} for the "
                f"inner product and {statistics.fmean(cos):.4f} for cosine: {_say(outcome, 'a<b')}{detail}."
            )
    return lines


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


def write_report(results: dict[str, Any], out: Path) -> None:
    s = results["variants"]
    th = results["loss_thresholds"]
    head = [
        "variant",
        "paper model",
        "final val VQA",
        "best val VQA",
        *[f"steps to loss < {t:g}" for t in th],
        "loss noise",
        "samples/s",
        "wall time (s)",
    ]
    rows = [
        [
            f"`{v}`",
            r["paper_model"],
            _fmt(r["final_val_vqa_score"], 4),
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
    text = (
        f"""# Comparison report: {results["preset"]} preset

## Question
Does replacing ViLT's visual embedding with CLIP and aligning CLIP's image and question features with InfoNCE before
fusion make VQA fine-tuning converge in fewer steps (Takahira et al.)? And is the inner-product InfoNCE (eq. 2)
steadier than the cosine one (eq. 1)?

## Setup
- Preset `{results["preset"]}`, {_steps_run(results)} optimizer steps, seeds {", ".join(map(str, results["seeds"]))};
  every variant with the same seeds, data order and hyperparameters.
- Training data `{results["train_data"]}`, validation `{results["val_data"]}`.
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

## What the numbers say
"""
        + "\n".join(f"- {line}" for line in findings(s, th))
        + """

These are measurements of this run on this data, not a verdict on the method in general.
"""
    )
    atomic.write_text(out, text)


def machine_description() -> str:
    import platform

    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001
        pass
    return f"CPU only, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.compare",
        description="Run the paper's comparison: every variant with the same seeds, data order and hyperparameters; "
        "write results.json, loss_curves.png and report.md in --run-dir.",
    )
    p.add_argument("--preset", default="demo", help="trainer preset for every run (default: demo)")
    p.add_argument("--train-data", required=True, metavar="DIR", help="training shard folder")
    p.add_argument("--val-data", required=True, metavar="DIR", help="validation shard folder")
    p.add_argument(
        "--run-dir", default="runs/compare", metavar="DIR", help="comparison folder (default runs/compare)"
    )
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated model variants (default: {','.join(DEFAULT_VARIANTS)}; also clip-no-infonce)",
    )
    p.add_argument(
        "--steps", type=int, default=None, metavar="N", help="optimizer steps per run (default: preset's)"
    )
    p.add_argument(
        "--seeds", default="0", help="comma-separated seeds, each run for every variant (default: 0)"
    )
    p.add_argument(
        "--loss-thresholds",
        default="2.0,1.5,1.0",
        help="VQA-loss levels for 'steps to stay under' (default: 2.0,1.5,1.0)",
    )
    p.add_argument(
        "--smooth-steps",
        type=int,
        default=SMOOTH_STEPS,
        metavar="N",
        help=f"width of the centred smoothing window in training steps (default: {SMOOTH_STEPS})",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="configuration override for every run (repeatable)",
    )
    p.add_argument(
        "--num-gpus", type=int, default=None, help="GPUs per run (default: all local GPUs; 0 = CPU)"
    )
    p.add_argument("--master-port", type=int, default=29512, help="rendezvous port of the deepspeed launcher")
    p.add_argument("--report-only", action="store_true", help="only rebuild the outputs from finished runs")
    p.add_argument("--quiet", dest="show_progress", action="store_false", help="no live progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from trainer.config import VARIANTS

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        print(
            f"compare: error: --variants: unknown {unknown} (one of: {', '.join(VARIANTS)})", file=sys.stderr
        )
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        thresholds = [float(t) for t in args.loss_thresholds.split(",")]
    except ValueError:
        print("compare: error: --seeds and --loss-thresholds take comma-separated numbers", file=sys.stderr)
        return 2
    if args.smooth_steps < 1:
        print(f"compare: error: --smooth-steps must be >= 1, got {args.smooth_steps}", file=sys.stderr)
        return 2
    for flag, folder in (("--train-data", args.train_data), ("--val-data", args.val_data)):
        if not (Path(folder) / "manifest.json").is_file():
            print(
                f"compare: error: {flag} {folder}: not a shard folder (no manifest.json); convert it with "
                f"python -m data_pipeline.convert",
                file=sys.stderr,
            )
            return 2
    root = Path(args.run_dir)
    specs = [RunSpec(v, s, root / f"{v}-seed{s}") for s in seeds for v in variants]
    start = time.time()
    try:
        if not args.report_only:
            for spec in specs:
                run_one(spec, args)
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for spec in specs:
            if not (spec.run_dir / DONE_FILE).is_file():
                raise CompareError(
                    f"{spec.run_dir}: run not complete; run the comparison without --report-only"
                )
            runs[spec.variant].append(summarise_run(spec.run_dir, thresholds, args.smooth_steps))
    except CompareError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 1
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "preset": args.preset,
        "steps": args.steps,
        "seeds": seeds,
        "variants_order": variants,
        "train_data": args.train_data,
        "val_data": args.val_data,
        "loss_thresholds": thresholds,
        "smooth_steps": args.smooth_steps,
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "wall_time_s": sum(r["wall_time_s"] for rs in runs.values() for r in rs)
        if args.report_only
        else time.time() - start,
        "variants": aggregate(runs, thresholds),
    }
    validate_results(results)
    atomic.write_text(root / "results.json", json.dumps(results, indent=2) + "\n")
    plot(runs, root / "loss_curves.png", args.smooth_steps)
    write_report(results, root / "report.md")
    print(f"[compare] report: {root / 'report.md'}")
    print(f"[compare] watch:  tensorboard --logdir {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
