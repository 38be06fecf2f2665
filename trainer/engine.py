"""The DeepSpeed boundary: the one module that calls `deepspeed.initialize`, backward, step, save and load.

Who owns what (see deepspeed_configs/README.md): the JSON file owns ZeRO stage, precision, communication, offload and
gradient clipping; the trainer config owns the optimizer (AdamW as ViLT: per-group learning rates from the model's
param groups), the schedule (10% linear warm-up, then linear decay to zero) and the batch sizes, which this module
writes into the DeepSpeed config. A JSON that sets one of those trainer-owned keys to a different value is refused,
so no setting has two owners.

`model.compile` (trainer config) compiles the fused model, not the whole task, before it is handed to DeepSpeed:
`compile_model` below. The losses stay eager, in fp32 and with their cross-rank all-gather, outside the graph.

One rank runs without ZeRO (`resolve_ds_config`, `plain_single_rank`): ZeRO stage 0, DeepSpeed steps torch's fused
AdamW on the module's own fp32 weights and gradients, as a plain PyTorch script does; a bf16 JSON computes in bf16 by
DeepSpeed's `torch_autocast` section (torch.autocast, entered by DeepSpeed's forward) instead of bf16 weights. With one
rank ZeRO has nothing to shard. Its flat fp32 copies, gradient buckets and fp64 norm cost the CPU step 15-25%
(docs/performance.md); on one H200 (2026-11-27, vqa2-base clip-infonce-dot, batch 256, compiled) the ZeRO-2 bf16
engine ran at 1,392 samples/s at 384 px and 2,048 at 224 px against plain PyTorch's 1,635 and 3,257 (fp32 weights,
autocast bf16, fused AdamW): its step was host-bound (per-tensor norms, per-parameter gradient hooks and bucket
copies, 12 stream synchronisations a step); this engine's own GPU figure at stage 0 in autocast is still to be
measured. Several ranks, fp16 and optimizer offload keep the JSON's stage and precision; a checkpoint written under
ZeRO is resumed under the stage and precision it was written with (`Engine.load`).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from trainer.compiling import compile_model
from trainer.config import ConfigError, OptimConfig, TrainConfig
from trainer.dist import DistInfo
from trainer.optim import WarmupLinearDecay, adamw_settings

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
    if plain_single_rank(ds, world_size, load_universal=load_universal):
        _make_single_rank(ds)
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; DeepSpeed's own step prints would interleave
    ds.setdefault("wall_clock_breakdown", False)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def _optimizer_section(ds: Mapping[str, Any], optim: OptimConfig) -> dict[str, Any]:
    """DeepSpeed's optimizer section: AdamW's settings from trainer/optim.py, as the plain step builds it."""
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
    """One rank: nothing to shard. Stage 0 hands the module's own fp32 weights and gradients to torch's fused AdamW,
    as plain PyTorch does; ZeRO-1/2 would copy every gradient into a bucket and a flat partition, step a separate fp32
    copy of the weights and copy it back, and take an fp64 norm, every step. The JSON's other zero_optimization keys
    stay (DeepSpeed ignores them at stage 0; Engine.load restores its stage for a checkpoint written under ZeRO)."""
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": 0}
    bf16_key = _bf16_key(ds)
    if ds.get(bf16_key, {}).get("enabled", False):
        # bf16 by torch.autocast over fp32 weights, not bf16 weights: at stage 0 DeepSpeed 0.19.8 steps bf16 weights
        # through its unfused fp16-style optimizer (runtime/fp16/unfused_optimizer.py: fp32 copies made tensor by
        # tensor in Python, an overflow check that synchronises the device every step), measured at 983 samples/s
        # against ZeRO-2 bf16's 1,392 and plain PyTorch's 1,635 (one H200, 2026-11-27, vqa2-base clip-infonce-dot,
        # 384 px, batch 256, compiled). With fp32 weights DeepSpeed wraps nothing: the step is torch's fused AdamW on
        # the module's parameters, as plain PyTorch's with autocast.
        ds[bf16_key] = {**ds[bf16_key], "enabled": False}
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}


def _bf16_key(ds: Mapping[str, Any]) -> str:
    """The key DeepSpeed reads its bf16 section from: `bf16`, else the older `bfloat16` (runtime/precision_config.py)."""
    return "bf16" if "bf16" in ds or "bfloat16" not in ds else "bfloat16"


# The sections of a DeepSpeed config that set the precision of the weights and of the computation.
_PRECISION_KEYS = ("bf16", "bfloat16", "fp16", "torch_autocast")


def plain_single_rank(ds: Mapping[str, Any], world_size: int, *, load_universal: bool = False) -> bool:
    """Whether a run with DeepSpeed config `ds` on `world_size` ranks runs as plain PyTorch does instead of as the JSON
    says: ZeRO stage 0, DeepSpeed stepping torch's fused AdamW on the module's own fp32 weights, and a bf16 JSON's bf16
    turned into DeepSpeed's `torch_autocast` bf16 (`resolve_ds_config` makes the change).

    One rank without offload, in fp32 or bf16. Several ranks keep ZeRO (it shards optimizer state and gradients).
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


