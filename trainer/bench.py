"""`python -m trainer.bench`: training throughput of the model variants: one table at the end, the same numbers in JSON.

    python -m trainer.bench --preset vqa2-base --variants clip-infonce-dot,baseline --image-sizes 384,224 \\
        --batch-size 256 --modes synthetic,shards,plain --train-data DIR --set model.compile=true
    python -m trainer.bench --preset tiny --train-data data/easyvqa/train          (the CPU: the tiny model)

Every variant x image size x mode is one cell. A cell builds the task (model + losses, random weights: a preset's
pretrained names are dropped, speed does not depend on them and nothing here reaches the network) with the project's
own builders, trains `--warmup` steps untimed (the first one compiles under model.compile), then `--repeats` windows of
`--steps` optimizer steps; the table shows the median window. The device is synchronised only at the ends of a window,
so the host runs ahead of the device as in training. Per cell:

- samples/s and step time (one optimizer step = one micro-batch of `--batch-size`);
- peak memory: CUDA max allocated on a GPU; on the CPU the process's peak resident set (VmHWM), reset before the
  timed windows: a process figure, not a device-memory one;
- model FLOPs utilisation: the FLOPs of one training step (forward and backward of the real task on a batch of the
  real shape, counted by `torch.utils.flop_counter.FlopCounterMode`) x steps/s over a matrix-product peak measured in
  this run on this device (bf16 on a GPU, where each cell is compared with the peak of its own precision; fp32 and
  bf16 on the CPU, where the faster of the two is the basis; the table says which);
- the fraction of the window spent waiting for the next batch (as train/data_wait_fraction in training).

Modes:
- synthetic: one batch already on the device, reused every step: the model in the DeepSpeed engine (trainer/engine.py)
  alone;
- shards: shards from --train-data through `build_loader` (DALI's GPU decoder on a GPU), end to end through the engine;
- plain: the same task with torch.optim.AdamW (same param groups and schedule) and no DeepSpeed, bf16 by autocast where
  the DeepSpeed config is bf16: its difference to `synthetic` is the engine's overhead.

Without --train-data the model has VQA v2's 3,129 answers and BERT's 30,522-token vocabulary (ViLT's); with it, the
data's answers and a vocabulary built from its questions, in every mode. It runs in one process (on a GPU, or on the
CPU with a 1-rank gloo group, as trainer/dist.py sets up), so OpenMP keeps its default wait policy as one rank of
trainer/main.py does; set OMP_WAIT_POLICY to measure another. docs/performance.md has the figures measured with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import logging
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from data_pipeline.errors import is_bad_input
from trainer import dist as D
from trainer.config import VARIANTS, ConfigError, RunConfig, apply_overrides
from trainer.engine import (
    Engine,
    WarmupLinearDecay,
    compile_model,
    default_ds_config_path,
    load_ds_config,
    move_batch,
    resolve_ds_config,
)
from trainer.presets import PRESETS, get_preset

log = logging.getLogger("trainer.bench")

MODES = ("synthetic", "shards", "plain")
# Without --train-data the model gets VQA v2's answer list size (3,129 answers, as ViLT) and BERT's WordPiece
# vocabulary (30,522 tokens, ViLT's tokenizer); with it, the data's own answers and a vocabulary built from its
# questions, in every mode, so that the three modes time the same model.
DEFAULT_ANSWERS = 3129
DEFAULT_VILT_VOCAB = 30522
CLIP_VOCAB = 49408  # open_clip's BPE; its last id, end-of-text, marks where CLIP pools the text feature
GIB = 2**30


# -- measurements --------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    device: torch.device, dtype: torch.dtype, n: int, *, reps: int, budget_s: float = 2.0
) -> float:
    """The best FLOP/s of `reps` back-to-back n x n @ n x n products in `dtype`: timed 3 to 10 times, within about
    `budget_s` seconds (a shared CPU needs the repetitions: its best timing is its peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # kernel selection, allocation
    synchronize(device)
    best, start = 0.0, time.perf_counter()
    for trial in range(10):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
        if trial >= 2 and time.perf_counter() - start > budget_s:
            break
    return best


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
):
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_step_flops(
    task: torch.nn.Module, batch: dict[str, Any], *, autocast: torch.dtype | None = None
) -> int:
    """FLOPs of one forward + backward of `task` on `batch` (FlopCounterMode); the gradients are dropped after.

    torch's counter knows the CUDA attention kernels but not the CPU one that `scaled_dot_product_attention` runs on
    the CPU: it is counted here with torch's own attention formulas, so the CPU figure covers attention too.
    """
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    counter = FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
        },
    )
    device_type = batch["pixels"].device.type
    with counter, torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        task(batch)["loss"].backward()
    task.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


