"""The claims a comparison checks, each with a verdict by the noise rule (`results.verdict`): "supports" or
"contradicts" only when the means over seeds differ by more than the larger of the two seed ranges, else (and
always with one seed) "not resolved".

- The ablation's own question, "CLIP's visual embedding scores higher than ViLT's": `clip-no-infonce` against
  `baseline`, VQA score on the whole validation split at the end (the embedding swap alone, without InfoNCE).
- The paper's first claim, "converges in fewer steps": models (2) `clip-infonce-cos` and (3) `clip-infonce-dot`
  against ViLT (`baseline`) and against the ablation without InfoNCE (`clip-no-infonce`), in steps until the
  smoothed VQA loss stays under each threshold (a run that never gets there counts as one step past its end).
- The paper's second claim, "(3) is steadier than (2)": late-training loss noise of the inner product against cosine.
- Beyond the paper, each variant with a modifier (e.g. `clip-infonce-dot+dup-mask`) against the plain variant it
  modifies (`clip-infonce-dot`): fewer steps to each threshold, and a higher VQA score on the whole validation split
  at the end.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from trainer.tools.compare.results import verdict

PAPER_INFONCE = ("clip-infonce-cos", "clip-infonce-dot")
CLIP_TOWER = "CLIP's visual embedding scores higher than ViLT's (ablation)"
REFERENCES = ("baseline", "clip-no-infonce")


@dataclass(frozen=True)
class Claim:
    claim: str
    variant: str
    reference: str
    measure: str
    outcome: str
    """supports | contradicts | not resolved"""
    diff: float | None
    """mean of variant - mean of reference (None with one seed)"""
    spread: float | None
    """the larger of the two seed ranges it is compared with"""
    digits: int = 0
    means: tuple[float, float] | None = None
    """(mean of variant, mean of reference) over seeds, where both have values"""
    ranges: tuple[tuple[float, float], tuple[float, float]] | None = None
    """((min, max) of variant, (min, max) of reference) over seeds"""

    def compared(self) -> str:
        """`mean (min-max) vs mean (min-max)`, the numbers a verdict rests on."""
        if self.means is None or self.ranges is None:
            return "-"
        d = self.digits
        (a, b), ((a0, a1), (b0, b1)) = self.means, self.ranges
        if len(set(self.ranges[0])) == 1 and len(set(self.ranges[1])) == 1:  # one seed
            return f"{a:.{d}f} vs {b:.{d}f}"
        return f"{a:.{d}f} ({a0:.{d}f}-{a1:.{d}f}) vs {b:.{d}f} ({b0:.{d}f}-{b1:.{d}f})"

    def difference(self) -> str:
        return "-" if self.diff is None else f"{self.diff:+.{self.digits}f}"

    def seed_range(self) -> str:
        return "-" if self.spread is None else f"{self.spread:.{self.digits}f}"


def _say(outcome: str, claim_holds_when: str) -> str:
    if outcome == "unresolved":
        return "not resolved"
    return "supports" if outcome == claim_holds_when else "contradicts"


def _values(spread: dict[str, Any], never: float | None = None) -> list[float]:
    """A spread's per-seed values; a run that never reached a threshold counts as `never` (past its last step)."""
    if never is None:
        return [v for v in spread["values"] if v is not None]
    return [never if v is None else v for v in spread["values"]]


def last_step(summary: dict[str, Any]) -> int:
    return max(
        (r["config"]["train"]["max_steps"] for s in summary.values() for r in s["runs"] if r.get("config")),
        default=0,
    )


def _stats(a: list[float], b: list[float]) -> dict[str, Any]:
    """Claim's `means` and `ranges` of two lists of per-seed values (None where either is empty)."""
    if not (a and b):
        return {"means": None, "ranges": None}
    return {
        "means": (statistics.fmean(a), statistics.fmean(b)),
        "ranges": ((min(a), max(a)), (min(b), max(b))),
    }


def _steps(summary, claim, v, ref, thresholds, never) -> list[Claim]:
    out = []
    for t in thresholds:
        key = f"{t:g}"
        a = _values(summary[v]["steps_to_loss_below"][key], never)
        b = _values(summary[ref]["steps_to_loss_below"][key], never)
        outcome, diff, spread = verdict(a, b)
        measure = f"steps to VQA loss < {key}"
        out.append(Claim(claim, v, ref, measure, _say(outcome, "a<b"), diff, spread, **_stats(a, b)))
    return out


