"""The package boundaries, checked from the source so that a new import that breaks one fails here.

- `common` holds what both packages use that is not data (bad-input errors, atomic writes, the open_clip configs, the
  machine description, progress bars); it imports neither `data_pipeline` nor `trainer`.
- `data_pipeline` is the data: none of its modules imports `trainer` (not even inside a function), and whatever imports
  it from outside names one of its stages or its vocabulary (`answers`, `text`), never something that is not data.
- `trainer/main.py` is an entry point, not a library: no other module of the project imports it.
- The tools (`trainer/tools/`) import the core, never the other way. Every command is `python -m <package>` through
  a `__main__.py` that only hands over to a `main`.
- One AdamW: `torch.optim.AdamW` is constructed only in `trainer/engine/optim.py`, which the DeepSpeed path and the plain
  step both take their settings from.
- Every "the input is wrong" exception subclasses `common.errors.BadInputError`, which decides exit status 2.
- Files are renamed into place only by `common.atomic`.
- `trainer/main.py` stays a thin entry point (under 350 lines); the sizes of the other modules and functions are a
  report (`python scripts/sizes.py`), not a rule.
- launch.sh stays thin (300 lines at most): set-up, tests and the demo, which must work before `.venv` exists, and
  hand-overs to Python; `trainer/launch/`, which `train` and `tensorboard` hand over to, imports the standard library
  and `common.errors` alone, so that its --help and --dry-run run before the set-up.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "data_pipeline", "trainer")


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imported(tree: ast.AST) -> set[str]:
    """Every module name an `import` or `from ... import` statement anywhere in `tree` names, with each name
    imported from a package as `package.name` (so that `from trainer import main` counts as `trainer.main`)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_the_packages_have_modules() -> None:
    for package in PACKAGES:
        assert len(_modules(package)) > 3, package  # a moved folder must not make the checks below vacuous


def _importing(paths: list[Path], *prefixes: str) -> dict[str, list[str]]:
    """Per file, the imported names that are one of `prefixes` or lie under one; files that import none left out."""
    offending = {
        _rel(path): sorted(
            n
            for n in _imported(_parse(path))
            if n in prefixes or n.startswith(tuple(f"{p}." for p in prefixes))
        )
        for path in paths
    }
    return {k: v for k, v in offending.items() if v}


def test_data_pipeline_never_imports_trainer() -> None:
    assert _importing(_modules("data_pipeline"), "trainer") == {}


def test_common_imports_neither_package() -> None:
    assert _importing(_modules("common"), "data_pipeline", "trainer") == {}


# What data_pipeline offers the rest of the project: its stages and the data's vocabulary.
DATA_PARTS = {"answers", "text", "convert", "shards", "loaders", "tools"}


def test_only_data_is_imported_from_data_pipeline() -> None:
    outside = [p for package in PACKAGES if package != "data_pipeline" for p in _modules(package)]
    outside += sorted((REPO / "scripts").glob("*.py"))
    wrong = {
        rel: [n for n in names if n.split(".")[1] not in DATA_PARTS]
        for rel, names in _importing(outside, "data_pipeline").items()
    }
    assert {k: v for k, v in wrong.items() if v} == {}
    assert {
        p.stem
        for p in (REPO / "data_pipeline").iterdir()
        if p.suffix == ".py" or (p / "__init__.py").is_file()
    } == (DATA_PARTS | {"__init__"})


def test_only_main_is_the_entry_point_that_imports_trainer_main() -> None:
    importers = [
        _rel(path)
        for package in PACKAGES
        for path in _modules(package)
        if path != REPO / "trainer" / "main.py" and "trainer.main" in _imported(_parse(path))
    ]
    assert importers == []


def _is_tool(path: Path) -> bool:
    return (REPO / "trainer" / "tools") in path.parents


def test_the_core_never_imports_the_tools() -> None:
    core = [p for p in _modules("trainer") if not _is_tool(p)]
    tools = [p for p in _modules("trainer") if _is_tool(p)]
    assert len(core) > 10 and len(tools) > 5  # a moved folder must not make the check vacuous
    assert _importing(core + _modules("data_pipeline") + _modules("common"), "trainer.tools") == {}


def test_command_entry_modules_only_hand_over_to_a_main() -> None:
    entries = [p for package in PACKAGES for p in _modules(package) if p.name == "__main__.py"]
    assert len(entries) >= 5, entries  # a moved folder must not make the check vacuous
    for path in entries:
        tree = _parse(path)
        handed = [
            alias.name for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names
        ]
        assert handed.count("main") == 1, _rel(path)
        defined = [
            n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
        ]
        assert defined == [], _rel(path)  # no code of its own: the command lives in the module it names


MAIN_MAX_LINES = 350


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_main_stays_a_thin_entry_point() -> None:
    assert _lines(REPO / "trainer" / "main.py") < MAIN_MAX_LINES


LAUNCH_SH_MAX_LINES = 300