class PeakMemory:
    """CUDA max allocated on a GPU; the process's peak resident set (VmHWM) on the CPU, reset through clear_refs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.label = "CUDA max allocated" if device.type == "cuda" else "process peak RSS (VmHWM)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # "5" resets the peak resident set size of this process (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.label = "process peak RSS since start (ru_maxrss: VmHWM could not be reset)"

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            status = Path("/proc/self/status").read_text()
            match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
            if match and "ru_maxrss" not in self.label:
                return int(match.group(1)) * 1024
        except OSError:
            pass
        import resource

        self.label = "process peak RSS since start (ru_maxrss)"
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# -- what runs in a cell -------------------------------------------------------------------------------------------
def synthetic_batch(
    cfg: RunConfig, *, n_answers: int, vilt_vocab: int, batch_size: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A batch of the loader's contract (data_pipeline/batch.py) with random content, on `device`."""
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    vilt_ids = torch.randint(5, vilt_vocab, (batch_size, m.max_text_len), generator=g)
    vilt_ids[:, 0] = 2  # [CLS]
    lengths = torch.randint(4, m.max_text_len + 1, (batch_size,), generator=g)
    vilt_mask = (torch.arange(m.max_text_len)[None] < lengths[:, None]).long()
    rows = torch.arange(batch_size)
    clip_ids = torch.randint(1, CLIP_VOCAB - 1, (batch_size, m.clip_context_length), generator=g)
    clip_ids[rows, torch.randint(2, m.clip_context_length, (batch_size,), generator=g)] = CLIP_VOCAB - 1
    targets = torch.zeros(batch_size, n_answers)
    targets[rows, torch.randint(0, n_answers, (batch_size,), generator=g)] = 1.0
    targets[rows, torch.randint(0, n_answers, (batch_size,), generator=g)] = 0.3
    batch = {
        "pixels": torch.randn(batch_size, 3, m.image_size, m.image_size, generator=g),
        "vilt_ids": vilt_ids,
        "vilt_mask": vilt_mask,
        "clip_ids": clip_ids,
        "targets": targets,
        "question_id": torch.arange(batch_size),
    }
    return {k: v.to(device) for k, v in batch.items()}


class PlainEngine:
    """The task without DeepSpeed: torch.optim.AdamW over the same param groups and schedule; bf16 by autocast (fp32
    weights), as a plain PyTorch training script does it. Same interface as trainer.engine.Engine's training half."""

    def __init__(self, task: torch.nn.Module, cfg: RunConfig, device: torch.device, *, bf16: bool) -> None:
        from torch.optim.lr_scheduler import LambdaLR

        self.task = task.to(device)
        self.device = device
        self.bf16 = bf16
        self.dtype = torch.float32  # pixels stay fp32: autocast casts at each operation
        o = cfg.optim
        fused = {"fused": True}  # torch's fused AdamW (CUDA, and CPU since torch 2.4), as the engine's
        self.optimizer = torch.optim.AdamW(
            task.param_groups(o), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, **fused
        )
        total = cfg.train.max_steps
        schedule = WarmupLinearDecay(total, round(o.warmup_ratio * total))
        self.scheduler = LambdaLR(self.optimizer, schedule)

    def train(self, mode: bool = True) -> None:
        self.task.train(mode)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.task(move_batch(batch, self.device, self.dtype))

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class DeviceBatch:
    """The same batch, already on the device, every step (the synthetic and plain modes)."""

    kind = "on-device batch"
    epochs_started = 0

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.batch

    def close(self) -> None:
        pass


class EpochBatches:
    """Batches from `make_loader(epoch)`, epoch after epoch, counting the epochs started (each restarts the loader)."""

    def __init__(self, make_loader: Callable[[int], Any]) -> None:
        self.make_loader = make_loader
        self.epochs_started = 0
        self.kind = "?"
        self._it = self._batches()

    def _batches(self) -> Iterator[dict[str, Any]]:
        epoch = 0
        while True:
            loader = self.make_loader(epoch)
            self.kind = loader.kind
            self.epochs_started += 1
            inner = iter(loader)
            try:
                yield from inner
            finally:
                close = getattr(inner, "close", None)
                if close is not None:  # the DALI loader's host thread and pipeline go now, not at collection
                    close()
            epoch += 1

    def __next__(self) -> dict[str, Any]:
        return next(self._it)

    def close(self) -> None:
        self._it.close()


