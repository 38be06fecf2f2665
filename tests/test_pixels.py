"""Pixel values end to end against CLIP's published preprocessing: solid-colour JPEGs with distinct R, G and B
through both loaders (DALI on the CPU and PyTorch), predict's preprocessing and the model's own mean/std, against
(c/255 - mean) / std with open_clip's OpenAI CLIP constants, channel by channel in RGB order.

A solid colour survives JPEG (4:4:4, quality 100) and any resize within a level or two, so the expected tensor is
known exactly: a swapped mean/std, a swapped channel order or the model's mean/std mixed up all move pixels by tens of
levels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from data_pipeline.loaders.loader import LoaderSpec, build_loader

COLOURS = {101: (200, 90, 30), 102: (20, 140, 230)}  # image id -> RGB, every channel different
SIZE = 32
TOLERANCE_LEVELS = 3  # JPEG rounding of a flat colour and the resize


def expected(rgb: tuple[int, int, int]) -> torch.Tensor:
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float64)
    std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float64)
    return (torch.tensor(rgb, dtype=torch.float64) / 255 - mean) / std


def _solid_jpeg(path: Path, rgb: tuple[int, int, int]) -> None:
    Image.new("RGB", (40, 30), rgb).save(path, format="JPEG", quality=100, subsampling=0)


@pytest.fixture(scope="module")
def solid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted VQA v2-format folder: two questions on each of two solid-colour images."""
    from data_pipeline.convert.cli import main as convert

    root = tmp_path_factory.mktemp("solid")
    images = root / "images"
    images.mkdir()
    questions, annotations = [], []
    for image_id, rgb in COLOURS.items():
        _solid_jpeg(images / f"COCO_val2014_{image_id:012d}.jpg", rgb)
        for k in range(2):
            qid = image_id * 10 + k
            questions.append({"image_id": image_id, "question": f"what colour {k}?", "question_id": qid})
            annotations.append(
                {
                    "question_type": "what",
                    "multiple_choice_answer": "red",
                    "answers": [
                        {"answer": "red", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)
                    ],
                    "image_id": image_id,
                    "answer_type": "other",
                    "question_id": qid,
                }
            )
    (root / "questions.json").write_text(json.dumps({"questions": questions}))
    (root / "annotations.json").write_text(json.dumps({"annotations": annotations}))
    out = root / "shards"
    argv = [
        "vqa2",
        "--questions",
        str(root / "questions.json"),
        "--annotations",
        str(root / "annotations.json"),
    ]
    argv += [
        "--images",
        str(images),
        "--out",
        str(out),
        "--min-answer-count",
        "1",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert convert(argv) == 0
    return out


class _Tokens:
    def __call__(self, questions: list[str]) -> dict[str, torch.Tensor]:
        n = len(questions)
        ids = torch.ones(n, 4, dtype=torch.long)
        return {"vilt_ids": ids, "vilt_mask": ids, "clip_ids": ids}


def _assert_solid(pixels: torch.Tensor, rgb: tuple[int, int, int], what: str) -> None:
    """Every pixel of a 3 x S x S tensor is the normalised colour, channel by channel."""
    want = expected(rgb)
    level = 1 / (255 * min(OPENAI_DATASET_STD))
    for c in range(3):
        got = pixels[c].double()
        worst = float((got - want[c]).abs().max())
        assert worst <= TOLERANCE_LEVELS * level, (
            f"{what}: channel {'RGB'[c]} of colour {rgb}: {float(got.mean()):.4f}, expected {float(want[c]):.4f}"
        )


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_loaders_normalise_with_clips_constants_in_rgb_order(solid: Path, kind: str) -> None:
    spec = LoaderSpec(
        tokenizer=_Tokens(),
        batch_size=2,
        image_size=SIZE,
        mean=OPENAI_DATASET_MEAN,
        std=OPENAI_DATASET_STD,
        train=False,
        kind=kind,
        num_workers=0,
        device=torch.device("cpu"),
    )
    seen = 0
    for batch in build_loader(solid, spec):
        assert batch["pixels"].shape[1:] == (3, SIZE, SIZE)
        for row, qid in enumerate(batch["question_id"].tolist()):
            if "valid" in batch and not bool(batch["valid"][row]):
                continue
            _assert_solid(batch["pixels"][row], COLOURS[qid // 10], f"{kind} loader, question {qid}")
            seen += 1
    assert seen == 4


def test_predict_preprocesses_as_the_loaders(tmp_path: Path) -> None:
    from trainer.serve.predict import load_image

    for image_id, rgb in COLOURS.items():
        path = tmp_path / f"{image_id}.jpg"
        _solid_jpeg(path, rgb)
        x = load_image(path, SIZE, tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD))
        assert x.shape == (3, SIZE, SIZE)
        _assert_solid(x, rgb, "predict")


def test_the_clip_models_mean_and_std_are_openai_clips() -> None:
    """What the run hands the loaders and predict (trainer/run/run.py, trainer/serve/predict.py): the task's mean/std."""
    from tests.helpers.tiny import N_ANSWERS, VOCAB, tiny_config
    from trainer.modeling.task import build_task

    task = build_task(tiny_config("clip-infonce-dot"), n_answers=N_ANSWERS, vilt_vocab_size=VOCAB)
    assert task.image_mean == pytest.approx(tuple(OPENAI_DATASET_MEAN), abs=1e-9)
    assert task.image_std == pytest.approx(tuple(OPENAI_DATASET_STD), abs=1e-9)
