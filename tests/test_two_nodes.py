"""Two nodes on one host through the project's own multi-node path: `./launch.sh train --no_ssh --num_nodes 2
--node_rank R --master_addr 127.0.0.1` started twice, as a container or Slurm task per node would start it, each node
one CPU rank (DeepSpeed's runner and per-node launcher, gloo), training a few steps on one shared run folder,
checkpointing, then both nodes restarted with `--resume auto` and continuing from that checkpoint.

tests/test_launchers.py starts two `trainer/main.py` ranks srun-style without launch.sh or DeepSpeed's launcher, and
tests/test_launch.py checks the commands launch.sh prints for several nodes and SIGTERM with a stand-in trainer;
this is the one test of the whole path, real trainer included.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import test_launch
from test_launch import REAL_VENV, Checkout

from tests.helpers.launch_checkout import link_repository
from tests.helpers.launch_env import wait_all

TRAINER_ARGS = [
    *("--preset", "tiny", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=4"),
    *("--set", "train.log_every=1", "--set", "train.progress_bar=false", "--set", "data.num_workers=1"),
    *("--deepspeed_config", "deepspeed_configs/zero2_fp32.json", "--resume", "auto"),
]

checkout = test_launch.checkout


@pytest.fixture
def cluster_checkout(checkout: Checkout) -> Checkout:
    """launch.sh in a checkout of its own (no GPU, a set-up environment) that runs the repository's real trainer
    with the real DeepSpeed launcher."""
    # pyproject.toml pins deepspeed, which installs its launcher beside the interpreter: missing, the set-up is broken.
    assert (REAL_VENV / "bin" / "deepspeed").exists(), (
        f"no DeepSpeed launcher in {REAL_VENV}/bin: run ./launch.sh setup"
    )
    for name in ("python", "deepspeed"):
        (checkout.venv / "bin" / name).unlink()
        (checkout.venv / "bin" / name).symlink_to(REAL_VENV / "bin" / name)
    return link_repository(checkout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_two_nodes(c: Checkout, trainer_args: list[str], logs: Path) -> list[str]:
    """Both nodes' `./launch.sh train --no_ssh ...`, run to the end; their outputs (a failure shows both)."""
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        launch = [
            "train",
            "--no_ssh",
            "--num_nodes",
            "2",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
        ]
        out = (logs / f"node{node}.log").open("w")
        procs.append(
            subprocess.Popen(
                [str(c.root / "launch.sh"), *launch, "--master_port", port, "--", *trainer_args],
                env=c.env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                cwd=c.tmp,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
    codes = wait_all(procs, 150)
    outputs = [(logs / f"node{node}.log").read_text() for node in (0, 1)]
    assert codes == [0, 0], "\n\n".join(f"node {n}:\n{o[-4000:]}" for n, o in enumerate(outputs))
    return outputs


def trainer_state(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"global_step{step}" / "trainer_state.json").read_text())


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)  # two launches, each with its own 150 s deadline
def test_two_nodes_train_checkpoint_and_resume_through_launch_sh(
    cluster_checkout: Checkout, tiny_easyvqa_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "shared" / "run"  # the one run folder both nodes see, as on a shared filesystem
    data = ["--train-data", str(tiny_easyvqa_shards / "train"), "--run-dir", str(run_dir)]

    first = start_two_nodes(cluster_checkout, [*TRAINER_ARGS, *data, "--max-steps", "2"], tmp_path)
    assert "rank 0/2 (local 0) on cpu, backend gloo" in first[0], first[0][-4000:]
    assert "--resume auto: no complete checkpoint" in first[0]
    state = trainer_state(run_dir, 2)
    assert (state["step"], state["world_size"], state["samples"]) == (2, 2, 16)
    ranks = sorted(p.name for p in (run_dir / "checkpoints" / "global_step2").glob("rng_rank*.pt"))
    assert ranks == ["rng_rank0.pt", "rng_rank1.pt"]  # one job of two ranks, one rank per node

    second = start_two_nodes(cluster_checkout, [*TRAINER_ARGS, *data, "--max-steps", "4"], tmp_path)
    assert f"--resume auto: resuming {run_dir} from its newest complete checkpoint (step 2)" in second[0]
    state = trainer_state(run_dir, 4)
    assert (state["step"], state["world_size"], state["samples"]) == (4, 2, 32)
