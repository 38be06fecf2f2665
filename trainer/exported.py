"""Reading an export back (written by trainer/export.py, which describes both forms): the folder form without pickle
(`from_pretrained`), the single-file form with `torch.load(weights_only=True)` (`load_exported`). Both return
(task in eval mode, question tokenizer, answers, config); anything wrong with the files is one `ConfigError` line
naming the file. `trainer.export.from_pretrained` and `trainer.export.load_exported` are these functions.
"""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from data_pipeline.errors import BadInputError
from trainer import run_folder
from trainer.checkpointing import first_line, unsafe_globals
from trainer.config import ConfigError, RunConfig, config_from_dict
from trainer.run_folder import RunFolder

FORMAT = "vqa-align/fp32-weights/1"  # the single-file (.pt) form
FOLDER_FORMAT = "vqa-align/export"  # the folder form: config.json's "format" ...
FOLDER_FORMAT_VERSION = 1  # ... and "format_version"
WEIGHTS_FILE = "model.safetensors"


# -- loading the folder form -------------------------------------------------------------------------------------
def from_pretrained(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any, list[str], RunConfig]:
    """(task in eval mode on `device`, question tokenizer, answers, config) from an export folder, without pickle:
    the weights from model.safetensors, the rest from JSON and the tokenizer's own files; the task is built by
    `trainer.run_folder.load` and its weights are loaded strictly. ConfigError with one line naming the file for a
    folder that is missing a file, has an unreadable one, or weights that do not fit its configuration.

    As for a run folder, a configuration whose pretrained ViLT or CLIP checkpoint has another architecture than the
    configured size is rebuilt from that checkpoint (`run_folder.load`), which must then be present."""
    path = Path(path)
    not_export = "not a folder written by `python -m trainer.export`"
    if not path.is_dir():
        raise ConfigError(f"{path}: no such folder ({not_export})")
    folder = RunFolder(path)
    weights_file = path / WEIGHTS_FILE
    for file in (folder.config_file, weights_file, folder.answers_file):
        if not file.is_file():
            raise ConfigError(f"{file}: missing ({not_export})")
    cfg = read_export_config(folder.config_file)
    answers = folder.read_answers()  # one line naming answers.json if damaged
    if not folder.has_tokenizer():
        meta = folder.tokenizer_dir / run_folder.TOKENIZER_META
        raise ConfigError(f"{meta}: missing ({not_export})")
    try:
        folder.load_tokenizer()
    except Exception as exc:  # noqa: BLE001 - a damaged tokenizer file, whatever the library says: one line
        raise ConfigError(
            f"{folder.tokenizer_dir}: the question tokenizer cannot be loaded ({first_line(exc)})"
        ) from None
    state_dict = read_safetensors(weights_file)
    try:
        cfg, tokenizer, answers, task = run_folder.load(folder, config=cfg, state_dict=state_dict)
    except ConfigError:
        raise
    except BadInputError as exc:  # ModelBuildError: a configuration this installation cannot build
        raise ConfigError(f"{folder.config_file}: the model cannot be built ({first_line(exc)})") from None
    except RuntimeError as exc:  # load_state_dict(strict=True): missing, unexpected or misshapen tensors
        raise ConfigError(
            f"{weights_file}: weights do not fit the model of {folder.config_file.name} ({mismatch(exc)})"
        ) from None
    return task.to(device), tokenizer, answers, cfg


def read_export_config(file: Path) -> RunConfig:
    """The run configuration of an export's config.json, after its format name and version are checked."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not valid JSON ({first_line(exc)})") from None
    if not isinstance(data, dict) or data.get("format") != FOLDER_FORMAT:
        raise ConfigError(f"{file}: no format '{FOLDER_FORMAT}' (not written by `python -m trainer.export`)")
    version = data.get("format_version")
    if version != FOLDER_FORMAT_VERSION:
        raise ConfigError(
            f"{file}: format_version {version!r}; this version of the project reads {FOLDER_FORMAT_VERSION}"
        )
    if not isinstance(data.get("config"), dict):
        raise ConfigError(f"{file}: 'config' is not the run configuration (a JSON object)")
    try:
        return config_from_dict(data["config"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{file}: {first_line(exc)}") from None


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        state_dict = load_file(file, device="cpu")
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file (SafetensorError and others): one line
        raise ConfigError(f"{file}: not a safetensors file that can be read ({first_line(exc)})") from None
    if not state_dict:
        raise ConfigError(f"{file}: holds no tensors")
    return state_dict


def mismatch(exc: RuntimeError) -> str:
    """The first problem `load_state_dict` reports (its message is one header line, then one line per problem)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else first_line(exc))[:300]


# -- loading the single-file form ------------------------------------------------------------------------------


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
