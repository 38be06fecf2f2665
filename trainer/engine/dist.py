"""Process-group set-up and the few collectives the trainer needs, as small functions returning values.

One code path serves every common launcher; `world_info_from_env` reads where this process sits in the job from
the first of these whose variables are set (the order matters: a launcher started under srun or mpirun sets its own
variables for its children, which must win over the outer ones):

    launcher                        rank / world size / local rank                                  ranks on the host
    deepspeed, torchrun             RANK, WORLD_SIZE, LOCAL_RANK                                    LOCAL_WORLD_SIZE, LOCAL_SIZE
    OpenMPI (mpirun)                OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK                        OMPI_COMM_WORLD_LOCAL_SIZE
    MPICH, Intel MPI (PMI)          PMI_RANK, PMI_SIZE, MPI_LOCALRANKID                             MPI_LOCALNRANKS
    Slurm (srun, one task per rank) SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID                       SLURM_NTASKS_PER_NODE
    none (python trainer/main.py)   a single process: rank 0 of 1

The rendezvous is torch's env:// one, MASTER_ADDR:MASTER_PORT (rank 0's host). deepspeed and torchrun set both;
under Slurm, when MASTER_ADDR is not exported, it is the first host of the step's node list (where srun puts task
0), else the address of the node srun ran on (SLURM_LAUNCH_NODE_IPADDR), and MASTER_PORT defaults to a port derived
from the job id; with mpirun, export both to every rank (`mpirun -x MASTER_ADDR=host0 -x MASTER_PORT=29500`). Several
ranks and no address: the job is refused (exit 2) instead of starting N separate single-rank runs. A plain process
gets single-process defaults, because DeepSpeed otherwise falls back to MPI discovery and fails on a missing mpi4py.
Whatever was filled in here is exported as RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which
torch.distributed and DeepSpeed read.

On CPU the backend is gloo; on GPUs it is NCCL, plus a gloo group for host-side control flags (stop requests)
so that agreeing on them never waits on the GPU stream.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.errors import BadInputError

# torch is imported by the functions that use it: trainer/main.py counts the ranks on its host with
# `world_info_from_env` before torch loads OpenMP, which reads its wait policy once, when it is loaded.
if TYPE_CHECKING:
    import torch
    import torch.distributed as tdist

log = logging.getLogger(__name__)

_CONTROL_GROUP: tdist.ProcessGroup | None = None
# Rendezvous variables set here (not by a launcher): removed again by destroy(), so that an in-process run (tests)
# leaves the environment of later runs and child processes as it found it.
_ADDED_ENV: list[str] = []

DEFAULT_MASTER_PORT = 29500


class LaunchError(BadInputError):
    """The launcher's variables do not describe a job this process can join (exit 2, one line)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Launch:
    """What the launcher's variables say, before any process group exists (`world_info_from_env`)."""

    launcher: str
    """torch (deepspeed, torchrun), openmpi, pmi, slurm, or none (a plain process)."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    """Ranks on this host as the launcher announces them (the world size where it does not)."""
    source: str
    """The variables read, for messages, e.g. `SLURM_PROCID/SLURM_NTASKS`."""


# (launcher, rank, world size, local rank, ranks on the host): the first whose world size variable is set wins.
_LAUNCHERS: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("torch", "RANK", "WORLD_SIZE", "LOCAL_RANK", ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")),
    (
        "openmpi",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        ("OMPI_COMM_WORLD_LOCAL_SIZE",),
    ),
    ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", ("MPI_LOCALNRANKS",)),
    (
        "slurm",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
        ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"),
    ),
)


def _int(env: Mapping[str, str], name: str, source: str) -> int:
    value = env[name].strip()
    if not re.fullmatch(r"\d+", value):
        raise LaunchError(f"{name}={env[name]!r} ({source}): not a whole number")
    return int(value)


def _leading_int(value: str | None) -> int | None:
    """The number a per-node count starts with: Slurm writes SLURM_TASKS_PER_NODE as e.g. `4(x2),2`."""
    m = re.match(r"\s*(\d+)", value or "")
    return int(m.group(1)) if m else None


def world_info_from_env(env: Mapping[str, str] | None = None, local_rank_arg: int | None = None) -> Launch:
    """Rank, world size and local rank from the first launcher whose variables are set (module docstring).

    `local_rank_arg` (--local_rank, from older launchers) is used only where the launcher sets no local rank.
    Raises LaunchError on values that are not numbers or a rank outside the world.
    """
    env = os.environ if env is None else env
    for launcher, rank_var, size_var, local_var, local_size_vars in _LAUNCHERS:
        # deepspeed and torchrun set all of theirs (WORLD_SIZE alone counts); the others need both: an `salloc` shell
        # has SLURM_NTASKS but no SLURM_PROCID.
        if size_var not in env or (launcher != "torch" and rank_var not in env):
            continue
        source = f"{rank_var}/{size_var}"
        world_size = _int(env, size_var, source)
        rank = _int(env, rank_var, source) if rank_var in env else 0
        if local_var in env:
            local_rank = _int(env, local_var, source)
        else:
            local_rank = local_rank_arg if local_rank_arg is not None else 0
        if world_size < 1 or rank >= world_size:
            raise LaunchError(
                f"{source}: rank {rank} of a world of {world_size} ({launcher} launcher variables)"
            )
        local_sizes = (_leading_int(env.get(v)) for v in local_size_vars)
        local_world_size = next((n for n in local_sizes if n), world_size)
        return Launch(launcher, rank, world_size, local_rank, local_world_size, source)
    local_rank = 0 if local_rank_arg is None else local_rank_arg
    return Launch("none", 0, 1, local_rank, 1, "no launcher variables")


def _first_host(nodelist: str) -> str | None:
    """The first host of a Slurm node list: `gpu[003-004,010],cpu1` -> `gpu003`, `a1,a2` -> `a1`."""
    out, depth, i = "", 0, 0
    while i < len(nodelist):
        c = nodelist[i]
        if c == "," and depth == 0:
            break
        if c == "[":
            close = nodelist.find("]", i)
            if close < 0:
                return None
            out += re.split(r"[,-]", nodelist[i + 1 : close])[0]
            i = close + 1
            continue
        out += c
        i += 1
    return out.strip() or None


def rendezvous(launch: Launch, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(MASTER_ADDR, MASTER_PORT) of the job: exported ones win; Slurm's node list fills them in (module docstring).

    Several ranks without an address refuse to start: each would otherwise train alone as rank 0 of its own job.
    """
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR") or None, env.get("MASTER_PORT") or None
    if launch.world_size == 1:
        return addr or "127.0.0.1", port or str(_free_port())
    if launch.launcher == "slurm":
        nodelist = (
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        )
        addr = (
            addr
            or (_first_host(nodelist) if nodelist else None)
            or env.get("SLURM_LAUNCH_NODE_IPADDR")
            or None
        )
        job = _leading_int(env.get("SLURM_JOB_ID"))
        port = port or str(DEFAULT_MASTER_PORT + (job % 10000 if job is not None else 0))
    if not addr:
        raise LaunchError(
            f"{launch.world_size} ranks ({launch.source}) but no rendezvous address: export MASTER_ADDR (the host "
            f"of rank 0) and MASTER_PORT to every rank (with mpirun: -x MASTER_ADDR=HOST -x MASTER_PORT=PORT)"
        )
    return addr, port or str(DEFAULT_MASTER_PORT)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_world_size() -> int:
    """The world size the launcher announced (1 for a plain process); readable before any process group exists."""
    return world_info_from_env().world_size


