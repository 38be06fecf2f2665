"""What a comparison compares: `--variants`, each a model variant of the trainer with optional loss modifiers.

    NAME[+MODIFIER]      NAME: a model variant (trainer/config/config.py VARIANTS), the trainer's model.variant
                         MODIFIER: dup-mask | dup-positive, the trainer's loss.duplicate_questions=mask | positive,
                         for the InfoNCE variants only (clip-infonce-cos, clip-infonce-dot)

    clip-infonce-dot               the paper's model (3), duplicate questions as negatives (as the paper)
    clip-infonce-dot+dup-mask      the same model, identical questions of a batch masked out of InfoNCE
    clip-infonce-cos+dup-positive  model (2), identical questions of a batch counted as positives

The name is the variant's name everywhere: its run folders (`NAME-seedS`), results.json, the report and the figure.
Every run gets `loss.duplicate_questions` from its variant (`none` without a modifier), so a comparison's names say
which loss each run had; `--set loss.duplicate_questions=...` is refused for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config.config import VARIANTS

# modifier -> (configuration field, value)
MODIFIERS: dict[str, tuple[str, str]] = {
    "dup-mask": ("loss.duplicate_questions", "mask"),
    "dup-positive": ("loss.duplicate_questions", "positive"),
}
MODIFIER_LABEL = {
    "dup-mask": "identical questions masked out of InfoNCE",
    "dup-positive": "identical questions as InfoNCE positives",
}
DUPLICATES_FIELD = "loss.duplicate_questions"
SYNTAX = "NAME[+MODIFIER]"


class VariantError(ValueError):
    """A --variants value that names no variant; the message names the value."""


@dataclass(frozen=True)
class Variant:
    name: str
    """As written in --variants (and in folders, results and report)."""
    model: str
    """The trainer's model.variant; also the name of the plain variant this one modifies."""
    modifiers: tuple[str, ...] = ()

    @property
    def settings(self) -> dict[str, str]:
        """The configuration this variant sets besides model.variant (loss.duplicate_questions always)."""
        out = {DUPLICATES_FIELD: "none"}
        out.update(dict(MODIFIERS[m] for m in self.modifiers))
        return out

    def overrides(self) -> list[str]:
        """`--set` items of this variant's trainer command."""
        return [f"model.variant={self.model}", *(f"{k}={v}" for k, v in self.settings.items())]


def infonce_variants() -> list[str]:
    return [name for name, (_, contrastive) in VARIANTS.items() if contrastive in ("cosine", "dot")]


def parse_variant(text: str) -> Variant:
    name = text.strip()
    model, *mods = name.split("+")
    if model not in VARIANTS:
        raise VariantError(f"'{name}': unknown model variant '{model}' (one of: {', '.join(VARIANTS)})")
    seen: set[str] = set()
    for mod in mods:
        if mod not in MODIFIERS:
            raise VariantError(f"'{name}': unknown modifier '+{mod}' (one of: +{', +'.join(MODIFIERS)})")
        field = MODIFIERS[mod][0]
        if field in seen:
            raise VariantError(f"'{name}': more than one modifier sets {field}")
        seen.add(field)
    if mods and model not in infonce_variants():
        raise VariantError(
            f"'{name}': +{mods[0]} changes the paper's InfoNCE, which {model} does not have "
            f"(it applies to {', '.join(infonce_variants())})"
        )
    return Variant(name, model, tuple(mods))


def parse_variants(text: str) -> list[Variant]:
    """The comma-separated --variants value; VariantError on a bad, repeated or missing one."""
    variants = [parse_variant(part) for part in text.split(",") if part.strip()]
    if not variants:
        raise VariantError(f"'{text}': no variant given")
    names = [v.name for v in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise VariantError(f"'{text}': {', '.join(repeated)} given more than once")
    return variants


def describe(variant: Variant, paper_model: dict[str, str]) -> str:
    """The report's "paper model" cell: the plain model's label, then what the modifiers change."""
    base = paper_model.get(variant.model, variant.model)
    return "; ".join([base, *(f"{MODIFIER_LABEL[m]} (beyond the paper)" for m in variant.modifiers)])
