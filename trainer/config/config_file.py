"""`--config FILE` and `--print-config` for trainer/main.py: a configuration read from a file (a run's config.json,
or any JSON or YAML file of the same schema, whole or in part) and the resolved configuration printed back in the
form config.json has, so that what one prints another can start from."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from common.errors import is_bad_input
from trainer.config.config import ConfigError, RunConfig, _coerce
from trainer.config.presets import get_preset


def add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help="start from the configuration in FILE (JSON or YAML: a run's config.json, or any file of its schema; "
        "fields it leaves out come from --preset), then --train-data/--val-data/--max-steps and --set on top",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration (JSON, the form of a run's config.json) and exit without training",
    )


def base_config(preset: str | None, config: str | None) -> RunConfig:
    """What a fresh run starts from: the preset (tiny by default), with the file of --config over it."""
    cfg = get_preset(preset or "tiny")
    return read_config_file(config, cfg) if config else cfg


def print_config(resolve: Callable[[], RunConfig]) -> int:
    """--print-config: the configuration `resolve` gives, as config.json holds it; a bad input is one line, exit 2."""
    try:
        cfg = resolve()
    except Exception as exc:
        if not is_bad_input(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(config_text(cfg))
    return 0


def read_config_file(path: str | Path, base: RunConfig) -> RunConfig:
    """`base` with every field that the JSON or YAML file at `path` sets; one-line errors name the file and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    data = _parse(text, path)
    if not isinstance(data, dict):
        raise ConfigError(
            f"--config {path}: expected a mapping of sections (model, loss, data, optim, train)"
        )
    return overlay(base, data, str(path))


def _parse(text: str, path: Path) -> Any:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def overlay(cfg: RunConfig, data: dict[str, Any], source: str) -> RunConfig:
    """A new config: `cfg` with the sections' fields in `data` replaced, each checked against its annotated type."""
    sections = {f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section '{section}' (one of: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of fields")
        hints = typing.get_type_hints(type(getattr(cfg, section)))
        for name, value in values.items():
            if name not in hints:
                raise ConfigError(
                    f"{source}: unknown field '{section}.{name}' (fields: {', '.join(sorted(hints))})"
                )
            sections[section][name] = _typed(value, hints[name], f"{source}: {section}.{name}")
    try:
        return RunConfig(
            **{f.name: type(getattr(cfg, f.name))(**sections[f.name]) for f in dataclasses.fields(cfg)}
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _typed(value: Any, typ: Any, where: str) -> Any:
    """A value read from JSON/YAML as the field's type: the rules of --set (trainer.config.config._coerce), so that a file
    and the command line accept the same values; lists become tuples, null only where the field allows None."""
    args = typing.get_args(typ)
    optional = typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    if isinstance(value, dict):
        raise ConfigError(f"{where}: expected a single value, got a mapping")
    if isinstance(value, list):
        return _coerce(",".join(str(v) for v in value), typ, where)
    if isinstance(value, bool) and typ is not bool and not (optional and bool in args):
        raise ConfigError(f"{where}: '{value}' is not a valid {getattr(typ, '__name__', typ)}")
    if isinstance(value, float) and (typ is int or (optional and int in args and float not in args)):
        if not value.is_integer():
            raise ConfigError(f"{where}: '{value}' is not a valid int")
        value = int(value)
    return _coerce(str(value), typ, where)


def config_text(cfg: RunConfig) -> str:
    """The configuration as a run folder's config.json holds it (RunConfig.save)."""
    return json.dumps(cfg.to_dict(), indent=2) + "\n"
