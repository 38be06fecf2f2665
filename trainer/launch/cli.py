"""`python -m trainer.launch [--dry-run] [--check] --root ROOT --venv VENV --caller-dir DIR {train,tensorboard} ARGS`:
the command line of `./launch.sh train` and `./launch.sh tensorboard`. launch.sh runs it from the repository root (so
that this checkout's package is the one imported): with --check before the set-up, then once the virtual environment
is set up; it says where it was called from, which relative paths of the user's (a hostfile, a log folder) are
taken from.

Bad input ends with one line, `launch.sh: error: ...`, and exit status 2, before anything runs.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainer.launch import hosts, node_env, relay
from trainer.launch.board import tensorboard
from trainer.launch.context import Context, is_uint, split_launch_args
from trainer.launch.help import train_parser
from trainer.launch.hosts import DEFAULT_MASTER_PORT, LaunchError
from trainer.launch.relay import note

# train's launch options that take a value; the others are flags.
VALUED = (
    "--num_gpus",
    "--hostfile",
    "--num_nodes",
    "--master_addr",
    "--master_port",
    "--node_rank",
    "--ssh_port",
)
FLAGS = ("--no_ssh", "--preflight", "--help", "-h")


def check_values(o: argparse.Namespace) -> None:
    """The values alone, first, so that every later message can rely on them."""
    for assignment in o.env:
        if not node_env.is_env_assignment(assignment):
            raise LaunchError(f"train: --env takes NAME=VALUE, got '{assignment}'")
    if o.num_gpus is not None and not is_uint(o.num_gpus, 1):
        raise LaunchError(f"train: --num_gpus must be a whole number of at least 1, got '{o.num_gpus}'")
    if o.num_nodes is not None and not is_uint(o.num_nodes, 1):
        raise LaunchError(f"train: --num_nodes must be a whole number of at least 1, got '{o.num_nodes}'")
    if o.node_rank is not None and not is_uint(o.node_rank):
        raise LaunchError(
            f"train: --node_rank must be a whole number (0 for the first node), got '{o.node_rank}'"
        )
    for port in (o.master_port, o.ssh_port):
        if port is not None and not is_uint(port, 1, 65535):
            raise LaunchError(f"train: a port must be a number from 1 to 65535, got '{port}'")


@dataclass
class Nodes:
    """How many nodes, the hostfile's hosts (absolute path) if one was given, and whether this is an ssh launch."""

    count: int = 1
    hostfile: str | None = None
    hosts: list[str] = field(default_factory=list)
    over_ssh: bool = False


def count_nodes(o: argparse.Namespace, caller_dir: Path) -> Nodes:
    nodes = Nodes()
    if o.hostfile is not None:
        nodes.hosts = [host for host, _ in hosts.read_hostfile(o.hostfile, caller_dir)]
        nodes.hostfile = hosts.absolute(o.hostfile, caller_dir)
        nodes.count = len(nodes.hosts)
        if o.num_nodes is not None:
            if int(o.num_nodes) > nodes.count:
                raise LaunchError(
                    f"train: --num_nodes {o.num_nodes}, but hostfile '{nodes.hostfile}' lists only {nodes.count} node(s)"
                )
            nodes.count = int(o.num_nodes)
    elif o.num_nodes is not None:
        if not o.no_ssh:
            raise LaunchError(
                "train: --num_nodes needs --hostfile (several nodes over ssh) or --no_ssh (one node of several)"
            )
        nodes.count = int(o.num_nodes)
    nodes.over_ssh = not o.no_ssh and nodes.hostfile is not None and nodes.count > 1
    return nodes


def check_mode(o: argparse.Namespace, nodes: Nodes) -> None:
    """The options that go together: --no_ssh's, and the ssh launch's."""
    last = nodes.count - 1
    if o.no_ssh:
        if o.hostfile is None and o.num_nodes is None:
            raise LaunchError(
                "train: --no_ssh needs the nodes: --num_nodes K (K alike nodes) or --hostfile FILE (the same file "
                "on every node)"
            )
        if o.master_addr is None:
            raise LaunchError(
                "train: --no_ssh needs --master_addr, the address of node 0 that every node can reach"
            )
        if o.node_rank is None:
            raise LaunchError(f"train: --no_ssh needs --node_rank, this node's rank from 0 to {last}")
        if int(o.node_rank) > last:
            raise LaunchError(
                f"train: --node_rank {o.node_rank} is out of range: {nodes.count} node(s), so 0 to {last}"
            )
        if o.ssh_port is not None:
            raise LaunchError("train: --ssh_port means nothing with --no_ssh")
    elif o.node_rank is not None:
        raise LaunchError(
            "train: --node_rank goes with --no_ssh (over ssh DeepSpeed numbers the nodes itself)"
        )
    elif o.ssh_port is not None and o.hostfile is None:
        raise LaunchError("train: --ssh_port goes with --hostfile (several nodes over ssh)")


