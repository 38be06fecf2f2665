"""launch.sh: every subcommand's --help, refusals of bad input, and the exact commands `train` and `tensorboard`
would run (--dry-run); then SIGTERM reaching every rank through DeepSpeed's real launcher.

Each test runs a copy of launch.sh in a temporary folder with a fake, already set-up virtual environment and a
fake nvidia-smi, in an environment built from scratch, so that neither the host's GPUs and variables nor the
repository's .venv change what is printed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.launch_checkout import (
    REAL_VENV,
    REPO,
    Checkout,
    accepts,
    busy,
    make_checkout,
    with_real_trainer,
    write_executable,
)


@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    return make_checkout(tmp_path)


def node_env(**overrides: str) -> list[list[str]]:
    """The exports every train dry run starts with, sorted by name as launch.sh prints them."""
    env = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", **overrides}
    return [["export", f"{k}={v}"] for k, v in sorted(env.items())]


def words(line: str) -> list[str]:
    return shlex.split(line)


# --- the command line ---------------------------------------------------------------------------------------------


def usage_commands(checkout: Checkout) -> list[str]:
    """The commands `./launch.sh --help` lists."""
    usage = checkout.launch("--help")
    assert usage.returncode == 0
    block = usage.stdout.split("Commands:")[1].split("Options:")[0]
    return [line.split()[0] for line in block.splitlines() if line.startswith("  ") and line[2] != " "]


def test_every_command_in_usage_answers_help(checkout: Checkout) -> None:
    commands = usage_commands(checkout)
    assert {"setup", "test", "train", "tensorboard", "help"} <= set(commands)
    for command in commands:
        result = checkout.launch(command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "Usage: ./launch.sh" in result.stdout, command


def test_unknown_command_and_option_are_refused(checkout: Checkout) -> None:
    result = checkout.launch("trian")
    assert result.returncode == 2
    assert "unknown command 'trian'" in result.stderr
    listed = result.stderr.split("one of: ")[1].split(";")[0].split(", ")
    assert listed == usage_commands(checkout)  # the message lists every command there is
    result = checkout.launch("--verbose", "train")
    assert result.returncode == 2 and "unknown option '--verbose'" in result.stderr
    assert checkout.launch().returncode == 2  # no command: usage, and a failure


def test_setup_and_test_still_run_what_they_ran(checkout: Checkout) -> None:
    assert checkout.dry("setup") == []  # stamp matches: nothing to install
    assert checkout.dry("test", "-k", "launch") == [
        words(f"{checkout.venv}/bin/ruff format --check ."),
        words(f"{checkout.venv}/bin/ruff check ."),
        words(f"{checkout.venv}/bin/python -m pytest -k launch"),
    ]


def test_setup_installs_the_whole_tree_from_the_lock_file(checkout: Checkout) -> None:
    """A stale stamp: setup installs requirements.lock with every hash checked and nothing outside it, then the
    project alone; torch's pin is written once (pyproject.toml), never in launch.sh."""
    (checkout.venv / ".setup-stamp").write_text("stale\n")
    py, lock = f"{checkout.venv}/bin/python", f"{checkout.root}/requirements.lock"
    assert checkout.dry("setup") == [
        [py, "-m", "pip", "install", "--quiet", "--upgrade", "pip>=24"],
        [py, "-m", "pip", "install", "--quiet", "--require-hashes", "--no-deps", "-r", lock],
        [py, "-m", "pip", "install", "--quiet", "--no-deps", "-e", f"{checkout.root}[dev]"],
    ]
    assert "torch==" not in (REPO / "launch.sh").read_text()
    (checkout.root / "requirements.lock").unlink()
    result = checkout.launch("--dry-run", "setup")
    assert result.returncode == 2 and "requirements.lock is missing" in result.stderr


def test_deepspeeds_launcher_logs_at_the_asked_level(checkout: Checkout) -> None:
    line = checkout.dry("train", "--num_gpus", "1", VQA_LOG_LEVEL="INFO")[-1]
    assert line[:3] == [f"{checkout.venv}/bin/deepspeed", "--log_level", "info"]
    result = checkout.launch("--dry-run", "train", VQA_LOG_LEVEL="loud")
    assert result.returncode == 2 and "VQA_LOG_LEVEL must be one of" in result.stderr, result.stderr


