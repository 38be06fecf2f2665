"""A tiny VQA v2-format data set written from scratch: for tests, and for trying the vqa2 converter without COCO.

`write_vqa2(root)` writes COCO-named JPEGs of varied sizes (some smaller, some larger than the model's input, one
grayscale), the official question and annotation JSON layouts with 10 annotator answers per question (spelling
variants such as "Two"/"2"/"yes." that the official normalisation merges), and, unless `bad=False`, one truncated
JPEG and one question whose image file does not exist. The returned `Vqa2Files` says where everything is and which
questions must be rejected.

`python -m data_pipeline.convert.synthetic --out RAW --images N` writes a train2014 and a val2014 split in the official
download's layout (RAW/v2_OpenEnded_mscoco_train2014_questions.json, RAW/v2_mscoco_train2014_annotations.json,
RAW/train2014/COCO_train2014_*.jpg, and the same for val2014), so that the README's VQA v2 commands run end to end
without the downloads. The data only checks the plumbing: its answers are random, nothing in it can be learned.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# (normalised answer, raw spellings annotators use for it, answer type)
_ANSWERS = [
    ("yes", ["yes", "Yes", "yes."], "yes/no"),
    ("no", ["no", "No", "no!"], "yes/no"),
    ("2", ["2", "two", "Two"], "number"),
    ("3", ["3", "three"], "number"),
    ("red", ["red", "Red", "the red"], "other"),
    ("dog", ["dog", "a dog", "Dog"], "other"),
]


@dataclass
class Vqa2Files:
    root: Path
    questions: Path
    annotations: Path
    images: Path
    split: str
    question_ids: list[int] = field(default_factory=list)
    """Every question in the files."""
    rejected: dict[int, str] = field(default_factory=dict)
    """question_id -> the reason kind the converter must give (e.g. "undecodable image", "image missing")."""


def _image(rng: random.Random, width: int, height: int, gray: bool, photo_like: bool) -> Image.Image:
    im = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    for _ in range(6):  # a few shapes: edges that resizing must treat alike in both loaders
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(4, width), y0 + rng.randrange(4, height)
        draw.rectangle([x0, y0, x1, y1], fill=tuple(rng.randrange(256) for _ in range(3)))
    if photo_like:
        # Sensor-like noise: JPEG size and decode cost then resemble a photo's (COCO: ~160 KiB at 640x480),
        # which flat shapes (a few KiB) do not.
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 24, (height, width, 3))
        im = Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    return im.convert("L") if gray else im


def _annotators(rng: random.Random, answer: int) -> list[str]:
    """10 answers: 6 for the true answer (in mixed spellings), 2 for another, 1 for a third, 1 unique."""
    others = rng.sample([i for i in range(len(_ANSWERS)) if i != answer], 2)
    raw = [rng.choice(_ANSWERS[answer][1]) for _ in range(6)]
    raw += [_ANSWERS[others[0]][0]] * 2 + [_ANSWERS[others[1]][0]] + [f"unique answer {rng.randrange(10**6)}"]
    rng.shuffle(raw)
    return raw


def _jpeg(im: Any, chroma_subsampling: bool) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **({} if chroma_subsampling else {"subsampling": 0}))
    return buf.getvalue()


def _question(rng: random.Random, image_id: int, k: int, qid: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Question `k` about image `image_id` and its annotation: a random answer and ten annotators' words for it."""
    answer = rng.randrange(len(_ANSWERS))
    raw = _annotators(rng, answer)
    question = {
        "image_id": image_id,
        "question": f"what is shown in picture {image_id} ({k})?",
        "question_id": qid,
    }
    annotation = {
        "question_type": "what is",
        "multiple_choice_answer": rng.choice(_ANSWERS[answer][1]),
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(raw)],
        "image_id": image_id,
        "answer_type": _ANSWERS[answer][2],
        "question_id": qid,
    }
    return question, annotation


def _spread(image_ids: list[int], per_image: float) -> list[tuple[int, int]]:
    """(image id, k) for every question: image n gets floor((n+1)q) - floor(nq) questions, q = `per_image`."""
    q = Fraction(str(per_image))  # exact for decimals such as 5.4 (no float rounding in the counts)
    return [
        (image_id, k)
        for n, image_id in enumerate(image_ids)
        for k in range(math.floor((n + 1) * q) - math.floor(n * q))
    ]


def _write_json(files: Vqa2Files, questions: list[dict], annotations: list[dict]) -> None:
    """The official questions and annotations file layouts."""
    info = {"description": "synthetic VQA v2-format data (data_pipeline.convert.synthetic)", "version": "2.0"}
    common = {"info": info, "data_subtype": files.split, "license": {"name": "none", "url": ""}}
    files.questions.write_text(
        json.dumps({**common, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions})
    )
    files.annotations.write_text(json.dumps({**common, "data_type": "mscoco", "annotations": annotations}))