def rendezvous_port(o: argparse.Namespace, nodes: Nodes) -> str | None:
    """The rendezvous port. On one node, the first free one from DeepSpeed's default upward: a second job on the
    host would otherwise die on the first one's port (EADDRINUSE), and its other ranks could join the first job's
    rendezvous. Several nodes must agree on the port, so it is never changed there; a default in use on the node
    that hosts the rendezvous (node 0) is refused before anything starts, naming the way out."""
    if o.master_port is not None:
        return o.master_port
    if not o.no_ssh and not nodes.over_ssh:
        port = hosts.first_free_port(DEFAULT_MASTER_PORT)
        note(
            f"rendezvous port {port} (the first free one from {DEFAULT_MASTER_PORT}; --master_port PORT to choose)"
        )
        return str(port)
    if o.no_ssh:
        here = int(o.node_rank) == 0
    else:  # DeepSpeed's runner puts it on --master_addr, else on the hostfile's first host
        here = (o.master_addr or nodes.hosts[0]) in hosts.this_host_names()
    if here and hosts.port_in_use(DEFAULT_MASTER_PORT):
        raise LaunchError(
            f"train: port {DEFAULT_MASTER_PORT} (DeepSpeed's default rendezvous port) is in use on this node, by "
            "another job; give every node the same free --master_port PORT"
        )
    return None


def apply_env_options(o: argparse.Namespace, env: dict[str, str]) -> None:
    """--env's variables into ENV at once, so that they count for everything after (VQA_LOG_LEVEL, VQA_RUN_DIR,
    CUDA_VISIBLE_DEVICES, PATH) as exported variables do."""
    for assignment in o.env:
        name, _, value = assignment.partition("=")
        env[name] = value


def node_environment(o: argparse.Namespace, nodes: Nodes, env: dict[str, str]) -> list[str]:
    """Adds the defaults to ENV; the NAME=VALUE lines every node's processes get."""
    names = [assignment.partition("=")[0] for assignment in o.env]
    for name, value in node_env.NODE_ENV_DEFAULTS.items():
        env[name] = env.get(name) or value
    lines = node_env.node_env_lines(env, names)
    unsafe = node_env.unsafe_over_ssh(lines) if nodes.over_ssh else None
    if unsafe:
        raise LaunchError(
            f"train: cannot pass {unsafe} to the other nodes over ssh: its value holds a quote, $, ` or backslash"
        )
    return lines


def has_option(option: str, args: Sequence[str]) -> bool:
    """Does ARGS hold OPTION, as `OPTION VALUE` or `OPTION=VALUE`?"""
    return any(arg == option or arg.startswith(f"{option}=") for arg in args)


