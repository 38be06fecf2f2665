"""easy-VQA source: the data set shipped inside the `easy-vqa` package (the project's default demo and test data).

4,000 train and 1,000 test 64x64 PNG images of one coloured shape, ~38k train and ~9.6k test questions, 13 answers,
one answer per question (so every label scores 1.0). Both splits share the package's answer list. The PNGs are
converted to JPEG (quality 95, 4:4:4) once, at conversion, because GPU decoders take JPEG.

Ids: question_id is the question's position in the package's list and image_id the package's image number; the
test split adds TEST_ID_OFFSET to both so that ids are unique across the two splits.
easy-VQA has no answer types, so the sample json has no `answer_type`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline import answers as ans
from data_pipeline.convert.build import BuildSpec, Candidate, ConversionError

SPLITS = ("train", "test")
TEST_ID_OFFSET = 1_000_000


def _package():
    try:
        # Here, not at the top: easy_vqa is needed only to convert easy-VQA, and a missing package is one line below.
        import easy_vqa
    except ImportError:
        raise ConversionError("the easy-vqa package is not installed (pip install easy-vqa==1.0)") from None
    return easy_vqa


def answer_list() -> list[str]:
    vocab = [ans.normalize_answer(a) for a in _package().get_answers()]
    if len(set(vocab)) != len(vocab):
        raise ConversionError("easy_vqa.get_answers(): answers collide after normalisation")
    return vocab


def make_spec(split: str, out: str | Path, **settings: Any) -> BuildSpec:
    """Describe the conversion of one easy-VQA split into `out` (settings: shard_size, seed, workers, ...)."""
    if split not in SPLITS:
        raise ConversionError(f"easy-VQA has splits {', '.join(SPLITS)}, not '{split}'")
    pkg = _package()
    texts, answers, image_ids = pkg.get_train_questions() if split == "train" else pkg.get_test_questions()
    image_paths = pkg.get_train_image_paths() if split == "train" else pkg.get_test_image_paths()
    vocab = answer_list()
    index = {a: i for i, a in enumerate(vocab)}
    offset = 0 if split == "train" else TEST_ID_OFFSET
    candidates, rejected = [], []
    for i, (question, answer, image_id) in enumerate(zip(texts, answers, image_ids, strict=True)):
        qid, iid = offset + i, offset + int(image_id)
        # One ground-truth answer per question: it scores 1.0 (the 10-annotator formula does not apply).
        label = index.get(ans.normalize_answer(answer))
        if label is None:
            raise ConversionError(f"easy_vqa {split} question {i}: answer '{answer}' is not in get_answers()")
        meta = {
            "question_id": qid,
            "image_id": iid,
            "question": question,
            "answers": [answer],
            "labels": [label],
            "scores": [1.0],
        }
        path = image_paths.get(int(image_id))
        if path is None:
            rejected.append(
                {
                    "question_id": qid,
                    "image_id": iid,
                    "reason": f"image missing: easy_vqa has no {split} image {image_id}",
                }
            )
            continue
        candidates.append(Candidate(meta, path))
    return BuildSpec(
        out=Path(out),
        source="easyvqa",
        split=split,
        candidates=candidates,
        rejected=rejected,
        answers=vocab,
        answers_source=f"easy_vqa {getattr(pkg, '__version__', '1.0')} get_answers()",
        has_answers=True,
        image_mode="jpeg",
        inputs={"package": "easy-vqa", "package_dir": str(Path(pkg.__file__).parent), "split": split},
        **settings,
    )
