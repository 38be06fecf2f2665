"""AdamW from the trainer config: the one place its settings are read and the one place it is built.

The trainer config owns the optimizer (`optim.*`: ViLT's AdamW, per-group learning rates from the task's
`param_groups`) and its schedule (`WarmupLinearDecay`: ViLT's linear warm-up, then linear decay to zero). Two paths step it, with the same settings:
- the DeepSpeed engine: `trainer.engine.engine.resolve_ds_config` writes `adamw_settings` into DeepSpeed's optimizer section
  and DeepSpeed builds torch's AdamW from it (`torch_adam`, fused);
- the plain step without DeepSpeed (`trainer.engine.plain.PlainEngine`, used by the tools): `build_adamw` below.

Nothing else in the project constructs an optimizer (tests/test_boundaries.py checks it).
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.config.config import OptimConfig

# torch's fused AdamW kernels (CUDA, and the CPU since torch 2.4): one pass over each parameter list instead of ~10
# element-wise ops each, which counts on the CPU for the CLIP text tower's 49,408-row embedding.
FUSED_DEVICE_TYPES = ("cuda", "cpu")


def adamw_settings(optim: OptimConfig) -> dict[str, Any]:
    """AdamW's defaults for every param group (a group's own `lr` and `weight_decay` win over them)."""
    return {"lr": optim.lr, "betas": optim.betas, "eps": optim.eps, "weight_decay": optim.weight_decay}


def fused_adamw(device: torch.device) -> bool:
    """Whether torch's fused AdamW runs on `device`."""
    return device.type in FUSED_DEVICE_TYPES


def build_adamw(
    param_groups: list[dict[str, Any]], optim: OptimConfig, device: torch.device
) -> torch.optim.AdamW:
    """torch's AdamW over `param_groups` with the config's settings, fused where the device supports it."""
    return torch.optim.AdamW(param_groups, **adamw_settings(optim), fused=fused_adamw(device))


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
