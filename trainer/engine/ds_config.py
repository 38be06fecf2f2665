"""The DeepSpeed config a run hands to `deepspeed.initialize`: the shipped JSON files (deepspeed_configs/), the
default one, and the trainer-owned settings written into it (trainer/engine/engine.py's module docstring says who owns what).

Which mode runs (deepspeed_configs/README.md): the default file is ZeRO stage 0 for one rank and for several
(`default_ds_config_path`); one rank runs any file without offload at stage 0 (`plain_single_rank`); bf16 at stage 0
always runs as autocast over fp32 weights; several ranks at stage 0 all-reduce the gradients during backward
(`overlapped_allreduce`, trainer/engine/grad_sync.py).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from trainer.config.config import ConfigError, OptimConfig, TrainConfig
from trainer.engine.optim import adamw_settings

CONFIG_DIR = Path(__file__).resolve().parents[2] / "deepspeed_configs"
# Keys the trainer config owns; the trainer writes them into the DeepSpeed config.
_TRAINER_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def default_ds_config_path(device: torch.device) -> Path:
    """ZeRO stage 0 with the gradient all-reduce overlapped with backward (`overlapped_allreduce`), for one rank and
    for several: fp32 weights and autocast bf16 on GPUs, fp32 on CPU (DeepSpeed's CPU path has no fast bf16 kernels to
    gain from). Chosen by measurement against ZeRO-1/2 and DeepSpeed's own stage-0 all-reduce on several ranks
    (deepspeed_configs/README.md, docs/performance.md); ZeRO files stay available by --deepspeed_config."""
    return CONFIG_DIR / ("stage0_bf16.json" if device.type == "cuda" else "stage0_fp32.json")


def overlapped_allreduce(ds: Mapping[str, Any], world_size: int) -> bool:
    """Whether the engine all-reduces the gradients itself, in buckets during backward (trainer/engine/grad_sync.py), instead
    of DeepSpeed's stage-0 all-reduce after backward: ZeRO stage 0 on several ranks with
    `zero_optimization.overlap_comm` true. DeepSpeed ignores both `overlap_comm` and `reduce_bucket_size` at stage 0;
    the engine reads them with the meaning they have at stages 1-2 (overlap the reduction with backward, in buckets of
    that many elements)."""
    zero = ds.get("zero_optimization", {})
    return world_size > 1 and int(zero.get("stage", 0)) == 0 and bool(zero.get("overlap_comm", False))


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON file, failing with the file name and the parse error's position."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--deepspeed_config: no such file '{p}' (configs ship in {CONFIG_DIR})")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--deepspeed_config: '{p}' is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"--deepspeed_config: '{p}' must hold a JSON object, not {type(data).__name__}")
    for key in ("optimizer", "scheduler"):
        if key in data:
            raise ConfigError(
                f"--deepspeed_config: '{p}' sets '{key}', which the trainer config owns "
                f"(optim.* fields; see deepspeed_configs/README.md): remove it from the JSON"
            )
    return data


def resolve_ds_config(
    base: Mapping[str, Any],
    train: TrainConfig,
    optim: OptimConfig,
    world_size: int,
    *,
    load_universal: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config this run hands to `deepspeed.initialize`: the JSON plus the trainer-owned settings (batch
    sizes from `train`, AdamW from `optim`), and stage 0 on one rank (`plain_single_rank`)."""
    ds = copy.deepcopy(dict(base))
    wanted = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum(world_size),
    }
    for key in _TRAINER_OWNED:
        if key in ds and ds[key] != wanted[key]:
            raise ConfigError(
                f"DeepSpeed config sets {key}={ds[key]} but the trainer config gives {wanted[key]} "
                f"(train.global_batch_size {train.global_batch_size}, train.micro_batch_size "
                f"{train.micro_batch_size}, world size {world_size}): remove it from the JSON"
            )
    ds.update(wanted)
    if "gradient_clipping" not in ds:
        # DeepSpeed >= 0.19.3 clips at 1.0 by default; ViLT does not clip. Never inherit an unstated default.
        raise ConfigError("DeepSpeed config must set gradient_clipping explicitly (0.0 = off, as ViLT)")
    ds["optimizer"] = _optimizer_section(ds, optim)
    if plain_single_rank(ds, world_size, load_universal=load_universal) or _bf16_weights_at_stage_0(ds):
        _make_single_rank(ds)
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; DeepSpeed's own step prints would interleave
    ds.setdefault("wall_clock_breakdown", False)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def _optimizer_section(ds: Mapping[str, Any], optim: OptimConfig) -> dict[str, Any]:
    """DeepSpeed's optimizer section: AdamW's settings from trainer/engine/optim.py, as the plain step builds it."""
    params: dict[str, Any] = {**adamw_settings(optim), "betas": list(optim.betas)}  # a list, as JSON holds it
    offload = (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    if offload in (None, "none"):
        # torch's AdamW: DeepSpeed's own FusedAdam would first JIT-compile a C++/CUDA op (a minute, and a CUDA
        # toolkit on the node). On GPUs torch's fused kernel gives the fused step without any build.
        params["torch_adam"] = True
        # torch's fused AdamW (CUDA, and CPU since torch 2.4): one pass over each flat partition instead of ~10
        # element-wise ops each, which counts on the CPU for the CLIP text tower's 49,408-row embedding.
        params["fused"] = True
    # With optimizer offload DeepSpeed runs its CPU Adam (built on first use), the only optimizer it offloads.
    return {"type": "AdamW", "params": params}


def _make_single_rank(ds: dict[str, Any]) -> None:
    """One rank (and a bf16 file at stage 0 on any number of ranks): nothing to shard. Stage 0 hands the module's own
    fp32 weights and gradients to torch's fused AdamW,
    as plain PyTorch does; ZeRO-1/2 would copy every gradient into a bucket and a flat partition, step a separate fp32
    copy of the weights and copy it back, and take an fp64 norm, every step. The JSON's other zero_optimization keys
    stay (DeepSpeed ignores them at stage 0; Engine.load restores its stage for a checkpoint written under ZeRO)."""
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": 0}
    bf16_key = _bf16_key(ds)
    if ds.get(bf16_key, {}).get("enabled", False):
        # bf16 by torch.autocast over fp32 weights, not bf16 weights: at stage 0 DeepSpeed 0.19.8 steps bf16 weights
        # through its unfused fp16-style optimizer (runtime/fp16/unfused_optimizer.py: fp32 copies made tensor by
        # tensor in Python, an overflow check that synchronises the device every step), slower than ZeRO-2 bf16 and
        # than plain PyTorch (docs/performance.md, "On one GPU: NVIDIA H200"). With fp32 weights DeepSpeed wraps
        # nothing: the step is torch's fused AdamW on the module's parameters, as plain PyTorch's with autocast.
        ds[bf16_key] = {**ds[bf16_key], "enabled": False}
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}


