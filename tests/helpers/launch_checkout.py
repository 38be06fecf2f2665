"""A copy of launch.sh in a temporary folder with a fake, already set-up virtual environment and a fake
nvidia-smi, run in an environment built from scratch: what tests/test_launch.py and the launch faults of
tests/test_faults_runtime.py run launch.sh in, so that neither the host's GPUs and variables nor the
repository's .venv change what it does. The checkout holds the repository's launcher package (trainer/launch,
which `train` and `tensorboard` hand over to) and the fake interpreter runs it with the real one."""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The environment running the tests (.venv here, /opt/venv in the Docker image), whose DeepSpeed the slow tests use.
REAL_VENV = Path(sys.executable).parent.parent


@dataclass
class Checkout:
    root: Path
    venv: Path
    bin: Path
    tmp: Path
    home: Path

    @property
    def deepspeed(self) -> str:
        return f"{self.venv}/bin/deepspeed --log_level warning"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "TMPDIR": str(self.tmp),
            "VQA_VENV": str(self.venv),
            "LC_ALL": "C",
            **extra,
        }

    def launch(self, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.root / "launch.sh"), *args],
            env=self.env(**extra_env),
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def dry(self, *args: str, **extra_env: str) -> list[list[str]]:
        """The commands `./launch.sh --dry-run ARGS` prints, each split into words as the shell would (the
        quoting of bash's printf %q and Python's shlex differ, the words do not); fails on a non-zero exit."""
        return self.dry_and_port(*args, **extra_env)[0]

    def dry_and_port(self, *args: str, **extra_env: str) -> tuple[list[list[str]], int | None]:
        """`dry`, with the rendezvous port that launch.sh chose for a one-node launch taken out of the commands (it
        depends on what listens on this host) and returned beside them; None where it chose none."""
        result = self.launch("--dry-run", *args, **extra_env)
        assert result.returncode == 0, result.stderr
        lines = [shlex.split(line) for line in result.stdout.splitlines()]
        chosen = re.findall(r"^launch\.sh: rendezvous port (\d+) \(the first free one", result.stderr, re.M)
        if not chosen:
            return lines, None
        assert len(chosen) == 1, result.stderr
        launch = lines[-1]
        i = launch.index("--master_port")
        assert launch[i + 1] == chosen[0], (launch, result.stderr)
        return [*lines[:-1], launch[:i] + launch[i + 2 :]], int(chosen[0])

    def gpus(self, count: int) -> None:
        """Make nvidia-smi list COUNT GPUs (0: none)."""
        lines = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})"\n' for i in range(count))
        write_executable(self.bin / "nvidia-smi", f"#!/bin/sh\n{lines}exit 0\n")

    def hostfile(self, text: str, name: str = "hostfile") -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def stamp_for(launch_sh: Path) -> str:
    """The set-up stamp launch.sh itself computes for its checkout (sourcing it does not run main)."""
    result = subprocess.run(
        ["bash", "-c", 'source "$1" && setup_stamp', "_", str(launch_sh)],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


# The set-up interpreter's stand-in: launch.sh's own launcher runs for real, anything else does nothing.
FAKE_PYTHON = f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "trainer.launch" ]; then exec {sys.executable} "$@"; fi
exit 0
"""


def make_checkout(tmp_path: Path) -> Checkout:
    root, venv, bin_dir, tmp, home = (tmp_path / n for n in ("repo", "venv", "bin", "tmp", "home"))
    for d in (root / "trainer", root / "common", venv / "bin", bin_dir, tmp, home):
        d.mkdir(parents=True)
    shutil.copy2(REPO / "launch.sh", root / "launch.sh")
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copy2(REPO / "requirements.lock", root / "requirements.lock")
    # The launcher package and what it imports (the standard library besides), nothing of the trainer.
    for package in ("trainer", "common"):
        (root / package / "__init__.py").write_text("")
    (root / "trainer" / "launch").symlink_to(REPO / "trainer" / "launch")
    (root / "common" / "errors.py").symlink_to(REPO / "common" / "errors.py")
    write_executable(venv / "bin" / "python", FAKE_PYTHON)
    for name in ("deepspeed", "tensorboard", "ruff"):
        write_executable(venv / "bin" / name, "#!/bin/sh\nexit 0\n")
    (venv / ".setup-stamp").write_text(stamp_for(root / "launch.sh"))
    c = Checkout(root, venv, bin_dir, tmp, home)
    c.gpus(0)
    return c


def with_real_trainer(checkout: Checkout) -> Checkout:
    """The checkout with the repository's trainer, data pipeline, common package and DeepSpeed configs, and a venv whose `deepspeed`
    is the real launcher (its script runs the interpreter it was installed with)."""
    deepspeed = REAL_VENV / "bin" / "deepspeed"
    # pyproject.toml pins deepspeed, which installs its launcher beside the interpreter: missing, the set-up is broken.
    assert deepspeed.exists(), f"no DeepSpeed launcher in {REAL_VENV}/bin: run ./launch.sh setup"
    (checkout.venv / "bin" / "deepspeed").unlink()
    (checkout.venv / "bin" / "deepspeed").symlink_to(deepspeed)
    return link_repository(checkout)


def link_repository(checkout: Checkout) -> Checkout:
    """The checkout's trainer, data pipeline, common package and DeepSpeed configs: the repository's own (links)."""
    for name in ("trainer", "data_pipeline", "common", "deepspeed_configs"):
        if (checkout.root / name).is_dir() and not (checkout.root / name).is_symlink():
            shutil.rmtree(checkout.root / name)  # the launcher's part alone, which make_checkout put there
        (checkout.root / name).symlink_to(REPO / name)
    return checkout


def accepts(port: int) -> bool:
    """Whether something on this host listens on `port`, as launch.sh probes it (a connection to loopback)."""
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def busy(*ports: int) -> Iterator[None]:
    """Listen on `ports` meanwhile, as another job's rendezvous would (a port someone else already listens on is
    busy anyway)."""
    with contextlib.ExitStack() as stack:
        for port in ports:
            s = stack.enter_context(socket.socket())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
                s.listen()
            except OSError:
                if not accepts(port):
                    pytest.skip(f"port {port} can neither be listened on nor is listened on here")
        yield
