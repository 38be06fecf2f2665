"""Export a training checkpoint for inference: a folder of safetensors weights and JSON, loaded without pickle.

    python -m trainer.serve.export --run-dir RUN [--tag global_step1000] --out model/
    python -m trainer.serve.predict --weights model/ --image a.jpg --question "what shape is this?"

The folder (`EXPORT_FILES`; each file written atomically, `config.json` last, so that an export cut short has none):

    model/
      model.safetensors   fp32 weights of the VQATask: its state dict, gathered from every rank's ZeRO shards, or read
                          from `mp_rank_00_model_states.pt` for a checkpoint written without ZeRO (a single-rank run's)
      config.json         {"format": "vqa-align/export", "format_version": 1, "step", "tag", "config": the run's
                          resolved configuration}
      answers.json        the answer list (index -> answer string)
      tokenizer/          the run's question tokenizer, its own files (data_pipeline/text.py)

`from_pretrained(folder)` returns (task in eval mode, question tokenizer, answers, config): the weights read with
`safetensors`, everything else from JSON and the tokenizer's own files, the task built by `trainer.run.run_folder.load`
(the folder is laid out as a run folder is) and its weights loaded strictly. Nothing is unpickled, so a folder from
anyone can be loaded. A missing file, an unreadable one or weights that do not fit the configuration are a one-line
`ConfigError` naming the file.

No process group is needed: DeepSpeed's zero_to_fp32 reads a ZeRO checkpoint's shards on one process.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import atomic
from trainer.checkpoint.layout import has_zero_shards, list_complete
from trainer.checkpoint.safety import check_deepspeed_files
from trainer.config.config import ConfigError
from trainer.run import run_folder
from trainer.run.run_folder import RunFolder
from trainer.serve.exported import (
    FOLDER_FORMAT,
    FOLDER_FORMAT_VERSION,
    WEIGHTS_FILE,
    from_pretrained,
)

__all__ = [
    "EXPORT_FILES",
    "export",
    "export_folder",
    "from_pretrained",
    "main",
]

log = logging.getLogger(__name__)

CONFIG_FILE = run_folder.CONFIG_FILE
ANSWERS_FILE = run_folder.ANSWERS_FILE
TOKENIZER_DIR = run_folder.TOKENIZER_DIR
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, ANSWERS_FILE, TOKENIZER_DIR)


def pick_checkpoint(run_dir: Path, tag: str | None) -> tuple[str, int]:
    """(tag, step) of a complete checkpoint of the run: `tag` (a universal one included), else the newest that is not
    universal (a universal checkpoint holds the same weights as the checkpoint it was converted from)."""
    refs = list_complete(run_dir / "checkpoints")
    if not refs:
        raise ConfigError(f"{run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
    if tag is None:
        own = [r for r in refs if not r.universal] or refs
        return own[-1].tag, own[-1].step
    for r in refs:
        if r.tag == tag:
            return r.tag, r.step
    raise ConfigError(f"{run_dir}: no complete checkpoint '{tag}' (have: {', '.join(r.tag for r in refs)})")


def fp32_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The VQATask's weights in fp32 from checkpoint `tag` of the run, whichever ZeRO stage wrote it."""
    path = run_dir / "checkpoints" / tag
    check_deepspeed_files(path)  # zero_to_fp32 unpickles the shards fully: nothing unknown may reach it
    if (path / "zero").is_dir():
        sd = universal_state_dict(path)
    elif not has_zero_shards(path):
        sd = stage0_state_dict(path)
    else:
        # zero_to_fp32 reports its progress with print(), and DeepSpeed's logger (its accelerator warning on import
        # included) writes to the stdout it finds when first imported: both to stderr, so that stdout stays the
        # commands' own output (predict's JSON lines, export's folder name).
        with contextlib.redirect_stdout(sys.stderr):
            # Imported here (as below): deepspeed takes seconds to import, and only a checkpoint to convert needs it.
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def universal_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a universal checkpoint (`python -m trainer.checkpoint to-universal`, DeepSpeed's
    ds_to_universal): one folder per parameter under zero/, whose fp32.pt holds the whole parameter as {"param": tensor,
    ...}, read with `weights_only=True`. The task's buffers, when it has any, come from the module states beside it."""
    out: dict[str, torch.Tensor] = {}
    for folder in sorted((path / "zero").iterdir()):
        file = folder / "fp32.pt"
        if not file.is_file():
            continue  # DeepSpeed's own entries (e.g. optimizer_state) hold no weights
        try:
            entry = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ConfigError(
                f"{file}: holds objects other than tensors and plain containers; not loaded"
            ) from None
        if not isinstance(entry, dict) or not isinstance(entry.get("param"), torch.Tensor):
            raise ConfigError(f"{file}: not a universal checkpoint parameter (no 'param' tensor)")
        out[folder.name] = entry["param"]
    if not out:
        raise ConfigError(f"{path}: a zero/ folder without parameters: not a universal checkpoint")
    states = torch.load(
        path / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True, weights_only=False
    )
    module = states.get("module") or {}
    out.update({name: module[name] for name in states.get("buffer_names") or () if name in module})
    return out


