"""Export a training checkpoint as one self-contained fp32 file for inference (DeepSpeed's zero_to_fp32 API).

    python -m trainer.export --run-dir RUN [--tag global_step1000] --out model.pt

The file is a `torch.save`d dict: `state_dict` (fp32 weights of the VQATask, gathered from every rank's ZeRO
shards), `config` (the run's resolved configuration), `answers` (index -> answer string), `tokenizer_files` (the
run's question tokenizer, so the file needs nothing else), `step` and `tag`. `load_exported(file)` rebuilds the
model, the tokenizer and the answer list from it; `python -m trainer.predict --weights FILE` uses it.
No process group is needed: zero_to_fp32 reads the shards on one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainer.checkpointing import list_complete
from trainer.config import ConfigError, RunConfig, config_from_dict

log = logging.getLogger(__name__)

FORMAT = "vqa-align/fp32-weights/1"


def pick_checkpoint(run_dir: Path, tag: str | None) -> tuple[str, int]:
    """(tag, step) of a complete, non-universal checkpoint of the run (the newest if `tag` is None)."""
    refs = [r for r in list_complete(run_dir / "checkpoints") if not r.universal]
    if not refs:
        raise ConfigError(f"{run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
    if tag is None:
        return refs[-1].tag, refs[-1].step
    for r in refs:
        if r.tag == tag:
            return r.tag, r.step
    raise ConfigError(f"{run_dir}: no complete checkpoint '{tag}' (have: {', '.join(r.tag for r in refs)})")


def fp32_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def export(run_dir: Path, out: Path, tag: str | None = None) -> Path:
    from trainer.checkpointing import atomic_torch_save

    run_dir = Path(run_dir)
    tag, step = pick_checkpoint(run_dir, tag)
    cfg = json.loads((run_dir / "config.json").read_text())
    answers = json.loads((run_dir / "answers.json").read_text())
    tok_dir = run_dir / "tokenizer"
    tokenizer_files = {p.name: p.read_text() for p in sorted(tok_dir.iterdir()) if p.is_file()}
    payload = {
        "format": FORMAT,
        "state_dict": fp32_state_dict(run_dir, tag),
        "config": cfg,
        "answers": answers,
        "tokenizer_files": tokenizer_files,
        "step": step,
        "tag": tag,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(payload, out)
    n = sum(v.numel() for v in payload["state_dict"].values())
    log.info("exported %s (step %d, %.1f M parameters) -> %s", tag, step, n / 1e6, out)
    return out


def load_exported(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any, list[str], RunConfig]:
    """(model in eval mode, question tokenizer, answers, config) from an exported file."""
    from data_pipeline.text import QuestionTokenizer

    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a file written by `python -m trainer.export`")
    cfg = config_from_dict(payload["config"])
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in payload["tokenizer_files"].items():
            Path(tmp, name).write_text(text)
        tokenizer = QuestionTokenizer.load(tmp)
    answers = list(payload["answers"])
    task = build_inference_task(
        cfg,
        payload["state_dict"],
        n_answers=len(answers),
        vilt_vocab_size=tokenizer.vilt_vocab_size,
        clip_vocab=tokenizer.clip_vocab,
    )
    return task.to(device), tokenizer, answers, cfg


def build_inference_task(
    cfg: RunConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    n_answers: int,
    vilt_vocab_size: int,
    clip_vocab: list[int] | None = None,
) -> torch.nn.Module:
    """The VQATask with trained weights. Built without the pretrained sources (the weights replace them anyway),
    so inference never needs the hub or the original checkpoint files."""
    import dataclasses

    from trainer.task import build_task

    model = dataclasses.replace(cfg.model, vilt_pretrained=None, clip_pretrained=None)
    sizes = {"n_answers": n_answers, "vilt_vocab_size": vilt_vocab_size, "clip_vocab": clip_vocab}
    task = build_task(dataclasses.replace(cfg, model=model), **sizes)
    try:
        task.load_state_dict(state_dict, strict=True)
    except RuntimeError:
        if model == cfg.model:
            raise
        # A pretrained checkpoint's architecture can differ from the named size: build it from its own source.
        task = build_task(cfg, **sizes)
        task.load_state_dict(state_dict, strict=True)
    return task.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description="Write a run's checkpoint as one fp32 weights file (with config, answers and tokenizer) "
        "for inference with `python -m trainer.predict --weights FILE`.",
    )
    p.add_argument("--run-dir", required=True, type=Path, help="the training run folder")
    p.add_argument(
        "--tag", default=None, help="checkpoint tag, e.g. global_step1000 (default: the newest complete)"
    )
    p.add_argument("--out", required=True, type=Path, help="file to write (e.g. model.pt)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        export(args.run_dir, args.out, args.tag)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
