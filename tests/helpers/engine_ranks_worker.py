"""One rank of the multi-rank engine checks (run by tests/test_engine_ranks.py, 2 processes, gloo, CPU).

Each rank builds the tiny task and trainer/engine/engine.py's `Engine` from a shipped DeepSpeed JSON as a 2-rank run resolves
it, trains on its half of each global batch, and rank 0 saves what the test compares:
- `parity`: float64, the stage-0 default (all-reduce overlapped with backward, small buckets so that there are
  several): the losses of 3 steps, the gradients of the first step (read after backward, before the optimizer step)
  and the weights after 3 steps;
- `accumulated`: float64, `baseline`, 2 micro-batches per step: the weights after 2 steps;
- `compiled`: fp32, the model compiled (aot_eager) against eager: losses, and the graphs the compiler was handed;
- `comm`: fp32, the default with `communication_data_type` fp32 and bf16, and DeepSpeed's own stage-0 all-reduce after
  backward: the first step's gradients;
- `resume`: fp32, a run checkpointed at step 2 under one JSON and resumed under another (ZeRO-2 -> the stage-0 default,
  and back): the resumed run's losses and stage, and the uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.tiny import N_ANSWERS, VOCAB, synthetic_batch, tiny_config, to_double  # noqa: E402
from trainer.engine import dist as D  # noqa: E402
from trainer.engine.engine import CONFIG_DIR, Engine, load_ds_config, resolve_ds_config  # noqa: E402
from trainer.modeling.task import build_task  # noqa: E402

PER_RANK = 4
SMALL_BUCKET = 4000  # elements: the tiny task's ~100 gradients fall into several buckets


def config(variant: str = "clip-infonce-dot", **train):
    cfg = tiny_config(variant, infonce_weight=1.0, temperature=0.5)
    train = {"global_batch_size": 2 * PER_RANK, "micro_batch_size": PER_RANK, "max_steps": 10, **train}
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def engine(cfg, dist: D.DistInfo, ds_file: str, *, double: bool = False, **ds_changes) -> Engine:
    torch.manual_seed(0)
    task = build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB)
    if double:
        task = task.double()
    ds = resolve_ds_config(load_ds_config(CONFIG_DIR / ds_file), cfg.train, cfg.optim, dist.world_size)
    for key, value in ds_changes.items():
        if key in ("overlap_comm", "reduce_bucket_size"):
            ds["zero_optimization"][key] = value
        else:
            ds[key] = value
    e = Engine(task, ds, dist, optim=cfg.optim, max_steps=cfg.train.max_steps)
    if double:
        _ = (
            e.engine
        )  # built now: DeepSpeed sees fp32 settings; the batches' pixels must follow the float64 weights
        e._dtype = torch.float64
    return e


def my_half(step: int, dist: D.DistInfo, double: bool) -> dict[str, torch.Tensor]:
    full = synthetic_batch(dist.world_size * PER_RANK, seed=10 + step)
    full = to_double(full) if double else full
    return {k: v[dist.rank * PER_RANK : (dist.rank + 1) * PER_RANK] for k, v in full.items()}


def train(e: Engine, dist: D.DistInfo, steps: range, *, double: bool = False, grads: dict | None = None):
    """Global losses (averaged over the ranks) of `steps`; the first step's gradients into `grads`."""
    losses = []
    for step in steps:
        out = e.forward(my_half(step, dist, double))
        e.backward(out["loss"])
        if grads is not None and not grads:
            grads.update({n: p.grad.detach().clone() for n, p in e.task.named_parameters()})
        e.step()
        loss = out["loss"].detach().clone()
        tdist.all_reduce(loss)
        losses.append(float(loss) / dist.world_size)
    return losses


