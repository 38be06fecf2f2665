"""The one-rank engine against the benchmark's plain step (trainer/engine/plain.py): what `python -m trainer.tools.bench --modes
synthetic,plain` compares must be the same arithmetic, so that the difference it times is DeepSpeed's own cost.

Counted, not timed: the same optimizer settings in every param group, the same losses step for step, and the
operators of a training step under torch.profiler, where the engine may add only the scalar division of the loss by
the accumulation steps (and its backward, and the scalar's conversion), never a gradient copy, a norm or a host read.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tests.helpers.tiny import N_ANSWERS, VOCAB, synthetic_batch, tiny_config
from trainer.engine import dist as D
from trainer.engine.engine import CONFIG_DIR, Engine, load_ds_config, resolve_ds_config
from trainer.engine.plain import PlainEngine
from trainer.modeling.task import build_task

# Per step, beyond plain's operators: DeepSpeed divides the loss by the accumulation steps (runtime/engine.py
# `backward`) and the loss's gradient again (`_backward_prologue_per_tensor`): 2 `div`, 1 `DivBackward0`, and the
# conversions of the Python scalar (`to`, `_to_copy`, `empty_strided`, `copy_`), 2 each.
ALLOWED_EXTRA_PER_STEP = 2
STEPS = 2


def _op_counts(engine, batches) -> collections.Counter:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            engine.backward(engine.forward(batch)["loss"])
            engine.step()
    return collections.Counter({e.key: e.count for e in prof.key_averages()})


@pytest.mark.slow
@pytest.mark.parametrize("ds_file", ["zero2_fp32.json", "zero1_fp32.json"])
def test_one_rank_engine_steps_as_the_plain_step_does(ds_file: str) -> None:
    cfg = tiny_config("clip-infonce-dot")
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, global_batch_size=8, micro_batch_size=8, max_steps=100)
    )
    dist = D.init_distributed()
    try:
        ds = resolve_ds_config(load_ds_config(CONFIG_DIR / ds_file), cfg.train, cfg.optim, 1)
        engines = []
        for make in (
            lambda task: Engine(task, ds, dist, optim=cfg.optim, max_steps=cfg.train.max_steps),
            lambda task: PlainEngine(task, cfg, dist.device, bf16=False),
        ):
            torch.manual_seed(0)
            engines.append(make(build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB)))
        engine, plain = engines
        assert engine.zero_stage == 0
        groups = engine.engine.optimizer.param_groups
        assert len(groups) == len(plain.optimizer.param_groups)
        for ours, theirs in zip(groups, plain.optimizer.param_groups, strict=True):
            assert {k: v for k, v in ours.items() if k != "params"} == {
                k: v for k, v in theirs.items() if k != "params"
            }  # lr, betas, eps, weight decay, fused/foreach, and the schedule's initial_lr

        batches = [synthetic_batch(8, seed=s) for s in range(3 + STEPS)]
        losses = []
        for e in engines:
            e.train(True)
            losses.append([])
            for b in batches[:3]:
                out = e.forward(b)
                e.backward(out["loss"])
                e.step()
                losses[-1].append(float(out["loss"].detach()))
        assert losses[0] == losses[1]  # bit for bit: same weights, same optimizer, same schedule

        ours, theirs = (_op_counts(e, batches[3:]) for e in engines)
        extra = {k: n - theirs[k] for k, n in ours.items() if n > theirs[k]}
        assert max(extra.values(), default=0) <= ALLOWED_EXTRA_PER_STEP * STEPS, extra
        assert set(extra) <= {
            "aten::div", "autograd::engine::evaluate_function: DivBackward0", "DivBackward0",
            "aten::to", "aten::_to_copy", "aten::empty_strided", "aten::copy_",
        }, extra  # fmt: skip
        for sync in ("aten::item", "aten::_local_scalar_dense"):
            assert ours[sync] == theirs[sync], sync  # no host read of its own
    finally:
        D.destroy()