class HFViltTask(torch.nn.Module):
    """transformers' `ViltForQuestionAnswering` with the preset's ViLT shape (ViLT-B/32 for vqa2-base) and random
    weights, behind the task interface (forward(batch) -> {"loss"}, param_groups): the stock ViLT the project is
    measured against, trained as its own code does (BCE x answers, eager attention, no compilation)."""

    def __init__(self, cfg: RunConfig, *, n_answers: int, vilt_vocab: int) -> None:
        from transformers import ViltConfig, ViltForQuestionAnswering

        super().__init__()
        m = cfg.model
        config = ViltConfig(
            vocab_size=vilt_vocab, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size, image_size=m.image_size,
            patch_size=m.patch_size, max_position_embeddings=m.max_text_len, num_labels=n_answers,
        )  # fmt: skip
        self.model = ViltForQuestionAnswering(config)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.model(
            input_ids=batch["vilt_ids"],
            attention_mask=batch["vilt_mask"],
            pixel_values=batch["pixels"],
            labels=batch["targets"],
        )
        return {"loss": out.loss}

    def param_groups(self, optim: Any) -> list[dict[str, Any]]:
        """ViLT's recipe: the head at lr x head_lr_mult, no weight decay on biases and norms."""
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            key = (name.startswith("classifier."), param.ndim < 2 or "norm" in name.lower())
            groups.setdefault(key, []).append(param)
        return [
            {
                "params": params,
                "lr": optim.lr * (optim.head_lr_mult if head else 1.0),
                "weight_decay": 0.0 if no_decay else optim.weight_decay,
            }
            for (head, no_decay), params in sorted(groups.items())
        ]


# Host-device synchronisations as the profiler names them: each one stalls the host until the GPU catches up.
_SYNC_EVENTS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "aten::_local_scalar_dense",
)


def profile_steps(engine: Any, batches: Any, n: int, device: torch.device, out: Path) -> dict[str, Any]:
    """`n` more steps under torch.profiler; the operator table (self device time first on a GPU) goes to `out`.

    Returns what the table shows in numbers: host (CPU) time and device time per step from the profiler's own
    totals, and the host synchronisations per step, the ones that keep the host from running ahead of the GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        train_steps(engine, batches, n)
        synchronize(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = [
        f"{n} steps, {wall / n * 1e3:.1f} ms per step under the profiler",
        events.table(sort_by=sort, row_limit=30),
    ]
    if device.type == "cuda":
        tables.append(events.table(sort_by="self_cpu_time_total", row_limit=20))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(tables) + "\n")
    # Kernels are events of their own (device_type CUDA); the operators that launch them carry the same time again.
    kernels = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    device_us = sum(e.self_device_time_total for e in kernels)
    syncs = {e.key: e.count / n for e in events if e.key in _SYNC_EVENTS}
    return {
        "file": str(out),
        "steps": n,
        "wall_s_per_step": wall / n,
        "device_busy_s_per_step": device_us / 1e6 / n,
        "syncs_per_step": syncs,
    }


def train_steps(engine: Any, batches: Any, n: int) -> float:
    """`n` optimizer steps (one micro-batch each); returns the seconds spent waiting for batches."""
    wait = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        out = engine.forward(batch)
        engine.backward(out["loss"])
        engine.step()
    return wait


@dataclasses.dataclass
class Timing:
    first_step_s: float
    windows: list[dict[str, float]]
    peak_memory_bytes: int
    memory_measure: str
    epoch_restarts: int
    """Loader epochs begun during the timed windows: each rebuilds the loader inside the timing."""


def time_engine(
    engine: Any, batches: Any, *, batch_size: int, args: argparse.Namespace, device: torch.device
) -> Timing:
    """The first step (compilation, allocator and loader start-up), the rest of the warm-up, then the windows."""
    memory = PeakMemory(device)
    engine.train(True)
    synchronize(device)
    t0 = time.perf_counter()
    train_steps(engine, batches, 1)
    synchronize(device)
    first = time.perf_counter() - t0
    train_steps(engine, batches, args.warmup - 1)
    synchronize(device)
    memory.reset()
    epochs = batches.epochs_started
    windows = []
    for _ in range(args.repeats):
        synchronize(device)
        t0 = time.perf_counter()
        wait = train_steps(engine, batches, args.steps)
        synchronize(device)
        elapsed = time.perf_counter() - t0
        windows.append(
            {
                "samples_per_s": args.steps * batch_size / elapsed,
                "step_time_s": elapsed / args.steps,
                "data_wait_fraction": min(1.0, wait / elapsed),
            }
        )
    return Timing(first, windows, memory.read(), memory.label, batches.epochs_started - epochs)


# -- the run -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    """What every cell shares: device, DeepSpeed config, precision, the data's answers and tokenizer."""

    args: argparse.Namespace
    base: RunConfig
    batch_size: int
    dist: D.DistInfo
    ds_base: dict[str, Any]
    ds_path: Path
    bf16: bool
    n_answers: int
    vilt_vocab: int
    clip_vocab: list[int] | None
    tokenizer: Any
    peaks: dict[str, float]
    peak_size: int


