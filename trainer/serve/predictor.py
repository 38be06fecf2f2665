"""Answering questions about images from Python: `Predictor.from_pretrained(folder).predict(images, questions)`.

    from trainer.serve.predictor import Predictor

    predictor = Predictor.from_pretrained("model/")        # an export folder (or .pt file); Predictor.from_run(RUN)
    predictor.predict(["a.jpg", pil_image], ["what shape is this?", "what color is it?"], top_k=3)
    # [{"image": "a.jpg", "question": ..., "answer": "circle", "p": 0.93, "top": [{"answer": ..., "p": ...}, ...]}, ...]

Images are file paths or PIL images, preprocessed as the loaders do (trainer/serve/predict.py: RGB, bilinear squash to the
model's size, the model's mean/std); questions are tokenised with the run's own question tokenizer. Pairs are
answered `batch_size` at a time, on the GPU when there is one. `python -m trainer.serve.predict` is this class on the
command line, so both give the same answers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.config.config import ConfigError, RunConfig
from trainer.serve.exported import from_pretrained
from trainer.serve.predict import check_questions, load_from_run, pair_up, to_pixels

ImageLike = Any  # a path (str or Path) or a PIL image


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Predictor:
    """A trained model with its question tokenizer and answer vocabulary, ready to answer (eval mode, no grad)."""

    def __init__(
        self,
        task: torch.nn.Module,
        tokenizer: Any,
        answers: list[str],
        cfg: RunConfig,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.task = task.to(self.device).eval()
        self.tokenizer, self.answers, self.cfg = tokenizer, answers, cfg

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> Predictor:
        """From an export folder (`python -m trainer.serve.export`; read without pickle). Bad files: ConfigError, one line
        naming the file."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every file is local; no library may try the hub
        device = torch.device(device) if device is not None else default_device()
        task, tokenizer, answers, cfg = from_pretrained(path, device)
        return cls(task, tokenizer, answers, cfg, device)

    @classmethod
    def from_run(
        cls, run_dir: str | Path, tag: str | None = None, device: str | torch.device | None = None
    ) -> Predictor:
        """From a run folder's checkpoint (the newest complete one, or `tag`), any ZeRO stage."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        device = torch.device(device) if device is not None else default_device()
        task, tokenizer, answers, cfg = load_from_run(Path(run_dir), tag, device)
        return cls(task, tokenizer, answers, cfg, device)

    @torch.no_grad()
    def predict(
        self,
        images: ImageLike | Sequence[ImageLike],
        questions: str | Sequence[str],
        *,
        top_k: int = 3,
        batch_size: int = 32,
    ) -> list[dict[str, Any]]:
        """One result per (image, question) pair, in order. One image is asked every question, one question is
        asked of every image; otherwise the two lists pair up and must be as long. Each result: image (the path,
        or None for a PIL image), question, answer, its probability p, and the `top_k` answers ranked."""
        images = (
            [images] if isinstance(images, str | Path) or not isinstance(images, Sequence) else list(images)
        )
        questions = [questions] if isinstance(questions, str) else list(questions)
        if top_k < 1 or batch_size < 1:
            raise ConfigError(f"top_k and batch_size must be at least 1, got {top_k} and {batch_size}")
        check_questions(questions)
        pairs = pair_up(images, questions)
        size, mean, std = self.cfg.model.image_size, self.task.image_mean, self.task.image_std
        results: list[dict[str, Any]] = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            pixels = torch.stack([to_pixels(image, size, mean, std) for image, _ in chunk])
            batch = dict(self.tokenizer([q for _, q in chunk]))
            batch["pixels"] = pixels
            batch = {k: v.to(self.device) for k, v in batch.items()}
            # VQA heads are trained with per-answer BCE: a sigmoid per answer, not a softmax over them
            probs = torch.sigmoid(self.task(batch)["logits"].float()).cpu()
            top = probs.topk(min(top_k, len(self.answers)), dim=1)
            for i, (image, question) in enumerate(chunk):
                ranked = [
                    {"answer": self.answers[int(j)], "p": round(float(v), 4)}
                    for v, j in zip(top.values[i], top.indices[i], strict=True)
                ]
                results.append(
                    {
                        "image": str(image) if isinstance(image, str | Path) else None,
                        "question": question,
                        "answer": ranked[0]["answer"],
                        "p": ranked[0]["p"],
                        "top": ranked,
                    }
                )
        return results
