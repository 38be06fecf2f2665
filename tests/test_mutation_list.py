"""The mutation check's list (scripts/mutation_check.py) stays in step with the code: every mutation's snippet occurs
exactly once in its file and changes it, names are unique, and every mutation names test files that exist."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mc():
    spec = importlib.util.spec_from_file_location("mutation_check", REPO / "scripts" / "mutation_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_check"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_every_snippet_still_matches_the_code(mc) -> None:
    # Inside the mutation check's copy, the one mutation applied there is meant to be missing.
    applied = os.environ.get("MUTATION_CHECK_APPLIED", "")
    problems = [
        f"{m.name}: {why}"
        for m in mc.MUTATIONS
        if m.name != applied and (why := mc.check_snippet(REPO, m)) is not None
    ]
    assert not problems, "\n".join(problems)


def test_the_list_is_large_unique_and_points_at_tests(mc) -> None:
    names = [m.name for m in mc.MUTATIONS]
    assert len(names) >= 40 and len(set(names)) == len(names)
    for m in mc.MUTATIONS:
        assert m.old != m.new and m.description and m.tests, m.name
        assert all((REPO / t).is_file() for t in m.tests), m.name


def test_a_stale_snippet_is_an_error_and_only_selects(mc, tmp_path: Path) -> None:
    m = mc.MUTATIONS[0]
    (tmp_path / m.file).parent.mkdir(parents=True)
    (tmp_path / m.file).write_text("nothing of it\n")
    assert "occurs 0 times" in mc.check_snippet(tmp_path, m)
    outcome = mc.check_one(tmp_path, m, sys.executable, 10.0)
    assert outcome.status == "error" and (tmp_path / m.file).read_text() == "nothing of it\n"
    assert [x.name for x in mc.select([f"{m.name},{mc.MUTATIONS[1].name}"])] == [m.name, mc.MUTATIONS[1].name]
    assert mc.main(["--only", "no-such-mutation", "--list"]) == 2