def cell_config(setup: Setup, variant: str, image_size: int) -> RunConfig:
    a = setup.args
    total = a.warmup + a.steps * a.repeats
    return apply_overrides(
        setup.base,
        [
            f"model.variant={variant}",
            f"model.image_size={image_size}",
            "model.vilt_pretrained=none",
            "model.clip_pretrained=none",
            f"train.micro_batch_size={setup.batch_size}",
            f"train.global_batch_size={setup.batch_size}",
            f"train.max_steps={total}",
        ],
    )


def build_cell_task(setup: Setup, cfg: RunConfig) -> torch.nn.Module:
    from trainer.task import build_task

    torch.manual_seed(cfg.train.seed)  # the same initial weights in every mode
    return build_task(
        cfg, n_answers=setup.n_answers, vilt_vocab_size=setup.vilt_vocab, clip_vocab=setup.clip_vocab
    )


def make_batches(setup: Setup, cfg: RunConfig, task: torch.nn.Module, mode: str, dtype: torch.dtype):
    """A DeviceBatch (synthetic, plain) or the training loader over --train-data, epoch after epoch (shards)."""
    device = setup.dist.device
    if mode != "shards":
        batch = synthetic_batch(
            cfg, n_answers=setup.n_answers, vilt_vocab=setup.vilt_vocab, batch_size=cfg.train.micro_batch_size,
            device=device, seed=cfg.train.seed,
        )  # fmt: skip
        batch["pixels"] = batch["pixels"].to(dtype)
        return DeviceBatch(batch)
    from data_pipeline.loader import build_loader

    def make_loader(epoch: int):
        return build_loader(
            setup.args.train_data, tokenizer=setup.tokenizer, batch_size=cfg.train.micro_batch_size,
            image_size=cfg.model.image_size, mean=task.image_mean, std=task.image_std, rank=0, world_size=1,
            train=True, seed=cfg.train.seed, epoch=epoch, kind=cfg.data.loader, num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer, device=device,
        )  # fmt: skip

    return EpochBatches(make_loader)


HF_VILT = "transformers-vilt"  # the row name of transformers' ViltForQuestionAnswering (--hf-vilt)


