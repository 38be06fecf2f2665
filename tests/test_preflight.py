"""trainer/tools/preflight/ (`python -m trainer.tools.preflight`): every rank's device, all-reduce, data and run-folder checks, rank 0's table and the exit
status; a plain process in-process, two ranks started as a launcher starts them (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), and `./launch.sh train --preflight` running it on the trainer's ranks."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import test_launch
from test_launch import Checkout

from tests.helpers.launch_env import clean_env, wait_all
from trainer.tools.preflight import checks as P
from trainer.tools.preflight import cli
from trainer.tools.preflight.report import render

REPO = Path(__file__).resolve().parents[1]
HEADER = ["host", "rank", "local", "device", "memory"]


def rows(out: str) -> list[list[str]]:
    """The rows of the per-rank table (below its `host rank local ...` header, up to the first blank line)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:5] == HEADER)
    found = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        found.append(line.split())
    return found


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# -- units ---------------------------------------------------------------------------------------------------------


def test_message_sizes_parse_and_print() -> None:
    assert [P.parse_size(s) for s in ("1KiB", "1MiB", "64MiB", "4096", "2k", "1G")] == [
        1024,
        1 << 20,
        64 << 20,
        4096,
        2048,
        1 << 30,
    ]
    for bad in ("", "0", "1 parsec", "-1KiB"):
        with pytest.raises(Exception, match="not a message size"):
            P.parse_size(bad)
    assert [P.format_size(n) for n in (1024, 64 << 20, 1000)] == ["1 KiB", "64 MiB", "1000 B"]


def test_bus_bandwidth_is_nccl_tests_definition_on_the_slowest_rank() -> None:
    reports = [P.RankReport(host="h", rank=r, local_rank=r, device="cpu") for r in range(4)]
    for r in reports:
        r.checks = {"device": P.Check(), "all-reduce": P.Check()}
        r.timings = {1 << 30: 0.5 if r.rank == 2 else 0.25}  # rank 2 is the slowest: 1 GiB in 0.5 s
    lines = render(reports, [1 << 30], "gloo")
    perf = next(line for line in lines if line.startswith("1 GiB")).split()
    algbw = (1 << 30) / 0.5 / 1e9
    assert perf[2:] == ["500000.0", "us", f"{algbw:.3g}", "GB/s", f"{algbw * 2 * 3 / 4:.3g}", "GB/s"]
    assert lines[-1] == "preflight: every check passed"


# -- one plain process ---------------------------------------------------------------------------------------------


def test_help_exits_0(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--train-data" in out and "--run-dir" in out and "--sizes" in out


def test_bad_size_is_refused_with_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--sizes", "1KiB,lots"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: --sizes: not a message size: 'lots' (e.g. 1KiB, 1MiB, 64MiB, 4096)"
    ]


