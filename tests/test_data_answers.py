"""Answer normalisation, soft scores and the VQA metric against the official evaluation's behaviour."""

from __future__ import annotations

import random

import pytest

from data_pipeline import answers as A


def official_accuracy(pred: str, gts: list[str]) -> float:
    """The official vqaEval.py loop, written out: leave each annotator out, min(1, matches among the rest / 3)."""
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        accs.append(min(1.0, sum(1 for g in others if g == pred) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("the dog.", "dog"),
        ("A Dog", "dog"),
        ("yes!", "yes"),
        ("  yes\n", "yes"),
        ("dont", "don't"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("red, white", "red white"),
        ("t-shirt", "t shirt"),
        ("t-shirt -", "tshirt"),  # a " -" anywhere: every "-" is removed, not turned into a space
        ("black & white", "black & white"),
    ],
)
def test_normalize_answer_matches_official_rules(raw: str, expected: str) -> None:
    assert A.normalize_answer(raw) == expected


def test_soft_score_table_for_ten_annotators() -> None:
    assert [A.soft_score(m) for m in range(11)] == [0.0, 0.3, 0.6, 0.9] + [1.0] * 7


def test_soft_score_is_the_leave_one_out_average() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randrange(1, 12)
        gts = [rng.choice("abc") for _ in range(n)]
        for cand in "abcd":
            assert A.soft_score(gts.count(cand), n) == pytest.approx(official_accuracy(cand, gts), abs=1e-6)


def test_answer_scores_merge_spellings() -> None:
    raw = ["Two", "2", "two", "2.", "3", "three", "dog", "dog", "dog", "cat"]
    assert A.answer_scores(raw) == {"2": 1.0, "3": 0.6, "dog": 0.9, "cat": 0.3}
    labels, scores = A.labels_and_scores(raw, {"cat": 0, "2": 1, "dog": 2})
    assert labels == [0, 1, 2] and scores == [0.3, 1.0, 0.9]


def test_vqa_score_keeps_the_2016_quirks() -> None:
    """vqaEval.py at 458a8b2 (2016): the prediction always fully normalised; the annotators' answers by punctuation only, and only when
    they are not all the same string."""
    # Not all identical: punctuation only, so "Two" stays "Two" and never matches the normalised "2".
    assert A.vqa_score("2", ["Two"] * 9 + ["three"], rule="vqa-2016") == 0.0
    assert A.vqa_score("2", ["2"] * 9 + ["three"], rule="vqa-2016") == 1.0
    assert (
        A.vqa_score("2", ["2!"] * 3 + ["three"] * 7, rule="vqa-2016") == 0.0
    )  # "!" becomes a space: "2 " is not "2"
    assert A.vqa_score("dog", ["dog.", "dog", "cat"] + ["bird"] * 7, rule="vqa-2016") == pytest.approx(
        0.6
    )  # periods stripped
    # All ten raw answers identical: compared as they are.
    assert A.vqa_score("2", ["Two"] * 10, rule="vqa-2016") == 0.0
    assert (
        A.vqa_score("Two", ["2"] * 10, rule="vqa-2016") == 1.0
    )  # the prediction is normalised: "Two" -> "2"
    assert (
        A.vqa_score("two", ["two"] * 10, rule="vqa-2016") == 0.0
    )  # the same raw string, but only the prediction is normalised
    assert A.vqa_score("yes", ["Yes"] * 10, rule="vqa-2016") == 0.0
    assert A.vqa_score("dog", ["dog", "dog", "cat"] + ["bird"] * 7, rule="vqa-2016") == pytest.approx(0.6)


def test_build_vocabulary_threshold_and_order() -> None:
    majors = ["yes"] * 5 + ["Yes"] * 2 + ["no"] * 4 + ["two", "2", "2"] + ["rare"]
    assert A.build_vocabulary(majors, 3) == ["yes", "no", "2"]
    assert A.build_vocabulary(majors, 1) == ["yes", "no", "2", "rare"]
    with pytest.raises(ValueError):
        A.build_vocabulary(majors, 0)
