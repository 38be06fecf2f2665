"""The two versions of the official VQA accuracy (data_pipeline/answers.py `VQA_RULES`) against their definitions.

Both are `vqaEval.py` of the VQA API (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py), written
out below from its text as straightforward transcriptions of the script's loop (answers as dicts with ids, the
leave-one-out loop over them), independent of the project's code:

- "vqa-2021", the default: commit a013f00 (2021-03-11, "Fixed processing answers bug"). Every annotator answer and
  the prediction lose newlines, tabs and surrounding white space; if the annotators' (cleaned) answers are not all
  the same string, both the annotators' answers and the prediction go through processPunctuation and
  processDigitArticle; otherwise they are compared as cleaned.
- "vqa-2016": commit 458a8b2. The prediction is cleaned and always goes through processPunctuation and
  processDigitArticle; the annotators' raw answers go through processPunctuation only, and only if they are not all
  the same string.

Then per question: the mean over the annotators of min(1, other annotators whose answer equals the prediction / 3).
"""

from __future__ import annotations

import random

import pytest

from data_pipeline import answers as A
from tests.helpers.vqa_official import OFFICIAL, clean, official_2016, official_2021

# -- case by case ------------------------------------------------------------------------------------------------
# (prediction, the 10 annotators' answers, score under vqa-2016, score under vqa-2021, why)
CASES = [
    (
        "Dog.",
        ["Dog."] * 10,
        0.0,
        1.0,
        "2016 normalises only the prediction; 2021 compares agreeing answers as cleaned",
    ),
    ("dog", ["Dog."] * 10, 0.0, 0.0, "agreeing answers are not normalised in either"),
    ("Yes", ["yes"] * 10, 1.0, 0.0, "2021 leaves the prediction as it is when the annotators agree"),
    ("two", ["two"] * 10, 0.0, 1.0, "2016: 'two' -> '2' on the prediction side only"),
    ("2", ["two"] * 10, 0.0, 0.0, "agreeing number words stay words"),
    ("dog", ["dog "] * 10, 0.0, 1.0, "2021 strips the annotators' answers"),
    ("dog", ["dog "] * 5 + ["dog"] * 5, 1.0, 1.0, "2021: the same once stripped; 2016: five exact matches"),
    ("dog", ["dog"] * 2 + [" dog"] * 2 + ["cat"] * 6, 0.6, 1.0, "stray white space counts only in 2016"),
    ("dog", ["dog\t"] * 3 + ["cat"] * 7, 0.0, 0.9, "a tab: kept by 2016's punctuation-only processing"),
    ("2", ["two"] * 3 + ["three"] * 7, 0.0, 0.9, "2021 turns the annotators' number words into digits"),
    ("dog", ["a dog"] * 3 + ["cat"] * 7, 0.0, 0.9, "2021 drops the annotators' articles"),
    ("yes", ["Yes"] * 3 + ["no"] * 7, 0.0, 0.9, "2021 lower-cases the annotators' answers"),
    (
        "yes",
        ["yes!"] * 3 + ["no"] * 7,
        0.0,
        0.9,
        "'!' becomes a space: 2016 keeps 'yes ', 2021 re-joins the words",
    ),
    ("yes", ["yes."] * 3 + ["no"] * 7, 0.9, 0.9, "periods go in both"),
    ("Yes.", ["yes"] * 3 + ["no"] * 7, 0.9, 0.9, "disagreeing annotators: the prediction normalised in both"),
    ("dont", ["don't"] * 3 + ["no"] * 7, 0.9, 0.9, "contractions restored on the prediction"),
    ("don't", ["dont"] * 3 + ["no"] * 7, 0.0, 0.9, "2021 restores them on the annotators' answers too"),
    (" dog\n", ["dog"] * 10, 1.0, 1.0, "the prediction is cleaned in both"),
    ("1,000", ["1000"] * 4 + ["1 000"] * 6, 1.0, 1.0, "commas between digits go"),
    ("red white", ["red, white"] * 3 + ["red"] * 7, 0.9, 0.9, "', ' drops the comma"),
    ("red white", ["red,white"] * 3 + ["red"] * 7, 0.9, 0.9, "',' alone becomes a space"),
    ("red white", ["red - white"] * 3 + ["red"] * 7, 0.0, 0.9, "' -' drops the dash: 2016 keeps two spaces"),
    (
        "tshirt",
        ["t-shirt -"] * 3 + ["shirt"] * 7,
        0.0,
        0.9,
        "' -' in the text: every '-' goes, not to a space",
    ),
    ("yes", ["yes."] * 10, 0.0, 0.0, "identical answers keep their period: no processing at all"),
    ("cat", ["dog"] * 10, 0.0, 0.0, "no match"),
    ("dog", ["dog"] + ["cat"] * 9, 0.3, 0.3, "one match"),
]


