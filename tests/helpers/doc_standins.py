"""Stand-ins for the programs the documented commands call that a test machine lacks or must not run for real:
docker (and docker compose), Slurm's sbatch, srun and scontrol, kubectl, DeepSpeed's launcher, nvidia-smi, and the
virtual environment's python, tensorboard and ruff. tests/test_docs_commands.py puts them on the PATH and in a
checkout's .venv, then runs the commands of README.md and docs/cluster.md as the docs write them.

Every call is appended as one JSON line to $STANDIN_LOG: the program, its arguments, its folder and its environment,
plus what the program would read (the hostfile and DS_ENV_FILE given to deepspeed, the manifest piped to kubectl).
A recording stand-in exits with the status $STANDIN_EXIT maps its name to (JSON; default 0). The others run what the
real program would run, on this host:

- docker run IMAGE ARGS / docker compose run SERVICE ARGS: the image's entry point (the checkout's launch.sh, which
  stands for /workspace/launch.sh; or the program --entrypoint names, found in the image's PATH, the checkout's
  .venv/bin first) with the image's ENV (read from docker/Dockerfile), the -e / compose environment, and every
  argument and variable that names a path inside a mounted volume translated to the host folder mounted there.
  Named compose volumes are folders under $STANDIN_VOLUMES. Options docker does not know are refused (exit 125).
  docker build checks its Dockerfile and context; docker push needs the tag that docker tag made.
- sbatch FILE: checks the script with `bash -n`, then runs it at once as the job's batch step on the first node
  (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_NTASKS_PER_NODE from its #SBATCH lines; a job array's
  tasks one after another, each with SLURM_ARRAY_JOB_ID and SLURM_ARRAY_TASK_ID), and records its exit status
  (an array's highest); prints "Submitted batch job N" as sbatch does.
- srun [OPTIONS] COMMAND: runs COMMAND once per task (nodes x tasks per node), one after another, each with the
  SLURM_NODEID, SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS Slurm gives it; exits with the highest status.
- scontrol show hostnames: the hosts of $STANDIN_SLURM_HOSTS, one a line; scontrol requeue: recorded.
- python: recorded; `-m MODULE` for a module named in $STANDIN_RUN (comma-separated; "-c" for `python -c`) is then
  run by the real interpreter, with the repository under test first on the path. `-m trainer.launch`, launch.sh's
  own launcher, is not recorded and always runs.
- nvidia-smi --list-gpus: $STANDIN_GPUS GPUs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Refusal(Exception):
    """What the real program would refuse, with its exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def record(prog: str, argv: list[str], **extra: object) -> None:
    entry = {"prog": prog, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), **extra}
    with open(os.environ["STANDIN_LOG"], "a") as log:
        log.write(json.dumps(entry) + "\n")


def exit_status(prog: str) -> int:
    return int(json.loads(os.environ.get("STANDIN_EXIT") or "{}").get(prog, 0))


def _read(path: str | None) -> str | None:
    return Path(path).read_text() if path and Path(path).is_file() else None


# -- docker --------------------------------------------------------------------------------------------------------

RUN_VALUE_OPTIONS = {
    "--gpus", "--network", "--shm-size", "--ulimit", "--stop-timeout", "-e", "--env", "-v", "--volume",
    "--entrypoint", "--device", "--cap-add", "--name", "--user", "-u", "-w", "--workdir", "--ipc",
}  # fmt: skip
RUN_FLAGS = {"--rm", "--init", "-d", "--detach", "-i", "-t", "-it", "--privileged"}
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-)?([^}]*)\}")