def test_the_lock_pins_every_direct_dependency_with_hashes() -> None:
    """requirements.lock holds each pyproject.toml pin at the same version, every package with a hash, and torch's
    hash includes the wheel pip installs here (the local index's)."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    direct = project["dependencies"] + project["optional-dependencies"]["dev"]
    text = (REPO / "requirements.lock").read_text()
    entries = re.findall(
        r"^([A-Za-z0-9_.\-]+)==(\S+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.M
    )
    pinned = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version, _ in entries}
    lines = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert len(lines) == len(entries) > 90, [line for line in lines if "==" not in line][
        :5
    ]  # every one hashed
    for requirement in direct:
        name, version = re.sub(r"\[.*\]", "", requirement).split("==")
        assert pinned.get(re.sub(r"[-_.]+", "-", name).lower()) == version, requirement
    local = Path("/opt/pypi-more/simple/torch/index.html")
    if local.is_file():  # the machine's pip serves torch from local disk: that wheel's hash must be listed
        wheel_hash = re.search(r"sha256=([0-9a-f]{64})", local.read_text()).group(1)
        torch_hashes = next(h for n, _, h in entries if n == "torch")
        assert wheel_hash in torch_hashes


# --- train on one node --------------------------------------------------------------------------------------------


def test_train_without_gpu_launches_one_cpu_process(checkout: Checkout) -> None:
    result = checkout.launch("--dry-run", "train", "--preset", "tiny")
    assert result.returncode == 0, result.stderr
    port = re.search(r"rendezvous port (\d+)", result.stderr)
    assert port, result.stderr
    assert [line.rstrip() for line in result.stdout.splitlines()] == [
        f"cd {checkout.root}",
        "export NCCL_DEBUG=WARN",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        f"{checkout.deepspeed} --num_gpus 1 --master_port {port[1]} trainer/main.py --preset tiny",
    ]
    assert "no GPU found" in result.stderr


def test_train_uses_every_local_gpu_unless_told(checkout: Checkout) -> None:
    checkout.gpus(8)
    ds = checkout.deepspeed
    assert checkout.dry("train", "--preset", "tiny")[-1] == words(
        f"{ds} --num_gpus 8 trainer/main.py --preset tiny"
    )
    for form in (["--num_gpus", "2"], ["--num_gpus=2"]):
        assert checkout.dry("train", *form, "--preset", "tiny")[-1] == words(
            f"{ds} --num_gpus 2 trainer/main.py --preset tiny"
        )
    # CUDA_VISIBLE_DEVICES: DeepSpeed itself launches one process per listed GPU, which --num_gpus would undo.
    lines = checkout.dry("train", "--preset", "tiny", CUDA_VISIBLE_DEVICES="2,3")
    assert lines[-1] == words(f"{ds} trainer/main.py --preset tiny")


def test_trainer_args_pass_through_unchanged(checkout: Checkout) -> None:
    trainer_args = [
        "--preset",
        "tiny",
        "--set",
        "loss.name=info nce",
        "--set",
        "x='y'",
        "--num_gpus",
        "3",
        "--help",
    ]
    line = checkout.dry("train", "--num_gpus", "1", "--", *trainer_args)[-1]
    assert line == [*words(checkout.deepspeed), "--num_gpus", "1", "trainer/main.py", *trainer_args]
    # Without `--`, trainer arguments start at the first argument that is not a launch option.
    line = checkout.dry("train", "--num_gpus", "1", "--preset", "tiny", "--num_gpus", "5")[-1]
    assert line[5:] == ["trainer/main.py", "--preset", "tiny", "--num_gpus", "5"]


def test_data_and_run_paths_from_the_environment(checkout: Checkout) -> None:
    paths = {"VQA_TRAIN_DATA": "/data/train", "VQA_VAL_DATA": "/data/val", "VQA_RUN_DIR": "/runs/a b"}
    lines = checkout.dry("train", "--preset", "tiny", **paths)
    assert lines[1:-1] == node_env(**paths)
    assert lines[-1][5:] == [
        "trainer/main.py",
        *["--train-data", "/data/train", "--val-data", "/data/val", "--run-dir", "/runs/a b"],
        *["--preset", "tiny"],
    ]
    # Given on the command line, in either form, the argument wins and the variable adds nothing.
    line = checkout.dry("train", "--run-dir=/elsewhere", "--val-data", "/v", **paths)[-1]
    assert line[5:] == [
        "trainer/main.py",
        "--train-data",
        "/data/train",
        "--run-dir=/elsewhere",
        "--val-data",
        "/v",
    ]


def test_nccl_and_cache_settings_are_exported_and_nothing_else(checkout: Checkout) -> None:
    settings = {
        "NCCL_DEBUG": "INFO",
        "NCCL_SOCKET_IFNAME": "^lo,docker0",
        "NCCL_IB_DISABLE": "1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "HF_HOME": "/checkpoints/huggingface",
        "OMP_NUM_THREADS": "4",
        "VQA_LOG_LEVEL": "info",
    }
    lines = checkout.dry("train", "--env", "CUDA_DEVICE_MAX_CONNECTIONS=1", **settings, UNRELATED="x")
    assert lines[1:-1] == node_env(**settings, CUDA_DEVICE_MAX_CONNECTIONS="1")


# --- several nodes ------------------------------------------------------------------------------------------------


def test_hostfile_over_ssh_hands_the_environment_to_deepspeed(checkout: Checkout) -> None:
    hostfile = checkout.hostfile("# the cluster\nworker-0 slots=8\n\n  worker-1   slots=8  # second\n")
    (checkout.home / ".deepspeed_env").write_text("# mine\nFROM_HOME=1\n\nPYTHONWARNINGS=ignore\n")
    lines = checkout.dry(
        "train", "--hostfile", str(hostfile), "--master_addr", "10.0.0.1", "--master_port", "29600",
        "--ssh_port", "2222", "--env", "EXTRA=a b", "--", "--preset", "vqa2-base", NCCL_SOCKET_IFNAME="eth0",
    )  # fmt: skip
    exports = node_env(EXTRA="a b", NCCL_SOCKET_IFNAME="eth0")
    env_file = f"{checkout.tmp}/vqa-align.XXXXXX/deepspeed_env"
    # The user's own lines first, then launch.sh's, which DeepSpeed reads later and so win.
    file_lines = ["FROM_HOME=1", "PYTHONWARNINGS=ignore"] + [export[1] for export in exports]
    assert lines == [
        ["cd", str(checkout.root)],
        *exports,
        ["mktemp", "-d", f"{checkout.tmp}/vqa-align.XXXXXX"],
        ["printf", "%s\\n", *file_lines, ">", env_file],
        ["export", f"DS_ENV_FILE={env_file}"],
        words(
            f"{checkout.deepspeed} --hostfile {hostfile} --master_addr 10.0.0.1 --master_port 29600 --ssh_port 2222 "
            "trainer/main.py --preset vqa2-base"
        ),
    ]


def test_hostfile_node_and_gpu_limits_pass_through(checkout: Checkout) -> None:
    hostfile = checkout.hostfile("a slots=8\nb slots=8\nc slots=4\n")
    line = checkout.dry("train", "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "4")[-1]
    assert line == words(
        f"{checkout.deepspeed} --hostfile {hostfile} --num_nodes 2 --num_gpus 4 trainer/main.py"
    )
    # A relative hostfile is the one in the caller's folder, not in the repository root DeepSpeed runs from.
    line = checkout.dry("train", "--hostfile", hostfile.name)[-1]
    assert line == words(f"{checkout.deepspeed} --hostfile {hostfile} trainer/main.py")
    # One host: DeepSpeed launches locally, no ssh and so no environment file.
    single = checkout.hostfile("localhost slots=2\n", "single")
    lines = checkout.dry("train", "--hostfile", str(single))
    assert not any("DS_ENV_FILE" in " ".join(x) for x in lines)
    assert lines[-1] == words(f"{checkout.deepspeed} --hostfile {single} trainer/main.py")


def test_no_ssh_node_of_alike_nodes(checkout: Checkout) -> None:
    checkout.gpus(8)
    lines = checkout.dry(
        "train", "--no_ssh", "--num_nodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1",
        "--master_port", "29500", "--", "--preset", "vqa2-base",
    )  # fmt: skip
    launch_dir = f"{checkout.tmp}/vqa-align.XXXXXX"
    assert lines == [
        ["cd", str(checkout.root)],
        *node_env(),
        ["mktemp", "-d", launch_dir],
        ["printf", "%s\\n", "node-0 slots=8", "node-1 slots=8", ">", f"{launch_dir}/hostfile"],
        words(
            f"{checkout.deepspeed} --hostfile {launch_dir}/hostfile --no_ssh --node_rank 1 --master_addr 10.0.0.1 "
            "--master_port 29500 trainer/main.py --preset vqa2-base"
        ),
    ]
    # --num_gpus sets each node's count.
    args = ["--no_ssh", "--num_nodes", "3", "--node_rank", "0", "--master_addr", "h", "--num_gpus", "2"]
    assert [
        "printf",
        "%s\\n",
        "node-0 slots=2",
        "node-1 slots=2",
        "node-2 slots=2",
        ">",
        f"{launch_dir}/hostfile",
    ] in (checkout.dry("train", *args))


def test_no_ssh_with_a_shared_hostfile(checkout: Checkout) -> None:
    hostfile = checkout.hostfile("n0 slots=8\nn1 slots=4\n")
    lines = checkout.dry(
        "train", "--no_ssh", "--hostfile", str(hostfile), "--node_rank", "1", "--master_addr", "n0"
    )
    assert not any("DS_ENV_FILE" in " ".join(x) for x in lines)  # each node exports its own environment
    assert lines[-1] == words(
        f"{checkout.deepspeed} --hostfile {hostfile} --no_ssh --node_rank 1 --master_addr n0 trainer/main.py"
    )


# Every refusal, one by one: tests/test_launch_units.py. Here a few, as launch.sh ends with them.
@pytest.mark.parametrize(
    ("args", "hostfile_text", "message"),
    [
        (["--hostfile", "{tmp}/nowhere"], None, "hostfile '{tmp}/nowhere' does not exist"),
        (["--hostfile", "{hostfile}"], "worker-0 slots=8\nworker-1 gpus=8\n", "line 2: expected 'HOST slots=N'"),
        (["--no_ssh", "--num_nodes", "2", "--node_rank", "0"], None, "--no_ssh needs --master_addr"),
        (["--num_gpus"], None, "--num_gpus needs a value"),
        (["--hostfile", "{hostfile}", "--env", 'X=say "hi"'], "a slots=8\nb slots=8\n", "cannot pass X to the other nodes"),
    ],
)  # fmt: skip
def test_train_refuses_bad_input_before_running_anything(
    checkout: Checkout, args: list[str], hostfile_text: str | None, message: str
) -> None:
    hostfile = checkout.hostfile(hostfile_text) if hostfile_text is not None else checkout.tmp / "hostfile"
    fill = {"tmp": str(checkout.tmp), "hostfile": str(hostfile)}
    result = checkout.launch("--dry-run", "train", *(a.format(**fill) for a in args), "--preset", "tiny")
    assert result.returncode == 2
    assert message.format(**fill) in result.stderr
    assert result.stderr.startswith("launch.sh: error: train: ")
    assert result.stdout == ""  # refused before any command (the set-up, up to date, prints none)


# --- the rendezvous port -----------------------------------------------------------------------------------------


def test_one_node_takes_the_first_free_rendezvous_port(checkout: Checkout) -> None:
    with busy(29500, 29501):
        expected = next(p for p in range(29502, 65536) if not accepts(p))
        result = checkout.launch("--dry-run", "train", "--preset", "tiny")
        assert result.returncode == 0, result.stderr
        lines, port = checkout.dry_and_port("train", "--num_gpus", "2", "--preset", "tiny")
    assert port == expected
    notes = [line for line in result.stderr.splitlines() if "rendezvous port" in line]
    assert notes == [
        f"launch.sh: rendezvous port {expected} (the first free one from 29500; --master_port PORT to choose)"
    ]
    assert lines[-1] == words(f"{checkout.deepspeed} --num_gpus 2 trainer/main.py --preset tiny")
    # A one-host hostfile launches locally: the same choice.
    single = checkout.hostfile("localhost slots=2\n", "single")
    assert checkout.dry_and_port("train", "--hostfile", str(single))[1] is not None
    # A port given is the user's: passed on as it is, busy or not, without a note.
    with busy(29500):
        result = checkout.launch("--dry-run", "train", "--master_port", "29500", "--preset", "tiny")
    assert result.returncode == 0 and "rendezvous port" not in result.stderr, result.stderr
    assert words(result.stdout.splitlines()[-1])[3:7] == ["--num_gpus", "1", "--master_port", "29500"]


def test_several_nodes_refuse_a_busy_default_port_where_the_rendezvous_is(checkout: Checkout) -> None:
    no_ssh = ["train", "--no_ssh", "--num_nodes", "2", "--master_addr", "10.0.0.1"]
    over_ssh = ["train", "--hostfile", str(checkout.hostfile("localhost slots=1\nworker-1 slots=1\n"))]
    with busy(29500):
        for args in ([*no_ssh, "--node_rank", "0"], over_ssh):
            result = checkout.launch("--dry-run", *args, "--preset", "tiny")
            assert result.returncode == 2 and result.stdout == "", result.stderr
            assert result.stderr.splitlines() == [
                "launch.sh: error: train: port 29500 (DeepSpeed's default rendezvous port) is in use on this node, "
                "by another job; give every node the same free --master_port PORT"
            ]
            # Every node told the same other port: launched as told.
            lines, port = checkout.dry_and_port(*args, "--master_port", "29600", "--preset", "tiny")
            assert port is None and lines[-1][-5:] == [
                "--master_port",
                "29600",
                "trainer/main.py",
                "--preset",
                "tiny",
            ]
        # Node 1 only connects to node 0's port: its own 29500 does not matter, and the port is never changed.
        lines, port = checkout.dry_and_port(*no_ssh, "--node_rank", "1", "--preset", "tiny")
        assert port is None and "--master_port" not in lines[-1]


RECORDING_DEEPSPEED = """#!/bin/sh
# Stands in for DeepSpeed's runner: records its arguments and the environment file it was given.
printf '%s\\n' "$@" > "$TEST_OUT/args"
if [ -n "${DS_ENV_FILE:-}" ]; then cp "$DS_ENV_FILE" "$TEST_OUT/deepspeed_env"; fi
echo "$NCCL_DEBUG" > "$TEST_OUT/nccl_debug"
exit 3
"""


def test_train_runs_what_the_dry_run_prints(checkout: Checkout) -> None:
    out = checkout.tmp / "out"
    out.mkdir()
    write_executable(checkout.venv / "bin" / "deepspeed", RECORDING_DEEPSPEED)
    write_executable(checkout.bin / "pdsh", "#!/bin/sh\nexit 0\n")
    hostfile = checkout.hostfile("a slots=8\nb slots=8\n")
    args = [
        "train",
        "--hostfile",
        str(hostfile),
        "--env",
        "EXTRA=x y",
        "--",
        "--preset",
        "tiny",
        "--set",
        "a=b c",
    ]
    printed = checkout.dry(*args)
    result = checkout.launch(*args, TEST_OUT=str(out))
    assert result.returncode == 3, result.stderr  # the launcher's exit status
    assert (out / "args").read_text().splitlines() == printed[-1][1:]
    env_file = [line for line in printed if line[0] == "printf"][0][2:-2]
    assert (out / "deepspeed_env").read_text().splitlines() == env_file
    assert (out / "nccl_debug").read_text() == "WARN\n"
    assert not list(checkout.tmp.glob("vqa-align.*")), "the environment file is removed at exit"


def test_several_nodes_over_ssh_need_pdsh(checkout: Checkout) -> None:
    # A PATH without pdsh, wherever the system has it: every other command of the checkout's PATH, linked.
    no_pdsh = checkout.tmp / "path-without-pdsh"
    no_pdsh.mkdir()
    for folder in reversed(
        checkout.env()["PATH"].split(":")
    ):  # the first folder's command wins, as on a PATH
        for tool in Path(folder).iterdir() if Path(folder).is_dir() else ():
            if tool.name != "pdsh" and os.access(tool, os.X_OK):
                (no_pdsh / tool.name).unlink(missing_ok=True)
                (no_pdsh / tool.name).symlink_to(tool)
    assert shutil.which("pdsh", path=str(no_pdsh)) is None
    hostfile = checkout.hostfile("a slots=8\nb slots=8\n")
    result = checkout.launch("train", "--hostfile", str(hostfile), PATH=str(no_pdsh))
    assert result.returncode == 2 and "need pdsh" in result.stderr and "--no_ssh" in result.stderr


# --- tensorboard --------------------------------------------------------------------------------------------------


def test_tensorboard_serves_the_runs_on_loopback(checkout: Checkout) -> None:
    (checkout.root / "runs").mkdir()
    assert checkout.dry("tensorboard") == [
        words(f"{checkout.venv}/bin/tensorboard --logdir {checkout.root}/runs --host 127.0.0.1 --port 6006")
    ]
    runs = checkout.tmp / "runs"
    runs.mkdir()
    assert checkout.dry(
        "tensorboard", "--logdir", str(runs), "--port=6007", "--", "--reload_interval", "30"
    ) == [
        words(
            f"{checkout.venv}/bin/tensorboard --logdir {runs} --host 127.0.0.1 --port 6007 --reload_interval 30"
        )
    ]
    assert checkout.dry("tensorboard", "--host", "0.0.0.0", VQA_RUNS_DIR=str(runs)) == [
        words(f"{checkout.venv}/bin/tensorboard --logdir {runs} --host 0.0.0.0 --port 6006")
    ]


def test_tensorboard_refuses_bad_input(checkout: Checkout) -> None:
    result = checkout.launch("--dry-run", "tensorboard", "--logdir", str(checkout.tmp / "none"))
    assert result.returncode == 2 and "log folder" in result.stderr and "does not exist" in result.stderr
    result = checkout.launch("--dry-run", "tensorboard", "--logdir", str(checkout.tmp), "--port", "http")
    assert result.returncode == 2 and "--port must be a number" in result.stderr


# --- SIGTERM through DeepSpeed's real launcher --------------------------------------------------------------------

STAND_IN_TRAINER = """\
import json, os, pathlib, signal, sys, time
out = pathlib.Path(os.environ["TEST_OUT"])
rank = os.environ["RANK"]

