"""Loading a checkpoint's files safely: each rank's RNG file, and the scan of the files DeepSpeed unpickles.

Every file of a checkpoint this project reads itself is loaded with `torch.load(weights_only=True)`, which unpickles
tensors and plain containers only and refuses any other object before running anything. The RNG files hold tensors,
lists and numbers only for that reason. Before DeepSpeed loads a checkpoint (its loader unpickles
everything), every `.pt` file in it is scanned, without unpickling, for the objects it names; a file that names
anything outside what DeepSpeed itself writes is refused.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config.config import ConfigError

RNG_FORMAT = "vqa-align/rng/2"


# -- RNG files ---------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, lists, strings and numbers: a file that `weights_only=True` loads."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "format": RNG_FORMAT,
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": int(py_version), "state": [int(x) for x in py_internal], "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unsafe_globals(file: Path) -> list[str]:
    """The objects other than tensors and plain containers a torch file names, read from its pickle opcodes
    without unpickling anything; ["unreadable"] where the file is no torch zip file."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    except Exception:  # noqa: BLE001 - any reason it cannot be scanned means it is refused, not loaded
        return ["unreadable"]


def load_rng_file(file: Path) -> dict[str, Any]:
    """A rank's RNG file, loaded with `weights_only=True` and checked; ConfigError for anything else."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A file naming other objects: say which, read from its opcodes without unpickling anything.
        unsafe = unsafe_globals(file)
        raise ConfigError(
            f"{file}: holds objects other than tensors and plain containers ({', '.join(unsafe) or 'unknown'})"
            f"; not loaded (not an RNG file the trainer wrote)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: one line naming it
        raise ConfigError(f"{file}: not a readable RNG file ({first_line(exc)})") from None
    check_rng_state(state, file)
    return state


def check_rng_state(state: Any, file: Path) -> None:
    """The RNG file's shape, checked before any of it is applied."""
    if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
        raise ConfigError(f"{file}: not an RNG file of format '{RNG_FORMAT}' (not written by this trainer)")
    n, p = state.get("numpy"), state.get("python")
    ok = (
        isinstance(state.get("torch"), torch.Tensor)
        and isinstance(n, dict)
        and isinstance(n.get("key"), torch.Tensor)
        and isinstance(p, dict)
        and isinstance(p.get("state"), list)
    )
    if not ok:
        raise ConfigError(f"{file}: not an RNG file the trainer wrote (unexpected contents)")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# -- files DeepSpeed loads ---------------------------------------------------------------------------------------
# What DeepSpeed's own checkpoint files name besides what `weights_only=True` allows (read from checkpoints written at
# ZeRO stages 0-3 and their universal copies; DynamicLossScaler is fp16's loss scaler). DeepSpeed unpickles its files
# fully (weights_only=False), so a file naming anything else is refused before DeepSpeed opens it.
DEEPSPEED_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


def check_deepspeed_files(path: Path) -> None:
    """Refuse a checkpoint whose .pt files name objects DeepSpeed does not write, without unpickling them."""
    for file in sorted(path.rglob("*.pt")):
        if file.name.startswith("rng_rank"):
            continue  # loaded by load_rng_file, with weights_only=True
        unknown = sorted(set(unsafe_globals(file)) - DEEPSPEED_GLOBALS)
        if unknown:
            raise ConfigError(
                f"{file}: names objects that DeepSpeed's checkpoint files do not hold ({', '.join(unknown)}); "
                f"not loaded"
            )
