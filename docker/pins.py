"""Print requirements from pyproject.toml, one per line, for the Docker build to install in stages.

pyproject.toml is the one list of pinned dependencies. The image cannot install it in a single `pip install`:
torch must be present before DeepSpeed is installed without build isolation (its setup.py imports torch), so
docker/Dockerfile asks this script for the pins of each stage instead of keeping a second list that would drift.

    python docker/pins.py                    every runtime dependency
    python docker/pins.py --extra dev        ... plus the `dev` extra
    python docker/pins.py torch torchvision  only these (an error if pyproject.toml does not pin them)
    python docker/pins.py --build-system     the build-system requirements (setuptools, wheel)

Runtime dependencies and extras must be exact pins (`name==version`); anything else is an error, so an unpinned
entry in pyproject.toml fails the image build instead of silently floating. Standard library only: this runs in
a bare virtual environment before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

DEFAULT_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

_NAME = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")
_EXACT_PIN = re.compile(r"^\s*[A-Za-z0-9._-]+(?:\[[^\]]*\])?\s*===?\s*[A-Za-z0-9.+!_-]+\s*(?:;.*)?$")


class PinError(ValueError):
    """pyproject.toml lacks a requested package, or lists one without an exact pin."""


def normalize(name: str) -> str:
    """PEP 503 name normalisation: `Open_Clip.Torch` and `open-clip-torch` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise PinError(f"cannot read a package name from requirement {requirement!r}")
    return normalize(match.group(1))


def load(pyproject: Path) -> dict:
    try:
        with pyproject.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise PinError(f"{pyproject} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise PinError(f"{pyproject} is not valid TOML: {e}") from None


def pinned_requirements(pyproject: Path, extras: list[str] | None = None) -> list[str]:
    """The project's dependencies plus those of `extras`, in file order, each checked to be an exact pin."""
    project = load(pyproject).get("project", {})
    requirements = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras or []:
        if extra not in optional:
            raise PinError(
                f"{pyproject} has no optional-dependencies extra {extra!r} (has: {sorted(optional)})"
            )
        requirements += optional[extra]
    loose = [r for r in requirements if not _EXACT_PIN.match(r)]
    if loose:
        raise PinError(f"{pyproject} lists requirements without an exact '==' pin: {', '.join(loose)}")
    return requirements


def select(requirements: list[str], names: list[str]) -> list[str]:
    """The requirements for `names`, in the order asked; an error names any package that is not listed."""
    by_name = {requirement_name(r): r for r in requirements}
    missing = [n for n in names if normalize(n) not in by_name]
    if missing:
        raise PinError(f"pyproject.toml does not list {', '.join(missing)}")
    return [by_name[normalize(n)] for n in names]


def build_requirements(pyproject: Path) -> list[str]:
    return list(load(pyproject).get("build-system", {}).get("requires", []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*", help="print only these packages' requirements (default: all)")
    parser.add_argument("--extra", action="append", default=[], help="add an optional-dependencies extra")
    parser.add_argument("--build-system", action="store_true", help="print [build-system].requires instead")
    parser.add_argument("--pyproject", type=Path, default=DEFAULT_PYPROJECT, help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        if args.build_system:
            if args.packages or args.extra:
                parser.error("--build-system takes no package names and no --extra")
            lines = build_requirements(args.pyproject)
        else:
            lines = pinned_requirements(args.pyproject, args.extra)
            if args.packages:
                lines = select(lines, args.packages)
    except PinError as e:
        print(f"pins.py: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
