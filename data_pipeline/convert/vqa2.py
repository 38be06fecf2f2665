"""VQA v2 source: the official question and annotation files and the COCO image folder, read and validated.

Files: `v2_OpenEnded_mscoco_<split>_questions.json` ({"questions": [{question_id, image_id, question}]}),
`v2_mscoco_<split>_annotations.json` ({"annotations": [{question_id, image_id, multiple_choice_answer, answers:
[{answer, ...} x 10], answer_type}]}) and images named `COCO_<split>_<12-digit image id>.jpg` (any name ending in
`<12-digit id>.jpg` is accepted, so COCO 2017's `<id>.jpg` works too).

Malformed input is a `ConversionError` whose one-line message names the file and the field (`A.json:
annotations[12]: missing field 'answers'`); a question whose image or annotation is absent is not an error but a
rejection, listed in the manifest. Annotations that no question references are counted in the manifest
(`unreferenced_annotations`) and in the summary line: they are harmless but usually mean mismatched files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipeline import answers as ans
from data_pipeline.convert.build import BuildSpec, Candidate, ConversionError

_IMAGE_NAME = re.compile(r"(\d{12})\.jpe?g$", re.IGNORECASE)


def load_json(path: str | Path, flag: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file ({flag})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ConversionError(
            f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
        ) from None
    except UnicodeDecodeError:
        raise ConversionError(f"{path}: not a UTF-8 text file ({flag})") from None


def _records(data: Any, path: Path, key: str, what: str) -> list[dict[str, Any]]:
    if not isinstance(data, dict) or key not in data:
        raise ConversionError(f"{path}: missing field '{key}' (is this a VQA v2 {what} file?)")
    records = data[key]
    if not isinstance(records, list):
        raise ConversionError(f"{path}: field '{key}' must be a list, got {type(records).__name__}")
    return records


def _field(record: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(record, dict):
        raise ConversionError(f"{where}: expected an object, got {type(record).__name__}")
    if name not in record:
        raise ConversionError(f"{where}: missing field '{name}'")
    value = record[name]
    # bool is an int in Python; an id of `true` is still malformed.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ConversionError(f"{where}: field '{name}' must be {expected}, got {type(value).__name__}")
    return value


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """[{question_id, image_id, question}] from an official questions file, validated."""
    path = Path(path)
    out, seen = [], set()
    for i, q in enumerate(_records(load_json(path, "--questions"), path, "questions", "questions")):
        where = f"{path}: questions[{i}]"
        qid = _field(q, "question_id", int, where)
        if qid in seen:
            raise ConversionError(f"{where}: duplicate question_id {qid}")
        seen.add(qid)
        out.append(
            {
                "question_id": qid,
                "image_id": _field(q, "image_id", int, where),
                "question": _field(q, "question", str, where),
            }
        )
    return out


def read_annotations(path: str | Path) -> dict[int, dict[str, Any]]:
    """question_id -> {image_id, multiple_choice_answer, answers (raw strings), answer_type?}, validated."""
    path = Path(path)
    out: dict[int, dict[str, Any]] = {}
    for i, a in enumerate(_records(load_json(path, "--annotations"), path, "annotations", "annotations")):
        where = f"{path}: annotations[{i}]"
        qid = _field(a, "question_id", int, where)
        if qid in out:
            raise ConversionError(f"{where}: duplicate question_id {qid}")
        raw = _field(a, "answers", list, where)
        if not raw:
            raise ConversionError(f"{where}: field 'answers' is empty")
        answers = [_field(r, "answer", str, f"{where}.answers[{j}]") for j, r in enumerate(raw)]
        record = {
            "image_id": _field(a, "image_id", int, where),
            "multiple_choice_answer": _field(a, "multiple_choice_answer", str, where),
            "answers": answers,
        }
        if "answer_type" in a:
            record["answer_type"] = _field(a, "answer_type", str, where)
        out[qid] = record
    return out


def index_images(folder: str | Path) -> dict[int, str]:
    """image_id -> path for every `*<12-digit id>.jpg` in `folder` (not recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: no such folder (--images)")
    found: dict[int, str] = {}
    with os.scandir(folder) as entries:
        for e in entries:
            m = _IMAGE_NAME.search(e.name)
            if m is None:
                continue
            image_id = int(m.group(1))
            if image_id in found:
                raise ConversionError(
                    f"{folder}: two files for image id {image_id}: {Path(found[image_id]).name}, {e.name}"
                )
            found[image_id] = e.path
    if not found:
        raise ConversionError(
            f"{folder}: no COCO image files (names ending in a 12-digit id and .jpg) (--images)"
        )
    return found


def read_answer_list(path: str | Path) -> list[str]:
    """An answers.json written by this package: a JSON list of distinct answer strings."""
    path = Path(path)
    data = load_json(path, "--answers")
    if not isinstance(data, list) or not data or not all(isinstance(a, str) for a in data):
        raise ConversionError(f"{path}: must be a non-empty JSON list of answer strings (an answers.json)")
    if len(set(data)) != len(data):
        raise ConversionError(f"{path}: the answer list has duplicates")
    return data


def build_answer_vocabulary(annotation_files: Sequence[str | Path], min_count: int) -> list[str]:
    """ViLT's vocabulary over several annotation files (train + val): majority answers seen >= min_count times."""
    if min_count < 1:
        raise ConversionError(f"--min-answer-count must be >= 1, got {min_count}")
    majors = []
    for path in annotation_files:
        majors.extend(a["multiple_choice_answer"] for a in read_annotations(path).values())
    vocab = ans.build_vocabulary(majors, min_count)
    if not vocab:
        raise ConversionError(
            f"no answer is the majority answer {min_count} times in {', '.join(map(str, annotation_files))}"
        )
    return vocab


UNREFERENCED_LISTED = (
    100  # question ids of unreferenced annotations kept in the manifest (the count is exact)
)


def _unreferenced(anns: dict[int, dict[str, Any]] | None, qs: list[dict[str, Any]]) -> list[int]:
    """Question ids of annotations that no question references (mismatched files, e.g. another split's)."""
    if anns is None:
        return []
    asked = {q["question_id"] for q in qs}
    return sorted(qid for qid in anns if qid not in asked)


def _file_info(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    return {"path": str(p.resolve()), "bytes": p.stat().st_size}


def _vocabulary(
    anns: dict[int, dict[str, Any]] | None,
    annotations: str | Path | None,
    answers_file: str | Path | None,
    min_answer_count: int,
) -> tuple[list[str], str]:
    """The answer vocabulary (a given list, else built from the annotations) and a line saying where it came from."""
    if answers_file is not None:
        return read_answer_list(answers_file), f"reused from {Path(answers_file).resolve()}"
    if anns is None:
        raise ConversionError(
            "--answers is required without --annotations: test questions need the training vocabulary"
        )
    if min_answer_count < 1:
        raise ConversionError(f"--min-answer-count must be >= 1, got {min_answer_count}")
    vocab = ans.build_vocabulary((a["multiple_choice_answer"] for a in anns.values()), min_answer_count)
    if not vocab:
        raise ConversionError(f"{annotations}: no answer reaches --min-answer-count {min_answer_count}")
    return (
        vocab,
        f"built from {Path(annotations).resolve()} (multiple_choice_answer count >= {min_answer_count})",
    )


def _candidates(
    qs: list[dict[str, Any]],
    anns: dict[int, dict[str, Any]] | None,
    index: dict[str, int],
    image_paths: dict[int, str],
    skip_out_of_vocab: bool,
    *,
    where: dict[str, Any],
) -> tuple[list[Candidate], list[dict[str, Any]], int]:
    """(the questions to convert, the rejected ones with their reason, how many have no answer in the vocabulary)."""
    candidates: list[Candidate] = []
    rejected: list[dict[str, Any]] = []
    out_of_vocab = 0
    for q in qs:
        qid, image_id = q["question_id"], q["image_id"]
        meta: dict[str, Any] = dict(q, answers=[], labels=[], scores=[])
        reason = None
        if anns is not None:
            a = anns.get(qid)
            if a is None:
                reason = f"no annotation: question {qid} is not in {where['annotations']}"
            elif a["image_id"] != image_id:
                reason = (
                    f"annotation mismatch: image_id {a['image_id']} in {where['annotations']}, {image_id} in "
                    f"{where['questions']}"
                )
            else:
                labels, scores = ans.labels_and_scores(a["answers"], index)
                if not labels:
                    out_of_vocab += 1
                    if skip_out_of_vocab:
                        continue
                meta.update(answers=a["answers"], labels=labels, scores=scores)
                if "answer_type" in a:
                    meta["answer_type"] = a["answer_type"]
        path = image_paths.get(image_id)
        if reason is None and path is None:
            reason = f"image missing: no file for image_id {image_id} in {where['images']}"
        if reason is not None:
            rejected.append({"question_id": qid, "image_id": image_id, "reason": reason})
            continue
        candidates.append(Candidate(meta, path))
    return candidates, rejected, out_of_vocab


def make_spec(
    *,
    questions: str | Path,
    annotations: str | Path | None,
    images: str | Path,
    out: str | Path,
    answers_file: str | Path | None,
    min_answer_count: int,
    skip_out_of_vocab: bool = False,
    **settings: Any,
) -> BuildSpec:
    """Read and validate a VQA v2 split and describe its conversion (settings: shard_size, seed, workers, ...)."""
    qs = read_questions(questions)
    anns = read_annotations(annotations) if annotations is not None else None
    vocab, source = _vocabulary(anns, annotations, answers_file, min_answer_count)
    candidates, rejected, out_of_vocab = _candidates(
        qs, anns, {a: i for i, a in enumerate(vocab)}, index_images(images), skip_out_of_vocab,
        where={"questions": questions, "annotations": annotations, "images": images},
    )  # fmt: skip

    unreferenced = _unreferenced(anns, qs)
    inputs = {
        "questions": _file_info(questions),
        "annotations": _file_info(annotations) if annotations is not None else None,
        "images": str(Path(images).resolve()),
        "answers": _file_info(answers_file) if answers_file is not None else None,
        "min_answer_count": min_answer_count,
        "skip_out_of_vocab": skip_out_of_vocab,
    }
    extra = {
        "out_of_vocabulary": {
            "questions": out_of_vocab,
            "left_out": skip_out_of_vocab,
            "note": "questions none of whose answers is in the vocabulary (targets all zero)",
        },
        "unreferenced_annotations": {
            "count": len(unreferenced),
            "question_ids": unreferenced[:UNREFERENCED_LISTED],
            "note": f"annotations whose question_id no question has (ignored; at most {UNREFERENCED_LISTED} listed)",
        },
    }
    notes = [f"{len(unreferenced)} annotations without a question ignored"] if unreferenced else []
    return BuildSpec(
        out=Path(out),
        source="vqa2",
        split=Path(out).name,
        candidates=candidates,
        rejected=rejected,
        answers=vocab,
        answers_source=source,
        has_answers=anns is not None,
        image_mode="verbatim",
        inputs=inputs,
        extra=extra,
        notes=notes,
        **settings,
    )
