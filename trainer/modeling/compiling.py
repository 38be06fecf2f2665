"""`torch.compile` of the fused model (`model.compile`): static shapes, instance-level, eager on a compiler error.

The engine compiles the fused model, not the whole task, before it is handed to DeepSpeed: the losses stay eager,
in fp32 and with their cross-rank all-gather, outside the graph. The benchmark compiles its plain cell the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


def compile_model(model: torch.nn.Module, *, backend: str | Callable = "inductor") -> None:
    """Compile `model.forward` in place with `torch.compile(dynamic=False)`; run eagerly if compiling fails.

    Static shapes: the default (`dynamic=None`) recompiles with dynamic shapes once a second shape is seen, and that
    recompilation failed in inductor on a 384 px prototype of the model (docs/performance.md, "What makes training
    fast"); with
    `dynamic=False` every new shape (an evaluation batch size) gets its own static graph. The forward is replaced as
    an instance attribute, so parameter names, state dicts and checkpoints stay those of the eager model (a
    `torch.compile(module)` wrapper would prefix them with `_orig_mod.`).

    Compilation runs lazily, on the first forward. An error of the compiler itself (dynamo tracing, inductor code
    generation, no C++ compiler: all `TorchDynamoException`) is logged once and the model continues eagerly; errors
    of the model (shapes, out of memory) are raised as usual. An error while compiling the backward graph surfaces
    in backward and is not caught: set model.compile=false then.
    """
    # Here, not at the top: importing torch._dynamo takes about 1 s, paid only by a run that compiles.
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
