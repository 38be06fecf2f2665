"""Every common launcher forms one job: rank, world size and local rank from deepspeed/torchrun, Slurm, OpenMPI and
MPICH/PMI variables (trainer/engine/dist.py `world_info_from_env`), the rendezvous address, the refusal of several ranks
without one, and an srun-style start of two `trainer/main.py` processes given only Slurm's variables."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.launch_env import clean_env, wait_all
from trainer.engine import dist as D
from trainer.main import REPO_ROOT, main, ranks_on_this_host

# (environment, launcher, rank, world size, local rank, ranks on the host)
CASES = {
    "plain process": ({}, "none", 0, 1, 0, 1),
    "torchrun": (
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "h0"},
        *("torch", 5, 8, 1, 4),
    ),
    "deepspeed": (
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_SIZE": "4", "MASTER_ADDR": "h0"},
        *("torch", 3, 4, 3, 4),
    ),
    "slurm": (
        {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NTASKS_PER_NODE": "4"},
        *("slurm", 6, 8, 2, 4),
    ),
    "slurm without --ntasks-per-node": (
        {"SLURM_PROCID": "1", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "3(x2)"},
        *("slurm", 1, 6, 1, 3),
    ),
    "openmpi": (
        {
            "OMPI_COMM_WORLD_RANK": "3",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        },
        *("openmpi", 3, 4, 1, 2),
    ),
    "mpich (pmi)": (
        {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"},
        *("pmi", 2, 3, 0, 1),
    ),
    "pmi without local variables": ({"PMI_RANK": "1", "PMI_SIZE": "2"}, "pmi", 1, 2, 0, 2),
    # A launcher started by srun (one task per node) sets its own variables for its children: they win.
    "deepspeed under srun": (
        {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8"}
        | {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1"},
        *("torch", 9, 16, 1, 8),
    ),
    # mpirun inside a Slurm allocation: every task inherits the batch script's SLURM_PROCID=0.
    "mpirun in an sbatch script": (
        {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
        | {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"},
        *("openmpi", 1, 2, 1, 2),
    ),
    # An salloc shell has SLURM_NTASKS but is no task of a step: a plain process.
    "salloc shell": ({"SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]"}, "none", 0, 1, 0, 1),
    "a launcher announcing a world size only": ({"WORLD_SIZE": "4"}, "torch", 0, 4, 0, 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_launcher_gives_rank_world_and_local_rank(case: str) -> None:
    env, launcher, rank, world, local_rank, local_world = CASES[case]
    got = D.world_info_from_env(env)
    assert (got.launcher, got.rank, got.world_size, got.local_rank, got.local_world_size) == (
        launcher,
        rank,
        world,
        local_rank,
        local_world,
    )


def test_ranks_on_the_host_are_counted_before_torch_loads() -> None:
    """trainer/main.py sets OpenMP's wait policy from `world_info_from_env`'s count before torch loads OpenMP: the
    module it comes from imports no torch, and bad launcher values count as one rank (the start refuses them)."""
    probe = "import sys, trainer.engine.dist; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "False", out.stderr[-2000:]
    assert (
        ranks_on_this_host({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)"}) == 4
    )
    assert ranks_on_this_host({"WORLD_SIZE": "3"}) == 3
    assert ranks_on_this_host({"SLURM_PROCID": "0", "SLURM_NTASKS": "two"}) == 1
    assert ranks_on_this_host({}) == 1


def test_local_rank_argument_only_where_the_launcher_sets_none() -> None:
    assert D.world_info_from_env({}, local_rank_arg=2).local_rank == 2
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h"}
    assert D.world_info_from_env(env, local_rank_arg=0).local_rank == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "two"}, "SLURM_NTASKS='two'"),
        ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 of a world of 4"),
        ({"PMI_RANK": "0", "PMI_SIZE": "0"}, "rank 0 of a world of 0"),
    ],
)
def test_bad_launcher_values_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(D.LaunchError, match=message):
        D.world_info_from_env(env)


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("gpu[003-004,010],cpu1", "gpu003"),
        ("a1,a2", "a1"),
        ("node7", "node7"),
        ("n[1,3]-ib", "n1-ib"),
        ("rack1-n[08-09]", "rack1-n08"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist: str, host: str) -> None:
    assert D._first_host(nodelist) == host


def test_rendezvous_address_and_port() -> None:
    slurm = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456"}
    launch = D.world_info_from_env(slurm)
    # Exported values win.
    assert D.rendezvous(launch, {**slurm, "MASTER_ADDR": "h0", "MASTER_PORT": "2222"}) == ("h0", "2222")
    # Slurm: the step's first host (where task 0 runs), a port from the job id (the same on every task).
    port = str(D.DEFAULT_MASTER_PORT + 123456 % 10000)
    nodes = {**slurm, "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.9"}
    assert D.rendezvous(launch, nodes) == ("gpu003", port)
    assert D.rendezvous(launch, {**nodes, "SLURM_STEP_NODELIST": "gpu004"}) == ("gpu004", port)
    assert D.rendezvous(launch, {**slurm, "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.9"}) == ("10.0.0.9", port)
    # One process: loopback and a free port.
    addr, free = D.rendezvous(D.world_info_from_env({}), {})
    assert addr == "127.0.0.1" and int(free) > 0
    # MPI with an exported address: the default port where none is exported.
    mpi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_ADDR": "h0"}
    assert D.rendezvous(D.world_info_from_env(mpi), mpi) == ("h0", str(D.DEFAULT_MASTER_PORT))


@pytest.mark.parametrize(
    "env",
    [
        {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"},
        {"PMI_RANK": "0", "PMI_SIZE": "4"},
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"},  # no node list, no launch address
        {"RANK": "0", "WORLD_SIZE": "2"},
    ],
)
def test_several_ranks_without_a_rendezvous_address_are_refused(env: dict[str, str]) -> None:
    launch = D.world_info_from_env(env)
    with pytest.raises(D.LaunchError, match="no rendezvous address: export MASTER_ADDR") as err:
        D.rendezvous(launch, env)
    assert "\n" not in str(err.value)


def test_main_refuses_several_ranks_without_an_address_in_one_line(
    tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_launcher: pytest.MonkeyPatch
) -> None:
    for name, value in {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}.items():
        no_launcher.setenv(name, value)
    run_dir = tmp_path / "run"
    rc = main(["--train-data", str(tiny_easyvqa_shards / "train"), "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err[-3000:]
    assert len(errors) == 1 and "2 ranks (OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE)" in errors[0], err[
        -3000:
    ]
    assert "Traceback" not in err and not run_dir.exists()


def test_plain_process_exports_single_process_defaults_and_removes_them(
    no_launcher: pytest.MonkeyPatch,
) -> None:
    launch = D.export_launch_env()
    try:
        assert launch.launcher == "none"
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
        assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0
    finally:
        D.destroy()
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)


def test_slurm_variables_are_exported_for_torch(no_launcher: pytest.MonkeyPatch) -> None:
    slurm = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n[4-5]"}
    for name, value in slurm.items():
        no_launcher.setenv(name, value)
    no_launcher.setenv("MASTER_PORT", "3333")
    try:
        D.export_launch_env()
        assert [
            os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        ] == [
            "1",
            "2",
            "1",
            "n4",
            "3333",
        ]
    finally:
        D.destroy()
    assert "RANK" not in os.environ and os.environ["MASTER_PORT"] == "3333"  # the exported one stays


# -- an srun-style start ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_slurm_tasks_form_one_two_rank_job(tiny_easyvqa_shards: Path, tmp_path: Path) -> None:
    """What `srun --ntasks 2 python trainer/main.py ...` starts: two processes that know only Slurm's variables."""
    run_dir = tmp_path / "run"
    args = [
        *("--preset", "tiny", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=4"),
        *("--set", "train.log_every=1", "--set", "train.progress_bar=false", "--set", "data.num_workers=1"),
        *("--train-data", str(tiny_easyvqa_shards / "train"), "--run-dir", str(run_dir), "--max-steps", "2"),
        *("--deepspeed_config", "deepspeed_configs/zero2_fp32.json"),
    ]
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = clean_env(
            {
                "SLURM_PROCID": str(rank),
                "SLURM_NTASKS": "2",
                "SLURM_LOCALID": str(rank),
                "SLURM_NTASKS_PER_NODE": "2",
                "SLURM_JOB_NODELIST": "localhost",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1",
            }
        )
        log = (tmp_path / f"rank{rank}.log").open("w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "trainer/main.py", *args],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    wait_all(procs, 120)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(log[-4000:] for log in logs)
    assert "rank 0/2 (local 0) on cpu, backend gloo, launcher slurm" in logs[0], logs[0][-4000:]
    state = json.loads((run_dir / "checkpoints" / "global_step2" / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"], state["samples"]) == (2, 2, 16)
    # One job, not two single-rank runs: one set of rank files in one checkpoint, one run config.
    assert sorted(p.name for p in (run_dir / "checkpoints" / "global_step2").glob("rng_rank*.pt")) == [
        "rng_rank0.pt",
        "rng_rank1.pt",
    ]
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["train_batch_size"] == 8
