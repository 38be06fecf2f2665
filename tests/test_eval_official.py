"""The reported VQA score (trainer/run/evaluation.py) against the official VQA accuracy, computed here on raw answers.

The official definition here is the 2016 VQA evaluation script (`vqaEval.py` of the VQA API, GT-Vision-Lab/VQA at
commit 458a8b2; `train.vqa_rule=vqa-2016`), written out below from its text (tests/test_vqa_rules.py checks the
current version, the default): the predicted answer is cleaned of newlines, tabs and surrounding white space and normalised
(punctuation, then lower case, number words to digits, articles dropped); the 10 annotator answers are left as
they are, or only have their punctuation processed where they are not all the same string; the accuracy is the mean,
over the 10 subsets of 9 annotators, of min(1, annotators in the subset who gave the predicted answer / 3).

The evaluation computes it from the raw annotator answers the shards keep (`read_references`), not from the
training targets, whose soft scores come from fully normalised annotator answers (data_pipeline/answers.py
`answer_scores`, ViLT's convention); `KNOWN_DIFFERENT` are questions where the two differ, so a reported score read
from the targets would fail here.

A small VQA v2-format set (official JSON layouts, COCO-named JPEGs) is converted by `data_pipeline.convert`, so
the targets are the ones the converter writes and the batch contract (data_pipeline/loaders/batch.py) builds.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from data_pipeline.answers import reference_answers
from data_pipeline.loaders.batch import assemble
from data_pipeline.shards.sharding import iter_sample_json, open_folder
from trainer.run.evaluation import Reference, evaluate, read_references

# -- the official accuracy ---------------------------------------------------------------------------------------
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = ("a", "an", "the")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # the script passes re.UNICODE as `count`


def _process_digit_article(text: str) -> str:
    # The script also restores contractions ("dont" -> "don't"); no answer here has one.
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def official_accuracy(prediction: str, raw_answers: list[str]) -> float:
    """One question's accuracy, as vqaEval.py computes it."""
    res = prediction.replace("\n", " ").replace("\t", " ").strip()
    res = _process_digit_article(_process_punctuation(res))
    gts = list(raw_answers)
    if len(set(gts)) > 1:
        gts = [_process_punctuation(a) for a in gts]
    accs = []
    for left_out in range(len(gts)):
        others = gts[:left_out] + gts[left_out + 1 :]
        accs.append(min(1.0, sum(1 for a in others if a == res) / 3))
    return sum(accs) / len(accs)


# -- the data ----------------------------------------------------------------------------------------------------
VOCAB = ["yes", "no", "2", "3", "red", "dog"]

# (question id, answer type, the 10 raw annotator answers, the predicted answer)
AGREEING = [
    (1, "yes/no", ["yes"] * 10, "yes"),
    (2, "yes/no", ["yes"] * 3 + ["no"] * 7, "yes"),  # 3 of 10: 0.9
    (3, "number", ["2"] * 2 + ["3"] * 8, "2"),  # 2 of 10: 0.6
    (4, "other", ["red"] + ["dog"] * 9, "red"),  # 1 of 10: 0.3
    (5, "other", ["dog"] * 4 + ["red"] * 3 + ["blue"] * 3, "dog"),  # 4 of 10: 1.0
    (6, "other", ["dog"] * 5 + ["red"] * 5, "yes"),  # nobody: 0
    (7, "other", ["blue"] * 6 + ["green"] * 4, "red"),  # no answer in the vocabulary: targets all 0
    (8, "yes/no", ["yes."] * 2 + ["yes"] + ["no"] * 7, "yes"),  # periods go on both sides: 0.9
    (9, "number", ["3", "3", "2", "2", "2", "4", "3", "3", "5", "3"], "3"),  # 5 of 10, interleaved: 1.0
    (10, "number", ["2", "3", "4", "5", "6", "7", "8", "9", "10", "11"], "2"),  # 0.3
    (11, "other", ["red"] * 9 + ["dog"], "dog"),
]
KNOWN_DIFFERENT = [
    # identical raw answers are compared unprocessed: "two" is not "2"
    (21, "number", ["two"] * 10, "2"),
    # ... nor "Yes" "yes"
    (22, "yes/no", ["Yes"] * 10, "yes"),
    # differing raw answers get punctuation processing only: no number words, case, articles or white space
    (23, "number", ["two"] * 4 + ["2"] * 2 + ["3"] * 4, "2"),
    (24, "other", ["Red"] * 2 + ["red"] + ["dog"] * 7, "red"),
    (25, "other", ["a dog"] * 3 + ["dog"] + ["red"] * 6, "dog"),
    (26, "yes/no", ["no "] * 3 + ["yes"] * 7, "no"),
    (27, "yes/no", ["yes!"] * 3 + ["no"] * 7, "yes"),  # "yes!" becomes "yes " there
]
# The soft score stored as the training target for the predicted answer of each KNOWN_DIFFERENT question (every
# annotator answer fully normalised, as ViLT builds targets), and the official accuracy the evaluation must report.
TARGET_SCORE = {21: 1.0, 22: 1.0, 23: 1.0, 24: 0.9, 25: 1.0, 26: 0.9, 27: 0.9}
OFFICIAL_SCORE = {21: 0.0, 22: 0.0, 23: 0.6, 24: 0.3, 25: 0.3, 26: 0.0, 27: 0.0}