def run_cell(
    setup: Setup, variant: str, image_size: int, mode: str, flops: dict[tuple[str, int], int]
) -> dict[str, Any]:
    """One cell: a fresh task (same seed in every mode), its FLOPs counted once per variant and size (eager, before
    any compilation), the engine of the mode, the timing (and a profile with --profile); everything is released
    before the next cell. `variant` HF_VILT is transformers' ViLT in the plain mode, eager, as its own code runs."""
    a = setup.args
    device = setup.dist.device
    hf = variant == HF_VILT
    cfg = cell_config(setup, setup.base.model.variant if hf else variant, image_size)
    if hf:
        torch.manual_seed(cfg.train.seed)
        task: torch.nn.Module = HFViltTask(cfg, n_answers=setup.n_answers, vilt_vocab=setup.vilt_vocab).to(
            device
        )
    else:
        task = build_cell_task(setup, cfg).to(device)
    key = (variant, image_size)
    if key not in flops:
        probe = synthetic_batch(
            cfg,
            n_answers=setup.n_answers,
            vilt_vocab=setup.vilt_vocab,
            batch_size=setup.batch_size,
            device=device,
        )
        flops[key] = count_step_flops(task, probe, autocast=torch.bfloat16 if setup.bf16 else None)
        del probe
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the eager count's activations; other processes may share the GPU
    compiled = cfg.model.compile and not hf
    if mode == "plain":
        engine: Any = PlainEngine(task, cfg, device, bf16=setup.bf16)
        if compiled:
            compile_model(task.model)
        label = f"torch AdamW{', autocast bf16' if setup.bf16 else ', fp32'}"
    else:
        ds_cfg = resolve_ds_config(setup.ds_base, cfg, 1, device)
        engine = Engine(task, ds_cfg, cfg, setup.dist)
        label = f"DeepSpeed ZeRO-{engine.zero_stage} {engine.precision}"
    batches = make_batches(setup, cfg, task, mode, engine.dtype)
    profile = None
    try:
        timing = time_engine(engine, batches, batch_size=setup.batch_size, args=a, device=device)
        loader_kind = batches.kind
        if a.profile:
            out = Path(a.profile) / f"profile_{variant}_{image_size}px_{mode}.txt"
            profile = profile_steps(engine, batches, a.profile_steps, device, out)
    finally:
        batches.close()
        del engine, task
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if cfg.model.compile:
            # Cells of other variants, image sizes or precisions add graphs to the same code object; past dynamo's
            # recompile limit (8 in torch 2.14) the later cells would run eagerly, with only a warning to show it.
            torch._dynamo.reset()
    row = summarise(setup, cfg, mode, label, loader_kind, timing, flops[key], compiled=compiled)
    if hf:
        row["variant"] = HF_VILT
    if profile is not None:
        row["profile"] = profile
    return row


def summarise(
    setup: Setup,
    cfg: RunConfig,
    mode: str,
    engine_label: str,
    loader_kind: str,
    timing: Timing,
    flops_per_step: int,
    *,
    compiled: bool,
) -> dict[str, Any]:
    windows = timing.windows
    sps = statistics.median(w["samples_per_s"] for w in windows)
    step = statistics.median(w["step_time_s"] for w in windows)
    precision = "bf16" if setup.bf16 else "fp32"
    basis = mfu_basis(setup.dist.device, precision, setup.peaks)
    peak = setup.peaks[basis]
    batch = cfg.train.micro_batch_size
    return {
        "variant": cfg.model.variant,
        "image_size": cfg.model.image_size,
        "mode": mode,
        "engine": engine_label,
        "loader": loader_kind,
        "compile": compiled,
        "batch_size": batch,
        "samples_per_s": sps,
        "step_time_s": step,
        "peak_memory_bytes": timing.peak_memory_bytes,
        "memory_measure": timing.memory_measure,
        "flops_per_step": flops_per_step,
        "flops_per_sample": flops_per_step / batch,
        "precision": precision,
        "mfu_basis": basis,
        "peak_flops_per_s": peak,
        "mfu": flops_per_step / step / peak,
        "data_wait_fraction": statistics.median(w["data_wait_fraction"] for w in windows),
        "first_step_s": timing.first_step_s,
        "epoch_restarts": timing.epoch_restarts,
        "windows": windows,
    }


# -- set-up and output ---------------------------------------------------------------------------------------------
def build_tokenizer(cfg: RunConfig, folder: str, work: Path):
    """A vocabulary built from the data's questions (never a pretrained ViLT's: the weights are random here) with
    the CLIP ids every variant may need, by the run folder's own builder."""
    from trainer import run_folder

    model = dataclasses.replace(cfg.model, vilt_pretrained=None)
    questions = functools.partial(run_folder.shard_questions, folder)
    return run_folder.build_tokenizer(model, work / run_folder.TOKENIZER_DIR, questions, fit_clip_vocab=True)


def mfu_basis(device: torch.device, precision: str, peaks: dict[str, float]) -> str:
    """Which measured peak a cell's MFU divides by: its own precision's on a GPU; on the CPU the fastest measured
    one (a CPU without bf16 units emulates bf16 products, slower than fp32: no peak for bf16 work, which may run
    partly in fp32 kernels)."""
    if device.type == "cuda":
        return precision
    return max(peaks, key=lambda name: peaks[name])


