"""One rank of `python -m trainer.tools.bench --ranks N` (trainer/tools/bench/ranks.py): the cells' engines on one task
configuration, the interleaved timed windows, the profiles, and (rank 0) the report."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from typing import Any

import torch
import torch.distributed as tdist
from torch.profiler import ProfilerActivity, profile, record_function

from trainer.config.config import RunConfig, apply_overrides
from trainer.config.presets import get_preset
from trainer.engine import dist as D
from trainer.engine.engine import CONFIG_DIR, Engine, load_ds_config, move_batch, resolve_ds_config
from trainer.engine.grad_sync import DEFAULT_BUCKET_ELEMENTS
from trainer.engine.plain import PlainEngine
from trainer.modeling.task import build_task
from trainer.tools.bench.cells import synthetic_batch
from trainer.tools.bench.hostwork import BACKWARD_RANGE, analyse, python_calls_from_autograd
from trainer.tools.bench.measure import synchronize
from trainer.tools.bench.ranks import now, summarise_windows


class DDPEngine(PlainEngine):
    """trainer/engine/plain.py's step (fused AdamW, schedule, autocast bf16 where asked) with the task wrapped in torch's
    DistributedDataParallel, bucketed as the engine's default (`bucket_elements`, gradients as bucket views)."""

    def __init__(
        self, task: torch.nn.Module, cfg: RunConfig, dist: D.DistInfo, *, bf16: bool, bucket_elements: int
    ):
        super().__init__(task, cfg, dist.device, bf16=bf16)
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", FutureWarning
            )  # torch 2.14 renames broadcast_buffers; 2.11 has only it
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.task,
                device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                bucket_cap_mb=bucket_elements * 4 / 2**20,
                gradient_as_bucket_view=True,
                # The model's buffers are constants: no broadcast before every forward (DDP's default), which the
                # engine does not do either; the reference is DDP at its fastest.
                broadcast_buffers=False,
            )

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.ddp(move_batch(batch, self.device, self.dtype))


