"""The Docker image and compose file, checked statically (no Docker engine here): hadolint and shellcheck clean,
the image installs exactly what pyproject.toml pins on a CUDA base that matches the pinned torch and DALI, and the
compose file gives the trainer its GPUs, shared memory, memlock and volumes, and TensorBoard a loopback-only port.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.helpers.doc_standins import interpolate, merge_service

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
BIN = Path(sys.executable).parent
# Folders that hold no project scripts: environments, caches, data and outputs.
NOT_SOURCE = {
    ".git",
    ".venv",
    "venv",
    "node_modules",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "data",
    "runs",
}
NOT_SOURCE |= {"checkpoints", "build"}


def load_pins():
    spec = importlib.util.spec_from_file_location("docker_pins", REPO / "docker" / "pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pins = load_pins()


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is missing from {BIN}: run ./launch.sh setup (it comes with the dev extra)")
    return str(path)


# --- linters ------------------------------------------------------------------------------------------------------


def test_hadolint_reports_nothing_on_the_dockerfile() -> None:
    result = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def shell_scripts() -> list[Path]:
    """Every shell script of the repository: *.sh, and files whose first line names sh or bash."""
    found = []
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if d not in NOT_SOURCE and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder) / name
            if name.endswith(".sh"):
                found.append(path)
                continue
            try:
                with path.open("rb") as f:
                    first = f.readline(200)
            except OSError:
                continue
            if re.match(rb"#!\s*(/usr/bin/env\s+)?(/bin/|/usr/bin/)?(ba)?sh\b", first):
                found.append(path)
    return sorted(found)


def test_shellcheck_reports_nothing_on_any_shell_script() -> None:
    scripts = shell_scripts()
    assert {REPO / "launch.sh", REPO / ".ci" / "run"} <= set(scripts)
    result = subprocess.run([tool("shellcheck"), *map(str, scripts)], capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# --- the image ----------------------------------------------------------------------------------------------------


def test_pins_prints_pyproject_requirements() -> None:
    dependencies = pyproject()["project"]["dependencies"]
    assert pins.pinned_requirements(REPO / "pyproject.toml") == dependencies
    assert pins.select(dependencies, ["Torch", "deepspeed"]) == [
        next(r for r in dependencies if r.startswith("torch==")),
        next(r for r in dependencies if r.startswith("deepspeed==")),
    ]
    with_dev = pins.pinned_requirements(REPO / "pyproject.toml", ["dev"])
    assert with_dev == dependencies + pyproject()["project"]["optional-dependencies"]["dev"]
    assert pins.build_requirements(REPO / "pyproject.toml") == pyproject()["build-system"]["requires"]


def test_pins_refuses_what_it_cannot_pin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loose = tmp_path / "pyproject.toml"
    loose.write_text('[project]\ndependencies = ["torch==2.14.1", "numpy>=2"]\n')
    with pytest.raises(pins.PinError, match="numpy>=2"):
        pins.pinned_requirements(loose)
    assert pins.main(["--pyproject", str(loose)]) == 2
    assert "without an exact '==' pin: numpy>=2" in capsys.readouterr().err
    assert pins.main(["no-such-package"]) == 2
    assert "does not list no-such-package" in capsys.readouterr().err
    assert pins.main(["--extra", "nope"]) == 2
    assert pins.main(["torch", "torchvision"]) == 0
    assert capsys.readouterr().out.split() == ["torch==2.14.1", "torchvision==0.29.1"]


def test_dockerfile_installs_from_pyproject_and_nowhere_else() -> None:
    runs = [args for keyword, args in final_stage() if keyword == "RUN"]
    copies = [args for keyword, args in final_stage() if keyword == "COPY"]
    assert any(re.search(r"\bpyproject\.toml /workspace/pyproject\.toml$", c) for c in copies)
    joined = "\n".join(runs)
    for stage in ("--build-system", "torch torchvision", "deepspeed", "--extra dev"):
        assert f"python docker/pins.py {stage} >" in joined, stage
    # The project itself through the same set-up users run, after the whole checkout is copied in.
    setup = next(i for i, r in enumerate(runs) if "./launch.sh setup" in r)
    checkout = next(i for i, (k, a) in enumerate(final_stage()) if k == "COPY" and a.endswith(". /workspace"))
    assert final_stage().index(("RUN", runs[setup])) > checkout
    # No second list: no package that pyproject.toml names appears pinned in the Dockerfile.
    text = DOCKERFILE.read_text().lower()
    project = pyproject()["project"]
    for requirement in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        name = pins.requirement_name(requirement)
        pattern = re.sub(r"-", "[-_.]", re.escape(name).replace(r"\-", "-"))
        assert not re.search(rf"\b{pattern}\s*(==|>=|<=|~=|!=)", text), f"{name} is pinned in the Dockerfile"


def test_cuda_base_matches_the_pinned_torch_and_dali() -> None:
    import torch

    froms = [args for keyword, args in final_stage() if keyword == "FROM"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-devel-ubuntu(\d+\.\d+)(\s+AS\s+\S+)?", froms[0])
    assert match, f"the final stage must start from a pinned nvidia/cuda X.Y.Z devel tag, not {froms[0]!r}"
    base = f"{match.group(1)}.{match.group(2)}"
    # The torch this suite runs is the pinned one, and its CUDA is the base image's.
    torch_pin = pins.select(pyproject()["project"]["dependencies"], ["torch"])[0].split("==")[1]
    assert importlib.metadata.version("torch").split("+")[0] == torch_pin
    assert torch.version.cuda == base
    # nvidia-dali-cudaXY0: built for CUDA X.Y.
    dali = next(r for r in pyproject()["project"]["dependencies"] if r.startswith("nvidia-dali-cuda"))
    dali_cuda = re.match(r"nvidia-dali-cuda(\d+)(\d)==", dali)
    assert dali_cuda and f"{dali_cuda.group(1)}.{dali_cuda.group(2)}" == base
    # And the build itself re-checks torch against the image's CUDA_VERSION.
    assert 'os.environ["CUDA_VERSION"]' in DOCKERFILE.read_text()


def test_python_is_the_one_pyproject_requires() -> None:
    required = re.fullmatch(r"==(\d+\.\d+)\.\*", pyproject()["project"]["requires-python"])
    assert required
    runs = "\n".join(args for keyword, args in final_stage() if keyword == "RUN")
    assert f"uv python install {required.group(1)}" in runs
    assert f'"$(uv python find {required.group(1)})" -m venv /opt/venv' in runs
    env = " ".join(args for keyword, args in final_stage() if keyword == "ENV")
    assert "VQA_VENV=/opt/venv" in env and "PATH=/opt/venv/bin:" in env


def test_deepspeed_is_installed_after_torch_without_compiling_any_op() -> None:
    runs = [args for keyword, args in final_stage() if keyword == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "pins.py torch torchvision" in r)
    deepspeed_step = next(i for i, r in enumerate(runs) if "pins.py deepspeed" in r)
    assert torch_step < deepspeed_step
    build = runs[deepspeed_step]
    # Its setup.py sees the pinned torch (no build isolation) and compiles nothing, as ./launch.sh setup installs it.
    assert "--no-build-isolation" in build and "DS_BUILD_OPS=0" in build
    assert "DS_BUILD_OPS=0" in (REPO / "launch.sh").read_text()
    # No fused Adam: the trainer steps torch's fused AdamW, so DeepSpeed's own would never run.
    text = DOCKERFILE.read_text()
    assert "DS_BUILD_FUSED_ADAM" not in text and "TORCH_CUDA_ARCH_LIST" not in text
    from trainer.config.config import OptimConfig
    from trainer.config.presets import get_preset
    from trainer.engine.engine import load_ds_config, resolve_ds_config

    for name in ("zero2_bf16.json", "zero3_bf16.json"):
        ds = resolve_ds_config(
            load_ds_config(REPO / "deepspeed_configs" / name),
            get_preset("vqa2-base").train,
            OptimConfig(),
            8,
        )
        assert ds["optimizer"]["params"]["torch_adam"] is True, name


def test_image_has_the_rdma_user_space_for_nccl_over_infiniband() -> None:
    apt = next(args for keyword, args in final_stage() if keyword == "RUN" and "apt-get install" in args)
    packages = set(apt.split("--no-install-recommends", 1)[1].split("&&", 1)[0].split())
    # libibverbs.so.1 is what NCCL's IB transport opens; the providers are the adapters' drivers (mlx5, efa, ...).
    assert {"libibverbs1", "ibverbs-providers", "librdmacm1", "ibverbs-utils"} <= packages


def test_image_runs_as_non_root_with_launch_sh_as_entry_point() -> None:
    stage = final_stage()
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    uid = next(a for k, a in stage if k == "ARG" and a.startswith("USER_UID="))
    assert users[-1] == "${USER_UID}:${USER_GID}" and uid != "USER_UID=0"
    workdir = [args for keyword, args in stage if keyword == "WORKDIR"][-1]
    entrypoint = json.loads([args for keyword, args in stage if keyword == "ENTRYPOINT"][-1])
    assert entrypoint == [f"{workdir}/launch.sh"]
    assert (REPO / "launch.sh").stat().st_mode & 0o111, "launch.sh must be executable"


def test_dockerignore_keeps_data_runs_and_checkpoints_out_of_the_build() -> None:
    patterns = {
        line.strip().strip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"data", "runs", "checkpoints", "weights", ".venv", ".git"} <= patterns
    # ... and keeps in what the build needs.
    for needed in ("pyproject.toml", "launch.sh", "docker", "trainer", "data_pipeline", "common"):
        assert needed not in patterns and not any(p in ("*", "**") for p in patterns), needed


# --- the compose file ---------------------------------------------------------------------------------------------


def compose(env: dict[str, str] | None = None) -> dict:
    """The compose file as Docker Compose sees it with only these variables set (none: the defaults)."""
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})


def volumes_of(service: dict) -> dict[str, tuple[str, bool]]:
    """target → (source, read_only) for a service's short-syntax volumes."""
    mounts = {}
    for entry in service["volumes"]:
        source, target, *mode = entry.split(":")
        mounts[target] = (source, mode == ["ro"])
    return mounts