def measure_peaks(device: torch.device, bf16: bool, size: int | None) -> tuple[dict[str, float], int]:
    """Matrix-product peaks: bf16 (and fp32 where the cells run in fp32) on a GPU; fp32 and bf16 on the CPU."""
    n = size or (8192 if device.type == "cuda" else 512)
    reps = 20 if device.type == "cuda" else 2
    dtypes = ["bf16"] + ([] if bf16 and device.type == "cuda" else ["fp32"])
    table = {"bf16": torch.bfloat16, "fp32": torch.float32}
    return {name: matmul_peak(device, table[name], n, reps=reps) for name in dtypes}, n


def machine_line() -> str:
    from data_pipeline.bench import machine

    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:  # pragma: no cover - deepspeed is a pinned dependency
        ds = "not installed"
    return f"{machine()}, DeepSpeed {ds}"


def _flops(rate: float) -> str:
    return f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"


def _basis_note(rows: list[dict[str, Any]]) -> str:
    bases = sorted({(r["precision"], r["mfu_basis"]) for r in rows})
    if all(p == b for p, b in bases):
        return "the peak of its own precision"
    return ", ".join(f"{p} cells against the {b} peak" for p, b in bases) + " (the fastest measured here)"


def format_table(report: dict[str, Any]) -> str:
    rows = report["results"]
    memory = rows[0]["memory_measure"] if rows else ""
    mem_head = "peak mem GiB" + (" (RSS)" if "RSS" in memory else "")
    head = [
        "variant", "px", "mode", "engine", "loader", "samples/s", "step ms", mem_head, "GFLOP/sample", "MFU",
        "data wait", "1st step s",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["variant"], str(r["image_size"]), r["mode"], r["engine"] + (" +compile" if r["compile"] else ""),
            r["loader"], f"{r['samples_per_s']:.1f}", f"{r['step_time_s'] * 1e3:.1f}",
            f"{r['peak_memory_bytes'] / GIB:.2f}", f"{r['flops_per_sample'] / 1e9:.3f}", f"{r['mfu'] * 100:.2f}%",
            f"{r['data_wait_fraction'] * 100:.1f}%", f"{r['first_step_s']:.1f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    peaks = ", ".join(f"{k} {_flops(v)}" for k, v in report["matmul_peak_flops_per_s"].items())
    a = report["settings"]
    notes = [
        f"machine: {report['machine']}",
        f"date: {report['date']}; command: {report['command']}",
        f"batch {a['batch_size']}; median of {a['repeats']} windows of {a['steps']} steps after {a['warmup']} warm-up "
        f"steps; DeepSpeed config {report['deepspeed_config_file']}",
        f"MFU basis: measured {report['matmul_peak_size']}x{report['matmul_peak_size']} matrix-product peak ({peaks}), "
        f"each cell against {_basis_note(rows)}; FLOPs of forward + backward counted by FlopCounterMode",
        f"peak memory: {memory}",
    ]
    for r in rows:
        prof = r.get("profile")
        if prof:
            syncs = ", ".join(f"{k} {v:g}" for k, v in sorted(prof["syncs_per_step"].items())) or "none"
            busy = prof["device_busy_s_per_step"]
            notes.append(
                f"profile {r['variant']} {r['image_size']} px {r['mode']}: {prof['wall_s_per_step'] * 1e3:.1f} ms per "
                + (
                    f"step, device busy {busy * 1e3:.1f} ms ({busy / prof['wall_s_per_step'] * 100:.0f}%), "
                    if busy
                    else "step, "
                )
                + f"host synchronisations per step: {syncs} ({prof['file']})"
            )
    restarts = [r for r in rows if r["epoch_restarts"]]
    if restarts:
        notes.append(
            "loader epochs restarted inside the timing (a larger --train-data avoids it): "
            + ", ".join(f"{r['variant']} {r['image_size']} px {r['epoch_restarts']}" for r in restarts)
        )
    return "\n".join(lines + [""] + notes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.bench",
        description="Training throughput (samples/s, step time, peak memory, model FLOPs utilisation, data wait) of "
        "model variants and image sizes: with batches already on the device (synthetic), from real shards through "
        "the data loader (shards), and without the DeepSpeed engine (plain). One table at the end, the same numbers "
        "in a JSON file.",
    )
    p.add_argument(
        "--preset",
        default="tiny",
        help=f"configuration to start from: {', '.join(sorted(PRESETS))} (default: tiny)",
    )
    p.add_argument(
        "--variants",
        help="comma-separated model variants (default: the preset's); one of " + ", ".join(VARIANTS),
    )
    p.add_argument("--image-sizes", help="comma-separated square image sizes in px (default: the preset's)")
    p.add_argument(
        "--batch-size", type=int, help="samples per optimizer step (default: the preset's micro-batch)"
    )
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per timed window (default: 20)")
    p.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="untimed steps first; the first compiles under model.compile (default: 5)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed windows per cell; the table shows the median (default: 3)",
    )
    p.add_argument(
        "--modes", default=None, help="comma-separated, of synthetic, shards, plain (default: all three with "
        "--train-data, else synthetic,plain)",
    )  # fmt: skip
    p.add_argument(
        "--train-data", metavar="DIR", help="shard folder for the shards mode (data_pipeline.convert)"
    )
    p.add_argument(
        "--deepspeed-config", "--deepspeed_config", metavar="FILE",
        help="DeepSpeed JSON (default: deepspeed_configs/zero2_bf16.json on a GPU, zero2_fp32.json on the CPU)",
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override a configuration field, as in trainer/main.py (e.g. model.compile=true, data.num_workers=8); "
        "--variants, --image-sizes and --batch-size win over it",
    )  # fmt: skip
    p.add_argument(
        "--hf-vilt", action="store_true",
        help="also time transformers' ViltForQuestionAnswering (the preset's ViLT shape, random weights, eager) in "
        "the plain mode at each image size: the stock-ViLT reference, in the same run",
    )  # fmt: skip
    p.add_argument(
        "--profile", metavar="DIR",
        help="after each cell's timing, profile --profile-steps more steps with torch.profiler: the operator table "
        "goes to DIR/profile_<variant>_<px>_<mode>.txt, host/device time and host synchronisations per step to the JSON",
    )  # fmt: skip
    p.add_argument(
        "--profile-steps", type=int, default=3, help="steps under the profiler per cell (default: 3)"
    )
    p.add_argument(
        "--peak-size", type=int, help="matrix size of the peak measurement (default 8192 GPU, 512 CPU)"
    )
    p.add_argument(
        "--out",
        default="runs/bench.json",
        metavar="FILE",
        help="the JSON file of the results (default: runs/bench.json)",
    )
    return p