def checkpoint_zero(path: Path) -> tuple[int, dict[str, Any] | None]:
    """The ZeRO stage a DeepSpeed checkpoint folder was written with (0 without ZeRO optimizer shards, else the stage
    recorded in them, read as `deepspeed.checkpoint.ds_to_universal` does) and the DeepSpeed config recorded with the
    shards (None at stage 0 or if none was recorded). Memory-mapped: no tensor is read."""
    shards = sorted(path.glob("*zero_pp_rank_*_optim_states.pt"))
    if not shards:
        return 0, None
    state = torch.load(shards[0], map_location="cpu", mmap=True, weights_only=False)
    written = state.get("ds_config")
    return int(state["optimizer_state_dict"].get("zero_stage", 1)), (
        dict(written) if isinstance(written, Mapping) else None
    )


def move_batch(batch: Mapping[str, Any], device: torch.device, float_dtype: torch.dtype) -> dict[str, Any]:
    """Put a loader batch on the engine's device; pixels take the engine's compute dtype (bf16 under bf16 weights,
    fp32 under autocast, which casts at each operation)."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if k == "pixels" and v.is_floating_point():
                v = v.to(float_dtype)
        out[k] = v
    return out


class Engine:
    """A DeepSpeed engine around one `nn.Module` whose forward(batch) returns the losses (the VQATask).

    `deepspeed.initialize` runs on first use, not here: a resumed run first learns from `load` which ZeRO stage and
    precision its checkpoint was written with (a single-rank run written under ZeRO before stage 0 became the
    single-rank choice, e.g. ZeRO-2 with bf16 weights, or one that continued a universal checkpoint) and builds the
    engine that way, so the checkpoint loads.

    Under DeepSpeed's `torch_autocast` (one bf16 rank, `plain_single_rank`) the module keeps fp32 weights and DeepSpeed
    enters torch.autocast around the module in its forward (deepspeed/runtime/engine.py `forward`, through
    runtime/torch_autocast.py `autocast_if_enabled`), not in backward: `dtype` is fp32 (the batches stay fp32;
    autocast casts at each operation) and `autocast_dtype` is bf16. The losses turn autocast off and run in fp32
    (trainer/losses.py).
    """

    def __init__(
        self,
        task: torch.nn.Module,
        ds_config: dict[str, Any],
        dist: DistInfo,
        *,
        optim: OptimConfig,
        max_steps: int,
        compile: bool = False,
    ) -> None:
        self.task = task
        self.optim = optim
        self.compile = compile
        self.dist = dist
        self.ds_config = ds_config
        self.schedule = WarmupLinearDecay(max_steps, round(optim.warmup_ratio * max_steps))
        if compile:
            if int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3:
                # ZeRO-3 gathers each layer's parameters in module hooks, which the graph would have to contain.
                log.warning("model.compile is not applied under ZeRO stage 3: the model runs eagerly")
            else:
                compile_model(task.model)
        self._engine: Any = None
        self._grad_norm: torch.Tensor | None = None

    def _build(self) -> None:
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        groups = self.task.param_groups(self.optim)
        self._engine, _, _, _ = deepspeed.initialize(
            model=self.task,
            model_parameters=groups,
            config=self.ds_config,
            # A plain function, not the schedule object: LambdaLR saves (and a resume would restore) a callable
            # object's attributes, and a resumed run must follow its own max_steps, not the checkpoint's.
            lr_scheduler=lambda optimizer: LambdaLR(optimizer, lambda step: self.schedule(step)),
            dist_init_required=False,
        )
        if self._engine.bfloat16_enabled():
            self._dtype = torch.bfloat16
        elif self._engine.fp16_enabled():
            self._dtype = torch.float16
        else:
            self._dtype = torch.float32
        self._autocast_dtype = (
            self._engine.torch_autocast_dtype() if self._engine.torch_autocast_enabled() else None
        )
        if self.zero_stage == 0 and self.dist.world_size == 1:
            # Stage 0 all-reduces every gradient after backward (runtime/engine.py: allreduce_gradients ->
            # buffered_allreduce_fallback: flatten, all-reduce, divide by the world size, copy back). Over one rank that
            # is the identity at the cost of two copies of all gradients per step; several ranks keep it.
            self._engine.enable_backward_allreduce = False
        log.info(
            "DeepSpeed ZeRO stage %d, %s, gradient accumulation %d, %d param groups",
            self.zero_stage,
            self.precision,
            self.grad_accum,
            len(groups),
        )

    @property
    def engine(self) -> Any:
        """The DeepSpeed engine, built on first use."""
        if self._engine is None:
            self._build()
        return self._engine

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the module's weights and of the pixels it is given: fp32 under autocast, which casts at each
        operation (`autocast_dtype`)."""
        if self._engine is None:
            self._build()
        return self._dtype

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype DeepSpeed's `torch_autocast` computes in (its forward runs under torch.autocast); None without."""
        if self._engine is None:
            self._build()
        return self._autocast_dtype

    @property
    def precision(self) -> str:
        """The precision for labels and logs: the weights' dtype ('float32', 'bfloat16'), or 'fp32 weights, autocast
        bf16' under DeepSpeed's torch_autocast."""
        if self.autocast_dtype is None:
            return str(self.dtype).replace("torch.", "")
        short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        return f"{short[self.dtype]} weights, autocast {short[self.autocast_dtype]}"

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

    def step(self, *, measure_grad_norm: bool = False) -> None:
        """One micro-step; DeepSpeed applies the optimizer (and the schedule) at the accumulation boundary.

        Without ZeRO DeepSpeed computes no gradient norm (ZeRO does, every step); the caller asks for one on the steps
        it logs (`measure_grad_norm`), and it is computed then, before the optimizer step clears the gradients: one
        pass over the gradients, no host sync."""
        engine = self.engine
        if not engine.zero_optimization() and engine.is_gradient_accumulation_boundary():
            self._grad_norm = None
            if measure_grad_norm:
                grads = [p.grad for p in self.task.parameters() if p.grad is not None]
                self._grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None
        engine.step()

    def lr(self) -> float:
        """The base learning rate of the last optimizer step (optim.lr x schedule); other groups run at fixed
        multiples of it."""
        return self.optim.lr * self.schedule(max(0, self.engine.lr_scheduler.last_epoch - 1))

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step (DeepSpeed's under ZeRO; ours at stage 0, on the steps the
        trainer logs); None if none was computed."""
        if not self.engine.zero_optimization():
            return None if self._grad_norm is None else float(self._grad_norm)
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save(self, save_dir: Path, tag: str) -> None:
        """Every rank calls this: each writes its own ZeRO shards. DeepSpeed's `latest` file is not written here
        (the checkpointer writes it once the checkpoint is complete on every rank), nor the trainer's state (the
        checkpointer's trainer_state.json holds it, once)."""
        self.engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)

    def load(self, load_dir: Path, tag: str) -> None:
        stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        if self._engine is None and stage == 0 and self.dist.world_size == 1:
            # A single-rank checkpoint written under ZeRO (before stage 0 was the single-rank choice, e.g. by the
            # ZeRO-2 bf16 one-GPU run, or after a universal resume) holds its optimizer state in ZeRO's flat shards,
            # which only a ZeRO optimizer loads: this run continues at the checkpoint's stage and with the precision
            # recorded with its shards (bf16 weights for a bf16 one, not autocast), and so do its own checkpoints.
            written, written_cfg = checkpoint_zero(Path(load_dir) / tag)
            if written == 3 and self.compile:
                raise ConfigError(
                    f"checkpoint {tag} was written under ZeRO stage 3, which runs eagerly: resume it with "
                    f"model.compile=false"
                )
            if written:
                ds = dict(self.ds_config)
                if written_cfg is not None:
                    ds = {k: v for k, v in ds.items() if k not in _PRECISION_KEYS}
                    ds.update({k: copy.deepcopy(written_cfg[k]) for k in _PRECISION_KEYS if k in written_cfg})
                ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": written}
                self.ds_config = ds
                log.warning(
                    "checkpoint %s was written under ZeRO stage %d: this single-rank run keeps that stage and its "
                    "precision (the stage-0 speed returns with a run started afresh)",
                    tag,
                    written,
                )
        path, _ = self.engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint '{tag}' from {load_dir}")
