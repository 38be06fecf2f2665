"""What runs in one cell of the benchmark: the configuration of a variant at an image size, the task, the engine of
the mode (the DeepSpeed engine, or the plain step of trainer/engine/plain.py), its batches (one on-device batch or the
shard loader, epoch after epoch) and transformers' ViLT as the stock reference; then the cell's row of the report."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from data_pipeline.loaders.loader import LoaderSpec, build_loader
from data_pipeline.loaders.questions import QuestionTable
from trainer.config.config import RunConfig, apply_overrides
from trainer.engine import dist as D
from trainer.engine.engine import Engine, resolve_ds_config
from trainer.engine.plain import PlainEngine
from trainer.modeling.compiling import compile_model
from trainer.tools.bench.measure import Timing, count_step_flops, mfu_basis, profile_steps, time_engine

CLIP_VOCAB = 49408  # open_clip's BPE; its last id, end-of-text, marks where CLIP pools the text feature


def synthetic_batch(
    cfg: RunConfig, *, n_answers: int, vilt_vocab: int, batch_size: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A batch of the loader's contract (data_pipeline/loaders/batch.py) with random content, on `device`. Its questions fit
    the text lengths the model runs at (model.text_len / model.clip_text_len where set), as the data's all do."""
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    vilt_len, clip_len = m.text_len or m.max_text_len, m.clip_text_len or m.clip_context_length
    vilt_ids = torch.randint(5, vilt_vocab, (batch_size, m.max_text_len), generator=g)
    vilt_ids[:, 0] = 2  # [CLS]
    lengths = torch.randint(4, vilt_len + 1, (batch_size,), generator=g)
    vilt_mask = (torch.arange(m.max_text_len)[None] < lengths[:, None]).long()
    rows = torch.arange(batch_size)
    clip_ids = torch.randint(1, CLIP_VOCAB - 1, (batch_size, m.clip_context_length), generator=g)
    clip_ids[rows, torch.randint(2, clip_len, (batch_size,), generator=g)] = CLIP_VOCAB - 1
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
        # transformers' ViLT and trainer.modeling.task (the model) are imported where a cell is built, here and below: `python
        # -m trainer.tools.bench --help` need not wait for them.
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
    from trainer.modeling.task import build_task

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
    # As the trainer reads: tokens from the folder's question table, at the text lengths the model runs at.
    m, model = cfg.model, getattr(task, "model", None)
    table = QuestionTable.build(setup.args.train_data, setup.tokenizer).trimmed(
        getattr(model, "vilt_text_len", None) or m.max_text_len,
        getattr(model, "clip_text_len", None) or m.clip_context_length,
    )
    spec = LoaderSpec(
        tokenizer=setup.tokenizer, batch_size=cfg.train.micro_batch_size, image_size=cfg.model.image_size,
        mean=task.image_mean, std=task.image_std, train=True, seed=cfg.train.seed, kind=cfg.data.loader,
        num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer, device=device,
        host_workers=cfg.data.host_workers, questions=table, hw_decoder_load=cfg.data.dali_hw_decoder_load,
        prefetch_depth=cfg.data.dali_prefetch_depth,
    )  # fmt: skip
    return EpochBatches(lambda epoch: build_loader(setup.args.train_data, spec.at(epoch)))


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
        ds_cfg = resolve_ds_config(setup.ds_base, cfg.train, cfg.optim, 1)
        engine = Engine(
            task,
            ds_cfg,
            setup.dist,
            optim=cfg.optim,
            max_steps=cfg.train.max_steps,
            compile=cfg.model.compile,
        )
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
