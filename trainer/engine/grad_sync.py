"""The gradient all-reduce of data-parallel training without ZeRO, overlapped with backward in buckets.

DeepSpeed at ZeRO stage 0 all-reduces the gradients after backward has finished (deepspeed/runtime/engine.py
`allreduce_gradients` -> `buffered_allreduce_fallback`: flatten every gradient into one buffer, all-reduce it, divide,
copy back): nothing overlaps, and the copies cost two passes over all gradients. `BucketedAllReduce` does what
`torch.nn.parallel.DistributedDataParallel` does instead, with DDP's own C++ `Reducer`: the gradients are grouped into
buckets of about `bucket_elements` (in the reverse order of the parameters, then, from the second step on, in the
order backward produced them), and as soon as the last gradient of a bucket has been accumulated, the bucket's
all-reduce starts asynchronously while backward goes on; the end of backward waits for the last bucket and leaves the
averaged gradients in `param.grad` (views of the buckets), before DeepSpeed's optimizer step.

The gradient hooks are the Reducer's, in C++ on each parameter's AccumulateGrad node: no Python runs per parameter or
per gradient tensor in a step. A Python function runs per bucket only with `comm_dtype` bf16 (torch's
`bf16_compress_hook`: the bucket is cast to bf16, divided by the world size, all-reduced, and cast back).

The module stays DeepSpeed's: the DDP object is built only for its Reducer (and broadcasts rank 0's weights once, as
DeepSpeed has already done); its forward is never called, so the module's state_dict, DeepSpeed's checkpoints and
everything that reads them are unchanged. The engine (trainer/engine/engine.py) turns DeepSpeed's own all-reduce off
(`enable_backward_allreduce`) and arms the Reducer before every backward that ends an accumulation boundary
(`arm`); the micro-batches between boundaries accumulate locally, as under DDP's `no_sync`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
import torch.distributed as tdist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.nn.parallel import DistributedDataParallel

from trainer.config.config import ConfigError

# DDP's default bucket (25 MiB of fp32 gradients), used when the JSON does not set `zero_optimization.reduce_bucket_size`.
DEFAULT_BUCKET_ELEMENTS = 25 * 2**20 // 4


class BucketedAllReduce:
    """Averages the gradients of `module`'s trainable parameters over the default process group during backward."""

    def __init__(
        self, module: torch.nn.Module, *, bucket_elements: int, comm_dtype: torch.dtype, device: torch.device
    ) -> None:
        if comm_dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(
                f"DeepSpeed config: communication_data_type {str(comm_dtype).removeprefix('torch.')} is not supported "
                f"by the overlapped all-reduce (stage 0, overlap_comm true): fp32 or bf16"
            )
        self.bucket_elements = bucket_elements
        self.comm_dtype = comm_dtype
        # bucket_cap_mb counts the gradients' bytes (fp32 here: the weights stay fp32 under autocast).
        self._ddp = DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=bucket_elements * 4 / 2**20,
            # The buckets hold the gradients themselves: no copy back after the all-reduce.
            gradient_as_bucket_view=True,
        )
        if comm_dtype == torch.bfloat16:
            self._ddp.register_comm_hook(tdist.group.WORLD, bf16_compress_hook)
        self._reducer = self._ddp.reducer

    def arm(self) -> None:
        """Before the forward of a micro-batch whose backward must all-reduce (an accumulation boundary, grad enabled):
        what DDP's forward does around the module's (`_pre_forward`, `_post_forward` without unused-parameter search).
        From the second armed step on, the buckets follow the order in which the first backward produced them."""
        self._reducer.prepare_for_forward()
        self._reducer._rebuild_buckets()
        self._reducer.prepare_for_backward([])

    def forward_context(self) -> AbstractContextManager[None]:
        """Around the engine's forward: marks this DDP object as the active one, as DDP's own forward does, so that
        a compiled model (model.compile) is split by dynamo's DDPOptimizer at the buckets' boundaries. Without it the
        compiled model's backward is one graph that hands out all its gradients at its end, and nothing would overlap."""
        return self._ddp._inside_ddp_forward()
