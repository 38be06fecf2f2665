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
rank ZeRO has nothing to shard, and its flat fp32 copies, gradient buckets and fp64 norm cost host time every step:
on a CPU they slow the step, on a GPU they make it host-bound (per-tensor norms, per-parameter gradient hooks and
bucket copies, stream synchronisations every step) against plain PyTorch with fp32 weights, autocast bf16 and fused
AdamW. Figures: docs/performance.md, sections "The DeepSpeed engine against plain PyTorch on one CPU rank" and "On
one GPU: NVIDIA H200". Optimizer offload and fp16 keep the JSON's stage and precision.

Several ranks run the default file (deepspeed_configs/stage0_*.json) at ZeRO stage 0 too, as DDP does: fp32 weights
(autocast bf16 on GPUs), torch's fused AdamW on the module's own parameters, and the gradient all-reduce overlapped
with backward in buckets by torch DDP's C++ Reducer (trainer/engine/grad_sync.py; `overlapped_allreduce`), instead of
DeepSpeed's stage-0 all-reduce after backward. The 267M parameters of vqa2-base (4.3 GB of fp32 training state) fit
every GPU, so ZeRO's sharding buys no memory that is needed, and its step costs host work (a Python hook per
parameter, a norm per gradient tensor, bucket copies): measured against torch DDP, ZeRO-1/2 and DeepSpeed's own
stage-0 all-reduce in docs/performance.md. ZeRO files stay available by --deepspeed_config. A checkpoint is resumed at
the stage and in the precision it was written with (`Engine.load`), on one rank and on several.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from trainer.config.config import ConfigError, OptimConfig
from trainer.engine.dist import DistInfo

# The config's functions live in trainer/engine/ds_config.py; callers import them from here, the DeepSpeed boundary.
from trainer.engine.ds_config import (  # noqa: F401
    _PRECISION_KEYS,
    CONFIG_DIR,
    default_ds_config_path,
    load_ds_config,
    overlapped_allreduce,
    plain_single_rank,
    resolve_ds_config,
)
from trainer.engine.grad_sync import DEFAULT_BUCKET_ELEMENTS, BucketedAllReduce
from trainer.engine.optim import WarmupLinearDecay
from trainer.modeling.compiling import compile_model

log = logging.getLogger(__name__)


def checkpoint_zero(path: Path) -> tuple[int, dict[str, Any] | None]:
    """The ZeRO stage a DeepSpeed checkpoint folder was written with (0 without ZeRO optimizer shards, else the stage
    recorded in them, read as `deepspeed.checkpoint.ds_to_universal` does) and the DeepSpeed config recorded with it
    (with the shards under ZeRO, in `mp_rank_00_model_states.pt` at stage 0; None if none was recorded).
    Memory-mapped: no tensor is read."""
    shards = sorted(path.glob("*zero_pp_rank_*_optim_states.pt"))
    if not shards:
        states = path / "mp_rank_00_model_states.pt"
        if not states.is_file():
            return 0, None
        written = torch.load(states, map_location="cpu", mmap=True, weights_only=False).get("ds_config")
        return 0, dict(written) if isinstance(written, Mapping) else None
    state = torch.load(shards[0], map_location="cpu", mmap=True, weights_only=False)
    written = state.get("ds_config")
    return int(state["optimizer_state_dict"].get("zero_stage", 1)), (
        dict(written) if isinstance(written, Mapping) else None
    )