def trainer_defaults(trainer_args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """VQA_TRAIN_DATA, VQA_VAL_DATA and VQA_RUN_DIR as the trainer's options, unless TRAINER_ARGS give them."""
    defaults = []
    for name, option in (
        ("VQA_TRAIN_DATA", "--train-data"),
        ("VQA_VAL_DATA", "--val-data"),
        ("VQA_RUN_DIR", "--run-dir"),
    ):
        if env.get(name) and not has_option(option, trainer_args):
            defaults += [option, env[name]]
    return defaults


def slots_here(o: argparse.Namespace, ctx: Context) -> tuple[int, int]:
    """(this node's GPU count, the processes to start on it): --num_gpus, else one per GPU, else one CPU process."""
    gpus = hosts.local_gpu_count(ctx.env.get("PATH"))
    if o.num_gpus is not None:
        return gpus, int(o.num_gpus)
    if gpus > 0:
        return gpus, gpus
    note("no GPU found (nvidia-smi): launching one CPU process (--num_gpus 1)")
    # Told, DeepSpeed does not warn in every process that it could not detect an accelerator.
    ctx.env["DS_ACCELERATOR"] = ctx.env.get("DS_ACCELERATOR") or "cpu"
    return 0, 1


def launcher_options(o: argparse.Namespace, nodes: Nodes, port: str | None, ctx: Context) -> list[str]:
    """DeepSpeed's launcher options: which nodes and GPUs, the rendezvous, ssh."""
    options = []
    if nodes.hostfile is not None:
        options += ["--hostfile", nodes.hostfile]
        options += ["--num_nodes", o.num_nodes] if o.num_nodes is not None else []
        options += ["--num_gpus", o.num_gpus] if o.num_gpus is not None else []
    else:
        gpus, slots = slots_here(o, ctx)
        if o.no_ssh:
            # DeepSpeed needs the list of nodes even when it launches only this one: K alike nodes.
            hostfile = f"{ctx.make_launch_dir()}/hostfile"
            ctx.write_lines(hostfile, [f"node-{i} slots={slots}" for i in range(nodes.count)])
            options += ["--hostfile", hostfile]
        elif o.num_gpus is None and gpus > 0 and ctx.env.get("CUDA_VISIBLE_DEVICES"):
            note(
                f"CUDA_VISIBLE_DEVICES={ctx.env['CUDA_VISIBLE_DEVICES']}: DeepSpeed launches one process per GPU listed there"
            )
        else:
            options += ["--num_gpus", str(slots)]
    options += ["--no_ssh", "--node_rank", o.node_rank] if o.no_ssh else []
    for option, value in (
        ("--master_addr", o.master_addr),
        ("--master_port", port),
        ("--ssh_port", o.ssh_port),
    ):
        options += [option, value] if value is not None else []
    return options


def train(args: Sequence[str], ctx: Context) -> int:
    """`./launch.sh train ARGS`: checks everything first, then runs (or prints) DeepSpeed's launcher."""
    launch_args, trainer_args = split_launch_args(args, "train", (*VALUED, "--env"), FLAGS)
    if ctx.check_only and any(arg in FLAGS[2:] for arg in launch_args):
        return 0  # the help, once set up
    o = train_parser().parse_args(launch_args)
    check_values(o)
    apply_env_options(o, ctx.env)
    nodes = count_nodes(o, ctx.caller_dir)
    check_mode(o, nodes)
    if nodes.over_ssh and not ctx.dry_run and not shutil.which("pdsh", path=ctx.env.get("PATH")):
        raise LaunchError(
            "train: several nodes over ssh need pdsh, DeepSpeed's launcher (apt-get install pdsh), or run --no_ssh "
            "on every node"
        )
    level = node_env.ds_log_level(ctx.env)
    if ctx.check_only:
        return 0
    port = rendezvous_port(o, nodes)
    env_lines = node_environment(o, nodes, ctx.env)
    ctx.run(["cd", str(ctx.root)])
    for line in env_lines:
        ctx.run(["export", line])
    try:
        command = [f"{ctx.venv}/bin/deepspeed", "--log_level", level, *launcher_options(o, nodes, port, ctx)]
        if nodes.over_ssh:
            launch_dir = ctx.make_launch_dir()
            env_file = f"{launch_dir}/deepspeed_env"
            ctx.write_lines(env_file, node_env.user_deepspeed_env_lines(ctx.env, ctx.root) + env_lines)
            ctx.run(["export", f"DS_ENV_FILE={env_file}"])
            ctx.env["DS_ENV_FILE"] = env_file
        # The preflight runs as a module (as `python -m`), from the repository root like the trainer.
        program = ["--module", "trainer.tools.preflight"] if o.preflight else ["trainer/main.py"]
        trainer_argv = [*trainer_defaults(trainer_args, ctx.env), *trainer_args]
        command += [*program, *trainer_argv]
        if ctx.dry_run:
            print(shlex.join(command), flush=True)
            return 0
        runner = relay.Relay("runner" if nodes.over_ssh else "launcher")
        status = runner.run(command, ctx.env)
        if runner.stop_signal and not o.preflight:
            run_dir = relay.trainer_run_dir(trainer_argv, ctx.env)
            note(relay.stopped_note(runner.stop_signal, run_dir, args, ctx.root))
        return status
    finally:
        ctx.remove_launch_dirs()


COMMANDS = {"train": train, "tensorboard": tensorboard}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    parser.add_argument("--root", type=Path, required=True, help="the repository root (launch.sh's folder)")
    parser.add_argument("--venv", type=Path, required=True, help="the virtual environment")
    parser.add_argument("--caller-dir", type=Path, required=True, help="the folder launch.sh was called from")
    parser.add_argument(
        "--check", action="store_true", help="check the arguments only, silent unless one is wrong"
    )
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER)
    o = parser.parse_args(argv)
    ctx = Context(o.root, o.venv, o.caller_dir, dry_run=o.dry_run, check_only=o.check)
    try:
        return COMMANDS[o.command](o.args, ctx)
    except LaunchError as error:
        print(f"launch.sh: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the relay's handlers are in place: no traceback, as after them
        note("SIGINT before the launch: not launching")
        return 130