def _score(summary, claim, v, ref) -> list[Claim]:
    a, b = _values(summary[v]["full_val_vqa_score"]), _values(summary[ref]["full_val_vqa_score"])
    if not (a and b):
        return []
    outcome, diff, spread = verdict(a, b)
    measure = "VQA score, whole split, end"
    return [Claim(claim, v, ref, measure, _say(outcome, "a>b"), diff, spread, digits=4, **_stats(a, b))]


def claims(summary: dict[str, Any], thresholds: list[float]) -> list[Claim]:
    """Every claim the variants in `summary` (results.json's `variants`) allow, in the module docstring's order."""
    never = float(last_step(summary) + 1)
    out: list[Claim] = []
    if "clip-no-infonce" in summary and "baseline" in summary:
        out += _score(summary, CLIP_TOWER, "clip-no-infonce", "baseline")
    for v in PAPER_INFONCE:
        for ref in REFERENCES:
            if v in summary and ref in summary:
                out += _steps(summary, "converges in fewer steps (paper)", v, ref, thresholds, never)
    if all(v in summary for v in PAPER_INFONCE):
        dot = _values(summary["clip-infonce-dot"]["loss_noise"])
        cos = _values(summary["clip-infonce-cos"]["loss_noise"])
        if dot and cos:
            outcome, diff, spread = verdict(dot, cos)
            out.append(
                Claim(
                    "(3) is steadier than (2) (paper)",
                    "clip-infonce-dot",
                    "clip-infonce-cos",
                    "late-training loss noise",
                    _say(outcome, "a<b"),
                    diff,
                    spread,
                    digits=4,
                    **_stats(dot, cos),
                )
            )
    for v, s in summary.items():
        base = s.get("model_variant", v)
        if base == v or base not in summary:
            continue
        out += _steps(summary, "the modifier converges in fewer steps", v, base, thresholds, never)
        out += _score(summary, "the modifier scores higher", v, base)
    return out


def _group_outcome(outcomes: list[str]) -> str:
    if all(o == "supports" for o in outcomes):
        return "supported"
    if all(o == "contradicts" for o in outcomes):
        return "contradicted"
    if all(o == "not resolved" for o in outcomes):
        return "not resolved"
    return "mixed"


def summary_lines(found: list[Claim]) -> list[str]:
    """The report's opening: three lines per claim (a claim = one statement about one pair of variants, over its
    measures): the verdict; the means (min-max over seeds) compared; what the verdict rests on. Resolved claims first."""
    groups: dict[tuple[str, str, str], list[Claim]] = {}
    for c in found:
        groups.setdefault((c.claim, c.variant, c.reference), []).append(c)
    blocks = []
    for (claim, variant, reference), cs in groups.items():
        outcome = _group_outcome([c.outcome for c in cs])
        numbers = "; ".join(f"{c.measure}: {c.compared()}" for c in cs)
        resolved = [c for c in cs if c.outcome != "not resolved"]
        if any(c.spread is None for c in cs):
            why = "One seed: a difference cannot be told from seed noise; run several seeds."
        elif resolved:
            c = max(resolved, key=lambda c: abs(c.diff or 0) / max(c.spread or 0, 1e-12))
            why = (
                f"The difference of the means ({c.difference()}, {c.measure}) is larger than the larger seed-to-seed "
                f"range ({c.seed_range()})"
                + (
                    f"; {len(cs) - len(resolved)} other measure(s) stay within the range."
                    if len(resolved) < len(cs)
                    else "."
                )
            )
        else:
            c = max(cs, key=lambda c: abs(c.diff or 0) / max(c.spread or 0, 1e-12))
            why = (
                f"Every difference is within the seed-to-seed range (the largest relative one: {c.difference()} "
                f"against {c.seed_range()}, {c.measure}): more seeds or longer runs would be needed to tell."
            )
        blocks.append(
            (
                outcome in ("not resolved",),
                [f"**{claim}**: `{variant}` against `{reference}`: **{outcome}**.", numbers + ".", why],
            )
        )
    return [line for _, lines in sorted(blocks, key=lambda b: b[0]) for line in lines]


def verdict_table(found: list[Claim]) -> str:
    head = ["claim", "variant", "against", "measure", "difference", "seed range", "verdict"]
    rows = [
        [c.claim, f"`{c.variant}`", f"`{c.reference}`", c.measure, c.difference(), c.seed_range(), c.outcome]
        for c in found
    ]
    return "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        + ["| " + " | ".join(r) + " |" for r in rows]
    )