def parse_options(
    argv: list[str], values: set[str], flags: set[str], what: str
) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Leading options of ARGV as (name, value) pairs, and the rest; an unknown option is refused."""
    options: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name, eq, value = argv[i].partition("=")
        if name in flags and not eq:
            options.append((name, None))
            i += 1
        elif name in values and eq:
            options.append((name, value))
            i += 1
        elif name in values and i + 1 < len(argv):
            options.append((name, argv[i + 1]))
            i += 2
        else:
            raise Refusal(f"unknown flag: {argv[i]}\nSee '{what} --help'.", 125)
    return options, argv[i:]


def image_env(root: Path) -> dict[str, str]:
    """The ENV of docker/Dockerfile's last stage (PATH left out: the stand-in's own comes first)."""
    text = re.sub(r"\\\n", " ", (root / "docker" / "Dockerfile").read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword == "FROM":
            env = {}
        elif keyword == "ENV":
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                if name != "PATH":
                    env[name] = value
    return env


def run_image(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    mounts: dict[str, str] | None = None,
    entrypoint: str | None = None,
    base_env: dict[str, str] | None = None,
) -> int:
    """ARGS run by the image's entry point on this host: paths inside MOUNTS (container path → host folder) and the
    image's own folders translated, ENV on top of the image's, on top of BASE_ENV (default: this process's, which
    names the checkout in STANDIN_ROOT); the exit status."""
    base = dict(os.environ if base_env is None else base_env)
    root = Path(base["STANDIN_ROOT"])
    table = {"/workspace": str(root), "/opt/venv": str(root / ".venv"), **(mounts or {})}
    ordered = sorted(table.items(), key=lambda item: -len(item[0]))

    def host(value: str) -> str:
        for target, source in ordered:
            if value == target or value.startswith(target + "/"):
                return source + value[len(target) :]
        return value

    run_env = base
    run_env.update({k: host(v) for k, v in image_env(root).items()})
    run_env.update({k: host(v) for k, v in (env or {}).items()})
    run_env["PATH"] = f"{root / '.venv' / 'bin'}:{run_env['PATH']}"
    if entrypoint is None:
        program = str(root / "launch.sh")
    elif "/" in entrypoint:
        program = host(entrypoint)
    else:
        found = shutil.which(entrypoint, path=run_env["PATH"])
        if found is None:
            raise Refusal(f'exec: "{entrypoint}": executable file not found in $PATH', 127)
        program = found
    return subprocess.run([program, *map(host, args)], env=run_env, cwd=root).returncode


def _bind(source: str, target: str) -> str:
    """A host folder for a mount's source: an absolute path, else a named volume (a folder of the stand-in)."""
    if not source.startswith("/"):
        source = str(Path(os.environ["STANDIN_VOLUMES"]) / source)
    Path(source).mkdir(parents=True, exist_ok=True)  # docker creates a missing bind-mount source
    return source


def docker_run(argv: list[str]) -> int:
    options, rest = parse_options(argv, RUN_VALUE_OPTIONS, RUN_FLAGS, "docker run")
    if not rest:
        raise Refusal('"docker run" requires at least 1 argument.', 125)
    image, args = rest[0], rest[1:]
    env, mounts, entrypoint = {}, {}, None
    for name, value in options:
        assert value is not None or name in RUN_FLAGS
        if name in ("-e", "--env"):
            key, eq, val = value.partition("=")
            if eq:
                env[key] = val
            elif key in os.environ:
                env[key] = os.environ[key]
        elif name in ("-v", "--volume"):
            source, target, *_mode = value.split(":")
            mounts[target] = _bind(source, target)
        elif name == "--entrypoint":
            entrypoint = value
    record("docker", ["run", *argv], image=image, options=options, mounts=mounts)
    return run_image(args, env=env, mounts=mounts, entrypoint=entrypoint)


def interpolate(value: object, env: dict[str, str]) -> object:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME-default}, over a parsed document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):

        def substitute(m: re.Match[str]) -> str:
            name, op, default = m.groups()
            if op == ":-":
                return env.get(name) or default
            if op == "-":
                return env.get(name, default)
            return env.get(name, "")

        return _VARIABLE.sub(substitute, value)
    return value


def compose_services(files: list[str]) -> dict[str, dict]:
    """The services of several compose files as `docker compose -f A -f B` merges them: mappings key by key,
    sequences appended (environment lists by variable name)."""
    import yaml

    services: dict[str, dict] = {}
    for file in files:
        document = interpolate(yaml.safe_load(Path(file).read_text()), dict(os.environ))
        for name, service in document["services"].items():
            merge_service(services.setdefault(name, {}), service)
    return services


def merge_service(merged: dict, service: dict) -> None:
    """One compose file's definition of a service merged into `merged` as `docker compose -f A -f B` does: mappings
    key by key, sequences appended without repeats, anything else replaced."""
    for key, value in service.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = merged[key] + [v for v in value if v not in merged[key]]
        else:
            merged[key] = value


def service_env(service: dict) -> dict[str, str]:
    """A service's environment: NAME=VALUE as given, a bare NAME passed on where it is set."""
    entries = service.get("environment") or []
    if isinstance(entries, dict):
        entries = [f"{k}={v}" if v is not None else k for k, v in entries.items()]
    env = {}
    for entry in entries:
        name, eq, value = entry.partition("=")
        if eq:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
    return env


