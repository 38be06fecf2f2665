"""One rank of the global-batch InfoNCE parity check (run by tests/test_distributed_infonce.py, 2 processes, gloo).

Each rank takes its half of the batch, runs forward/backward of the real task, and averages gradients and loss over
ranks exactly as data-parallel training (DeepSpeed) does. Rank 0 saves the result for the test to compare.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.tiny import (  # noqa: E402
    N_ANSWERS,
    VOCAB,
    parse_variant,
    synthetic_batch,
    tiny_config,
    to_double,
    with_duplicate_questions,
)
from trainer.modeling.task import build_task  # noqa: E402


def run(variants: list[str], per_rank: int, out: str) -> None:
    dist.init_process_group("gloo")
    results = {v: one_variant(v, per_rank) for v in variants}
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def one_variant(variant: str, per_rank: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    name, loss = parse_variant(variant)
    torch.manual_seed(0)
    task = build_task(
        tiny_config(name, infonce_weight=1.0, temperature=0.5, **loss),
        n_answers=N_ANSWERS,
        vilt_vocab_size=VOCAB,
    )
    task = task.double()  # float64, so that round-off (~1e-7 relative in fp32) cannot hide a real difference
    full = to_double(synthetic_batch(per_rank * world, seed=7))
    if loss:
        full = with_duplicate_questions(full)
    mine = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in full.items()}
    result = task(mine)
    result["loss"].backward()
    parts = torch.stack([result["loss"].detach(), result["vqa_loss"], result["infonce_loss"]])
    dist.all_reduce(parts)
    grads = {}
    for name, p in task.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        grads[name] = g / world
    return {"losses": parts / world, "grads": grads}


if __name__ == "__main__":
    run(sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3])