def _csv(raw: str | None, default: list, cast: Callable, what: str) -> list:
    if raw is None:
        return default
    try:
        items = [cast(x.strip()) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: '{raw}' is not a comma-separated list") from None
    if not items:
        raise ConfigError(f"{what}: empty list")
    return items


@dataclasses.dataclass(frozen=True)
class Plan:
    """The cells asked for on the command line, checked."""

    base: RunConfig
    variants: list[str]
    sizes: list[int]
    modes: list[str]
    batch_size: int


def resolve_args(args: argparse.Namespace) -> Plan:
    """The base configuration and the cells asked for; ConfigError on anything that cannot run."""
    base = apply_overrides(get_preset(args.preset), list(args.set))
    variants = _csv(args.variants, [base.model.variant], str, "--variants")
    for v in variants:
        if v not in VARIANTS:
            raise ConfigError(f"--variants: unknown variant '{v}' (one of: {', '.join(VARIANTS)})")
    sizes = _csv(args.image_sizes, [base.model.image_size], int, "--image-sizes")
    default_modes = list(MODES) if args.train_data else ["synthetic", "plain"]
    modes = _csv(args.modes, default_modes, str, "--modes")
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"--modes: unknown mode '{m}' (one of: {', '.join(MODES)})")
    if "shards" in modes and not args.train_data:
        raise ConfigError(
            "--modes shards needs --train-data DIR (a shard folder written by data_pipeline.convert)"
        )
    batch_size = base.train.micro_batch_size if args.batch_size is None else args.batch_size
    counts = {
        "batch-size": batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "profile-steps": args.profile_steps,
    }
    for name, value in counts.items():
        if value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    if any(s < 1 for s in sizes):
        raise ConfigError(f"--image-sizes must be positive, got {sizes}")
    return Plan(base, variants, sizes, modes, batch_size)


