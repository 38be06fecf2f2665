"""Answer questions about image files with a trained model.

    python -m trainer.serve.predict --run-dir RUN [--tag T] --image a.jpg --question "what shape is this?"
    python -m trainer.serve.predict --weights model/ --image a.jpg --image b.jpg --question "what color is it?"
    python -m trainer.serve.predict --weights model/ --pairs pairs.jsonl    # {"image": "a.jpg", "question": "..."} a line

`--weights` takes an export folder (`python -m trainer.serve.export`, loaded by `trainer.serve.export.from_pretrained`, without
pickle).

With one image, every question is about it; with one question, it is asked of every image; otherwise images and
questions pair up in order. `--pairs FILE` reads the pairs from a JSONL file instead (an image path, relative to the
file's folder, and a question a line; `-` for standard input, paths then relative to the current folder), so that
the model loads once for any number of them. Prints one JSON object per pair: image, question, answer, its
probability, and the top-k answers. Images are preprocessed as the loaders do (RGB, bilinear squash to the model's
size, the model's mean/std), `--batch-size` pairs at a time, on the GPU when there is one. From Python,
`trainer.serve.predictor.Predictor` does the same (the command is that class).

Bad input (exit 2, one line, nothing answered): a missing or unreadable image, an empty question, an export folder
with a missing or damaged file or weights that do not fit its configuration (the message names the file), a file
given as `--weights` (an export is a folder; no file is unpickled), `--top-k`
below 1, a `--pairs` line that is not a JSON object with an image and a question (named by its line number). Images
and questions are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from data_pipeline.convert.images import upright_rgb
from trainer.config.config import ConfigError
from trainer.run import run_folder
from trainer.serve.export import fp32_state_dict, pick_checkpoint

log = logging.getLogger(__name__)


def load_from_run(
    run_dir: Path, tag: str | None, device: torch.device
) -> tuple[torch.nn.Module, Any, list[str], Any]:
    """Model, tokenizer, answers and config straight from a run's checkpoint (its fp32 weights read in memory, as
    `trainer.serve.export` reads them: any ZeRO stage, stage 0 included)."""
    tag, _ = pick_checkpoint(run_dir, tag)
    cfg, tokenizer, answers, task = run_folder.load(run_dir, state_dict=fp32_state_dict(run_dir, tag))
    return task.to(device), tokenizer, answers, cfg


def open_image(image: Any) -> Any:
    """An image file (a path) or a PIL image as an RGB PIL image: the one place images are opened."""
    if isinstance(image, Image.Image):
        return upright_rgb(image)
    path = Path(image)
    if not path.is_file():
        raise ConfigError(f"--image {path}: no such file")
    try:
        with Image.open(path) as im:  # upright (EXIF orientation applied), as the training loaders see photos
            return upright_rgb(im)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # not an image, or a truncated one
        raise ConfigError(f"--image {path}: not an image file that can be read ({exc})") from None


def to_pixels(image: Any, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The model's input for an image (a path or a PIL image): the loaders' bilinear squash and normalisation."""
    rgb = open_image(image).resize((size, size), Image.BILINEAR)
    x = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    x = x.permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def load_image(path: Path, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return to_pixels(path, size, mean, std)


def check_images(paths: list[Path]) -> None:
    """Fail before the model loads on an image that is missing or not an image (only the header is read here)."""
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"--image {path}: no such file")
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ConfigError(f"--image {path}: not an image file that can be read ({exc})") from None


def check_questions(questions: list[str]) -> None:
    for i, q in enumerate(questions, 1):
        if not q.strip():
            raise ConfigError(f"--question number {i} is empty: give the text of the question to answer")


def positive_int(text: str) -> int:
    """argparse type for --top-k: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def read_pairs(source: str) -> list[tuple[Path, str]]:
    """The (image, question) pairs of a JSONL file (`-`: standard input), one {"image": ..., "question": ...} a line;
    image paths relative to the file's folder. One-line errors name the file and line."""
    if source == "-":
        lines, base, name = sys.stdin.read().splitlines(), Path.cwd(), "<stdin>"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"--pairs {path}: no such file")
        lines, base, name = path.read_text(encoding="utf-8").splitlines(), path.parent, str(path)
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--pairs {name}, line {number}: not valid JSON ({exc.msg})") from None
        if not (
            isinstance(row, dict)
            and isinstance(row.get("image"), str)
            and isinstance(row.get("question"), str)
        ):
            raise ConfigError(
                f'--pairs {name}, line {number}: expected {{"image": "PATH", "question": "TEXT"}}, got {line[:80]}'
            )
        pairs.append((base / row["image"], row["question"]))
    if not pairs:
        raise ConfigError(f"--pairs {name}: no pairs in it")
    return pairs


def pair_up(images: list[Any], questions: list[str]) -> list[tuple[Any, str]]:
    if len(images) == 1:
        return [(images[0], q) for q in questions]
    if len(questions) == 1:
        return [(im, questions[0]) for im in images]
    if len(images) != len(questions):
        raise ConfigError(
            f"{len(images)} images and {len(questions)} questions: give one of either, or equal counts"
        )
    return list(zip(images, questions, strict=True))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.serve.predict",
        description="Answer questions about images with a trained checkpoint (a run folder or an export).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", type=Path, help="training run folder (uses its newest complete checkpoint)")
    src.add_argument(
        "--weights",
        type=Path,
        help="an export folder written by `python -m trainer.serve.export`",
    )
    p.add_argument(
        "--tag", default=None, help="with --run-dir: checkpoint tag (default: the newest complete)"
    )
    p.add_argument("--image", action="append", type=Path, help="image file (repeatable)")
    p.add_argument("--question", action="append", help="question text (repeatable)")
    p.add_argument(
        "--pairs",
        metavar="FILE",
        help='JSONL of {"image": PATH, "question": TEXT} a line (PATH relative to FILE\'s folder; - for standard '
        "input), instead of --image/--question: the model loads once for them all",
    )
    p.add_argument("--top-k", type=positive_int, default=3, help="answers listed per question (default 3)")
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="pairs answered per forward pass (default 32)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    try:
        args = p.parse_args(argv)
        if (args.pairs is None) == (args.image is None or args.question is None) or (
            args.pairs is not None and (args.image or args.question)
        ):
            p.error("give --image and --question, or --pairs FILE")
    except SystemExit as exc:  # --help, or argparse's own message (exit 2) for a bad option
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from trainer.serve.predictor import (
        Predictor,
    )  # here, not at the top: trainer.serve.predictor imports this module

    try:
        if args.pairs is not None:
            pairs = read_pairs(args.pairs)
            images, questions = [image for image, _ in pairs], [q for _, q in pairs]
        else:
            images, questions = args.image, args.question
            pairs = pair_up(images, questions)
        check_questions(questions)
        check_images(sorted(set(images)))
        if args.weights is not None:
            predictor = Predictor.from_pretrained(args.weights)
        else:
            predictor = Predictor.from_run(args.run_dir, args.tag)
        results = predictor.predict(
            [image for image, _ in pairs], [q for _, q in pairs], top_k=args.top_k, batch_size=args.batch_size
        )
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
