"""The claims a comparison checks, each with a verdict by the noise rule (`results.verdict`): "supports" or
"contradicts" only when the means over seeds differ by more than the larger of the two seed ranges, else (and
always with one seed) "not resolved".

- The paper's first claim, "converges in fewer steps": models (2) `clip-infonce-cos` and (3) `clip-infonce-dot`
  against ViLT (`baseline`) and against the ablation without InfoNCE (`clip-no-infonce`), in steps until the
  smoothed VQA loss stays under each threshold (a run that never gets there counts as one step past its end).
- The paper's second claim, "(3) is steadier than (2)": late-training loss noise of the inner product against cosine.
- Beyond the paper, each variant with a modifier (e.g. `clip-infonce-dot+dup-mask`) against the plain variant it
  modifies (`clip-infonce-dot`): fewer steps to each threshold, and a higher VQA score on the whole validation split
  at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.tools.compare.results import verdict

PAPER_INFONCE = ("clip-infonce-cos", "clip-infonce-dot")
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


def _steps(summary, claim, v, ref, thresholds, never) -> list[Claim]:
    out = []
    for t in thresholds:
        key = f"{t:g}"
        a = _values(summary[v]["steps_to_loss_below"][key], never)
        b = _values(summary[ref]["steps_to_loss_below"][key], never)
        outcome, diff, spread = verdict(a, b)
        out.append(Claim(claim, v, ref, f"steps to VQA loss < {key}", _say(outcome, "a<b"), diff, spread))
    return out


def claims(summary: dict[str, Any], thresholds: list[float]) -> list[Claim]:
    """Every claim the variants in `summary` (results.json's `variants`) allow, in the module docstring's order."""
    never = float(last_step(summary) + 1)
    out: list[Claim] = []
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
                )
            )
    for v, s in summary.items():
        base = s.get("model_variant", v)
        if base == v or base not in summary:
            continue
        out += _steps(summary, "the modifier converges in fewer steps", v, base, thresholds, never)
        a, b = _values(s["full_val_vqa_score"]), _values(summary[base]["full_val_vqa_score"])
        if a and b:
            outcome, diff, spread = verdict(a, b)
            out.append(
                Claim(
                    "the modifier scores higher",
                    v,
                    base,
                    "VQA score, whole split, end",
                    _say(outcome, "a>b"),
                    diff,
                    spread,
                    digits=4,
                )
            )
    return out


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
