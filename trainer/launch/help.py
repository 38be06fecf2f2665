"""The help of `./launch.sh train` (its argparse parser) and of `./launch.sh tensorboard`."""

from __future__ import annotations

import argparse

USAGE = "./launch.sh train [LAUNCH OPTIONS] [--] [TRAINER ARGS...]"

DESCRIPTION = """\
Runs `deepspeed [LAUNCH OPTIONS] trainer/main.py [TRAINER ARGS]` from the repository root. Launch options come
first; the first other argument, or everything after `--`, goes to trainer/main.py unchanged
(./launch.sh train -- --help shows the trainer's options). Relative paths in TRAINER ARGS are taken from the
repository root, where trainer/main.py runs.

Three ways to run:
  one node (default): this node's GPUs (--num_gpus, --master_port);
  several nodes over ssh, started from node 0 (DeepSpeed's pdsh launcher, passwordless ssh to every node, the
  repository and .venv at the same path on every node): --hostfile, with --num_nodes, --num_gpus, --master_addr,
  --master_port, --ssh_port;
  one node of several without ssh (Kubernetes, Slurm, one container per node): run the same command on every
  node, each with its own --node_rank; each node starts only its own processes: --no_ssh, --node_rank,
  --master_addr (required), and --num_nodes or --hostfile."""

EPILOG = """\
Environment:
  Every node's processes get: every NCCL_* variable set here, with NCCL_DEBUG=WARN unless set;
  TORCH_NCCL_ASYNC_ERROR_HANDLING (default 1: a failed or hung collective aborts the job instead of hanging it);
  VQA_TRAIN_DATA, VQA_VAL_DATA, VQA_RUN_DIR, HF_HOME, HF_HUB_OFFLINE, TORCH_HOME, OMP_NUM_THREADS,
  VQA_LOG_LEVEL when set. VQA_LOG_LEVEL (debug, info, warning, error; default warning) is the threshold for other
  libraries' lines in the trainer and for DeepSpeed's launcher (its --log_level).
  Over ssh DeepSpeed exports them on the other nodes from a file named by DS_ENV_FILE (launch.sh writes it,
  after the lines of your own ~/.deepspeed_env and ./.deepspeed_env); without ssh each node exports its own.
  VQA_TRAIN_DATA, VQA_VAL_DATA, VQA_RUN_DIR also become --train-data, --val-data, --run-dir for
  trainer/main.py unless TRAINER ARGS give them.

SIGTERM (docker stop, Kubernetes, Slurm, cloud preemption) and Ctrl-C (SIGINT) go to every rank of this node at
once, and launch.sh waits for them to exit (the trainer checkpoints on either); over ssh, to DeepSpeed's runner,
which stops every node. A run stopped so ends with one line naming the saved checkpoint and the command that
continues it (exit status 130 for SIGINT, 143 for SIGTERM).

Examples:
  ./launch.sh train --preset tiny --train-data data/easy-vqa/train --val-data data/easy-vqa/test --run-dir runs/tiny
  ./launch.sh train --hostfile hostfile --master_addr 10.0.0.1 -- --preset vqa2-base --resume latest ...
  ./launch.sh train --no_ssh --num_nodes 2 --node_rank 1 --master_addr 10.0.0.1 -- --preset vqa2-base ...
  ./launch.sh train --preflight --hostfile hostfile -- --train-data /mnt/shards/train --run-dir /mnt/runs/r
"""