def write_vqa2(
    root: str | Path,
    *,
    n_images: int = 8,
    questions_per_image: float = 3,
    split: str = "train2014",
    seed: int = 0,
    bad: bool = True,
    first_image_id: int = 100,
    sizes: tuple[int, int, int, int] = (40, 120, 30, 100),
    photo_like: bool = False,
    chroma_subsampling: bool = True,
    on_image: Callable[[int], None] | None = None,
    names: tuple[str, str, str] = ("questions.json", "annotations.json", "images"),
) -> Vqa2Files:
    """Write images/, questions.json and annotations.json under `root` (see the module docstring).

    `sizes` = (min width, max width, min height, max height) of the images; `photo_like` adds noise so that
    JPEGs weigh and decode like photos (for the benchmark). `chroma_subsampling=False` writes 4:4:4 JPEGs instead of
    the usual 4:2:0: decoders differ in how they upsample chroma (nvJPEG and libjpeg-turbo by tens of levels next to
    colour edges), so comparisons of two decoders' pixels use 4:4:4. A fractional `questions_per_image` (VQA v2 has
    ~5.4) spreads the questions evenly: image n gets floor((n+1)q) - floor(nq) of them, so a whole number gives
    every image exactly that many (the random draws, and so the files, stay as they were). `on_image(n)` is called
    after each image is written (progress for large sets). `names`: the questions file, annotations file and image
    folder under `root` (`official_names(split)` gives the downloads' names).
    """
    rng = random.Random(seed)
    root = Path(root)
    images = root / names[2]
    images.mkdir(parents=True, exist_ok=True)
    files = Vqa2Files(root, root / names[0], root / names[1], images, split)
    questions, annotations = [], []
    image_ids = [first_image_id + i for i in range(n_images)]
    truncated = image_ids[1] if bad else None
    for n, image_id in enumerate(image_ids):
        width, height = rng.randint(sizes[0], sizes[1]), rng.randint(sizes[2], sizes[3])
        im = _image(rng, width, height, gray=(n == 2), photo_like=photo_like)
        data = _jpeg(im, chroma_subsampling)
        if image_id == truncated:
            data = data[: len(data) // 2]  # a download cut short
        (images / f"COCO_{split}_{image_id:012d}.jpg").write_bytes(data)
        if on_image is not None:
            on_image(n + 1)
    targets = _spread(image_ids, questions_per_image)
    missing_image = first_image_id + n_images + 7  # no file is written for this one
    if bad:
        targets.append((missing_image, 0))
    for image_id, k in targets:
        qid = image_id * 1000 + k
        question, annotation = _question(rng, image_id, k, qid)
        questions.append(question)
        annotations.append(annotation)
        files.question_ids.append(qid)
        if image_id == truncated:
            files.rejected[qid] = "undecodable image"
        elif image_id == missing_image:
            files.rejected[qid] = "image missing"
    _write_json(files, questions, annotations)
    return files


# The official file names of one split (visualqa.org's downloads, cocodataset.org's image folders).
def official_names(split: str) -> tuple[str, str, str]:
    """(questions file, annotations file, image folder) of `split` (train2014, val2014) as the downloads name them."""
    return f"v2_OpenEnded_mscoco_{split}_questions.json", f"v2_mscoco_{split}_annotations.json", split


def write_official_layout(
    out: str | Path, *, n_images: int, questions_per_image: float = 3, seed: int = 0, bad: bool = False
) -> dict[str, Vqa2Files]:
    """train2014 and val2014 splits (each of `n_images` images, ids disjoint) under `out` in the official layout."""
    out = Path(out)
    existing = [
        name for split in ("train2014", "val2014") for name in official_names(split) if (out / name).exists()
    ]
    if existing:
        raise FileExistsError(
            f"--out {out}: already holds {', '.join(existing)}; give an empty or new folder"
        )
    written: dict[str, Vqa2Files] = {}
    for i, split in enumerate(("train2014", "val2014")):
        written[split] = write_vqa2(
            out,
            n_images=n_images,
            questions_per_image=questions_per_image,
            split=split,
            seed=seed + i,
            bad=bad,
            first_image_id=100 + i * (n_images + 1000),
            names=official_names(split),
        )
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.convert.synthetic",
        description="Write a small synthetic VQA v2-format data set (train2014 and val2014) in the official "
        "download's layout, for trying the VQA v2 conversion and training commands without COCO. Its answers are "
        "random: it checks the plumbing, a model learns nothing from it.",
    )
    p.add_argument(
        "--out", required=True, metavar="RAW", help="folder to write into (created; must not hold the files)"
    )
    p.add_argument("--images", type=int, default=16, metavar="N", help="images per split (default 16)")
    p.add_argument(
        "--questions-per-image", type=float, default=3, metavar="Q", help="questions per image (default 3)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--bad",
        action="store_true",
        help="also write one truncated JPEG and one question without its image per split, which the converter "
        "must reject",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.images < 1 or args.questions_per_image <= 0:
        print("error: --images must be >= 1 and --questions-per-image > 0", file=sys.stderr)
        return 2
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        written = write_official_layout(
            args.out,
            n_images=args.images,
            questions_per_image=args.questions_per_image,
            seed=args.seed,
            bad=args.bad,
        )
    except (FileExistsError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, files in written.items():
        print(
            f"{split}: {args.images} images, {len(files.question_ids)} questions -> {files.questions.parent}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