def service_mounts(service: dict) -> dict[str, str]:
    mounts = {}
    for entry in service.get("volumes") or []:
        source, target, *_mode = entry.split(":")
        mounts[target] = _bind(source, target)
    return mounts


def docker_compose(argv: list[str]) -> int:
    files: list[str] = []
    rest = list(argv)
    while rest and rest[0] in ("-f", "--file"):
        files.append(rest[1])
        rest = rest[2:]
    if not files or not rest:
        raise Refusal("the stand-in takes `docker compose -f FILE [-f FILE] run|up ...`", 125)
    for file in files:
        if not Path(file).is_file():
            raise Refusal(f"open {Path(file).resolve()}: no such file or directory", 14)
    services = compose_services(files)
    command, rest = rest[0], rest[1:]
    if command == "run":
        options, rest = parse_options(rest, {"--entrypoint", "-e"}, {"--rm"}, "docker compose run")
        if not rest or rest[0] not in services:
            raise Refusal(f"no such service: {rest[0] if rest else ''}", 1)
        service = services[rest[0]]
        env = service_env(service)
        env.update(dict(v.partition("=")[::2] for n, v in options if n == "-e" and v))
        entrypoint = next((v for n, v in options if n == "--entrypoint"), service.get("entrypoint"))
        args = rest[1:] or service["command"]
        mounts = service_mounts(service)
        record("docker", ["compose", *argv], service=rest[0], definition=service, mounts=mounts)
        return run_image(args, env=env, mounts=mounts, entrypoint=entrypoint)
    if command == "up":
        options, names = parse_options(rest, set(), {"-d", "--detach"}, "docker compose up")
        status = 0
        for name in names:
            if name not in services:
                raise Refusal(f"no such service: {name}", 1)
            service = services[name]
            mounts = service_mounts(service)
            record("docker", ["compose", *argv], service=name, definition=service, mounts=mounts)
            env = service_env(service)
            status = max(status, run_image(service["command"], env=env, mounts=mounts))
        return status
    raise Refusal(f"the stand-in has no `docker compose {command}`", 125)


def docker(argv: list[str]) -> int:
    if not argv:
        raise Refusal("Usage:  docker [OPTIONS] COMMAND", 125)
    command, rest = argv[0], argv[1:]
    if command == "run":
        return docker_run(rest)
    if command == "compose":
        return docker_compose(rest)
    if command == "build":
        options, context = parse_options(
            rest, {"-f", "--file", "-t", "--tag", "--build-arg"}, set(), "docker build"
        )
        dockerfile = next((v for n, v in options if n in ("-f", "--file")), "Dockerfile")
        if len(context) != 1 or not Path(context[0]).is_dir():
            raise Refusal('"docker build" requires exactly 1 argument: the build context folder', 125)
        if not Path(dockerfile).is_file():
            raise Refusal(f"failed to read dockerfile: open {dockerfile}: no such file or directory", 1)
        tags = [v for n, v in options if n in ("-t", "--tag")]
        record("docker", argv, tags=tags, context=str(Path(context[0]).resolve()))
        return 0
    images = {tag for call in calls() if call["prog"] == "docker" for tag in call.get("tags", [])}
    if command == "tag":
        if len(rest) != 2 or rest[0] not in images:
            raise Refusal(f"No such image: {rest[0] if rest else ''}", 1)
        record("docker", argv, tags=[rest[1]])
        return 0
    if command == "push":
        if len(rest) != 1 or rest[0] not in images:
            raise Refusal(f"An image does not exist locally with the tag: {rest[0] if rest else ''}", 1)
        record("docker", argv)
        return 0
    raise Refusal(f"the stand-in has no `docker {command}`", 125)