def stage0_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The module weights of a checkpoint written without ZeRO (a single-rank run is at stage 0: trainer/engine/engine.py).

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
    """Export checkpoint `tag` (default: the newest complete) of the run as the folder `out` (`export_folder`)."""
    return export_folder(run_dir, out, tag)


def export_folder(run_dir: Path, out: Path, tag: str | None = None) -> Path:
    """Write the export folder `out` (module docstring). An earlier export there is replaced; a folder holding
    anything else is refused, so that nothing of another folder is overwritten or left to be loaded with it."""
    run_dir, out = Path(run_dir), Path(out)
    check_out_folder(out)
    tag, step = pick_checkpoint(run_dir, tag)
    folder = RunFolder(run_dir)
    cfg, answers = folder.read_config(), folder.read_answers()
    if not folder.has_tokenizer():
        raise ConfigError(f"{folder.tokenizer_dir}: no question tokenizer in the run folder")
    state_dict = fp32_state_dict(run_dir, tag)
    tok_dir = out / TOKENIZER_DIR
    tok_dir.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)  # an earlier export here is incomplete from now until the end
    write_safetensors(out / WEIGHTS_FILE, state_dict, metadata={"format": "pt"})
    run_folder.write_json(out / ANSWERS_FILE, answers)
    names = set()
    for src in sorted(folder.tokenizer_dir.iterdir()):
        if src.is_file() and not src.name.startswith("."):  # not a temporary file of an interrupted write
            atomic.write_bytes(tok_dir / src.name, src.read_bytes())
            names.add(src.name)
    for stale in tok_dir.iterdir():  # an earlier export's tokenizer file this tokenizer does not have
        if stale.name not in names and stale.is_file():
            stale.unlink()
    meta = {"format": FOLDER_FORMAT, "format_version": FOLDER_FORMAT_VERSION, "step": step, "tag": tag}
    run_folder.write_json(out / CONFIG_FILE, {**meta, "config": cfg.to_dict()}, indent=2)
    n = sum(v.numel() for v in state_dict.values())
    log.info("exported %s (step %d, %.1f M parameters) -> %s", tag, step, n / 1e6, out)
    return out


def check_out_folder(out: Path) -> None:
    """`--out` may be new, empty or an earlier export (its own files and temporary files only)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--out {out}: exists and is not a folder (an export is a folder: choose a new or empty one)"
        )
    if not out.is_dir():
        return
    foreign = sorted(
        p.name for p in out.iterdir() if p.name not in EXPORT_FILES and not p.match(atomic.TEMP_GLOB)
    )
    if foreign:
        raise ConfigError(
            f"--out {out}: holds files that are not an export's ({', '.join(foreign[:3])}): choose a new or empty "
            f"folder"
        )


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    return mask


def write_safetensors(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`state_dict` as a safetensors file, atomically. safetensors stores each tensor on its own: a tensor that
    shares memory with another (tied weights; zero_to_fp32's views into one flat buffer) is written as a copy, and
    loads back into the same parameters."""
    seen: set[int] = set()
    tensors = {}
    for name, value in state_dict.items():
        t = value.detach().cpu()
        storage = t.untyped_storage()
        shared = storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size()
        seen.add(storage.data_ptr())
        tensors[name] = t.contiguous().clone() if shared or not t.is_contiguous() else t
    with atomic.replacing(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(
            tmp, 0o666 & ~current_umask()
        )  # safetensors creates it 0600; readable as the umask says, as the rest
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # on disk before the rename, as every other atomic write
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m trainer.serve.export",
        description="Write a run's checkpoint as an export folder (fp32 model.safetensors, config.json, answers.json, "
        "tokenizer/) for `python -m trainer.serve.predict --weights DIR` or `trainer.serve.export.from_pretrained(DIR)`.",
    )
    p.add_argument("--run-dir", required=True, type=Path, help="the training run folder")
    p.add_argument(
        "--tag", default=None, help="checkpoint tag, e.g. global_step1000 (default: the newest complete)"
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="folder to write (new, empty or an earlier export)",
    )
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