def _bf16_weights_at_stage_0(ds: Mapping[str, Any]) -> bool:
    """A bf16 JSON at ZeRO stage 0 (`stage0_bf16.json`, the default on GPUs), on any number of ranks, and without a
    `torch_autocast` section of its own: run as autocast bf16 over fp32 weights (`_make_single_rank`), never with bf16
    weights, which DeepSpeed 0.19.8 steps at stage 0 through its unfused optimizer, far slower than autocast
    (docs/performance.md, "On one GPU: NVIDIA H200")."""
    if int(ds.get("zero_optimization", {}).get("stage", 0)) != 0 or "torch_autocast" in ds:
        return False
    return bool(ds.get(_bf16_key(ds), {}).get("enabled", False)) and not ds.get("fp16", {}).get(
        "enabled", False
    )


def _bf16_key(ds: Mapping[str, Any]) -> str:
    """The key DeepSpeed reads its bf16 section from: `bf16`, else the older `bfloat16` (runtime/precision_config.py)."""
    return "bf16" if "bf16" in ds or "bfloat16" not in ds else "bfloat16"


# The sections of a DeepSpeed config that set the precision of the weights and of the computation.
_PRECISION_KEYS = ("bf16", "bfloat16", "fp16", "torch_autocast")


def plain_single_rank(ds: Mapping[str, Any], world_size: int, *, load_universal: bool = False) -> bool:
    """Whether a run with DeepSpeed config `ds` on `world_size` ranks runs as plain PyTorch does instead of as the JSON
    says: ZeRO stage 0, DeepSpeed stepping torch's fused AdamW on the module's own fp32 weights, and a bf16 JSON's bf16
    turned into DeepSpeed's `torch_autocast` bf16 (`resolve_ds_config` makes the change).

    One rank without offload, in fp32 or bf16. Several ranks keep the JSON's stage: a ZeRO file's sharding, and the
    stage-0 default's all-reduce overlapped with backward (a bf16 file at stage 0 computes by autocast on any number of
    ranks: `_bf16_weights_at_stage_0`).
    Offload needs ZeRO, and a universal checkpoint loads only into a ZeRO optimizer (`load_universal`). fp16 keeps the
    JSON (autocast fp16 would need a gradient scaler; not measured). A JSON, bf16 or fp32, that has a `torch_autocast`
    section of its own (`"enabled": false` included) states its precision itself and is kept as written: the way to
    run the one-rank ZeRO engine, e.g. to compare it (scripts/gpu_check.sh's zero stage, on a GPU and on the CPU).
    """
    zero = ds.get("zero_optimization", {})
    offload = any(
        (zero.get(key) or {}).get("device", "none") not in (None, "none")
        for key in ("offload_optimizer", "offload_param")
    )
    if world_size != 1 or load_universal or offload or ds.get("fp16", {}).get("enabled", False):
        return False
    if "torch_autocast" in ds:
        return False
    return bool(ds.get(_bf16_key(ds), {}).get("enabled", False)) or int(zero.get("stage", 0)) > 0
