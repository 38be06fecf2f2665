"""What `train` and `tensorboard` share: where the launch runs (Context: the repository root, the virtual
environment, the caller's folder, the environment, a dry run or a check only), and the split of a command's own
options from the arguments it passes on."""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainer.launch.hosts import LaunchError


@dataclass
class Context:
    """Where the launch runs: the repository root, the virtual environment, the caller's folder, the environment
    its processes inherit (changed as the launch adds to it), and whether it only prints what it would run."""

    root: Path
    venv: Path
    caller_dir: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    dry_run: bool = False
    # Only the checks of the arguments, silent unless one fails: launch.sh runs them before the set-up, so that a
    # mistyped option does not wait for an install.
    check_only: bool = False
    launch_dirs: list[str] = field(default_factory=list)

    def run(self, words: Sequence[str]) -> None:
        """Prints a command the launch does itself (cd, export, mktemp), in a dry run."""
        if self.dry_run:
            print(shlex.join(words), flush=True)

    def write_lines(self, file: str, lines: Sequence[str]) -> None:
        """LINES to FILE, one a line; a dry run prints the shell command that would do it instead."""
        if self.dry_run:
            print(f"printf '%s\\n' {shlex.join(lines)} > {shlex.quote(file)}", flush=True)
        else:
            Path(file).write_text("".join(f"{line}\n" for line in lines))

    def make_launch_dir(self) -> str:
        """A temporary folder for the files handed to DeepSpeed (env file, generated hostfile), removed when the
        launch ends. A dry run prints the mktemp command and uses its template as the path."""
        template = f"{self.env.get('TMPDIR') or '/tmp'}/vqa-align.XXXXXX"
        if self.dry_run:
            self.run(["mktemp", "-d", template])
            return template
        folder = tempfile.mkdtemp(prefix="vqa-align.", dir=os.path.dirname(template))
        self.launch_dirs.append(folder)
        return folder

    def remove_launch_dirs(self) -> None:
        for folder in self.launch_dirs:
            shutil.rmtree(folder, ignore_errors=True)


def split_launch_args(
    args: Sequence[str],
    command: str,
    valued: Sequence[str],
    flags: Sequence[str],
) -> tuple[list[str], list[str]]:
    """ARGS as (COMMAND's own options, each valued one as --option=value; the arguments it passes on): its options
    come first, and the first other argument, or everything after `--`, is passed on unchanged."""
    launch, rest = [], list(args)
    while rest:
        arg = rest[0]
        name, has_value, value = arg.partition("=")
        if arg == "--":
            return launch, rest[1:]
        if arg in flags:
            launch.append(rest.pop(0))
            continue
        if name not in valued:
            break
        if not has_value:
            value = rest[1] if len(rest) > 1 else ""
            rest.pop(0)
        if not value or value.startswith("--"):
            raise LaunchError(f"{command}: {name} needs a value (see ./launch.sh {command} --help)")
        launch.append(f"{name}={value}")
        rest.pop(0)
    return launch, rest


def is_uint(value: str | None, least: int = 0, most: int | None = None) -> bool:
    return (
        value is not None
        and value.isascii()
        and value.isdigit()
        and least <= int(value) <= (most or int(value))
    )
