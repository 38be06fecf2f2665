"""Reading an export folder back (written by trainer/serve/export.py, which describes it) without pickle
(`from_pretrained`): (task in eval mode, question tokenizer, answers, config); anything wrong with the files is one
`ConfigError` line naming the file. `trainer.serve.export.from_pretrained` is this function.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from common.errors import BadInputError
from trainer.checkpoint.safety import first_line
from trainer.config.config import ConfigError, RunConfig, config_from_dict
from trainer.run import run_folder
from trainer.run.run_folder import RunFolder

FOLDER_FORMAT = "vqa-align/export"  # the folder form: config.json's "format" ...
FOLDER_FORMAT_VERSION = 1  # ... and "format_version"
WEIGHTS_FILE = "model.safetensors"


# -- loading the folder form -------------------------------------------------------------------------------------
def from_pretrained(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any, list[str], RunConfig]:
    """(task in eval mode on `device`, question tokenizer, answers, config) from an export folder, without pickle:
    the weights from model.safetensors, the rest from JSON and the tokenizer's own files; the task is built by
    `trainer.run.run_folder.load` and its weights are loaded strictly. ConfigError with one line naming the file for a
    folder that is missing a file, has an unreadable one, or weights that do not fit its configuration.

    As for a run folder, a configuration whose pretrained ViLT or CLIP checkpoint has another architecture than the
    configured size is rebuilt from that checkpoint (`run_folder.load`), which must then be present."""
    path = Path(path)
    not_export = "not a folder written by `python -m trainer.serve.export`"
    if path.is_file():  # e.g. a torch file: never unpickled here
        raise ConfigError(f"{path}: a file, not an export folder ({not_export})")
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
        raise ConfigError(
            f"{file}: no format '{FOLDER_FORMAT}' (not written by `python -m trainer.serve.export`)"
        )
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