def _jpeg(seed: int) -> bytes:
    im = Image.new("RGB", (24, 20), ((37 * seed) % 256, (91 * seed) % 256, 120))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_and_convert(
    root: Path, cases: list[tuple[int, str, list[str], str]], split: str = "val2014"
) -> Path:
    """Official-format questions/annotations and images for `cases`, converted with the vocabulary VOCAB."""
    from data_pipeline.convert.cli import main as convert

    images = root / "images"
    images.mkdir(parents=True)
    questions, annotations = [], []
    for qid, kind, raw, _ in cases:
        image_id = 500 + qid
        (images / f"COCO_{split}_{image_id:012d}.jpg").write_bytes(_jpeg(qid))
        questions.append({"image_id": image_id, "question": f"what is in picture {qid}?", "question_id": qid})
        annotations.append(
            {
                "question_type": "what is",
                "multiple_choice_answer": raw[0],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(raw)
                ],
                "image_id": image_id,
                "answer_type": kind,
                "question_id": qid,
            }
        )
    (root / "questions.json").write_text(json.dumps({"questions": questions}))
    (root / "annotations.json").write_text(json.dumps({"annotations": annotations}))
    (root / "answers.json").write_text(json.dumps(VOCAB))
    out = root / "shards"
    argv = [
        "vqa2",
        "--questions",
        str(root / "questions.json"),
        "--annotations",
        str(root / "annotations.json"),
    ]
    argv += ["--images", str(images), "--out", str(out), "--answers", str(root / "answers.json")]
    argv += ["--shard-size", "64", "--workers", "1", "--no-progress"]
    assert convert(argv) == 0
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """question_id -> the sample json the converter wrote, for every case."""
    out = write_and_convert(tmp_path_factory.mktemp("vqa2_cases"), AGREEING + KNOWN_DIFFERENT)
    metas = {int(m["question_id"]): m for m in iter_sample_json(open_folder(str(out)))}
    assert sorted(metas) == sorted(c[0] for c in AGREEING + KNOWN_DIFFERENT)
    return metas


class PickEngine:
    """An engine whose logits pick a given answer per question id."""

    def __init__(self, answer_of: dict[int, str]) -> None:
        self.answer_of = answer_of

    def train(self, mode: bool = True) -> None:
        return None

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = torch.zeros(len(batch["question_id"]), len(VOCAB))
        for row, qid in enumerate(batch["question_id"].tolist()):
            if qid >= 0:
                logits[row, VOCAB.index(self.answer_of[qid])] = 5.0
        return {"logits": logits}


def _tokens(questions: list[str]) -> dict[str, torch.Tensor]:
    n = len(questions)
    return {"vilt_ids": torch.zeros(n, 4), "vilt_mask": torch.ones(n, 4), "clip_ids": torch.zeros(n, 4)}


def reported(metas: list[dict[str, Any]], answer_of: dict[int, str], batch_size: int = 4):
    """trainer/run/evaluation.py's result on these samples, in batches as the loaders build them (last one padded)."""
    batches = []
    for start in range(0, len(metas), batch_size):
        rows: list[dict[str, Any] | None] = list(metas[start : start + batch_size])
        rows += [None] * (batch_size - len(rows))
        pixels = torch.zeros(batch_size, 3, 4, 4)
        batches.append(assemble(pixels, rows, _tokens, len(VOCAB), evaluation=True))
    refs = {
        int(m["question_id"]): Reference(reference_answers(m["answers"], "vqa-2016"), m["answer_type"])
        for m in metas
    }
    return evaluate(
        PickEngine(answer_of), batches, answers=VOCAB, device=torch.device("cpu"), references=refs
    )


