"""Process-group set-up and the few collectives the trainer needs, as small functions returning values.

One code path serves every launcher: `deepspeed --num_gpus N` / `--hostfile H`, `torchrun`, and a plain
`python trainer/main.py`. The launchers set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a plain process
gets single-process defaults here, because DeepSpeed otherwise falls back to MPI discovery and fails on a missing
mpi4py. On CPU the backend is gloo; on GPUs it is NCCL, plus a gloo group for host-side control flags (stop requests)
so that agreeing on them never waits on the GPU stream.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

_CONTROL_GROUP: tdist.ProcessGroup | None = None
# Rendezvous variables set here (not by a launcher): removed again by destroy(), so that an in-process run (tests)
# leaves the environment of later runs and child processes as it found it.
_ADDED_ENV: list[str] = []


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_world_size() -> int:
    """The world size the launcher announced (1 for a plain process); readable before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def set_single_process_defaults(local_rank_arg: int | None = None) -> None:
    """Fill in the rendezvous variables a launcher would have set, for a plain single process.

    Only missing variables are set, so launcher-provided values always win. A free port (not a fixed one) lets
    several single-process runs, e.g. parallel tests, share a machine.
    """
    defaults = {
        "RANK": "0",
        "LOCAL_RANK": "0" if local_rank_arg is None else str(local_rank_arg),
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
    }
    for key, value in defaults.items():
        if key not in os.environ:
            os.environ[key] = value
            _ADDED_ENV.append(key)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
        _ADDED_ENV.append("MASTER_PORT")


def _skip_deepspeed_shm_comm() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op (`deepspeed_shm_comm`).

    DeepSpeed's TorchBackend builds the op whenever the CPU accelerator reports it compatible: 24-72 s of C++
    compilation on 2 cores the first time (measured on a 2-core AMD EPYC), for a kernel that only serves inference all-reduce. There is
    no switch; `deepspeed.ops.__compatible_ops__` is the module-level dict that `build_shm_op` consults (DeepSpeed
    caches it in the module so that edits persist), and marking the op incompatible there makes DeepSpeed use plain
    gloo collectives. The probe behind the dict takes ~0.2 s.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_s: float = 1800.0, local_rank_arg: int | None = None) -> DistInfo:
    """Initialise torch.distributed (gloo on CPU, NCCL on CUDA) and DeepSpeed's communication layer on top of it."""
    global _CONTROL_GROUP
    import deepspeed

    set_single_process_defaults(local_rank_arg)
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
    log.info("rank %d/%d (local %d) on %s, backend %s", rank, world_size, local_rank, device, backend)
    return info


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def barrier() -> None:
    if is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier(group=_CONTROL_GROUP)


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (a host-side collective on the control group)."""
    if not is_initialized() or tdist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)  # int32 on CPU: gloo reduces it without the GPU
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return bool(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place on a copy); the identity in a single process."""
    out = t.clone()
    if is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def gather_objects(obj: object, dst: int = 0) -> list[object] | None:
    """Every rank's picklable `obj` on rank `dst` (in rank order), None elsewhere; over the control group."""
    if not is_initialized() or tdist.get_world_size() == 1:
        return [obj]
    out: list[object] | None = [None] * tdist.get_world_size() if tdist.get_rank() == dst else None
    tdist.gather_object(obj, out, dst=dst, group=_CONTROL_GROUP)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_initialized() or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src, group=_CONTROL_GROUP)
    return box[0]


def destroy() -> None:
    """Tear the process group down (safe to call twice), DeepSpeed's references to it included."""
    global _CONTROL_GROUP
    if is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm.comm")  # the module that holds DeepSpeed's live backend
        cdb = getattr(ds_comm, "cdb", None)
        if cdb is not None and cdb.is_initialized():
            # DeepSpeed caches the world group (deepspeed.utils.groups) and releases it only in its own destroy; after
            # torch's alone, the next deepspeed.initialize in this process (tests, trainer.bench's cells) broadcasts
            # over the destroyed group and fails ("Group ... is not registered").
            ds_comm.destroy_process_group()
        else:
            tdist.destroy_process_group()
    _CONTROL_GROUP = None
    while _ADDED_ENV:
        os.environ.pop(_ADDED_ENV.pop(), None)
