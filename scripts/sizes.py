"""Sizes: the longest modules and functions of common/, data_pipeline/ and trainer/, a report rather than a rule.

    python scripts/sizes.py                 # the 15 longest modules and the 15 longest functions
    python scripts/sizes.py --top 40

A module past about 400 lines or a function past about 60 usually holds more than one concern; the marks below say
where one is, so that a reviewer can ask whether it should be split. Only trainer/main.py has a hard limit (a thin
entry point, tests/test_boundaries.py). Lines are physical lines of the file, docstrings and comments included.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "data_pipeline", "trainer")
MODULE_MARK = 400
FUNCTION_MARK = 60


def measure() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    modules: list[tuple[int, str]] = []
    functions: list[tuple[int, str]] = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            text = path.read_text()
            modules.append((len(text.splitlines()), rel))
            for node in ast.walk(ast.parse(text, filename=rel)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    functions.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.lineno} {node.name}"))
    return sorted(modules, reverse=True), sorted(functions, reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/sizes.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--top", type=int, default=15, metavar="N", help="how many of each to list (default 15)"
    )
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be at least 1, got {args.top}")
    modules, functions = measure()
    for title, rows, mark in (("modules", modules, MODULE_MARK), ("functions", functions, FUNCTION_MARK)):
        over = sum(n > mark for n, _ in rows)
        print(f"longest {title} ({len(rows)} in all, {over} over {mark} lines):")
        for n, name in rows[: args.top]:
            print(f"  {n:5d}  {name}{'  *' if n > mark else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
