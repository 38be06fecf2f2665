"""The launcher run in a session of its own, SIGTERM and SIGINT passed on to every rank, and the last line of a run
that a signal stopped.

DeepSpeed's runner has no SIGTERM handler when it starts this node's processes itself (one node, or --no_ssh): it
would die and leave the ranks running, untold. And its per-node launcher (deepspeed.launcher.launch) passes a SIGTERM
on to the ranks one at a time, waiting for each to exit (30 s, then SIGKILL) before telling the next, which
deadlocks a checkpoint that needs every rank. So the signal goes to every rank of this node at once and the launch
waits for them; the launcher sees them exit with their own status. Over ssh (target "runner") the runner's own
handler stops pdsh and the remote launchers. The launcher runs in a session of its own, so that Ctrl-C at a
terminal reaches this process alone, which passes it on as it does SIGTERM: DeepSpeed's runner would otherwise print
a KeyboardInterrupt traceback and its launcher start killing the ranks' process trees while they save.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

RELAYED = (signal.SIGTERM, signal.SIGINT)


def note(text: str) -> None:
    print(f"launch.sh: {text}", file=sys.stderr, flush=True)


def children(parents: Sequence[int], proc: Path = Path("/proc")) -> list[int]:
    """The pids whose parent is one of PARENTS, from /proc/PID/stat (its fourth field, after the command name in
    parentheses, which may itself hold spaces and parentheses)."""
    wanted, found = set(parents), []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[1]) in wanted:
            found.append(int(stat.parent.name))
    return sorted(found)


def _kill(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Relay:
    """Runs the launcher and waits for it, passing SIGTERM and SIGINT on (see the module's docstring). TARGET is
    "launcher" when this node's processes are children of the launched command, "runner" over ssh."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.pid: int | None = None
        self.stop_signal: str | None = None  # "SIGTERM" or "SIGINT", once one was passed on

    def on_signal(self, signum: int, _frame: object) -> None:
        """Every rank (the per-node launcher's children) at once; before the ranks exist, the launcher; before that,
        the runner. A second Ctrl-C is passed on too: the ranks then stop at once."""
        name = signal.Signals(signum).name
        if self.pid is None:
            note(f"{name} before the launch: not launching")
            raise SystemExit(128 + signum)
        self.stop_signal = name
        if self.target == "runner":
            note(f"{name}: passing it to DeepSpeed's runner, which stops the processes of every node")
            _kill([self.pid], signum)
            return
        launchers = children([self.pid])
        ranks = children(launchers) if launchers else []
        if ranks:
            pids = " ".join(map(str, ranks))
            note(
                f"{name}: passing it to every rank on this node (pids {pids}) and waiting for them to save a checkpoint"
            )
            _kill(ranks, signum)
        elif launchers:
            note(f"{name} before the ranks started: stopping DeepSpeed's launcher")
            _kill(launchers, signal.SIGTERM)
        else:
            _kill([self.pid], signal.SIGTERM)

    def run(self, command: Sequence[str], env: Mapping[str, str]) -> int:
        """COMMAND's exit status (128 + N when signal N ended it, as a shell reports it)."""
        previous = {sig: signal.signal(sig, self.on_signal) for sig in RELAYED}
        try:
            # Its own session: a terminal's Ctrl-C reaches this process only. The handlers above are reset to the
            # default in the child by exec; waiting resumes after a handler ran (PEP 475).
            process = subprocess.Popen(list(command), env=dict(env), start_new_session=True)
            self.pid = process.pid
            status = process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 128 - status if status < 0 else status


def trainer_run_dir(trainer_args: Sequence[str], env: Mapping[str, str]) -> str:
    """The trainer's run folder for TRAINER_ARGS: --run-dir, else $VQA_RUN_DIR, else the trainer's default."""
    for i, arg in enumerate(trainer_args):
        if arg == "--run-dir" and i + 1 < len(trainer_args):
            return trainer_args[i + 1]
        if arg.startswith("--run-dir="):
            return arg.removeprefix("--run-dir=")
    return env.get("VQA_RUN_DIR") or "runs/latest"


def continue_args(given: Sequence[str]) -> list[str]:
    """launch.sh's train arguments as given, their --resume (if any) replaced by --resume auto."""
    again: list[str] = []
    skip = False
    for arg in given:
        if skip:
            skip = False
            if not arg.startswith("-"):
                continue
        if arg == "--resume":
            skip = True
            continue
        if arg.startswith("--resume="):
            continue
        again.append(arg)
    return [*again, "--resume", "auto"]


def stopped_note(signal_name: str, run_dir: str, given: Sequence[str], root: Path) -> str:
    """The last line of a training run that a signal stopped: the checkpoint the ranks saved (the run folder's
    `latest` pointer, rewritten once a checkpoint is complete) and the command that continues the run."""
    folder = Path(run_dir) if run_dir.startswith("/") else root / run_dir
    latest = folder / "checkpoints" / "latest"
    tag = latest.read_text().rstrip("\n") if latest.is_file() else ""
    command = shlex.join(["./launch.sh", "train", *continue_args(given)])
    if tag:
        return f"stopped by {signal_name}: checkpoint {tag} saved in {folder}/checkpoints; continue with: {command}"
    return f"stopped by {signal_name} with no complete checkpoint in {folder}/checkpoints; start again with: {command}"