def test_launch_sh_stays_thin() -> None:
    assert _lines(REPO / "launch.sh") <= LAUNCH_SH_MAX_LINES


def test_the_launcher_needs_nothing_installed() -> None:
    modules = sorted((REPO / "trainer" / "launch").glob("*.py"))
    assert len(modules) > 3, modules  # a moved folder must not make the check vacuous
    allowed = {"common", "common.errors", "trainer.launch"}
    offending = {
        _rel(path): sorted(
            name
            for name in _imported(_parse(path))
            if name.split(".")[0] not in sys.stdlib_module_names
            and name not in allowed
            and not name.startswith(("trainer.launch.", "common.errors."))
        )
        for path in modules
    }
    assert {k: v for k, v in offending.items() if v} == {}


def _constructs_adamw(path: Path) -> bool:
    """A call of `torch.optim.AdamW(...)`, `optim.AdamW(...)` or a bare `AdamW(...)` anywhere in the file."""
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name == "AdamW":
                return True
    return False


def test_adamw_is_constructed_in_one_place() -> None:
    builders = [_rel(p) for package in PACKAGES for p in _modules(package) if _constructs_adamw(p)]
    assert builders == ["trainer/engine/optim.py"]


def test_only_the_atomic_module_renames_files_into_place() -> None:
    def renames(path: Path) -> bool:
        return any(
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "replace"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "os"
            for node in ast.walk(_parse(path))
        )

    users = [_rel(p) for package in PACKAGES for p in _modules(package) if renames(p)]
    assert users == ["common/atomic.py"]


def _bad_input_classes() -> list[type]:
    from data_pipeline.convert.build import ConversionError
    from data_pipeline.shards.sharding import DataError
    from data_pipeline.text import TokenizerError
    from trainer.config.config import ConfigError
    from trainer.modeling.model import ModelBuildError
    from trainer.run.runlock import RunLockedError

    return [ConfigError, RunLockedError, DataError, TokenizerError, ModelBuildError, ConversionError]


@pytest.mark.parametrize("cls", _bad_input_classes(), ids=lambda c: c.__name__)
def test_bad_input_errors_share_the_base_class(cls: type) -> None:
    from common.errors import BadInputError, is_bad_input

    assert issubclass(cls, BadInputError)
    assert is_bad_input(cls("the message"))


def test_failures_are_not_bad_input() -> None:
    from common.errors import is_bad_input
    from trainer.checkpoint.checkpointing import CheckpointSpaceError
    from trainer.run.loop import NonFiniteLossError
    from trainer.tools.compare.results import CompareError

    failures = (CheckpointSpaceError, CompareError, NonFiniteLossError, RuntimeError, ValueError, OSError)
    for cls in failures:
        assert not is_bad_input(cls("x")), cls


def test_clip_configs_ship_as_package_data() -> None:
    """open_clip finds the project's architecture configs beside their module; an installed (non-editable) copy has
    them only if pyproject.toml declares them as package data."""
    from common.clip_configs import CONFIG_DIR

    json_files = sorted(p.name for p in CONFIG_DIR.glob("*.json"))
    assert json_files, CONFIG_DIR
    package = ".".join(CONFIG_DIR.relative_to(REPO).parts)
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.json" in declared.get(package, []), f"pyproject.toml: package-data for {package}"


def _documented_map() -> dict[str, set[str]]:
    """The package map at the top of docs/training.md: each folder with the modules it lists. Two spaces of indent
    per level; a token ending in `/` is a folder one level below the folder above it, `.py` tokens are modules of the
    folder one level up; `#` starts the comment."""
    text = (REPO / "docs" / "training.md").read_text()
    block = text.split("## Where each stage lives", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    folders: dict[str, set[str]] = {}
    stack: list[str] = []
    for line in block.splitlines():
        body = line.split("#", 1)[0]
        depth = (len(body) - len(body.lstrip(" "))) // 2
        for token in body.split():
            if token.endswith("/"):
                name = token.rstrip("/")
                stack[depth:] = [f"{stack[depth - 1]}/{name}" if depth else name]
                folders.setdefault(stack[depth], set())
            else:
                folders[stack[depth - 1]].add(token)
    return folders


def test_the_documented_map_matches_the_folders() -> None:
    documented = _documented_map()
    actual = {
        _rel(init.parent): {p.name for p in init.parent.glob("*.py") if not p.name.startswith("__")}
        for package in PACKAGES
        for init in (REPO / package).rglob("__init__.py")
    }
    assert len(actual) > 10  # a moved folder must not make the check vacuous
    assert documented == actual


def test_the_sizes_report_lists_the_longest_first(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import sizes
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert sizes.main(["--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("longest modules (") and out[4].startswith("longest functions (")
    module_lines = [int(line.split()[0]) for line in out[1:4]]
    longest = max(_lines(p) for package in PACKAGES for p in _modules(package))
    assert module_lines == sorted(module_lines, reverse=True) and module_lines[0] == longest