def on_sigterm(signum, frame):
    time.sleep(0.5)  # a checkpoint being written
    (out / f"rank{rank}.sigterm").write_text("")
    sys.exit(0)

signal.signal(signal.SIGTERM, on_sigterm)
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NCCL_DEBUG", "VQA_RUN_DIR"]
info = {k: os.environ.get(k) for k in keys}
(out / f"rank{rank}.json").write_text(json.dumps({"argv": sys.argv[1:], **info}))
time.sleep(120)
"""


@pytest.fixture
def real_deepspeed(checkout: Checkout) -> Checkout:
    """The checkout, its venv pointing at the repository's real DeepSpeed, and a stand-in trainer/main.py."""
    # pyproject.toml pins deepspeed, which installs its launcher beside the interpreter: missing, the set-up is broken.
    assert (REAL_VENV / "bin" / "deepspeed").exists(), (
        f"no DeepSpeed launcher in {REAL_VENV}/bin: run ./launch.sh setup"
    )
    for name in ("python", "deepspeed"):
        (checkout.venv / "bin" / name).unlink()
        (checkout.venv / "bin" / name).symlink_to(REAL_VENV / "bin" / name)
    (checkout.root / "trainer" / "main.py").write_text(STAND_IN_TRAINER)
    (checkout.tmp / "out").mkdir()
    return checkout


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_sigterm_reaches_every_rank_of_a_no_ssh_node(real_deepspeed: Checkout) -> None:
    c, out = real_deepspeed, real_deepspeed.tmp / "out"
    # This node is node 1 of 2 with two (CPU) processes: ranks 2 and 3 of 4. No rendezvous happens here, since
    # the stand-in trainer does not initialise torch.distributed.
    proc = subprocess.Popen(
        [str(c.root / "launch.sh"), "train", "--no_ssh", "--num_nodes", "2", "--node_rank", "1",
         "--master_addr", "127.0.0.1", "--master_port", "29555", "--num_gpus", "2", "--", "--preset", "tiny"],
        env=c.env(TEST_OUT=str(out), VQA_RUN_DIR="/runs/r"),
        cwd=c.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        started = wait_for(lambda: all((out / f"rank{r}.json").exists() for r in (2, 3)), timeout=120)
        assert started, proc.stdout.read() if proc.poll() is not None else "ranks did not start"
        assert list(c.tmp.glob("vqa-align.*")), "the generated hostfile's folder exists while running"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output  # both ranks checkpointed and exited 0, and launch.sh waited for them
    assert {p.name for p in out.glob("*.sigterm")} == {"rank2.sigterm", "rank3.sigterm"}, output
    for rank, local_rank in ((2, 0), (3, 1)):
        info = json.loads((out / f"rank{rank}.json").read_text())
        assert info["argv"] == [f"--local_rank={local_rank}", "--run-dir", "/runs/r", "--preset", "tiny"]
        assert (info["WORLD_SIZE"], info["MASTER_ADDR"], info["MASTER_PORT"]) == ("4", "127.0.0.1", "29555")
        assert (info["NCCL_DEBUG"], info["VQA_RUN_DIR"]) == ("WARN", "/runs/r")
    assert "passing it to every rank" in output
    assert not list(c.tmp.glob("vqa-align.*")), "the temporary hostfile is removed at exit"


CTRL_C_TRAINER = """\
import os, pathlib, signal, sys, time
out, run_dir = pathlib.Path(os.environ["TEST_OUT"]), pathlib.Path(sys.argv[sys.argv.index("--run-dir") + 1])

def on_sigint(signum, frame):
    time.sleep(0.5)  # a checkpoint being written
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("global_step7")
    sys.exit(130)

signal.signal(signal.SIGINT, on_sigint)
(out / "started").write_text("")
time.sleep(120)
"""


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_naming_the_checkpoint_and_the_command_that_continues(
    real_deepspeed: Checkout,
) -> None:
    """Ctrl-C at a terminal signals the whole foreground process group: launch.sh alone receives it (the launcher
    runs in a session of its own), passes it to the rank, and ends with the saved tag and the resume command, with
    no KeyboardInterrupt traceback from DeepSpeed's runner."""
    c, out, run_dir = real_deepspeed, real_deepspeed.tmp / "out", real_deepspeed.tmp / "run"
    (c.root / "trainer" / "main.py").write_text(CTRL_C_TRAINER)
    proc = subprocess.Popen(
        [str(c.root / "launch.sh"), "train", "--num_gpus", "1", "--", "--preset", "tiny", "--run-dir", str(run_dir)],
        env=c.env(TEST_OUT=str(out)), cwd=c.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job is
    )  # fmt: skip
    try:
        assert wait_for(lambda: (out / "started").exists() or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, proc.stdout.read()
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert output.splitlines()[-1] == (
        f"launch.sh: stopped by SIGINT: checkpoint global_step7 saved in {run_dir}/checkpoints; continue with: "
        f"./launch.sh train --num_gpus 1 -- --preset tiny --run-dir {run_dir} --resume auto"
    ), output
    assert "cmd = " not in output, (
        output
    )  # DeepSpeed's launcher INFO lines stay below VQA_LOG_LEVEL's warning


def test_sigterm_before_the_ranks_start_stops_the_launch(real_deepspeed: Checkout) -> None:
    c = real_deepspeed
    proc = subprocess.Popen(
        [str(c.root / "launch.sh"), "train", "--num_gpus", "1"],
        env=c.env(TEST_OUT=str(c.tmp / "out")),
        cwd=c.tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # DeepSpeed's runner takes seconds to import; stop it while it does (launch.sh's pid runs the launcher module,
    # whose child the runner is).
    runner = ["pgrep", "-P", str(proc.pid), "-f", "bin/deepspeed"]
    assert wait_for(lambda: subprocess.run(runner, capture_output=True).returncode == 0, 10)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=15) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list((c.tmp / "out").iterdir()), "no rank started"


# --- `./launch.sh train` end to end: DeepSpeed's real launcher, the real trainer -----------------------------------


@pytest.fixture
def real_trainer(checkout: Checkout) -> Checkout:
    return with_real_trainer(checkout)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_trains_with_the_real_trainer_through_deepspeeds_launcher(
    real_trainer: Checkout, tiny_easyvqa_shards: Path
) -> None:
    """`./launch.sh train` on a machine without a GPU: one CPU rank started by the `deepspeed` CLI runs
    trainer/main.py for 3 steps on the tiny easy-VQA shards, with the data and run folder given as launch.sh's
    environment variables; the run folder then holds the logged losses and the final checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.checkpoint.layout import list_complete

    c, run_dir = real_trainer, real_trainer.tmp / "run"
    result = subprocess.run(
        [str(c.root / "launch.sh"), "train", "--", "--preset", "tiny", "--max-steps", "3",
         *("--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=4", "--set", "train.log_every=1"),
         *("--set", "train.progress_bar=false", "--set", "data.num_workers=1")],
        env=c.env(
            VQA_TRAIN_DATA=str(tiny_easyvqa_shards / "train"), VQA_RUN_DIR=str(run_dir), HF_HUB_OFFLINE="1",
            OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1", VQA_LOG_LEVEL="info",  # DeepSpeed's launcher logs its commands
        ),
        cwd=c.tmp, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "no GPU found" in result.stderr  # launch.sh chose one CPU process
    # DeepSpeed's per-node launcher started the rank, handing it --local_rank as it does every trainer (its INFO
    # lines show with VQA_LOG_LEVEL=info).
    assert "deepspeed.launcher.launch" in log and "--local_rank=0" in log, log[-6000:]
    assert "step 3/3" in log, log[-6000:]
    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    losses = {e.step: e.value for e in ea.Scalars("train/loss")}
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values()), losses
    assert [(r.tag, r.world_size) for r in list_complete(run_dir / "checkpoints")] == [("global_step3", 1)]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["max_steps"] == 3 and config["train"]["global_batch_size"] == 8


def test_launch_sh_can_be_sourced_without_running() -> None:
    result = subprocess.run(
        [
            "bash",
            "-c",
            'source "$1" && type cmd_train >/dev/null && echo sourced',
            "_",
            str(REPO / "launch.sh"),
        ],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")},
    )
    assert result.returncode == 0 and result.stdout == "sourced\n", result.stderr


def test_a_first_setup_without_room_stops_before_pip_with_the_numbers(tmp_path: Path) -> None:
    """The folder check that a first setup runs: it climbs to the nearest existing folder and names the space."""
    script = 'source "$1" && VENV="$2" && need_free_space "$2" "$3" && echo room'
    venv = tmp_path / "not" / "yet" / ".venv"

    def check(gib: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", script, "_", str(REPO / "launch.sh"), str(venv), str(gib)],
            capture_output=True,
            text=True,
            env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")},
        )

    assert check(0).stdout == "room\n"
    refused = check(1 << 30)  # a billion GiB: more than any disk
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(
        f"launch.sh: error: setup: {venv} needs about {1 << 30} GiB free; {tmp_path} has"
    )
    assert "set VQA_VENV" in refused.stderr