def allreduce_calls(e: Engine, dist: D.DistInfo) -> int:
    """All-reduce calls in one more step (the buckets, once rebuilt in backward's order after the first step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(e, dist, range(3, 4), double=True)
    return sum(ev.count for ev in prof.key_averages() if ev.key == "c10d::allreduce_") - 1  # less the loss's


def parity(dist: D.DistInfo) -> dict:
    results = {}
    for name, changes in (("overlapped", {"reduce_bucket_size": SMALL_BUCKET}),):
        e = engine(config(), dist, "stage0_fp32.json", double=True, **changes)
        grads: dict = {}
        losses = train(e, dist, range(3), double=True, grads=grads)
        weights = {n: p.detach().clone() for n, p in e.task.named_parameters()}
        results[name] = {
            "losses": losses,
            "grads": grads,
            "weights": weights,
            "allreduce": e.allreduce,
            "deepspeed_allreduce": e.engine.enable_backward_allreduce,
            "allreduce_calls": allreduce_calls(e, dist),
        }
    return results


def accumulated(dist: D.DistInfo) -> dict:
    """`baseline` (a per-sample loss: micro-batch means average to the batch mean), micro-batches of PER_RANK / 2:
    2 accumulation steps per optimizer step, the all-reduce armed on the second only; the weights after 2 steps."""
    cfg = config("baseline", micro_batch_size=PER_RANK // 2)
    e = engine(cfg, dist, "stage0_fp32.json", double=True, reduce_bucket_size=SMALL_BUCKET)
    assert e.grad_accum == 2
    for step in range(2):
        half = my_half(step, dist, True)
        for part in range(2):
            micro = {k: v[part * PER_RANK // 2 : (part + 1) * PER_RANK // 2] for k, v in half.items()}
            e.backward(e.forward(micro)["loss"])
            e.step()
    return {"weights": {n: p.detach().clone() for n, p in e.task.named_parameters()}}


def _counting_aot_eager(graphs: list):
    """The aot_eager backend, recording each graph dynamo hands it."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


def compiled(dist: D.DistInfo) -> dict:
    """fp32, buckets of 1 MiB (dynamo's DDPOptimizer wants none below its 1 MiB first bucket): the model compiled
    (`aot_eager`: graph capture and AOTAutograd without inductor's minutes on the CPU) against eager, 3 steps each;
    the graphs dynamo handed the backend (one per bucket's share of the model when the engine's forward marks its DDP
    object active, one without)."""
    from trainer.modeling.compiling import compile_model

    results = {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        cfg = config()
        torch.manual_seed(0)
        task = build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB)
        graphs: list = []
        if mode == "compiled":
            compile_model(task.model, backend=_counting_aot_eager(graphs))
        ds = resolve_ds_config(
            load_ds_config(CONFIG_DIR / "stage0_fp32.json"), cfg.train, cfg.optim, dist.world_size
        )
        ds["zero_optimization"]["reduce_bucket_size"] = 2**18
        e = Engine(task, ds, dist, optim=cfg.optim, max_steps=cfg.train.max_steps)
        results[mode] = {"losses": train(e, dist, range(3)), "graphs": len(graphs)}
    torch._dynamo.reset()
    return results


def comm(dist: D.DistInfo) -> dict:
    results = {}
    for name, changes in (
        ("fp32", {"communication_data_type": "fp32"}),
        ("bf16", {"communication_data_type": "bf16"}),
        # DeepSpeed's own stage-0 all-reduce (it reduces fp32 and half types only, hence no float64 parity for it).
        ("after_backward", {"overlap_comm": False}),
    ):
        e = engine(config(), dist, "stage0_fp32.json", **changes)
        grads: dict = {}
        train(e, dist, range(1), grads=grads)
        results[name] = {
            "grads": grads,
            "allreduce": e.allreduce,
            "deepspeed_allreduce": e.engine.enable_backward_allreduce,
        }
    return results


def resume(dist: D.DistInfo, folder: Path) -> dict:
    results = {}
    for first, then in (("zero2_fp32.json", "stage0_fp32.json"), ("stage0_fp32.json", "zero2_fp32.json")):
        cfg = config()
        e = engine(cfg, dist, first)
        before = train(e, dist, range(2))
        save = folder / first.removesuffix(".json")
        e.save(save, "step2")
        tdist.barrier()
        uninterrupted = train(e, dist, range(2, 4))
        resumed = engine(cfg, dist, then)
        resumed.load(save, "step2")
        results[f"{first}->{then}"] = {
            "before": before,
            "uninterrupted": uninterrupted,
            "resumed": train(resumed, dist, range(2, 4)),
            "written_stage": e.zero_stage,
            "resumed_stage": resumed.zero_stage,
            "resumed_allreduce": resumed.allreduce,
        }
    return results


def main(out: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist = D.init_distributed()
    try:
        results = {"parity": parity(dist), "accumulated": accumulated(dist), "comm": comm(dist)}
        results["compiled"] = compiled(dist)
        results["resume"] = resume(dist, Path(folder))
        if dist.rank == 0:
            torch.save(results, out)
    finally:
        D.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