def universal_zero_stage(path: Path) -> int:
    """The ZeRO stage of the checkpoint a universal one was converted from (ds_to_universal keeps the optimizer's
    `zero_stage` in zero/optimizer_state.pt; 0 if it is not there)."""
    state = path / "zero" / "optimizer_state.pt"
    if not state.is_file():
        return 0
    return int(torch.load(state, map_location="cpu", mmap=True, weights_only=False).get("zero_stage", 0))


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
    precision its checkpoint was written with (e.g. a single-rank run that continued a universal checkpoint, which
    runs under ZeRO, or one whose DeepSpeed file set its own `torch_autocast` section) and builds the engine that way,
    so the checkpoint loads.

    Under DeepSpeed's `torch_autocast` (one bf16 rank, `plain_single_rank`) the module keeps fp32 weights and DeepSpeed
    enters torch.autocast around the module in its forward (deepspeed/runtime/engine.py `forward`, through
    runtime/torch_autocast.py `autocast_if_enabled`), not in backward: `dtype` is fp32 (the batches stay fp32;
    autocast casts at each operation) and `autocast_dtype` is bf16. The losses turn autocast off and run in fp32
    (trainer/modeling/losses.py).
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
        self._grad_sync: Any = (
            None  # trainer/engine/grad_sync.py's BucketedAllReduce, under `overlapped_allreduce`
        )
        self._armed = False

    def _build(self) -> None:
        # deepspeed here, not at the top: importing it takes seconds and probes the accelerator, and trainer/main.py
        # imports this module (its --help need not wait).
        import deepspeed

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
            # is the identity at the cost of two copies of all gradients per step.
            self._engine.enable_backward_allreduce = False
        elif overlapped_allreduce(self.ds_config, self.dist.world_size):
            # Several ranks at stage 0: the all-reduce runs in buckets during backward (trainer/engine/grad_sync.py), so
            # DeepSpeed must not all-reduce the averaged gradients a second time after it.
            zero = self.ds_config.get("zero_optimization", {})
            self._grad_sync = BucketedAllReduce(
                self._engine.module,
                bucket_elements=int(zero.get("reduce_bucket_size", DEFAULT_BUCKET_ELEMENTS)),
                comm_dtype=self._engine.communication_data_type,
                device=self.dist.device,
            )
            self._engine.enable_backward_allreduce = False
        log.info(
            "DeepSpeed ZeRO stage %d, %s, gradient all-reduce: %s, gradient accumulation %d, %d param groups",
            self.zero_stage,
            self.precision,
            self.allreduce,
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

    @property
    def allreduce(self) -> str:
        """How the gradients are averaged over the ranks, for labels and logs."""
        engine = self.engine
        if self.dist.world_size == 1:
            return "none (one rank)"
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
            engine.communication_data_type, str(engine.communication_data_type)
        )
        if self._grad_sync is not None:
            return (
                f"overlapped with backward, buckets of {self._grad_sync.bucket_elements:,} elements, {dtype}"
            )
        if self.zero_stage == 0:
            return f"after backward (DeepSpeed, one flat buffer), {dtype}"
        return f"ZeRO-{self.zero_stage} reduction, {dtype}"

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
        engine = self.engine
        if (
            self._grad_sync is not None
            and not self._armed
            and torch.is_grad_enabled()
            and engine.is_gradient_accumulation_boundary()
        ):
            # This micro-batch's backward ends the accumulation: its gradients are all-reduced as they are produced.
            # Armed once: a forward whose backward never ran (a skipped non-finite batch) leaves it armed for the next.
            self._grad_sync.arm()
            self._armed = True
        if self._grad_sync is not None:
            with self._grad_sync.forward_context():
                return engine(move_batch(batch, self.dist.device, self.dtype))
        return engine(move_batch(batch, self.dist.device, self.dtype))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self._armed = False

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
        if self._engine is None:
            self._follow_checkpoint_stage(Path(load_dir) / tag, tag)
        path, _ = self.engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint '{tag}' from {load_dir}")

    def _follow_checkpoint_stage(self, folder: Path, tag: str) -> None:
        """Build the engine at the ZeRO stage, and in the precision, that checkpoint `tag` was written with, where it
        differs from this run's.

        The optimizer state of a ZeRO checkpoint is in ZeRO's flat shards, which only a ZeRO optimizer loads; that of a
        stage-0 checkpoint is torch's AdamW state dict, which a ZeRO optimizer cannot load (DeepSpeed would warn and
        restart AdamW's moments from zero). So a run resumes at the checkpoint's stage and with the precision recorded
        with it (bf16 weights for a ZeRO bf16 one, autocast for a stage-0 one), and so do its own checkpoints: a ZeRO-2
        run continued under the stage-0 default stays at ZeRO-2, and a stage-0 run continued with a ZeRO file stays at
        stage 0 (with the overlapped all-reduce on several ranks). This covers one rank (a run that continued a universal
        checkpoint, or whose DeepSpeed file kept ZeRO with a `torch_autocast` section of its own) and several (a ZeRO
        file given to the start and not to the resume). A new stage starts with a new run (or, from ZeRO, a universal
        checkpoint)."""
        configured = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        written, written_cfg = checkpoint_zero(folder)
        if self.ds_config.get("checkpoint", {}).get("load_universal", False):
            # A universal checkpoint (ZeRO shards converted by ds_to_universal) loads into a ZeRO optimizer only: any
            # ZeRO stage does, and a run configured at stage 0 (the default) takes the stage its source was written at.
            if configured > 0:
                return
            written = universal_zero_stage(folder) or 2
        if written == configured or (written == 0 and not (folder / "mp_rank_00_model_states.pt").is_file()):
            return  # the same stage, or no checkpoint there: DeepSpeed's load says so
        if written == 3 and self.compile:
            raise ConfigError(
                f"checkpoint {tag} was written under ZeRO stage 3, which runs eagerly: resume it with "
                f"model.compile=false"
            )
        ds = dict(self.ds_config)
        if written_cfg is not None:
            ds = {k: v for k, v in ds.items() if k not in _PRECISION_KEYS}
            ds.update({k: copy.deepcopy(written_cfg[k]) for k in _PRECISION_KEYS if k in written_cfg})
        zero = {**ds.get("zero_optimization", {}), "stage": written}
        if written == 0:
            # The stage-0 default's all-reduce on several ranks (overlapped with backward), unless the checkpoint's own
            # config said otherwise.
            written_zero = (written_cfg or {}).get("zero_optimization", {})
            zero["overlap_comm"] = bool(written_zero.get("overlap_comm", True))
            if "reduce_bucket_size" in written_zero:
                zero["reduce_bucket_size"] = written_zero["reduce_bucket_size"]
        ds["zero_optimization"] = zero
        self.ds_config = ds
        log.warning(
            "checkpoint %s was written at ZeRO stage %d: this run keeps that stage and its precision instead of "
            "stage %d (the configured stage runs in a run started afresh)",
            tag,
            written,
            configured,
        )
