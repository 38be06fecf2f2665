"""A comparison's numbers: a finished run's TensorBoard scalars, the smoothed VQA loss and when it stays under each
threshold, the late-training noise, the verdict rule, and results.json with its documented schema (the rules are in
the package docstring, trainer/tools/compare/__init__.py)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from trainer.modeling.loss_names import loss_tag
from trainer.tools.compare.variants import Variant, describe

REPO = Path(__file__).resolve().parents[3]  # trainer/tools/compare/results.py -> the repository


def shown(path: str | Path) -> str:
    """A path as results.json and the report record it: relative to the repository when inside it (a committed
    report names `data/easy-vqa/train`, not the checkout's location), else as given."""
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


PAPER_MODEL = {
    "baseline": "(1) ViLT",
    "clip-infonce-cos": "(2) CLIP + InfoNCE, cosine (eq. 1)",
    "clip-infonce-dot": "(3) CLIP + InfoNCE, inner product (eq. 2)",
    "clip-no-infonce": "ablation: CLIP embedding, no InfoNCE",
    "clip-symmetric-ce": "CLIP's symmetric cross-entropy",
}
SMOOTH_STEPS = 100  # default width of the centred smoothing window, in training steps
DONE_FILE = "run_complete.json"
FULL_EVAL_DIR = (
    "full_eval"  # RUN/full_eval: the trainer's --eval-only of the last checkpoint on the whole split
)
RESULTS_SCHEMA_VERSION = 3  # 3: variants with modifiers, the validation subset and the whole-split score


# results.json, documented: top-level keys and their types; every variant entry; every spread ({mean, std, values}).
RESULTS_SCHEMA: dict[str, Any] = {
    "schema_version": int,
    "preset": str,
    "steps": (int, type(None)),
    "seeds": list,
    "variants_order": list,
    "train_data": str,
    "val_data": str,  # the whole validation split
    "val_subset": (
        dict,
        type(None),
    ),  # {folder, size, seed, of_samples} when runs validated on a fixed subset
    "loss_thresholds": list,
    "smooth_steps": int,
    "machine": str,
    "date": str,
    "wall_time_s": (int, float),
    "variants": dict,
}
VARIANT_SCHEMA: dict[str, str] = {
    "paper_model": "str",
    "model_variant": "str",  # the trainer's model.variant (the plain variant a modified one is compared with)
    "settings": "dict",  # what the variant sets besides model.variant, e.g. {"loss.duplicate_questions": "mask"}
    "full_val_vqa_score": "spread",  # each run's last checkpoint scored on the whole validation split
    "final_val_vqa_score": "spread",  # last evaluation during training (on the subset where there is one)
    "best_val_vqa_score": "spread",  # best evaluation during training (on the subset where there is one)
    "val_curve": "{step: [...], vqa_score: [spread per step]}",  # the evaluations during training
    "steps_to_loss_below": "spread per threshold",  # first step from which the smoothed VQA loss stays below
    "loss_noise": "spread",  # std of successive differences of log VQA loss / sqrt(2), second half of training
    "wall_time_s": "spread",
    "samples_per_second": "spread",  # median of the logged train/samples_per_second
    "runs": "list of per-run records (seed, run_dir, the numbers above, the configuration used)",
}


# Optional in a variant entry (results.json written before it lacks it; its figure then needs the run folders):
# the smoothed VQA loss over the variant's runs at the steps they all logged, for loss_curves.png's bands.
LOSS_CURVE = "loss_curve"  # {step: [...], mean: [...], min: [...], max: [...]}


def loss_band(rs: list[dict[str, Any]], window: int = SMOOTH_STEPS) -> dict[str, list[float]]:
    """The smoothed VQA loss of a variant's runs: its mean, minimum and maximum over the runs at every step they all
    logged (the figure draws the mean as a line and min-max as a band: one legend entry per variant)."""
    per_run = [
        dict(
            zip(
                r["curves"]["step"], smooth(r["curves"]["step"], r["curves"]["vqa_loss"], window), strict=True
            )
        )
        for r in rs
        if r["curves"]["step"]
    ]
    steps = sorted(set.intersection(*(set(c) for c in per_run))) if per_run else []
    band: dict[str, list[float]] = {"step": steps, "mean": [], "min": [], "max": []}
    for s in steps:
        values = [c[s] for c in per_run]
        band["mean"].append(round(statistics.fmean(values), 6))
        band["min"].append(round(min(values), 6))
        band["max"].append(round(max(values), 6))
    return band


def validate_results(results: dict[str, Any]) -> None:
    """Raise ValueError naming the first field of results.json that does not follow the documented schema."""

    def spread(value: Any, where: str) -> None:
        if not isinstance(value, dict) or set(value) != {"mean", "std", "values"}:
            raise ValueError(f"results.json: {where} is not a {{mean, std, values}} spread")

    for key, typ in RESULTS_SCHEMA.items():
        if key not in results or not isinstance(results[key], typ):
            raise ValueError(f"results.json: '{key}' missing or not {typ}")
    subset = results["val_subset"]
    if subset is not None and set(subset) != {"folder", "size", "seed", "of_samples"}:
        raise ValueError("results.json: 'val_subset' is not {folder, size, seed, of_samples}")
    for variant, entry in results["variants"].items():
        missing = set(VARIANT_SCHEMA) - set(entry)
        if missing:
            raise ValueError(f"results.json: variants.{variant} lacks {sorted(missing)}")
        for key, kind in VARIANT_SCHEMA.items():
            if kind == "spread":
                spread(entry[key], f"variants.{variant}.{key}")
        if not isinstance(entry["model_variant"], str) or not isinstance(entry["settings"], dict):
            raise ValueError(
                f"results.json: variants.{variant}: model_variant must be a str, settings a dict"
            )
        band = entry.get(LOSS_CURVE)
        if band is not None and not (
            isinstance(band, dict)
            and set(band) == {"step", "mean", "min", "max"}
            and len({len(v) if isinstance(v, list) else -1 for v in band.values()}) == 1
        ):
            raise ValueError(
                f"results.json: variants.{variant}.{LOSS_CURVE} is not {{step, mean, min, max}} of one length"
            )
        curve = entry["val_curve"]
        if not isinstance(curve, dict) or len(curve.get("step", ())) != len(curve.get("vqa_score", [None])):
            raise ValueError(
                f"results.json: variants.{variant}.val_curve is not {{step, vqa_score}} of one length"
            )
        for i, point in enumerate(curve["vqa_score"]):
            spread(point, f"variants.{variant}.val_curve.vqa_score[{i}]")
        for t in results["loss_thresholds"]:
            spread(
                entry["steps_to_loss_below"].get(f"{t:g}"), f"variants.{variant}.steps_to_loss_below.{t:g}"
            )
        for run in entry["runs"]:
            for key in (
                "seed",
                "run_dir",
                "full_val_vqa_score",
                "final_val_vqa_score",
                "best_val_vqa_score",
                "config",
                "wall_time_s",
            ):
                if key not in run:
                    raise ValueError(f"results.json: a run of {variant} lacks '{key}'")


class CompareError(RuntimeError):
    """A comparison that cannot run or whose runs failed; the message names the run and its log."""


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """All scalars of a run's TensorBoard event files: tag -> [(step, value, wall_time)], sorted by step."""
    # TensorBoard and trainer.run.run_folder (torch) are imported where a run's files are read, here and below: `python -m
    # trainer.tools.compare --help` loads neither.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, tuple[float, float]]] = {}
    # The evaluations of RUN/full_eval and any --eval-only (RUN/eval/<tag>/) keep their own scalars, at the same
    # steps as the run's.
    apart = (run_dir / FULL_EVAL_DIR, run_dir / "eval")
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        if any(folder in events.parents for folder in apart):
            continue
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


def read_full_eval(run_dir: Path) -> dict[str, Any] | None:
    """The whole-split evaluation of a run's last checkpoint (RUN/full_eval/eval/<tag>/, the metrics file of the
    trainer's --eval-only); None until it is written for the run's last step."""
    from trainer.run.run_folder import RunFolder

    files = sorted((run_dir / FULL_EVAL_DIR / "eval").glob("*/val_metrics_step*.json"), key=lambda p: p.name)
    config = RunFolder(run_dir).config_file
    if not files or not config.is_file():
        return None
    metrics = json.loads(files[-1].read_text())
    return metrics if metrics.get("step") == json.loads(config.read_text())["train"]["max_steps"] else None


def scoring_rule(config: dict[str, Any] | None, whole: dict[str, Any] | None = None) -> str | None:
    """The version of the official VQA accuracy that scored a run (data_pipeline/answers.py `VQA_RULES`): the one the
    whole-split metrics file records, else the run's `train.vqa_rule`. Runs and files from before the rule was
    configurable record none and were scored by vqa-2016; None where the run kept no config.json."""
    if whole is not None:
        return str(whole.get("vqa_rule", "vqa-2016"))
    if config is None:
        return None
    return str(config.get("train", {}).get("vqa_rule", "vqa-2016"))


def summarise_run(
    run_dir: Path, thresholds: list[float], window: int = SMOOTH_STEPS, *, full_eval: bool = False
) -> dict[str, Any]:
    """One finished run's numbers. `full_eval`: the runs validated on a subset, and the whole-split score is that of
    RUN/full_eval; otherwise the runs validated on the whole split, and it is their last evaluation."""
    from trainer.run.run_folder import RunFolder

    scalars = read_scalars(run_dir)
    vqa_tag = loss_tag("vqa_loss")
    if vqa_tag not in scalars:
        raise CompareError(f"{run_dir}: no {vqa_tag} in its TensorBoard events (did the run log?)")
    steps = [s for s, _, _ in scalars[vqa_tag]]
    vqa = [v for _, v, _ in scalars[vqa_tag]]
    smoothed = smooth(steps, vqa, window)
    val = scalars.get("val/vqa_score", [])
    best = max(val, key=lambda p: p[1]) if val else None
    sps = [v for _, v, _ in scalars.get("train/samples_per_second", [])]
    done = json.loads((run_dir / DONE_FILE).read_text())
    config_file = RunFolder(run_dir).config_file
    final = val[-1][1] if val else None
    if full_eval:
        whole = read_full_eval(run_dir)
        if whole is None:
            raise CompareError(f"{run_dir}: not yet scored on the whole validation split ({FULL_EVAL_DIR}/)")
        final_whole = whole.get("vqa_score")
    else:
        final_whole = final
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    return {
        "run_dir": shown(run_dir),
        "seed": done["seed"],
        "full_val_vqa_score": final_whole,
        "final_val_vqa_score": final,
        "best_val_vqa_score": best[1] if best else None,
        "best_val_step": best[0] if best else None,
        "final_train_vqa_loss": smoothed[-1],
        "steps_to_loss_below": {f"{t:g}": steps_to_stay_under(steps, smoothed, t) for t in thresholds},
        "loss_noise": loss_noise(vqa),
        "wall_time_s": done["wall_time_s"],
        "samples_per_second": statistics.median(sps) if sps else None,
        "vqa_rule": scoring_rule(config, whole if full_eval else None),
        "config": config,
        "curves": {
            "step": steps,
            "vqa_loss": vqa,
            "loss": [v for _, v, _ in scalars.get(loss_tag("loss"), [])],
            "infonce_loss": [v for _, v, _ in scalars.get(loss_tag("infonce_loss"), [])],
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


def _val_curve(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """The evaluations during training: every step any run evaluated at, a spread over the runs at each."""
    at = [dict(zip(r["curves"]["val_step"], r["curves"]["val_vqa_score"], strict=True)) for r in rs]
    steps = sorted({s for points in at for s in points})
    return {"step": steps, "vqa_score": [_spread([points.get(s) for points in at]) for s in steps]}


def aggregate(
    runs: dict[str, list[dict[str, Any]]],
    thresholds: list[float],
    variants: dict[str, Variant],
    window: int = SMOOTH_STEPS,
) -> dict[str, Any]:
    out = {}
    for name, rs in runs.items():
        variant = variants[name]
        out[name] = {
            "paper_model": describe(variant, PAPER_MODEL),
            "model_variant": variant.model,
            "settings": variant.settings,
            "full_val_vqa_score": _spread([r["full_val_vqa_score"] for r in rs]),
            "final_val_vqa_score": _spread([r["final_val_vqa_score"] for r in rs]),
            "best_val_vqa_score": _spread([r["best_val_vqa_score"] for r in rs]),
            "steps_to_loss_below": {
                f"{t:g}": _spread([r["steps_to_loss_below"][f"{t:g}"] for r in rs]) for t in thresholds
            },
            "loss_noise": _spread([r["loss_noise"] for r in rs]),
            "wall_time_s": _spread([r["wall_time_s"] for r in rs]),
            "samples_per_second": _spread([r["samples_per_second"] for r in rs]),
            "val_curve": _val_curve(rs),
            LOSS_CURVE: loss_band(rs, window),
            "runs": [{k: v for k, v in r.items() if k != "curves"} for r in rs],
        }
    return out