def calls() -> list[dict]:
    path = Path(os.environ["STANDIN_LOG"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- Slurm ---------------------------------------------------------------------------------------------------------


def sbatch_options(script: str) -> dict[str, str]:
    """The #SBATCH lines before the first command: --name=value (or --name: "") as Slurm reads them."""
    options = {}
    for line in script.splitlines()[1:]:
        if not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            name, _, value = line.split(None, 1)[1].partition("=")
            options[name] = value
    return options


def sbatch(argv: list[str]) -> int:
    if len(argv) != 1:
        raise Refusal("the stand-in takes `sbatch SCRIPT`", 1)
    script = Path(argv[0])
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    if checked.returncode != 0:
        raise Refusal(f"sbatch: error: {script}: {checked.stderr.strip()}", 1)
    options = sbatch_options(script.read_text())
    job_id = os.environ.get("STANDIN_SLURM_JOB_ID", "4242")
    hosts = os.environ["STANDIN_SLURM_HOSTS"].split(",")
    env = {
        **os.environ,
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": options.get("--job-name", script.name),
        "SLURM_JOB_NODELIST": os.environ["STANDIN_SLURM_NODELIST"],
        "SLURM_NNODES": options.get("--nodes", "1"),
        "SLURM_NTASKS_PER_NODE": options.get("--ntasks-per-node", "1"),
        "SLURM_NODEID": "0",
        "SLURMD_NODENAME": hosts[0],
    }
    # A job array (--array=A-B or A,B,...): the script once per task, each with its SLURM_ARRAY_TASK_ID; the job's
    # status is the highest of its tasks'.
    status = 0
    for task in _array_tasks(options.get("--array")):
        task_env = (
            env if task is None else {**env, "SLURM_ARRAY_JOB_ID": job_id, "SLURM_ARRAY_TASK_ID": str(task)}
        )
        status = max(status, subprocess.run(["bash", str(script)], env=task_env).returncode)
    record("sbatch", argv, options=options, job_status=status)
    print(f"Submitted batch job {job_id}")
    return 0


def _array_tasks(spec: str | None) -> list[int | None]:
    if spec is None:
        return [None]
    tasks: list[int | None] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        tasks += range(int(first), int(last or first) + 1)
    return tasks


def srun(argv: list[str]) -> int:
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1
    command = argv[i:]
    record("srun", argv)
    hosts = os.environ["STANDIN_SLURM_HOSTS"].split(",")
    nodes, per_node = int(os.environ["SLURM_NNODES"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
    status = 0
    for node in range(nodes):
        for local in range(per_node):
            env = {
                **os.environ,
                "SLURM_NODEID": str(node),
                "SLURMD_NODENAME": hosts[node],
                "SLURM_PROCID": str(node * per_node + local),
                "SLURM_LOCALID": str(local),
                "SLURM_NTASKS": str(nodes * per_node),
                "SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"],
            }
            status = max(status, subprocess.run(command, env=env).returncode)
    return status


def scontrol(argv: list[str]) -> int:
    record("scontrol", argv)
    if argv[:2] == ["show", "hostnames"]:
        print("\n".join(os.environ["STANDIN_SLURM_HOSTS"].split(",")))
    return 0


# -- the rest ------------------------------------------------------------------------------------------------------


def python(argv: list[str]) -> int:
    # launch.sh's own launcher (train, tensorboard) always runs: the commands it runs are the ones recorded.
    launcher = argv[:2] == ["-m", "trainer.launch"]
    if not launcher:
        record("python", argv)
    allowed = set(filter(None, os.environ.get("STANDIN_RUN", "").split(",")))
    runs = (
        launcher
        or (argv[:1] == ["-c"] and "-c" in allowed)
        or (argv[:1] == ["-m"] and argv[1:2] and argv[1] in allowed)
    )
    if not runs:
        return exit_status("python")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run([sys.executable, *argv], env=env).returncode


def deepspeed(argv: list[str]) -> int:
    hostfile = argv[argv.index("--hostfile") + 1] if "--hostfile" in argv else None
    record("deepspeed", argv, hostfile=_read(hostfile), ds_env_file=_read(os.environ.get("DS_ENV_FILE")))
    return exit_status("deepspeed")


def kubectl(argv: list[str]) -> int:
    manifest = sys.stdin.read() if argv[:3] == ["apply", "-f", "-"] else None
    record("kubectl", argv, manifest=manifest)
    return exit_status("kubectl")


def nvidia_smi(argv: list[str]) -> int:
    record("nvidia-smi", argv)
    for i in range(int(os.environ.get("STANDIN_GPUS", "0"))):
        print(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})")
    return 0


PROGRAMS = {
    "docker": docker,
    "sbatch": sbatch,
    "srun": srun,
    "scontrol": scontrol,
    "python": python,
    "deepspeed": deepspeed,
    "kubectl": kubectl,
    "nvidia-smi": nvidia_smi,
}


def main(prog: str, argv: list[str]) -> int:
    try:
        if prog in PROGRAMS:
            return PROGRAMS[prog](argv)
        record(prog, argv)
        return exit_status(prog)
    except Refusal as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.status


def install(bin_dir: Path, *names: str) -> None:
    """Executables NAME in BIN_DIR that run this module's stand-in for NAME."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = bin_dir / name
        path.write_text(
            f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
            f"from tests.helpers.doc_standins import main\nsys.exit(main({name!r}, sys.argv[1:]))\n"
        )
        path.chmod(0o755)
