"""The DeepSpeed boundary: the one module that calls `deepspeed.initialize`, backward, step, save and load.

Who owns what (see deepspeed_configs/README.md): the JSON file owns ZeRO stage, precision, communication, offload and
gradient clipping; the trainer config owns the optimizer (AdamW as ViLT: per-group learning rates from the model's
param groups), the schedule (10% linear warm-up, then linear decay to zero) and the batch sizes, which this module
writes into the DeepSpeed config. A JSON that sets one of those trainer-owned keys to a different value is refused,
so no setting has two owners.

`model.compile` (trainer config) compiles the fused model, not the whole task, before it is handed to DeepSpeed:
`compile_model` below. The losses stay eager, in fp32 and with their cross-rank all-gather, outside the graph.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError, RunConfig
from trainer.dist import DistInfo

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "deepspeed_configs"
# Keys the trainer config owns; the trainer writes them into the DeepSpeed config.
_TRAINER_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def default_ds_config_path(device: torch.device) -> Path:
    """bf16 ZeRO-2 on GPUs, fp32 ZeRO-2 on CPU (DeepSpeed's CPU path has no fast bf16 kernels to gain from)."""
    return CONFIG_DIR / ("zero2_bf16.json" if device.type == "cuda" else "zero2_fp32.json")


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
    cfg: RunConfig,
    world_size: int,
    device: torch.device,
    *,
    load_universal: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config this run hands to `deepspeed.initialize`: the JSON plus the trainer-owned settings."""
    ds = copy.deepcopy(dict(base))
    accum = cfg.train.grad_accum(world_size)
    wanted = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
    }
    for key in _TRAINER_OWNED:
        if key in ds and ds[key] != wanted[key]:
            raise ConfigError(
                f"DeepSpeed config sets {key}={ds[key]} but the trainer config gives {wanted[key]} "
                f"(train.global_batch_size {cfg.train.global_batch_size}, train.micro_batch_size "
                f"{cfg.train.micro_batch_size}, world size {world_size}): remove it from the JSON"
            )
    ds.update(wanted)
    if "gradient_clipping" not in ds:
        # DeepSpeed >= 0.19.3 clips at 1.0 by default; ViLT does not clip. Never inherit a silent default.
        raise ConfigError("DeepSpeed config must set gradient_clipping explicitly (0.0 = off, as ViLT)")
    opt = cfg.optim
    params: dict[str, Any] = {
        "lr": opt.lr,
        "betas": list(opt.betas),
        "eps": opt.eps,
        "weight_decay": opt.weight_decay,
    }
    offload = (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    if offload in (None, "none"):
        # torch's AdamW: DeepSpeed's own FusedAdam would first JIT-compile a C++/CUDA op (a minute, and a CUDA
        # toolkit on the node). On GPUs torch's fused kernel gives the fused step without any build.
        params["torch_adam"] = True
        # torch's fused AdamW (CUDA, and CPU since torch 2.4): one pass over each flat partition instead of ~10
        # element-wise ops each, which counts on the CPU for the CLIP text tower's 49,408-row embedding.
        params["fused"] = True
    # With optimizer offload DeepSpeed runs its CPU Adam (built on first use), the only optimizer it offloads.
    ds["optimizer"] = {"type": "AdamW", "params": params}
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; DeepSpeed's own step prints would interleave
    ds.setdefault("wall_clock_breakdown", False)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


class WarmupLinearDecay:
    """LR factor: linear warm-up from 0 over `warmup` steps, then linear decay to 0 at `total` (ViLT's schedule).

    LambdaLR multiplies every param group's own lr by it: the head's 10x and CLIP's separate lr keep their ratios.
    """

    def __init__(self, total: int, warmup: int) -> None:
        self.total = total
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def move_batch(batch: Mapping[str, Any], device: torch.device, float_dtype: torch.dtype) -> dict[str, Any]:
    """Put a loader batch on the engine's device; pixels take the engine's compute dtype (bf16 under bf16)."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if k == "pixels" and v.is_floating_point():
                v = v.to(float_dtype)
        out[k] = v
    return out


def compile_model(model: torch.nn.Module, *, backend: str | Callable = "inductor") -> None:
    """Compile `model.forward` in place with `torch.compile(dynamic=False)`; run eagerly if compiling fails.

    Static shapes: the default (`dynamic=None`) recompiles with dynamic shapes once a second shape is seen, and that
    recompilation failed on the 384 px model in inductor (MEASURED.md: `shape '[1472, 768]' is invalid`); with
    `dynamic=False` every new shape (an evaluation batch size) gets its own static graph. The forward is replaced as
    an instance attribute, so parameter names, state dicts and checkpoints stay those of the eager model (a
    `torch.compile(module)` wrapper would prefix them with `_orig_mod.`).

    Compilation runs lazily, on the first forward. An error of the compiler itself (dynamo tracing, inductor code
    generation, no C++ compiler: all `TorchDynamoException`) is logged once and the model continues eagerly; errors
    of the model (shapes, out of memory) are raised as usual. An error while compiling the backward graph surfaces
    in backward and is not caught: set model.compile=false then.
    """
    from torch._dynamo.exc import TorchDynamoException

    eager = model.forward
    compiled = torch.compile(eager, dynamic=False, backend=backend)
    failed = False

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal failed
        if not failed:
            try:
                return compiled(*args, **kwargs)
            except TorchDynamoException as exc:
                failed = True
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                log.warning(
                    "torch.compile of %s failed (%s: %s); running it eagerly. Set model.compile=false to skip "
                    "compiling.",
                    type(model).__name__,
                    type(exc).__name__,
                    first[:300],
                )
        return eager(*args, **kwargs)

    model.forward = forward  # type: ignore[method-assign]
    log.info(
        "model.compile: torch.compile(dynamic=False) of %s; the first step compiles", type(model).__name__
    )


class Engine:
    """A DeepSpeed engine around one `nn.Module` whose forward(batch) returns the losses (the VQATask)."""

    def __init__(
        self,
        task: torch.nn.Module,
        ds_config: dict[str, Any],
        cfg: RunConfig,
        dist: DistInfo,
    ) -> None:
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        self.cfg = cfg
        self.dist = dist
        self.ds_config = ds_config
        total = cfg.train.max_steps
        self.schedule = WarmupLinearDecay(total, round(cfg.optim.warmup_ratio * total))
        groups = task.param_groups(cfg.optim)
        if cfg.model.compile:
            if int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3:
                # ZeRO-3 gathers each layer's parameters in module hooks, which the graph would have to contain.
                log.warning("model.compile is not applied under ZeRO stage 3: the model runs eagerly")
            else:
                compile_model(task.model)
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=task,
            model_parameters=groups,
            config=ds_config,
            # A plain function, not the schedule object: LambdaLR saves (and a resume would restore) a callable
            # object's attributes, and a resumed run must follow its own max_steps, not the checkpoint's.
            lr_scheduler=lambda optimizer: LambdaLR(optimizer, lambda step: self.schedule(step)),
            dist_init_required=False,
        )
        if self.engine.bfloat16_enabled():
            self.dtype = torch.bfloat16
        elif self.engine.fp16_enabled():
            self.dtype = torch.float16
        else:
            self.dtype = torch.float32
        log.info(
            "DeepSpeed ZeRO stage %d, %s, gradient accumulation %d, %d param groups",
            self.engine.zero_optimization_stage(),
            self.dtype,
            self.engine.gradient_accumulation_steps(),
            len(groups),
        )

    # -- training ------------------------------------------------------------------------------------------------
    @property
    def grad_accum(self) -> int:
        return int(self.engine.gradient_accumulation_steps())

    @property
    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.engine(move_batch(batch, self.dist.device, self.dtype))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        """One micro-step; DeepSpeed applies the optimizer (and the schedule) at the accumulation boundary."""
        self.engine.step()

    def lr(self) -> float:
        """The base learning rate of the last optimizer step (optim.lr x schedule); other groups run at fixed
        multiples of it."""
        return self.cfg.optim.lr * self.schedule(max(0, self.lr_scheduler.last_epoch - 1))

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step (DeepSpeed computes it in step; None if it did not)."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save(self, save_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Every rank calls this: each writes its own ZeRO shards. DeepSpeed's `latest` file is not written here
        (the checkpointer writes it once the checkpoint is complete on every rank)."""
        self.engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)

    def load(self, load_dir: Path, tag: str) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint '{tag}' from {load_dir}")
        return dict(client_state or {})