def env_rank() -> int:
    """This process's rank as the launcher announced it (0 for a plain process, or where its variables are bad)."""
    try:
        return world_info_from_env().rank
    except LaunchError:
        return 0


def export_launch_env(local_rank_arg: int | None = None) -> Launch:
    """Export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for torch.distributed and DeepSpeed, from
    whichever launcher started this process (or single-process defaults); returns what was read.

    Only missing variables are set, so launcher-provided values always win. A free port (not a fixed one) lets
    several single-process runs, e.g. parallel tests, share a machine.
    """
    launch = world_info_from_env(local_rank_arg=local_rank_arg)
    addr, port = rendezvous(launch)
    values = {
        "RANK": str(launch.rank),
        "LOCAL_RANK": str(launch.local_rank),
        "WORLD_SIZE": str(launch.world_size),
        "MASTER_ADDR": addr,
        "MASTER_PORT": port,
    }
    for key, value in values.items():
        if key not in os.environ:
            os.environ[key] = value
            _ADDED_ENV.append(key)
    return launch


def _skip_deepspeed_shm_comm() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op (`deepspeed_shm_comm`).

    DeepSpeed's TorchBackend builds the op whenever the CPU accelerator reports it compatible: tens of seconds of C++
    compilation the first time (docs/training.md), for a kernel that only serves inference all-reduce. There is
    no switch; `deepspeed.ops.__compatible_ops__` is the module-level dict that `build_shm_op` consults (DeepSpeed
    caches it in the module so that edits persist), and marking the op incompatible there makes DeepSpeed use plain
    gloo collectives; the probe behind the dict is cheap by comparison.
    """
    # DeepSpeed is imported where it is used, here and below: importing it takes seconds and probes the accelerator,
    # which trainer/main.py --help and the CPU-only tools need not wait for.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_s: float = 1800.0, local_rank_arg: int | None = None) -> DistInfo:
    """Initialise torch.distributed (gloo on CPU, NCCL on CUDA) and DeepSpeed's communication layer on top of it."""
    global _CONTROL_GROUP
    import deepspeed
    import torch
    import torch.distributed as tdist

    launch = export_launch_env(local_rank_arg)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=timeout_s)

    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        _skip_deepspeed_shm_comm()

    if not tdist.is_initialized():
        kwargs: dict = {"backend": backend, "timeout": timeout}
        if backend == "nccl" and world_size > 1:
            kwargs["device_id"] = device
        tdist.init_process_group(**kwargs)
    # DeepSpeed sees an initialised process group and only wraps it (no MPI discovery, no second rendezvous).
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False)
    _CONTROL_GROUP = tdist.new_group(backend="gloo") if backend == "nccl" and world_size > 1 else None
    info = DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)
    log.info(
        "rank %d/%d (local %d) on %s, backend %s, launcher %s, rendezvous %s:%s",
        *(rank, world_size, local_rank, device, backend, launch.launcher),
        *(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]),
    )
    return info


