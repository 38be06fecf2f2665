"""Answer questions about image files with a trained model.

    python -m trainer.predict --run-dir RUN [--tag T] --image a.jpg --question "what shape is this?"
    python -m trainer.predict --weights model/ --image a.jpg --image b.jpg --question "what color is it?"

`--weights` takes an export folder (`python -m trainer.export`, loaded by `trainer.export.from_pretrained`, without
pickle) or the single `.pt` file of the older export form.

With one image, every question is about it; with one question, it is asked of every image; otherwise images and
questions pair up in order. Prints one JSON object per pair: image, question, answer, its probability, and the top-k
answers. Images are preprocessed as the loaders do (RGB, bilinear squash to the model's size, the model's mean/std).

Bad input (exit 2, one line, nothing answered): a missing or unreadable image, an empty question, an export folder
with a missing or damaged file or weights that do not fit its configuration (the message names the file), a weights
file that is not an export (it is never unpickled beyond tensors and plain containers: trainer/export.py), `--top-k`
below 1. Images and questions are checked before the model is loaded.
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

from trainer.config import ConfigError

log = logging.getLogger(__name__)


def load_from_run(
    run_dir: Path, tag: str | None, device: torch.device
) -> tuple[torch.nn.Module, Any, list[str], Any]:
    """Model, tokenizer, answers and config straight from a run's checkpoint (its fp32 weights read in memory, as
    `trainer.export` reads them: any ZeRO stage, stage 0 included)."""
    from trainer import run_folder
    from trainer.export import fp32_state_dict, pick_checkpoint

    tag, _ = pick_checkpoint(run_dir, tag)
    cfg, tokenizer, answers, task = run_folder.load(run_dir, state_dict=fp32_state_dict(run_dir, tag))
    return task.to(device), tokenizer, answers, cfg


def load_image(path: Path, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    from PIL import Image

    from data_pipeline.images import upright_rgb

    if not path.is_file():
        raise ConfigError(f"--image {path}: no such file")
    try:
        with Image.open(path) as im:  # upright (EXIF orientation applied), as the training loaders see photos
            rgb = upright_rgb(im).resize((size, size), Image.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # not an image, or a truncated one
        raise ConfigError(f"--image {path}: not an image file that can be read ({exc})") from None
    x = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    x = x.permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def check_images(paths: list[Path]) -> None:
    """Fail before the model loads on an image that is missing or not an image (only the header is read here)."""
    from PIL import Image

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


def pair_up(images: list[Path], questions: list[str]) -> list[tuple[Path, str]]:
    if len(images) == 1:
        return [(images[0], q) for q in questions]
    if len(questions) == 1:
        return [(im, questions[0]) for im in images]
    if len(images) != len(questions):
        raise ConfigError(
            f"{len(images)} images and {len(questions)} questions: give one of either, or equal counts"
        )
    return list(zip(images, questions, strict=True))


@torch.no_grad()
def predict(
    task: torch.nn.Module,
    tokenizer: Any,
    answers: list[str],
    pairs: list[tuple[Path, str]],
    *,
    image_size: int,
    top_k: int = 3,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    pixels = torch.stack([load_image(p, image_size, task.image_mean, task.image_std) for p, _ in pairs])
    questions = [q for _, q in pairs]
    batch = dict(tokenizer(questions))
    batch["pixels"] = pixels
    batch["targets"] = torch.zeros(len(pairs), len(answers))
    device = device or torch.device("cpu")
    batch = {k: v.to(device) for k, v in batch.items()}
    probs = torch.sigmoid(task(batch)["logits"].float()).cpu()  # VQA heads are trained with per-answer BCE
    top = probs.topk(min(top_k, len(answers)), dim=1)
    out = []
    for i, (image, question) in enumerate(pairs):
        ranked = [
            {"answer": answers[int(j)], "p": round(float(v), 4)}
            for v, j in zip(top.values[i], top.indices[i], strict=True)
        ]
        out.append(
            {
                "image": str(image),
                "question": question,
                "answer": ranked[0]["answer"],
                "p": ranked[0]["p"],
                "top": ranked,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m trainer.predict",
        description="Answer questions about images with a trained checkpoint (a run folder or an export).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", type=Path, help="training run folder (uses its newest complete checkpoint)")
    src.add_argument(
        "--weights",
        type=Path,
        help="an export folder written by `python -m trainer.export` (or the .pt file of its single-file form)",
    )
    p.add_argument(
        "--tag", default=None, help="with --run-dir: checkpoint tag (default: the newest complete)"
    )
    p.add_argument("--image", action="append", type=Path, required=True, help="image file (repeatable)")
    p.add_argument("--question", action="append", required=True, help="question text (repeatable)")
    p.add_argument("--top-k", type=positive_int, default=3, help="answers listed per question (default 3)")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own message (exit 2) for a bad option
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_questions(args.question)
        check_images(args.image)
        pairs = pair_up(args.image, args.question)
        if args.weights is not None:
            from trainer.export import from_pretrained, load_exported

            load = from_pretrained if args.weights.is_dir() else load_exported
            task, tokenizer, answers, cfg = load(args.weights, device)
        else:
            task, tokenizer, answers, cfg = load_from_run(args.run_dir, args.tag, device)
        results = predict(
            task, tokenizer, answers, pairs, image_size=cfg.model.image_size, top_k=args.top_k, device=device
        )
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