def _official(cases: list[tuple[int, str, list[str], str]]) -> dict[int, float]:
    return {qid: official_accuracy(pred, raw) for qid, _, raw, pred in cases}


def test_official_accuracy_as_written_here() -> None:
    """The definition above on hand-checked cases: 0, 0.3, 0.6, 0.9, 1 for 0-4 matches among 10 annotators."""
    assert [official_accuracy("2", ["2"] * m + ["3"] * (10 - m)) for m in range(6)] == pytest.approx(
        [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    )
    assert official_accuracy(" Two.\n", ["2"] * 10) == 1.0  # the prediction is always normalised
    assert official_accuracy("2", ["two"] * 10) == 0.0
    assert official_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)  # periods are removed
    assert official_accuracy("yes", ["yes!"] * 3 + ["no"] * 7) == 0.0  # "!" becomes a space: "yes "
    assert _official(KNOWN_DIFFERENT) == pytest.approx(OFFICIAL_SCORE)


def test_reported_score_is_official_on_normalised_annotations(converted: dict[int, dict[str, Any]]) -> None:
    """Per question, per answer type and overall, with padding in the last batch."""
    answer_of = {qid: pred for qid, _, _, pred in AGREEING}
    official = _official(AGREEING)
    for qid in answer_of:
        result = reported([converted[qid]], answer_of)
        assert result.count == 1
        assert result.vqa_score == pytest.approx(official[qid], abs=1e-6), (qid, result.vqa_score)

    metas = [converted[qid] for qid, *_ in AGREEING]
    result = reported(metas, answer_of, batch_size=4)  # 11 questions: one padding row
    assert result.count == len(AGREEING)
    assert result.vqa_score == pytest.approx(sum(official.values()) / len(official), abs=1e-6)
    for kind in ("yes/no", "number", "other"):
        ids = [qid for qid, k, _, _ in AGREEING if k == kind]
        assert result.by_type[kind] == pytest.approx(sum(official[q] for q in ids) / len(ids), abs=1e-6)
        assert result.count_by_type[kind] == len(ids)
    assert [p["answer"] for p in result.predictions] == [answer_of[q] for q in sorted(answer_of)]


def test_targets_differ_from_the_official_score_where_annotations_are_not_normalised(
    converted: dict[int, dict[str, Any]],
) -> None:
    """The training targets normalise every annotator answer (ViLT's convention); the reported score does not use
    them for data with annotator answers, so these differences never reach `val/vqa_score`."""
    for qid, *_ in KNOWN_DIFFERENT:
        meta = converted[qid]
        pred = VOCAB.index(next(p for q, _, _, p in KNOWN_DIFFERENT if q == qid))
        stored = dict(zip(meta["labels"], meta["scores"], strict=True)).get(pred, 0.0)
        assert stored == pytest.approx(TARGET_SCORE[qid], abs=1e-6)
        assert reported([meta], {qid: VOCAB[pred]}).vqa_score == pytest.approx(OFFICIAL_SCORE[qid], abs=1e-9)


def test_reported_score_is_official_where_annotations_are_not_normalised(
    converted: dict[int, dict[str, Any]],
) -> None:
    cases = AGREEING + KNOWN_DIFFERENT
    answer_of = {qid: pred for qid, _, _, pred in cases}
    official = _official(cases)
    result = reported([converted[qid] for qid, *_ in cases], answer_of)
    assert result.vqa_score == pytest.approx(sum(official.values()) / len(official), abs=1e-9)
    for kind in ("yes/no", "number", "other"):
        ids = [qid for qid, k, _, _ in cases if k == kind]
        assert result.by_type[kind] == pytest.approx(sum(official[q] for q in ids) / len(ids), abs=1e-9)


