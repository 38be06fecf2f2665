"""The training step without DeepSpeed: the task, torch's AdamW and ViLT's schedule, as a plain PyTorch script has it.

Training runs go through the DeepSpeed engine (trainer/engine/engine.py, driven by trainer/run/loop.py). The tools train without
it: the benchmark's plain cell times the engine's overhead against this step, and the preset search runs many short
trainings with it. Both use `PlainEngine`, which has the training half of `Engine`'s interface (train, forward,
backward, step, dtype) and the same optimizer settings (trainer/engine/optim.py) and schedule (`WarmupLinearDecay`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from trainer.config.config import RunConfig
from trainer.engine.engine import move_batch
from trainer.engine.optim import WarmupLinearDecay, build_adamw


class PlainEngine:
    """The task with torch's AdamW over its param groups and the warm-up/linear-decay schedule over
    `cfg.train.max_steps`; bf16 by autocast over fp32 weights. One `step` = one optimizer step (no accumulation)."""

    def __init__(self, task: torch.nn.Module, cfg: RunConfig, device: torch.device, *, bf16: bool) -> None:
        self.task = task.to(device)
        self.device = device
        self.bf16 = bf16
        self.dtype = torch.float32  # pixels stay fp32: autocast casts at each operation
        o = cfg.optim
        self.optimizer = build_adamw(task.param_groups(o), o, device)
        total = cfg.train.max_steps
        self.scheduler = LambdaLR(self.optimizer, WarmupLinearDecay(total, round(o.warmup_ratio * total)))

    def train(self, mode: bool = True) -> None:
        self.task.train(mode)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.task(move_batch(batch, self.device, self.dtype))

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        """The optimizer step at this step's learning rate, then the schedule moves on; gradients are cleared."""
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