def prepare(args: argparse.Namespace, plan: Plan, dist: D.DistInfo, work: Path) -> Setup:
    from data_pipeline.loader import read_answers

    ds_path = Path(args.deepspeed_config) if args.deepspeed_config else default_ds_config_path(dist.device)
    ds_base = load_ds_config(ds_path)
    bf16 = bool(ds_base.get("bf16", {}).get("enabled", False))
    if ds_base.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"{ds_path}: fp16 is not benchmarked (the project trains in bf16 or fp32)")
    tokenizer, clip_vocab = None, None
    n_answers, vilt_vocab = DEFAULT_ANSWERS, DEFAULT_VILT_VOCAB
    if args.train_data:
        from data_pipeline.sharding import read_manifest

        read_manifest(args.train_data)  # fails plainly on a folder that is not a finished shard folder
        n_answers = len(read_answers(args.train_data))
        tokenizer = build_tokenizer(plan.base, args.train_data, work)
        vilt_vocab = tokenizer.vilt_vocab_size
        clip_vocab = tokenizer.clip_vocab
    elif plan.base.model.clip_text_vocab == "compact":
        # Without questions: the ids the synthetic batches use (built only when asked: a batch holds the images too).
        probe = synthetic_batch(
            plan.base,
            n_answers=n_answers,
            vilt_vocab=vilt_vocab,
            batch_size=plan.batch_size,
            device=torch.device("cpu"),
        )
        clip_vocab = sorted(set(probe["clip_ids"].flatten().tolist()))
    peaks, n = measure_peaks(dist.device, bf16, args.peak_size)
    return Setup(
        args,
        plan.base,
        plan.batch_size,
        dist,
        ds_base,
        ds_path,
        bf16,
        n_answers,
        vilt_vocab,
        clip_vocab,
        tokenizer,
        peaks,
        n,
    )


def _logged_cell(
    setup: Setup, variant: str, size: int, mode: str, flops: dict[tuple[str, int], int]
) -> dict[str, Any]:
    log.info("cell: %s, %d px, %s", variant, size, mode)
    r = run_cell(setup, variant, size, mode, flops)
    log.info(
        "  %.1f samples/s, step %.1f ms, MFU %.2f%%, data wait %.1f%%",
        r["samples_per_s"], r["step_time_s"] * 1e3, r["mfu"] * 100, r["data_wait_fraction"] * 100,
    )  # fmt: skip
    return r


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Every cell asked for; the report (see `write_report`) is written after each cell, so that a run stopped at a
    time limit keeps the cells it finished (`"complete": false` until the last one)."""
    plan = resolve_args(args)
    if D.env_world_size() != 1:
        raise ConfigError(
            "trainer.bench runs in one process: start it with python -m trainer.bench, no launcher"
        )
    dist = D.init_distributed()
    with tempfile.TemporaryDirectory(prefix="vqa-bench-") as tmp:
        setup = prepare(args, plan, dist, Path(tmp))
        flops: dict[tuple[str, int], int] = {}
        cells = [(v, size, mode) for v in plan.variants for size in plan.sizes for mode in plan.modes]
        if args.hf_vilt:
            cells += [(HF_VILT, size, "plain") for size in plan.sizes]
        report = new_report(args, argv, setup)
        for variant, size, mode in cells:
            report["results"].append(_logged_cell(setup, variant, size, mode, flops))
            report["complete"] = len(report["results"]) == len(cells)
            write_report(report, Path(args.out))
    return report


def new_report(args: argparse.Namespace, argv: list[str], setup: Setup) -> dict[str, Any]:
    device = setup.dist.device
    return {
        "machine": machine_line(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m trainer.bench " + shlex.join(argv),
        "preset": args.preset,
        "settings": {
            "batch_size": setup.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "overrides": list(args.set),
            "train_data": args.train_data,
            "hf_vilt": args.hf_vilt,
            "profile": args.profile,
        },  # fmt: skip
        "deepspeed_config_file": str(setup.ds_path),
        "deepspeed_config": setup.ds_base,
        "n_answers": setup.n_answers,
        "vilt_vocab_size": setup.vilt_vocab,
        "matmul_peak_flops_per_s": setup.peaks,
        "matmul_peak_size": setup.peak_size,
        "complete": False,
        "results": [],
    }


def write_report(report: dict[str, Any], out: Path) -> None:
    """The JSON file, replaced atomically (a reader never sees half a file)."""
    from data_pipeline import atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out, json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own message
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("trainer").setLevel(logging.INFO)  # the cells' progress; not open_clip's INFO lines
    try:
        report = run(args, argv)
    except Exception as exc:
        if not is_bad_input(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        D.destroy()
    print(format_table(report))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