@pytest.mark.parametrize(("prediction", "raw", "old", "new", "why"), CASES, ids=[c[4] for c in CASES])
def test_each_version_scores_the_written_out_cases(
    prediction: str, raw: list[str], old: float, new: float, why: str
) -> None:
    assert official_2016(prediction, raw) == pytest.approx(old), "transcription of 458a8b2"
    assert official_2021(prediction, raw) == pytest.approx(new), "transcription of a013f00"
    assert A.vqa_score(prediction, raw, rule="vqa-2016") == pytest.approx(old)
    assert A.vqa_score(prediction, raw, rule="vqa-2021") == pytest.approx(new)
    assert A.vqa_score(prediction, raw) == pytest.approx(new), "vqa-2021 is the default"


def test_the_current_script_is_the_default() -> None:
    from trainer.config.config import TrainConfig

    assert A.DEFAULT_VQA_RULE == "vqa-2021"
    assert TrainConfig().vqa_rule == "vqa-2021"
    assert A.vqa_score("Dog.", ["Dog."] * 10) == 1.0  # 0 under the 2016 rule


def test_an_unknown_version_is_a_clear_error() -> None:
    from trainer.config.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=r"train\.vqa_rule: 'vqa-2017' is not one of vqa-2021, vqa-2016"):
        TrainConfig(vqa_rule="vqa-2017")
    with pytest.raises(ValueError, match="vqa-2021, vqa-2016"):
        A.vqa_score("dog", ["dog"] * 10, rule="2021")


# -- random traps ------------------------------------------------------------------------------------------------
_BASES = ["dog", "Dog", "the dog", "a dog", "two", "2", "Two", "none", "0", "yes", "Yes", "no", "dont", "don't",
          "isnt", "whats", "red white", "1,000", "1000", "3.5", "t-shirt", "t shirt", "an apple", "Apple"]  # fmt: skip
_DECORATIONS = [
    "",
    "",
    "",
    ".",
    "!",
    "?",
    ",",
    " ",
    "  ",
    "\t",
    "\n",
    " .",
    " !",
    ";",
    "-",
    " -",
    "(s)",
    " ?",
]


def _trap(rng: random.Random) -> str:
    text = rng.choice(_BASES)
    if rng.random() < 0.5:
        text += rng.choice(_DECORATIONS)
    if rng.random() < 0.2:
        text = rng.choice([" ", "\t", "\n", "("]) + text
    return text


def _question(rng: random.Random) -> tuple[str, list[str]]:
    """A prediction and 10 annotators' answers drawn from a few spellings of the same words, so that matches, near
    misses and identical answer sets are all frequent."""
    pool = [_trap(rng) for _ in range(rng.choice([1, 1, 2, 3]))]
    raw = [rng.choice(pool) for _ in range(10)]
    prediction = rng.choice(pool) if rng.random() < 0.6 else _trap(rng)
    return prediction, raw


@pytest.mark.parametrize("rule", ["vqa-2021", "vqa-2016"])
def test_random_traps_score_as_the_script_does(rule: str) -> None:
    rng = random.Random(20210311)
    official = OFFICIAL[rule]
    wrong = []
    for _ in range(3000):
        prediction, raw = _question(rng)
        if A.vqa_score(prediction, raw, rule=rule) != pytest.approx(official(prediction, raw), abs=1e-9):
            wrong.append((prediction, raw))
    assert not wrong, f"{len(wrong)} of 3000 differ, e.g. {wrong[:3]}"


def test_random_traps_tell_the_versions_apart() -> None:
    """The traps exercise every difference between the versions, so a rule that fell back to the other one fails."""
    rng = random.Random(20210311)
    cases = [_question(rng) for _ in range(3000)]
    differ = [c for c in cases if official_2016(*c) != pytest.approx(official_2021(*c))]
    assert len(differ) > 300
    agreeing = [c for c in differ if len({clean(a) for a in c[1]}) == 1]
    assert len(agreeing) > 50  # where only the prediction's treatment differs


def test_comparison_reports_say_which_version_scored_the_runs() -> None:
    from trainer.tools.compare.report import _scoring
    from trainer.tools.compare.results import scoring_rule

    assert scoring_rule({"train": {"vqa_rule": "vqa-2021"}}) == "vqa-2021"
    assert (
        scoring_rule({"train": {}}) == "vqa-2016"
    )  # configs from before the option: the 2016 rule scored them
    assert scoring_rule({"train": {"vqa_rule": "vqa-2021"}}, {"vqa_score": 0.5}) == "vqa-2016"
    assert scoring_rule(None) is None
    one = {"variants": {"a": {"runs": [{"vqa_rule": "vqa-2021"}, {"vqa_rule": "vqa-2021"}]}}}
    assert _scoring(one) == "VQA scores: the official accuracy, version `vqa-2021`."
    mixed = {
        "variants": {"a": {"runs": [{"vqa_rule": "vqa-2021"}]}, "b": {"runs": [{"vqa_rule": "vqa-2016"}]}}
    }
    assert "different versions" in _scoring(mixed)