def is_initialized() -> bool:
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized()


def barrier() -> None:
    import torch.distributed as tdist

    if is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier(group=_CONTROL_GROUP)


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (a host-side collective on the control group)."""
    import torch
    import torch.distributed as tdist

    if not is_initialized() or tdist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)  # int32 on CPU: gloo reduces it without the GPU
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return bool(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place on a copy); the identity in a single process."""
    import torch.distributed as tdist

    out = t.clone()
    if is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def gather_objects(obj: object, dst: int = 0) -> list[object] | None:
    """Every rank's picklable `obj` on rank `dst` (in rank order), None elsewhere; over the control group."""
    import torch.distributed as tdist

    if not is_initialized() or tdist.get_world_size() == 1:
        return [obj]
    out: list[object] | None = [None] * tdist.get_world_size() if tdist.get_rank() == dst else None
    tdist.gather_object(obj, out, dst=dst, group=_CONTROL_GROUP)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    import torch.distributed as tdist

    if not is_initialized() or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src, group=_CONTROL_GROUP)
    return box[0]


def destroy() -> None:
    """Tear the process group down (safe to call twice), DeepSpeed's references to it included."""
    global _CONTROL_GROUP
    import torch.distributed as tdist

    if is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm.comm")  # the module that holds DeepSpeed's live backend
        cdb = getattr(ds_comm, "cdb", None)
        if cdb is not None and cdb.is_initialized():
            # DeepSpeed caches the world group (deepspeed.utils.groups) and releases it only in its own destroy; after
            # torch's alone, the next deepspeed.initialize in this process (tests, trainer.tools.bench's cells) broadcasts
            # over the destroyed group and fails ("Group ... is not registered").
            ds_comm.destroy_process_group()
        else:
            tdist.destroy_process_group()
    _CONTROL_GROUP = None
    while _ADDED_ENV:
        os.environ.pop(_ADDED_ENV.pop(), None)