def test_references_read_from_the_shards_are_the_raw_answers(tmp_path: Path) -> None:
    folder = write_and_convert(tmp_path / "data", KNOWN_DIFFERENT)
    refs = read_references(str(folder), "vqa-2016")
    for qid, kind, raw, _ in KNOWN_DIFFERENT:
        assert refs[qid] == Reference(reference_answers(raw, "vqa-2016"), kind)
    assert refs[21].answers == ("two",) * 10  # identical answers stay as they are
    assert refs[27].answers == ("yes ",) * 3 + ("no",) * 7  # differing ones: punctuation only


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["vqa-2016", "vqa-2021"])
def test_eval_only_run_reports_the_official_score_of_its_predictions(
    tmp_path: Path, no_launcher, rule: str
) -> None:
    """Through the entry point: an --eval-only run on converted VQA v2-format shards; the official accuracy of the
    predictions file it writes, computed from the raw annotations by the transcription of that version of the script,
    is the score it reports, and the metrics file names the version."""
    from tests.helpers.vqa_official import OFFICIAL
    from trainer.main import main

    shards = write_and_convert(tmp_path / "data", AGREEING + RULES_DIFFER)
    run_dir = tmp_path / "run"
    argv = [
        "--preset",
        "tiny",
        "--train-data",
        str(shards),
        "--val-data",
        str(shards),
        "--run-dir",
        str(run_dir),
    ]
    argv += ["--eval-only", "--resume", "none", "--set", "model.variant=baseline"]
    argv += ["--set", "train.progress_bar=false"]
    argv += ["--set", "train.eval_batch_size=4", "--set", "data.num_workers=1"]  # 14 questions: padding
    argv += ["--set", f"train.vqa_rule={rule}"]
    argv += ["--deepspeed_config", "deepspeed_configs/zero2_fp32.json"]
    assert main(argv) == 0
    metrics = json.loads((run_dir / "eval" / "initial" / "val_metrics_step00000000.json").read_text())
    predictions = json.loads((run_dir / "eval" / "initial" / "val_predictions_step00000000.json").read_text())
    raw = {qid: answers for qid, _, answers, _ in AGREEING + RULES_DIFFER}
    assert sorted(p["question_id"] for p in predictions) == sorted(raw)
    official = [OFFICIAL[rule](p["answer"], raw[p["question_id"]]) for p in predictions]
    assert metrics["count"] == len(raw)
    assert metrics["vqa_rule"] == rule
    assert metrics["vqa_score"] == pytest.approx(sum(official) / len(official), abs=1e-6)


@pytest.mark.parametrize("rule", ["vqa-2021", "vqa-2016"])
def test_predictions_file_scores_as_each_version_of_the_script(tmp_path: Path, rule: str) -> None:
    """End to end on the results files: references read from converted shards with `rule`, the evaluation, the files
    it writes; the predictions file rescored by the transcription of that version (tests/helpers/vqa_official.py)
    gives the reported score, and the metrics file names the rule."""
    from tests.helpers.vqa_official import OFFICIAL
    from trainer.run.evaluation import write_results

    cases = AGREEING + KNOWN_DIFFERENT + RULES_DIFFER
    folder = write_and_convert(tmp_path / "data", cases)
    metas = list(iter_sample_json(open_folder(str(folder))))
    answer_of = {qid: pred for qid, _, _, pred in cases}
    batches = []
    for start in range(0, len(metas), 4):
        rows: list[dict[str, Any] | None] = list(metas[start : start + 4])
        rows += [None] * (4 - len(rows))
        batches.append(assemble(torch.zeros(4, 3, 4, 4), rows, _tokens, len(VOCAB), evaluation=True))
    result = evaluate(
        PickEngine(answer_of),
        batches,
        answers=VOCAB,
        device=torch.device("cpu"),
        references=read_references(str(folder), rule),
        vqa_rule=rule,
    )
    pred_path, metrics_path = write_results(result, tmp_path / "eval", 7)
    predictions = json.loads(pred_path.read_text())
    metrics = json.loads(metrics_path.read_text())
    raw = {qid: answers for qid, _, answers, _ in cases}
    per_question = {p["question_id"]: OFFICIAL[rule](p["answer"], raw[p["question_id"]]) for p in predictions}
    assert sorted(per_question) == sorted(raw)
    assert metrics["vqa_rule"] == rule
    assert metrics["vqa_score"] == pytest.approx(sum(per_question.values()) / len(per_question), abs=1e-9)
    other = OFFICIAL["vqa-2016" if rule == "vqa-2021" else "vqa-2021"]
    assert metrics["vqa_score"] != pytest.approx(
        sum(other(p["answer"], raw[p["question_id"]]) for p in predictions) / len(predictions), abs=1e-6
    ), "the cases must tell the versions apart"


# Questions the two versions score differently for a vocabulary answer (always normalised, as the vocabulary is).
RULES_DIFFER = [
    (41, "number", ["two"] * 3 + ["three"] * 7, "2"),  # 2021 turns number words into digits: 0.9 (2016: 0)
    (42, "other", ["Red "] * 4 + ["dog"] * 6, "red"),  # 2021: lower case, stripped: 1.0 (2016: 0)
    (43, "yes/no", ["yes"] * 5 + ["yes "] * 5, "yes"),  # one answer once stripped, both 1.0
]
