"""One job per run folder: an advisory lock that rank 0 of the training job holds for the job's lifetime.

Two jobs started in one `--run-dir` would overwrite each other's config and checkpoints and mix their TensorBoard
events, and a later `--resume latest` would silently continue one of them. The lock is `fcntl.flock` on
`<run_dir>/.lock`: the kernel releases it when the holding process ends, however it ends (kill -9, a node's OOM
killer, a preemption), so a dead job never leaves a lock that blocks the next start. The file itself stays and holds
the last holder's host, pid and start time, which the error of a second job names.

Only rank 0 takes the lock (the other ranks of a job share the folder with it); main.py broadcasts the outcome so
that every rank of a refused job exits the same way. `flock` works across hosts on local disks and on most network
file systems (NFSv4, Lustre with flock enabled); where a file system ignores it, the lock only guards one host.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from trainer.config.config import ConfigError

LOCK_FILE = ".lock"


class RunLockedError(ConfigError):
    """Another live process holds the run folder's lock (bad input: exit 2, nothing written)."""


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunLockedError naming the holder; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_NOFOLLOW: the holder's record is written into the lock file (truncated first); through a symbolic
            # link that would truncate whatever file the link names, possibly outside the run folder.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise ConfigError(
                f"--run-dir {self.path.parent}: {LOCK_FILE} is a symbolic link (to {os.readlink(self.path)}); the "
                f"trainer never writes through it: remove the link {self.path} and start again"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"--run-dir {self.path.parent} is in use by another run ({self.holder()}); wait for it to end, or "
                f"choose another --run-dir (the lock ends with that process)"
            ) from None
        # Ours now: record who holds it, for the message a second job prints.
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd

    def holder(self) -> str:
        """The recorded holder, as words (the file is written right after the lock is taken: it can be empty)."""
        try:
            if self.path.is_symlink():
                return "holder not recorded"
            info = json.loads(self.path.read_text() or "{}")
            return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder not recorded yet"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