def test_a_plain_process_passes_and_leaves_no_trace(
    tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_launcher: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "runs" / "new"
    args = [
        "--train-data",
        str(tiny_easyvqa_shards / "train"),
        "--val-data",
        str(tiny_easyvqa_shards / "test"),
    ]
    rc = cli.main([*args, "--run-dir", str(run_dir), "--sizes", "1KiB", "--preset", "tiny"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert rows(out) == [[socket.gethostname(), "0", "0", "cpu", *rows(out)[0][4:-4], "ok", "ok", "ok", "ok"]]
    assert "1 KiB" in out and "preflight: every check passed" in out
    assert "ignoring arguments it does not use: --preset tiny" in err and not error_lines(err)
    assert not (tmp_path / "runs").exists()  # the folders it made for the probe are gone again


def test_a_truncated_shard_fails_the_data_check(
    tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_launcher: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "train"
    shutil.copytree(tiny_easyvqa_shards / "train", data)
    tar = sorted(data.glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[:700])
    rc = cli.main(["--train-data", str(data), "--sizes", "1KiB"])
    out, err = capsys.readouterr()
    assert rc == 1, out + err
    assert rows(out)[0][-4:] == ["ok", "FAIL", "-", "ok"]
    [line] = error_lines(err)
    assert line.startswith(f"error: preflight failed on host {socket.gethostname()} rank 0: data train: ")
    assert tar.name in line


# -- two ranks, as a launcher starts them ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_two_ranks(args: list[str], tmp_path: Path) -> tuple[list[int], list[str], list[str]]:
    """Start `python -m trainer.tools.preflight ARGS` as ranks 0 and 1 of one job; (exit codes, stdouts, stderrs)."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = clean_env(
            {
                **{"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"},
                **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"},
            }
        )
        out, err = (tmp_path / f"rank{rank}.out").open("w"), (tmp_path / f"rank{rank}.err").open("w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "trainer.tools.preflight", *args],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=err,
            )
        )
    wait_all(procs, 60)
    outs = [(tmp_path / f"rank{r}.out").read_text() for r in range(2)]
    errs = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    return [p.returncode for p in procs], outs, errs


@pytest.mark.slow
def test_two_ranks_print_one_table_and_pass(tiny_easyvqa_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        "--train-data",
        str(tiny_easyvqa_shards / "train"),
        "--run-dir",
        str(run_dir),
        "--sizes",
        "1KiB,64KiB",
    ]
    codes, outs, errs = run_two_ranks(args, tmp_path)
    assert codes == [0, 0], "\n".join(outs + errs)
    host = socket.gethostname()
    table = rows(outs[0])
    assert [r[:4] for r in table] == [[host, "0", "0", "cpu"], [host, "1", "1", "cpu"]]
    assert all(r[-4:] == ["ok", "ok", "ok", "ok"] for r in table), outs[0]
    assert "preflight: 2 rank(s) on 1 host(s), backend gloo" in outs[0]
    perf = [line.split() for line in outs[0].splitlines() if line.startswith(("1 KiB", "64 KiB"))]
    assert len(perf) == 2 and all(p[3] == "us" and p[-1] == "GB/s" for p in perf), outs[0]
    assert "preflight" not in outs[1] and not error_lines(errs[0] + errs[1])  # only rank 0 reports
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_run_folder_under_a_file_fails_with_one_line_naming_rank_and_check(
    tiny_easyvqa_shards: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = [
        "--train-data",
        str(tiny_easyvqa_shards / "train"),
        "--run-dir",
        str(blocker / "run"),
        "--sizes",
        "1KiB",
    ]
    codes, outs, errs = run_two_ranks(args, tmp_path)
    assert codes == [1, 1], "\n".join(outs + errs)
    table = rows(outs[0])
    assert [r[1] for r in table] == ["0", "1"] and all(r[-4:] == ["ok", "ok", "FAIL", "ok"] for r in table)
    [line] = error_lines(errs[0])
    assert line.startswith(f"error: preflight failed on host {socket.gethostname()} rank 0: run folder: ")
    assert str(blocker / "run") in line and "(and 1 more, listed above)" in line
    assert not error_lines(errs[1])
    assert f"rank 1: run folder: {blocker / 'run'}: not writable" in outs[0]


# -- launch.sh train --preflight ---------------------------------------------------------------------------------


# launch.sh with a fake, set-up virtual environment and no GPU: tests/test_launch.py's fixture.
checkout = test_launch.checkout


def test_launch_sh_train_preflight_runs_the_module_on_the_trainers_ranks(checkout: Checkout) -> None:
    assert "--preflight" in checkout.launch("train", "--help").stdout
    line = checkout.dry(
        "train", "--preflight", "--num_gpus", "2", "--", "--preset", "tiny", "--run-dir", "/r"
    )[-1]
    assert line == [
        *checkout.deepspeed.split(),
        "--num_gpus",
        "2",
        "--module",
        "trainer.tools.preflight",
        "--preset",
        "tiny",
    ] + [
        "--run-dir",
        "/r",
    ]
    # The same defaults from the environment as the trainer gets; without --preflight, the trainer as before.
    line = checkout.dry("train", "--preflight", VQA_TRAIN_DATA="/data/train")[-1]
    assert line[5:] == ["--module", "trainer.tools.preflight", "--train-data", "/data/train"]
    assert checkout.dry("train", "--preset", "tiny")[-1][5:] == ["trainer/main.py", "--preset", "tiny"]