def cell_config(args: argparse.Namespace, world_size: int) -> RunConfig:
    base = apply_overrides(get_preset(args.preset), list(args.set))
    batch = args.batch_size or max(1, base.train.global_batch_size // world_size)
    total = args.warmup + args.steps * args.repeats + args.profile_steps + 1
    sets = [
        "model.vilt_pretrained=none",
        "model.clip_pretrained=none",
        f"train.micro_batch_size={batch}",
        f"train.global_batch_size={batch * world_size}",
        f"train.max_steps={total}",
    ]
    sets += [f"model.variant={args.variant}"] if args.variant else []
    sets += [f"model.image_size={args.image_size}"] if args.image_size else []
    return apply_overrides(base, sets)


def _ds_config(cell: str, cfg: RunConfig, dist: D.DistInfo) -> dict[str, Any]:
    precision = "bf16" if dist.device.type == "cuda" else "fp32"
    name = {"zero1": "zero1", "zero2": "zero2"}.get(cell, "stage0")
    ds = resolve_ds_config(
        load_ds_config(CONFIG_DIR / f"{name}_{precision}.json"), cfg.train, cfg.optim, dist.world_size
    )
    if cell == "stage0-overlap-bf16":
        ds["communication_data_type"] = "bf16"
    elif cell == "stage0-after-backward":
        ds["zero_optimization"]["overlap_comm"] = False
    return ds


def build_engine(cell: str, cfg: RunConfig, dist: D.DistInfo, n_answers: int, vilt_vocab: int, clip_vocab):
    torch.manual_seed(cfg.train.seed)  # the same initial weights in every cell
    task = build_task(cfg, n_answers=n_answers, vilt_vocab_size=vilt_vocab, clip_vocab=clip_vocab).to(
        dist.device
    )
    default = load_ds_config(CONFIG_DIR / "stage0_fp32.json")["zero_optimization"]
    if cell == "ddp":
        bucket = int(default.get("reduce_bucket_size", DEFAULT_BUCKET_ELEMENTS))
        bf16 = dist.device.type == "cuda"
        label = (
            f"torch DDP, {'fp32 weights, autocast bf16' if bf16 else 'fp32'}, buckets of {bucket:,} elements"
        )
        return DDPEngine(task, cfg, dist, bf16=bf16, bucket_elements=bucket), label
    engine = Engine(task, _ds_config(cell, cfg, dist), dist, optim=cfg.optim, max_steps=cfg.train.max_steps,
                    compile=cfg.model.compile)  # fmt: skip
    return engine, f"DeepSpeed ZeRO-{engine.zero_stage} {engine.precision}; all-reduce {engine.allreduce}"


def one_step(engine: Any, batch: dict[str, Any]) -> None:
    out = engine.forward(batch)
    with record_function(BACKWARD_RANGE):
        engine.backward(out["loss"])
    engine.step()


def timed_round(engines: dict[str, Any], batch: dict[str, Any], steps: int, device: torch.device) -> dict:
    """One round: `steps` steps of every cell, the cells taking turns step by step (A B C A B C ...), so that a shared
    machine's slow and quiet spells, which last seconds, fall on every cell alike. Per cell: wall seconds per step
    (each step timed between a barrier and its end, the slowest rank's) and CPU seconds per step of the process (all
    its threads, the training loop's and the communication's), averaged over the ranks: on a shared machine the CPU
    time hardly depends on what else runs, the wall time does."""
    cells = list(engines)
    wall = torch.zeros(len(cells), dtype=torch.float64)
    cpu = torch.zeros(len(cells), dtype=torch.float64)
    for _ in range(steps):
        step = torch.zeros(len(cells), dtype=torch.float64)
        for i, cell in enumerate(cells):
            synchronize(device)
            tdist.barrier()
            t0, c0 = now(), time.process_time()
            one_step(engines[cell], batch)
            synchronize(device)
            step[i] = now() - t0
            cpu[i] += time.process_time() - c0
        tdist.all_reduce(step, op=tdist.ReduceOp.MAX)  # outside the timing
        wall += step
    tdist.all_reduce(cpu)
    n = tdist.get_world_size()
    return {cell: (float(wall[i]) / steps, float(cpu[i]) / steps / n) for i, cell in enumerate(cells)}


def profiled(engine: Any, batch: dict[str, Any], steps: int, device: torch.device) -> dict[str, Any]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    tdist.barrier()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            one_step(engine, batch)
        synchronize(device)
    result = analyse(prof, steps, device)
    calls = python_calls_from_autograd(lambda: one_step(engine, batch))
    result["python_calls_from_autograd_per_step"] = calls
    result["python_calls_from_autograd_total"] = sum(calls.values())
    return result


def run_rank(args: argparse.Namespace, cells: list[str], dist: D.DistInfo) -> dict[str, Any]:
    cfg = cell_config(args, dist.world_size)
    vilt_vocab = args.vocab or cfg.model.wordpiece_vocab_size
    batch = synthetic_batch(
        cfg, n_answers=args.answers, vilt_vocab=vilt_vocab, batch_size=cfg.train.micro_batch_size,
        device=dist.device, seed=cfg.train.seed + dist.rank,
    )  # fmt: skip
    clip_vocab = None
    if cfg.model.compact_clip_vocab:
        ids = batch["clip_ids"].flatten().cpu()
        gathered = [torch.empty_like(ids) for _ in range(dist.world_size)]
        tdist.all_gather(gathered, ids)  # every rank's token ids, so that every rank builds the same table
        clip_vocab = sorted(set(torch.cat(gathered).tolist()))
    engines = {}
    for cell in cells:
        engine, label = build_engine(cell, cfg, dist, args.answers, vilt_vocab, clip_vocab)
        engine.train(True)
        t0 = now()
        for _ in range(args.warmup):
            one_step(engine, batch)
        synchronize(dist.device)
        engines[cell] = (engine, label, now() - t0)
    windows: dict[str, list[float]] = {cell: [] for cell in cells}
    cpu: dict[str, list[float]] = {cell: [] for cell in cells}
    for _ in range(args.repeats):
        timed = timed_round({cell: engines[cell][0] for cell in cells}, batch, args.steps, dist.device)
        for cell, (wall, cpu_s) in timed.items():
            windows[cell].append(wall)
            cpu[cell].append(cpu_s)
    rows = []
    global_batch = cfg.train.global_batch_size
    for cell in cells:
        engine, label, warm = engines[cell]
        row = {
            "cell": cell,
            "engine": label,
            "warmup_s": warm,
            **summarise_windows(windows[cell], global_batch),
            "cpu_s_per_step_windows": cpu[cell],
            "cpu_s_per_step": statistics.median(cpu[cell]),
        }
        row["profile"] = profiled(engine, batch, args.profile_steps, dist.device)
        rows.append(row)
    ddp = next((r for r in rows if r["cell"] == "ddp"), None)
    for row in rows:
        # Each round's windows ran back to back: the ratio within a round cancels most of a shared machine's slow
        # and quiet spells, which the medians of the cells' own windows do not.
        rounds = (
            [a / b for a, b in zip(row["samples_per_s_windows"], ddp["samples_per_s_windows"], strict=True)]
            if ddp
            else []
        )
        row["vs_ddp_rounds"] = rounds
        row["vs_ddp"] = statistics.median(rounds) if ddp else None
        row["cpu_vs_ddp"] = row["cpu_s_per_step"] / ddp["cpu_s_per_step"] if ddp else None
    return {
        "command": "python -m trainer.tools.bench " + " ".join(args.argv),
        "ranks": dist.world_size,
        "backend": tdist.get_backend(),
        "device": torch.cuda.get_device_name(dist.device)
        if dist.device.type == "cuda"
        else platform.processor() or "cpu",
        "threads_per_rank": torch.get_num_threads(),
        "torch": torch.__version__,
        "deepspeed": __import__("deepspeed").__version__,
        "preset": args.preset,
        "variant": cfg.model.variant,
        "image_size": cfg.model.image_size,
        "batch_per_rank": cfg.train.micro_batch_size,
        "global_batch": global_batch,
        "n_answers": args.answers,
        "vilt_vocab": vilt_vocab,
        "parameters": sum(p.numel() for p in engines[cells[0]][0].task.parameters() if p.requires_grad),
        "steps": args.steps,
        "repeats": args.repeats,
        "order": "interleaved step by step: "
        + ", ".join(cells)
        + f"; {args.repeats} rounds of {args.steps} steps each",
        "results": rows,
    }
