"""The nodes and this host as the launch sees them: a DeepSpeed hostfile read and checked, the local GPU count,
whether a name is this host, and the first free rendezvous port."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

from common.errors import BadInputError

DEFAULT_MASTER_PORT = 29500
# DeepSpeed reads "HOST slots=N" and ignores the rest of the line (a trailing comment, say).
_HOSTFILE_LINE = re.compile(r"(\S+)\s+slots=([0-9]+)(\s|$)")


class LaunchError(BadInputError):
    """A launch refused before anything starts (exit status 2); the message names the option or file at fault."""


def read_hostfile(shown: str, caller_dir: Path) -> list[tuple[str, int]]:
    """The (host, slots) lines of the hostfile named SHOWN (relative to CALLER_DIR), refusing what DeepSpeed would
    refuse or misread: a missing file, a line that is not "HOST slots=N", a host listed twice, no host at all."""
    path = caller_dir / shown
    if not path.exists():
        raise LaunchError(f"train: hostfile '{shown}' does not exist")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise LaunchError(f"train: hostfile '{shown}' is not a readable file")
    hosts: list[tuple[str, int]] = []
    lines = path.read_text(errors="replace").split("\n")
    for n, line in enumerate(lines, start=1):
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        match = _HOSTFILE_LINE.match(line)
        if not match:
            raise LaunchError(
                f"train: hostfile '{shown}' line {n}: expected 'HOST slots=N' (e.g. 'worker-0 slots=8'), got '{line}'"
            )
        host, slots = match[1], int(match[2])
        if host in (h for h, _ in hosts):
            raise LaunchError(f"train: hostfile '{shown}' lists {host} twice")
        if slots < 1:
            raise LaunchError(f"train: hostfile '{shown}' line {n}: slots must be at least 1")
        hosts.append((host, slots))
    if not hosts:
        raise LaunchError(
            f"train: hostfile '{shown}' lists no node: it needs one 'HOST slots=N' line per node "
            "(e.g. 'worker-0 slots=8')"
        )
    return hosts


def absolute(shown: str, caller_dir: Path) -> str:
    """SHOWN as an absolute path, `..` taken as the shell's `cd` takes it: DeepSpeed runs from the repository root
    (and takes a hostfile it cannot find for "no hostfile": one node, silently)."""
    return os.path.normpath(os.path.join(caller_dir, shown))


def local_gpu_count(path: str | None, dev: Path = Path("/dev")) -> int:
    """GPUs of the host it runs on: nvidia-smi's list (nvidia-smi found on PATH), else the /dev/nvidiaN device files
    (a container given GPUs but not the driver's utilities sees only its own); 0 where neither shows one."""
    smi = shutil.which("nvidia-smi", path=path)
    if smi:
        try:
            listed = subprocess.run([smi, "--list-gpus"], capture_output=True, text=True, check=False).stdout
        except OSError:
            return 0
        return sum(line.startswith("GPU ") for line in listed.splitlines())
    return len([p for p in dev.glob("nvidia[0-9]*")])


def port_in_use(port: int) -> bool:
    """True when something on this host accepts connections on PORT: another job's rendezvous (torch's TCPStore
    listens on every address, loopback included)."""
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def first_free_port(start: int = DEFAULT_MASTER_PORT) -> int:
    """The first port from START upward that nothing on this host listens on."""
    for port in range(start, 65536):
        if not port_in_use(port):
            return port
    raise LaunchError(f"train: no free port from {start} to 65535 on this host; give --master_port PORT")


def this_host_names() -> set[str]:
    """The names and addresses of this host: localhost, its hostname (long and short) and `hostname -I`."""
    name = socket.gethostname()
    names = {"localhost", "127.0.0.1", name, name.split(".")[0]}
    try:
        addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout
    except OSError:
        addresses = ""
    return names | set(addresses.split())
