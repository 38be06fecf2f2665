"""The preflight's shared-run-folder check (trainer/tools/preflight/checks.py `check_shared_run_dir`): with several
ranks, rank 0's probe file must be visible in every rank's run folder.

Two nodes whose run folder is not one shared filesystem each see a folder of their own at the same path (a local
disk). On one host that is two ranks given two different folders: rank 0 `--run-dir A`, rank 1 `--run-dir B`, each
a real, writable folder, so that only the check of the two ranks against each other can fail. The passing case (one
folder for both ranks) is tests/test_preflight.py's two-rank test, whose table shows the run folder ok.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_preflight import error_lines, rows

from tests.helpers.launch_env import clean_env, wait_all
from trainer.engine import dist as D
from trainer.tools.preflight import checks as P

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(per_rank_args: list[list[str]], tmp_path: Path) -> tuple[list[int], list[str], list[str]]:
    """`python -m trainer.tools.preflight ARGS[r]` as rank r of one job, as a launcher starts it; (codes, outs, errs)."""
    port, world = str(_free_port()), str(len(per_rank_args))
    procs = []
    for rank, args in enumerate(per_rank_args):
        env = clean_env(
            {
                **{
                    "RANK": str(rank),
                    "WORLD_SIZE": world,
                    "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": world,
                },
                **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"},
            }
        )
        out, err = (tmp_path / f"rank{rank}.out").open("w"), (tmp_path / f"rank{rank}.err").open("w")
        command = [sys.executable, "-m", "trainer.tools.preflight", "--sizes", "1KiB", *args]
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err))
    wait_all(procs, 60)
    outs = [(tmp_path / f"rank{r}.out").read_text() for r in range(len(procs))]
    errs = [(tmp_path / f"rank{r}.err").read_text() for r in range(len(procs))]
    return [p.returncode for p in procs], outs, errs


@pytest.mark.slow
def test_a_run_folder_not_shared_between_nodes_fails_on_the_rank_that_cannot_see_it(tmp_path: Path) -> None:
    node0, node1 = tmp_path / "node0-disk" / "run", tmp_path / "node1-disk" / "run"
    codes, outs, errs = run_ranks([["--run-dir", str(node0)], ["--run-dir", str(node1)]], tmp_path)
    assert codes == [1, 1], "\n".join(outs + errs)
    table = rows(outs[0])
    # Columns: ... device ok, data read, run folder, all-reduce. Each folder is writable on its own.
    assert [r[1] for r in table] == ["0", "1"]
    assert table[0][-4:] == ["ok", "-", "ok", "ok"] and table[1][-4:] == ["ok", "-", "FAIL", "ok"], outs[0]
    [line] = error_lines(errs[0])
    host = socket.gethostname()
    assert line.startswith(f"error: preflight failed on host {host} rank 1: run folder (shared): {node1}: ")
    assert "the run folder is not shared between nodes" in line and "split checkpoints" in line
    assert not error_lines(errs[1])
    # Nothing left behind: the probe file and the folders the preflight made.
    assert not node0.exists() and not node1.exists()


def test_one_rank_finds_its_own_probe_and_removes_it(tmp_path: Path, no_launcher: pytest.MonkeyPatch) -> None:
    """The check's own steps in a one-rank job (the preflight itself skips it there: nothing to compare)."""
    report = P.RankReport(host="h", rank=0, local_rank=0)
    P.check_run_dir(report, str(tmp_path))
    D.init_distributed()
    P.check_shared_run_dir(report, str(tmp_path), is_main=True)
    assert report.checks[P.SHARED_CHECK] == P.Check()
    assert list(tmp_path.iterdir()) == []
    # A rank whose run folder failed its own check is not checked again.
    failed = P.RankReport(host="h", rank=0, local_rank=0, checks={"run folder": P.Check(False, "read-only")})
    P.check_shared_run_dir(failed, str(tmp_path), is_main=True)
    assert P.SHARED_CHECK not in failed.checks
