"""trainer/launch, the Python that `./launch.sh train` and `./launch.sh tensorboard` hand over to, called directly:
the refusals of bad input, the launch options' split from the trainer's, the hostfile, the GPU count, the ports,
the node environment, the command that continues a stopped run, and the signal relay on a small process tree.
tests/test_launch.py runs launch.sh itself (what it prints and runs, end to end)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.launch_checkout import busy
from trainer.launch import board, cli, context, hosts, node_env, relay
from trainer.launch.hosts import LaunchError


def dry_context(tmp_path: Path, **env: str) -> context.Context:
    """A dry run from TMP_PATH in an environment of ENV alone (no GPU tool on its PATH)."""
    return context.Context(
        tmp_path, tmp_path / "venv", tmp_path, env={"PATH": str(tmp_path / "bin"), **env}, dry_run=True
    )


# --- refusals, before anything runs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "hostfile_text", "message"),
    [
        (["--hostfile", "{tmp}/nowhere"], None, "hostfile '{tmp}/nowhere' does not exist"),
        (["--hostfile", "{hostfile}"], "worker-0\nworker-1\n", "line 1: expected 'HOST slots=N'"),
        (["--hostfile", "{hostfile}"], "worker-0 slots=8\nworker-1 gpus=8\n", "line 2: expected 'HOST slots=N'"),
        (["--hostfile", "{hostfile}"], "# nothing yet\n\n", "lists no node"),
        (["--hostfile", "{hostfile}"], "a slots=8\na slots=8\n", "lists a twice"),
        (["--hostfile", "{hostfile}"], "a slots=0\n", "slots must be at least 1"),
        (["--hostfile", "{hostfile}", "--num_nodes", "3"], "a slots=8\nb slots=8\n", "lists only 2 node(s)"),
        (["--no_ssh", "--num_nodes", "2", "--node_rank", "2", "--master_addr", "h"], None, "--node_rank 2 is out of range: 2 node(s), so 0 to 1"),
        (["--no_ssh", "--hostfile", "{hostfile}", "--node_rank", "3", "--master_addr", "h"], "a slots=8\nb slots=8\n", "--node_rank 3 is out of range"),
        (["--no_ssh", "--hostfile", "{hostfile}", "--num_nodes", "1", "--node_rank", "1", "--master_addr", "h"], "a slots=8\nb slots=8\n", "out of range: 1 node(s)"),
        (["--no_ssh", "--num_nodes", "2", "--node_rank", "-1", "--master_addr", "h"], None, "--node_rank must be a whole number"),
        (["--no_ssh", "--num_nodes", "2", "--node_rank", "0"], None, "--no_ssh needs --master_addr"),
        (["--no_ssh", "--num_nodes", "2", "--master_addr", "h"], None, "--no_ssh needs --node_rank"),
        (["--no_ssh", "--node_rank", "0", "--master_addr", "h"], None, "--no_ssh needs the nodes"),
        (["--no_ssh", "--num_nodes", "2", "--node_rank", "0", "--master_addr", "h", "--ssh_port", "22"], None, "--ssh_port means nothing"),
        (["--node_rank", "0"], None, "--node_rank goes with --no_ssh"),
        (["--ssh_port", "2222"], None, "--ssh_port goes with --hostfile"),
        (["--num_nodes", "2"], None, "--num_nodes needs --hostfile"),
        (["--num_gpus", "0"], None, "--num_gpus must be a whole number of at least 1"),
        (["--num_gpus", "all"], None, "--num_gpus must be a whole number"),
        (["--num_gpus", "²"], None, "--num_gpus must be a whole number"),
        (["--num_gpus"], None, "--num_gpus needs a value"),
        (["--num_gpus="], None, "--num_gpus needs a value"),
        (["--num_gpus", "--preset"], None, "--num_gpus needs a value"),
        (["--master_port", "70000"], None, "a port must be a number from 1 to 65535"),
        (["--env", "NO_VALUE"], None, "--env takes NAME=VALUE, got 'NO_VALUE'"),
        (["--env", "1X=y"], None, "--env takes NAME=VALUE"),
        (["--hostfile", "{hostfile}", "--env", 'X=say "hi"'], "a slots=8\nb slots=8\n", "cannot pass X to the other nodes"),
    ],
)  # fmt: skip
def test_train_refuses_bad_input_before_printing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], hostfile_text: str | None, message: str
) -> None:
    hostfile = tmp_path / "hostfile"
    if hostfile_text is not None:
        hostfile.write_text(hostfile_text)
    fill = {"tmp": str(tmp_path), "hostfile": str(hostfile)}
    with pytest.raises(LaunchError) as refused:
        cli.train([*(a.format(**fill) for a in args), "--preset", "tiny"], dry_context(tmp_path))
    assert str(refused.value).startswith("train: ") and message.format(**fill) in str(refused.value)
    assert capsys.readouterr().out == ""


def test_a_refusal_is_one_line_and_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--root", str(tmp_path), "--venv", str(tmp_path / "venv"), "--caller-dir", str(tmp_path)]
    assert cli.main([*base, "--dry-run", "train", "--num_gpus", "none"]) == 2
    out, err = capsys.readouterr()
    assert (
        out == ""
        and err == "launch.sh: error: train: --num_gpus must be a whole number of at least 1, got 'none'\n"
    )
    assert cli.main([*base, "tensorboard", "--port"]) == 2
    assert (
        capsys.readouterr().err
        == "launch.sh: error: tensorboard: --port needs a value (see ./launch.sh tensorboard --help)\n"
    )


def test_the_check_before_the_set_up_is_silent_unless_an_argument_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = [
        "--root",
        str(tmp_path),
        "--venv",
        str(tmp_path / "venv"),
        "--caller-dir",
        str(tmp_path),
        "--check",
    ]
    assert cli.main([*base, "train", "--num_gpus", "2", "--", "--preset", "tiny"]) == 0
    assert cli.main([*base, "train", "--num_gpus", "2", "--help"]) == 0  # the help comes once set up
    assert cli.main([*base, "tensorboard", "--logdir", ".", "--help"]) == 0
    assert cli.main([*base, "tensorboard", "--logdir", "."]) == 0
    assert capsys.readouterr() == ("", "")
    assert cli.main([*base, "train", "--hostfile", "missing"]) == 2
    assert capsys.readouterr() == ("", "launch.sh: error: train: hostfile 'missing' does not exist\n")


def test_deepspeeds_log_level_follows_vqa_log_level() -> None:
    assert node_env.ds_log_level({}) == "warning"
    assert node_env.ds_log_level({"VQA_LOG_LEVEL": ""}) == "warning"
    assert node_env.ds_log_level({"VQA_LOG_LEVEL": "DEBUG"}) == "debug"
    with pytest.raises(
        LaunchError, match="VQA_LOG_LEVEL must be one of debug, info, warning, error, critical; got 'loud'"
    ):
        node_env.ds_log_level({"VQA_LOG_LEVEL": "loud"})


# --- the command line ---------------------------------------------------------------------------------------------


def test_launch_options_come_first_and_the_rest_goes_to_the_trainer() -> None:
    def split(args: list[str]) -> tuple[list[str], list[str]]:
        return context.split_launch_args(args, "train", (*cli.VALUED, "--env"), cli.FLAGS)

    assert split(["--num_gpus", "2", "--preset", "tiny", "--num_gpus", "5"]) == (
        ["--num_gpus=2"],
        ["--preset", "tiny", "--num_gpus", "5"],
    )
    assert split(["--num_gpus=2", "--no_ssh", "--env", "A=b=c", "--", "--help"]) == (
        ["--num_gpus=2", "--no_ssh", "--env=A=b=c"],
        ["--help"],
    )
    assert split(["--node_rank", "-1", "x"]) == (["--node_rank=-1"], ["x"])  # a value may start with one dash
    assert split([]) == ([], [])
    assert split(["--preflight", "--help"]) == (["--preflight", "--help"], [])


def test_train_help_says_every_option(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as done:
        cli.train(["--num_gpus", "2", "--help"], dry_context(tmp_path))
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("Usage: ./launch.sh train [LAUNCH OPTIONS] [--] [TRAINER ARGS...]\n")
    for option in (*cli.VALUED, "--env", "--no_ssh", "--preflight", "NCCL_DEBUG=WARN", "130 for SIGINT"):
        assert option in text, option


# --- nodes and this host ------------------------------------------------------------------------------------------


def test_hostfile_lines_comments_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "hostfile").write_text(
        "# the cluster\nw-0 slots=8\n\n  w-1\tslots=4  # second\nw-2 slots=2"
    )
    assert hosts.read_hostfile("cluster/hostfile", tmp_path) == [("w-0", 8), ("w-1", 4), ("w-2", 2)]
    assert hosts.absolute("cluster/../cluster/hostfile", tmp_path) == f"{tmp_path}/cluster/hostfile"
    (tmp_path / "folder").mkdir()
    with pytest.raises(LaunchError, match="hostfile 'folder' is not a readable file"):
        hosts.read_hostfile("folder", tmp_path)


def test_gpus_from_nvidia_smi_else_the_device_files(tmp_path: Path) -> None:
    tools, dev = tmp_path / "bin", tmp_path / "dev"
    tools.mkdir()
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (dev / name).write_text("")
    assert hosts.local_gpu_count(str(tools), dev) == 2  # no nvidia-smi: /dev/nvidiaN
    smi = tools / "nvidia-smi"
    smi.write_text(
        '#!/bin/sh\necho "GPU 0: H100 (UUID: a)"\necho "GPU 1: H100 (UUID: b)"\necho "GPU 2: H100"\n'
    )
    smi.chmod(0o755)
    assert hosts.local_gpu_count(str(tools), dev) == 3
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert hosts.local_gpu_count(str(tools), dev) == 0  # a driver that does not answer: no GPU it can use


def test_the_first_free_port_from_the_default_upward() -> None:
    with busy(29500, 29501):
        assert hosts.port_in_use(29500)
        assert hosts.first_free_port(29500) == next(
            p for p in range(29502, 65536) if not hosts.port_in_use(p)
        )
    assert "localhost" in hosts.this_host_names() and "127.0.0.1" in hosts.this_host_names()


# --- the environment of every node --------------------------------------------------------------------------------


def test_node_env_lines_are_nccl_the_named_ones_and_the_extra_ones_sorted() -> None:
    env = {
        "NCCL_SOCKET_IFNAME": "eth0",
        "HF_HOME": "/h",
        "UNRELATED": "x",
        "EXTRA": "a b",
        "NCCL_DEBUG": "INFO",
    }
    assert node_env.node_env_lines(env, ["EXTRA"]) == [
        "EXTRA=a b",
        "HF_HOME=/h",
        "NCCL_DEBUG=INFO",
        "NCCL_SOCKET_IFNAME=eth0",
    ]
    assert node_env.unsafe_over_ssh(["A=plain value", "B=it's fine"]) is None
    for value in ('"', "$HOME", "`x`", "a\\b"):
        assert node_env.unsafe_over_ssh(["A=1", f"B={value}"]) == "B"


def test_the_users_deepspeed_env_files_home_first_then_the_repository(tmp_path: Path) -> None:
    home, root = tmp_path / "home", tmp_path / "root"
    home.mkdir()
    root.mkdir()
    (home / ".deepspeed_env").write_text("# mine\nFROM_HOME=1\n\nnot a line\nPYTHONWARNINGS=ignore")
    (root / ".deepspeed_env").write_text("FROM_ROOT=2\n")
    assert node_env.user_deepspeed_env_lines({"HOME": str(home)}, root) == [
        "FROM_HOME=1",
        "PYTHONWARNINGS=ignore",
        "FROM_ROOT=2",
    ]
    (tmp_path / "own").write_text("OWN=3\n")
    env = {"HOME": str(home), "DS_ENV_FILE": str(tmp_path / "own")}
    assert node_env.user_deepspeed_env_lines(env, root) == ["OWN=3"]


def test_env_options_count_as_exported_variables(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [
        "--num_gpus",
        "1",
        "--master_port",
        "29600",
        "--env",
        "VQA_LOG_LEVEL=info",
        "--env",
        "VQA_RUN_DIR=/r",
    ]
    assert (
        cli.train([*args, "--env", "NCCL_DEBUG=INFO", "--", "--preset", "tiny"], dry_context(tmp_path)) == 0
    )
    assert capsys.readouterr().out.splitlines() == [
        f"cd {tmp_path}",
        "export NCCL_DEBUG=INFO",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "export VQA_LOG_LEVEL=info",
        "export VQA_RUN_DIR=/r",
        f"{tmp_path}/venv/bin/deepspeed --log_level info --num_gpus 1 --master_port 29600 trainer/main.py "
        "--run-dir /r --preset tiny",
    ]


def test_the_environment_fills_the_trainers_paths_unless_given() -> None:
    env = {"VQA_TRAIN_DATA": "/t", "VQA_VAL_DATA": "", "VQA_RUN_DIR": "/r"}
    assert cli.trainer_defaults(["--preset", "tiny"], env) == ["--train-data", "/t", "--run-dir", "/r"]
    assert cli.trainer_defaults(["--run-dir=/x", "--train-data", "/y"], env) == []


# --- a run stopped by a signal ------------------------------------------------------------------------------------


def test_the_command_that_continues_replaces_resume() -> None:
    assert relay.continue_args(["--num_gpus", "1", "--", "--resume", "latest", "--preset", "tiny"]) == [
        *["--num_gpus", "1", "--", "--preset", "tiny", "--resume", "auto"]
    ]
    assert relay.continue_args(["--resume=latest", "--resume", "--preset", "x"]) == [
        "--preset",
        "x",
        "--resume",
        "auto",
    ]


def test_the_stopped_note_names_the_saved_checkpoint(tmp_path: Path) -> None:
    args = ["--", "--preset", "tiny", "--run-dir", "runs/a b"]
    assert relay.trainer_run_dir(args, {}) == "runs/a b"
    assert relay.trainer_run_dir(["--run-dir=/x"], {"VQA_RUN_DIR": "/y"}) == "/x"
    assert relay.trainer_run_dir([], {"VQA_RUN_DIR": "/y"}) == "/y"
    assert relay.trainer_run_dir([], {}) == "runs/latest"
    folder = tmp_path / "runs" / "a b"
    assert relay.stopped_note("SIGTERM", "runs/a b", args, tmp_path) == (
        f"stopped by SIGTERM with no complete checkpoint in {folder}/checkpoints; start again with: "
        "./launch.sh train -- --preset tiny --run-dir 'runs/a b' --resume auto"
    )
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "latest").write_text("global_step7\n")
    assert relay.stopped_note("SIGINT", "runs/a b", args, tmp_path).startswith(
        f"stopped by SIGINT: checkpoint global_step7 saved in {folder}/checkpoints; continue with: ./launch.sh train"
    )


def test_children_are_read_from_proc(tmp_path: Path) -> None:
    for pid, ppid, name in (
        (10, 1, "deepspeed"),
        (11, 10, "python (launch) x"),
        (12, 11, "python"),
        (13, 11, "p"),
    ):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({name}) S {ppid} {pid} 0 0\n")
    (tmp_path / "self").mkdir()
    assert relay.children([10], tmp_path) == [11]
    assert relay.children([11], tmp_path) == [12, 13]
    # The real /proc: a child this test starts is found (other tests may have left children of their own, such as
    # multiprocessing's resource tracker, so the list is not compared whole).
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in relay.children([os.getpid()])
    finally:
        child.kill()
        child.wait()


def test_a_signal_before_the_launch_stops_it() -> None:
    with pytest.raises(SystemExit) as stopped:
        relay.Relay("launcher").on_signal(signal.SIGTERM, None)
    assert stopped.value.code == 143


RANK = """import os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    (out / "rank.stopped").write_text(str(signum))
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
(out / "rank.started").write_text("")
time.sleep(30)
"""


def test_sigterm_reaches_the_rank_below_the_launcher_and_the_launch_waits(tmp_path: Path) -> None:
    """A runner (sh) starting a launcher (sh) starting a rank, as DeepSpeed's runner does on one node: the signal
    goes to the rank, the launch waits for the launcher's exit and returns its status."""
    (tmp_path / "rank.py").write_text(RANK)
    rank = f"{sys.executable} {tmp_path / 'rank.py'} {tmp_path}"
    command = ["sh", "-c", f"sh -c '{rank}; exit 5'; exit $?"]

    def signal_once_started() -> None:
        deadline = time.monotonic() + 30
        while not (tmp_path / "rank.started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    runner, before = relay.Relay("launcher"), signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=signal_once_started)
    thread.start()
    try:
        status = runner.run(command, dict(os.environ))
    finally:
        thread.join()
    assert (tmp_path / "rank.stopped").read_text() == str(int(signal.SIGTERM))
    assert (status, runner.stop_signal) == (5, "SIGTERM")
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is undone


def test_the_exit_status_of_a_launcher_a_signal_ended(tmp_path: Path) -> None:
    assert relay.Relay("runner").run(["sh", "-c", "kill -TERM $$"], dict(os.environ)) == 143


# --- tensorboard --------------------------------------------------------------------------------------------------


def test_tensorboard_logdir_relative_to_the_caller(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "runs").mkdir()
    assert (
        board.tensorboard(
            ["--logdir", "runs", "--host=0.0.0.0", "--samples_per_plugin", "x=1"], dry_context(tmp_path)
        )
        == 0
    )
    assert capsys.readouterr().out == (
        f"{tmp_path}/venv/bin/tensorboard --logdir runs --host 0.0.0.0 --port 6006 --samples_per_plugin x=1\n"
    )
    with pytest.raises(LaunchError, match="tensorboard: log folder 'elsewhere' does not exist"):
        board.tensorboard(["--logdir", "elsewhere"], dry_context(tmp_path))
    with pytest.raises(LaunchError, match="tensorboard: --port must be a number from 1 to 65535, got '0'"):
        board.tensorboard(["--port", "0"], dry_context(tmp_path))