def size_in_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).lower())
    assert match, text
    return int(match.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2)]


def test_trainer_gets_every_gpu_shared_memory_and_memlock() -> None:
    trainer = compose()["services"]["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d["driver"] == "nvidia" and d["count"] == "all" and "gpu" in d["capabilities"] for d in devices
    )
    assert size_in_bytes(trainer["shm_size"]) >= 16 << 30
    memlock = trainer["ulimits"]["memlock"]
    assert memlock == -1 or (memlock["soft"], memlock["hard"]) == (-1, -1)
    assert trainer["init"] is True  # PID 1 hands SIGTERM on, so the trainer can checkpoint
    assert trainer["command"][0] == "train"


def test_trainer_volumes_for_data_runs_and_checkpoints() -> None:
    document = compose()
    trainer = document["services"]["trainer"]
    mounts = volumes_of(trainer)
    assert {"/data", "/runs", "/checkpoints"} <= set(mounts)
    assert mounts["/data"][1], "shards are mounted read-only"
    assert not mounts["/runs"][1] and not mounts["/checkpoints"][1]
    for target in ("/data", "/runs", "/checkpoints"):
        assert mounts[target][0] in document["volumes"], f"{target}: a named volume by default"
    environment = dict(e.split("=", 1) for e in trainer["environment"] if "=" in e)
    assert environment["VQA_RUN_DIR"].startswith("/runs/")
    assert environment["VQA_TRAIN_DATA"].startswith("/data/") and environment["VQA_VAL_DATA"].startswith(
        "/data/"
    )
    assert environment["NCCL_DEBUG"] == "WARN" and environment["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    # Host folders instead, by absolute path.
    mounts = volumes_of(compose({"VQA_DATA_VOLUME": "/mnt/shards"})["services"]["trainer"])
    assert mounts["/data"] == ("/mnt/shards", True)


def test_tensorboard_reads_the_runs_volume_on_loopback_only() -> None:
    services = compose()["services"]
    tensorboard, trainer = services["tensorboard"], services["trainer"]
    logdir = tensorboard["command"][tensorboard["command"].index("--logdir") + 1]
    assert tensorboard["command"][0] == "tensorboard"
    assert volumes_of(tensorboard)[logdir] == (volumes_of(trainer)["/runs"][0], True)
    assert "deploy" not in tensorboard  # no GPU for TensorBoard
    for name, service in services.items():
        for port in service.get("ports", []):
            host_ip = port.rsplit(":", 2)[0] if port.count(":") == 2 else None
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond the local host"
    assert services["tensorboard"]["ports"] == ["127.0.0.1:6006:6006"]
    assert "ports" not in trainer and trainer["network_mode"] == "host"


def test_compose_builds_this_repository_and_runs_launch_sh_commands() -> None:
    trainer = compose()["services"]["trainer"]
    context = (COMPOSE.parent / trainer["build"]["context"]).resolve()
    assert context == REPO and (context / trainer["build"]["dockerfile"]).resolve() == DOCKERFILE
    usage = subprocess.run(
        [str(REPO / "launch.sh"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for service in compose()["services"].values():
        assert f"\n  {service['command'][0]} " in usage, service["command"]


RDMA_COMPOSE = REPO / "docker" / "compose.rdma.yaml"


def merged_trainer(*files: Path) -> dict:
    """The trainer service of several compose files as `docker compose -f A -f B` merges them: mappings key by key,
    sequences (devices, cap_add) appended, environment lists merged by variable name."""
    merged: dict = {}
    for file in files:
        merge_service(merged, interpolate(yaml.safe_load(file.read_text()), {})["services"]["trainer"])
    return merged


def test_rdma_compose_file_gives_the_trainer_infiniband_devices_ipc_lock_and_memlock() -> None:
    plain = compose()["services"]["trainer"]
    assert "devices" not in plain  # nodes without InfiniBand start with compose.yaml alone
    trainer = merged_trainer(COMPOSE, RDMA_COMPOSE)
    assert "/dev/infiniband:/dev/infiniband" in trainer["devices"]
    assert "IPC_LOCK" in trainer["cap_add"]
    assert trainer["ulimits"]["memlock"] == {"soft": -1, "hard": -1}
    assert trainer["network_mode"] == "host" and trainer["deploy"] == plain["deploy"]  # the rest unchanged
    assert {"NCCL_IB_HCA", "NCCL_IB_GID_INDEX", "NCCL_DEBUG_SUBSYS"} <= set(trainer["environment"])
    # docs/cluster.md shows the same command the file's header does.
    command = "docker compose -f docker/compose.yaml -f docker/compose.rdma.yaml run --rm trainer train"
    assert command in RDMA_COMPOSE.read_text() and command in (REPO / "docs" / "cluster.md").read_text()


def test_fetched_weights_go_to_the_checkpoints_volume() -> None:
    env = " ".join(args for keyword, args in final_stage() if keyword == "ENV")
    assert "VQA_WEIGHTS=/checkpoints/weights" in env
    assert "/checkpoints" in volumes_of(compose()["services"]["trainer"])
