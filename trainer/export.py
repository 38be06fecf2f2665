"""Export a training checkpoint as one self-contained fp32 file for inference.

    python -m trainer.export --run-dir RUN [--tag global_step1000] --out model.pt

The file is a `torch.save`d dict: `state_dict` (fp32 weights of the VQATask, gathered from every rank's ZeRO
shards, or read from `mp_rank_00_model_states.pt` for a checkpoint written without ZeRO, as a single-rank run's
is), `config` (the run's resolved configuration), `answers` (index -> answer string), `tokenizer_files` (the
run's question tokenizer, so the file needs nothing else), `step` and `tag`. `load_exported(file)` rebuilds the
model, the tokenizer and the answer list from it; `python -m trainer.predict --weights FILE` uses it.
The file holds only tensors, dicts, lists, strings and numbers, so it is read with `torch.load(weights_only=True)`:
a file naming any other object is refused before anything of it is unpickled, and its layout is checked before any
of it is used.
No process group is needed: DeepSpeed's zero_to_fp32 reads a ZeRO checkpoint's shards on one process.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainer import run_folder
from trainer.checkpointing import (
    check_deepspeed_files,
    first_line,
    has_zero_shards,
    list_complete,
    unsafe_globals,
)
from trainer.config import ConfigError, RunConfig, config_from_dict
from trainer.run_folder import RunFolder

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
    """The VQATask's weights in fp32 from checkpoint `tag` of the run, whichever ZeRO stage wrote it."""
    path = run_dir / "checkpoints" / tag
    check_deepspeed_files(path)  # zero_to_fp32 unpickles the shards fully: nothing unknown may reach it
    if not has_zero_shards(path):
        sd = stage0_state_dict(path)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def stage0_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The module weights of a checkpoint written without ZeRO (a single-rank run is at stage 0: trainer/engine.py).

    Such a checkpoint has no optimizer shards for zero_to_fp32 to gather: DeepSpeed saves the module's full
    `state_dict()` as the `module` entry of `mp_rank_00_model_states.pt`, beside torch's AdamW state, the schedule
    and the trainer's state (runtime/engine.py: `_save_checkpoint`). Everything in that file is tensors and plain
    containers, so it is read with `weights_only=True`, memory-mapped: only the weights are read from disk.
    """
    file = path / "mp_rank_00_model_states.pt"
    if not file.is_file():
        raise ConfigError(
            f"{path}: no mp_rank_00_model_states.pt and no ZeRO shards: not a DeepSpeed checkpoint"
        )
    try:
        states = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(file)) or "unknown"
        raise ConfigError(
            f"{file}: holds objects other than tensors and plain containers ({unsafe}); not loaded"
        ) from None
    module = states.get("module") if isinstance(states, dict) else None
    if not isinstance(module, dict) or not module:
        raise ConfigError(f"{file}: no 'module' weights in it")
    half = sorted(
        {str(v.dtype) for v in module.values() if v.is_floating_point() and v.dtype != torch.float32}
    )
    if half:
        # Only a DeepSpeed config that sets stage 0 with bf16/fp16 weights itself saves half-precision module weights
        # (the trainer's own single-rank stage 0 keeps fp32 weights); their fp32 master copies are not read here.
        log.warning("%s: module weights in %s are upcast to fp32", file, ", ".join(half))
    return dict(module)


def export(run_dir: Path, out: Path, tag: str | None = None) -> Path:
    from data_pipeline import atomic

    run_dir = Path(run_dir)
    tag, step = pick_checkpoint(run_dir, tag)
    folder = RunFolder(run_dir)
    payload = {
        "format": FORMAT,
        "state_dict": fp32_state_dict(run_dir, tag),
        "config": folder.read_config().to_dict(),
        "answers": folder.read_answers(),
        "tokenizer_files": folder.tokenizer_files(),
        "step": step,
        "tag": tag,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.torch_save(payload, out)
    n = sum(v.numel() for v in payload["state_dict"].values())
    log.info("exported %s (step %d, %.1f M parameters) -> %s", tag, step, n / 1e6, out)
    return out


def load_exported(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any, list[str], RunConfig]:
    """(model in eval mode, question tokenizer, answers, config) from an exported file: its files unpacked into a
    temporary run folder, rebuilt as every run folder is (trainer/run_folder.py)."""
    payload = read_exported(Path(path))
    with tempfile.TemporaryDirectory() as tmp:
        folder = RunFolder(tmp)
        folder.save(
            config_from_dict(payload["config"]),
            answers=list(payload["answers"]),
            tokenizer_files=payload["tokenizer_files"],
        )
        cfg, tokenizer, answers, task = run_folder.load(folder, state_dict=payload["state_dict"])
    return task.to(device), tokenizer, answers, cfg


def read_exported(path: Path) -> dict[str, Any]:
    """An exported file's payload: loaded with `weights_only=True` (no object other than tensors and plain
    containers is ever unpickled) and its layout checked; ConfigError with one line for anything else."""
    not_export = f"{path}: not a file written by `python -m trainer.export`"
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Names objects outside the allow-list (or is no pickle at all): say which, read without unpickling.
        unsafe = [g for g in unsafe_globals(path) if g != "unreadable"]
        why = f"it names objects other than tensors and plain containers: {', '.join(unsafe)}; not loaded"
        raise ConfigError(f"{not_export} ({why if unsafe else 'not a torch file'})") from None
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: one line naming it
        raise ConfigError(f"{not_export} ({first_line(exc)})") from None
    problem = export_layout_problem(payload)
    if problem:
        raise ConfigError(f"{not_export} ({problem})")
    return payload


def export_layout_problem(payload: Any) -> str | None:
    """What is wrong with an unpickled export's layout, or None (every key `load_exported` uses, with its type)."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return f"no format '{FORMAT}'"
    sd = payload.get("state_dict")
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        return "state_dict is not a dict of tensors"
    if not isinstance(payload.get("config"), dict):
        return "config is not a dict"
    answers = payload.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return "answers is not a list of strings"
    files = payload.get("tokenizer_files")
    if not isinstance(files, dict) or not all(isinstance(t, str) for t in files.values()):
        return "tokenizer_files is not a dict of texts"
    # The names become files in a temporary folder: plain names only, never a path leading out of it.
    bad = [
        n for n in files if not isinstance(n, str) or n in ("", ".", "..") or Path(n).name != n or "\\" in n
    ]
    if bad:
        return f"tokenizer_files has names that are not plain file names: {bad[:3]}"
    return None


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