TENSORBOARD_HELP = """\
Usage: ./launch.sh tensorboard [--logdir DIR] [--host HOST] [--port PORT] [--] [TENSORBOARD ARGS...]

Serve TensorBoard for every run under DIR (default: $VQA_RUNS_DIR, else runs/ in the repository), which the
trainer fills from rank 0 (train/..., val/... tags).
  --logdir DIR   the folder of run folders
  --host HOST    address to listen on (default 127.0.0.1: the local host only; from elsewhere, tunnel with
                 ssh -L 6006:127.0.0.1:6006 NODE). Inside a container use 0.0.0.0 and let the published
                 port decide who can reach it (docker/compose.yaml publishes it on 127.0.0.1).
  --port PORT    default 6006
Other arguments go to tensorboard unchanged.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The texts as written, and "Usage:" as every other command of launch.sh says it."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=24, width=118)

    def add_usage(self, usage, actions, groups, prefix=None) -> None:  # noqa: ANN001 (argparse's signature)
        super().add_usage(usage, actions, groups, "Usage: " if prefix is None else prefix)


# The launch options by group: (name, argparse settings); the values stay strings, as given.
OPTIONS: dict[str, list[tuple[str, dict]]] = {
    "checking first": [
        (
            "--preflight",
            {
                "action": "store_true",
                "help": "run `python -m trainer.tools.preflight` on the same ranks instead of the trainer (deepspeed "
                "--module trainer.tools.preflight): every rank checks its GPU and memory, an all-reduce over the world "
                "(latency, bus bandwidth), reading samples of --train-data/--val-data, and writing to --run-dir; rank "
                "0 prints one table, and the exit status is 1 when a check fails. TRAINER ARGS stay as they are (the "
                "preflight ignores the ones it does not use), so adding --preflight to a training command checks "
                "that command's nodes and paths in seconds.",
            },
        ),
    ],
    "nodes and GPUs": [
        (
            "--num_gpus",
            {
                "metavar": "N",
                "help": "processes on this node (on each node: GPUs 0..N-1 instead of the hostfile's slots). "
                "Default: one per local GPU (nvidia-smi --list-gpus; with CUDA_VISIBLE_DEVICES set, DeepSpeed takes "
                "exactly the GPUs listed there); on a machine without a GPU, one CPU process (--num_gpus 1: "
                "DeepSpeed's CPU accelerator, gloo)",
            },
        ),
        (
            "--hostfile",
            {
                "metavar": "FILE",
                "help": 'one line per node: HOST slots=GPUS (e.g. "worker-0 slots=8"); # comments allowed. Over '
                "ssh, the nodes to start; with --no_ssh, the same hostfile on every node, its line order giving the "
                "node ranks",
            },
        ),
        (
            "--num_nodes",
            {
                "metavar": "K",
                "help": "use only the first K hosts of the hostfile; with --no_ssh and no hostfile, K nodes with the "
                "same number of GPUs (--num_gpus, or this node's GPU count)",
            },
        ),
    ],
    "rendezvous": [
        (
            "--master_addr",
            {
                "metavar": "ADDR",
                "help": "address of node 0 that every node can reach (over ssh, default: DeepSpeed asks node 0's "
                "`hostname -I` over ssh; required with --no_ssh)",
            },
        ),
        (
            "--master_port",
            {
                "metavar": "PORT",
                "help": "rendezvous port. One node: default the first free one from 29500 upward, so that several "
                "jobs can share the host (launch.sh says which). Several nodes: DeepSpeed's default 29500; every "
                "node must use the same, so launch.sh does not change it: with 29500 in use on node 0 it stops and "
                "says so",
            },
        ),
        ("--ssh_port", {"metavar": "PORT", "help": "ssh port of the nodes, if not 22"}),
    ],
    "without ssh": [
        ("--no_ssh", {"action": "store_true", "help": "one node of several, started on each node alike"}),
        (
            "--node_rank",
            {
                "metavar": "R",
                "help": "this node's rank, 0 <= R < number of nodes (node 0 hosts the rendezvous)",
            },
        ),
    ],
    "environment": [
        (
            "--env",
            {
                "metavar": "NAME=VALUE",
                "action": "append",
                "default": [],
                "help": "one more variable for the processes of every node (repeatable)",
            },
        ),
    ],
}


def train_parser() -> argparse.ArgumentParser:
    """The launch options of `./launch.sh train`, each value as given (cli.check_values checks them, with the
    project's one-line messages)."""
    parser = argparse.ArgumentParser(
        prog="./launch.sh train",
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_Formatter,
        allow_abbrev=False,
    )
    for title, options in OPTIONS.items():
        group = parser.add_argument_group(title)
        for name, settings in options:
            group.add_argument(name, **settings)
    return parser
