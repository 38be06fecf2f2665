"""The multi-rank default (deepspeed_configs/stage0_fp32.json: ZeRO stage 0, the gradient all-reduce overlapped with
backward in buckets, trainer/engine/grad_sync.py) on 2 gloo ranks against 1 process, the gradients' communication dtype, and
resuming across the stage-0 default and ZeRO-2 in both directions. One 2-process launch (tests/helpers/
engine_ranks_worker.py) serves every check: process start-up dominates on 2 cores."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.engine_ranks_worker import PER_RANK, config
from tests.helpers.tiny import N_ANSWERS, VOCAB, synthetic_batch, to_double
from tests.test_distributed_infonce import assert_equal_to_float64_round_off
from trainer.engine import dist as D
from trainer.engine.engine import CONFIG_DIR, Engine, load_ds_config, resolve_ds_config
from trainer.modeling.task import build_task

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]

WORKER = Path(__file__).parent / "helpers" / "engine_ranks_worker.py"
# bf16 keeps 8 significant bits: each rank's gradient is rounded to bf16 (2^-9 relative), summed and rounded again,
# then cast back. Measured on the tiny task: every gradient tensor within 0.55% of its largest entry (2026-12-07).
# BF16_TOL allows 2^-6 (1.6%) of each tensor's largest entry; a gradient missing one rank's half differs by ~50%.
BF16_TOL = 2.0**-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("engine_ranks")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(folder / "ranks.pt"), str(folder / "checkpoints")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return torch.load(folder / "ranks.pt")


def _one_process(variant: str = "clip-infonce-dot", steps: int = 3) -> dict:
    """The same steps in one process on the whole global batch (float64), through the engine at one rank."""
    cfg = config(variant)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=2 * PER_RANK))
    dist = D.init_distributed()
    try:
        torch.manual_seed(0)
        task = build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB).double()
        ds = resolve_ds_config(load_ds_config(CONFIG_DIR / "stage0_fp32.json"), cfg.train, cfg.optim, 1)
        engine = Engine(task, ds, dist, optim=cfg.optim, max_steps=cfg.train.max_steps)
        _ = engine.engine  # built now; the pixels follow the float64 weights
        engine._dtype = torch.float64
        losses, grads = [], {}
        for step in range(steps):
            out = engine.forward(to_double(synthetic_batch(2 * PER_RANK, seed=10 + step)))
            engine.backward(out["loss"])
            if not grads:
                grads = {n: p.grad.detach().clone() for n, p in task.named_parameters()}
            engine.step()
            losses.append(float(out["loss"].detach()))
        weights = {n: p.detach().clone() for n, p in task.named_parameters()}
        return {"losses": losses, "grads": grads, "weights": weights}
    finally:
        D.destroy()


def test_two_ranks_equal_one_process_in_loss_gradients_and_steps(ranks: dict) -> None:
    got = ranks["parity"]["overlapped"]
    # The default's own all-reduce ran, in several buckets, and DeepSpeed's after-backward one did not.
    assert got["allreduce"].startswith("overlapped with backward") and got["allreduce"].endswith("fp32")
    assert got["deepspeed_allreduce"] is False
    assert got["allreduce_calls"] > 1
    want = _one_process()
    assert_equal_to_float64_round_off(torch.tensor(got["losses"]), torch.tensor(want["losses"]), "losses")
    scale = max(g.abs().max().item() for g in want["grads"].values())
    for name, grad in want["grads"].items():
        assert_equal_to_float64_round_off(got["grads"][name], grad, name, scale)
    # Three AdamW steps later the weights agree too (AdamW divides by sqrt(v): round-off stays round-off).
    for name, w in want["weights"].items():
        diff = (got["weights"][name] - w).abs().max().item()
        assert diff <= 1e-9 * max(1.0, w.abs().max().item()), (name, diff)


def test_gradient_accumulation_all_reduces_the_accumulated_gradients_once(ranks: dict) -> None:
    """2 ranks x 2 micro-batches of 2 (the all-reduce armed on the second) step as 1 process on the batch of 8."""
    got = ranks["accumulated"]["weights"]
    want = _one_process("baseline", steps=2)["weights"]
    moved = max((got[n] - _initial("baseline")[n]).abs().max().item() for n in got)
    assert moved > 1e-6  # the steps moved the weights: the comparison is not of two initial states
    for name, w in want.items():
        diff = (got[name] - w).abs().max().item()
        assert diff <= 1e-9 * max(1.0, w.abs().max().item()), (name, diff)


def _initial(variant: str) -> dict:
    cfg = config(variant)
    torch.manual_seed(0)
    task = build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB).double()
    return {n: p.detach().clone() for n, p in task.named_parameters()}


def test_a_compiled_model_is_split_at_the_buckets_and_trains_as_eager(ranks: dict) -> None:
    """With model.compile the engine marks its DDP object active around the forward, as DDP's forward does: dynamo's
    DDPOptimizer splits the compiled model at the buckets' boundaries, so that gradients leave backward bucket by
    bucket and their all-reduce can overlap the rest (one graph would hand out every gradient at its end)."""
    eager, compiled = ranks["compiled"]["eager"], ranks["compiled"]["compiled"]
    assert eager["graphs"] == 0 and compiled["graphs"] > 1
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)


def test_bf16_communication_is_within_bf16_rounding_of_fp32(ranks: dict) -> None:
    comm = ranks["comm"]
    assert comm["bf16"]["allreduce"].endswith("bf16") and comm["fp32"]["allreduce"].endswith("fp32")
    worst = 0.0
    for name, fp32 in comm["fp32"]["grads"].items():
        scale = fp32.abs().max().item()
        diff = (comm["bf16"]["grads"][name] - fp32).abs().max().item()
        assert diff <= BF16_TOL * scale, (name, diff, scale)
        worst = max(worst, diff / max(scale, 1e-30))
    assert worst > 1e-5  # the check has teeth: bf16 was on the wire (fp32 agrees to ~1e-7)
    # DeepSpeed's own stage-0 all-reduce after backward gives the same fp32 average.
    after = comm["after_backward"]
    assert after["deepspeed_allreduce"] is True and after["allreduce"].startswith("after backward")
    for name, fp32 in comm["fp32"]["grads"].items():
        torch.testing.assert_close(after["grads"][name], fp32, rtol=1e-6, atol=1e-6 * fp32.abs().max().item())


@pytest.mark.parametrize(
    "route,written,resumed",
    [("zero2_fp32.json->stage0_fp32.json", 2, 2), ("stage0_fp32.json->zero2_fp32.json", 0, 0)],
)
def test_a_checkpoint_resumes_across_the_default_and_zero2_with_the_losses_continuing(
    ranks: dict, route: str, written: int, resumed: int
) -> None:
    """A ZeRO-2 checkpoint resumed under the stage-0 default continues at ZeRO-2 (its optimizer state is in ZeRO's
    shards), and a stage-0 one resumed with zero2_fp32.json continues at stage 0 (`Engine._follow_checkpoint_stage`):
    either way the losses continue as the uninterrupted run's."""
    r = ranks["resume"][route]
    assert (r["written_stage"], r["resumed_stage"]) == (written, resumed)
    assert r["resumed"] == pytest.approx(r["uninterrupted"], rel=1e-6)
    assert r["before"][1] != pytest.approx(
        r["uninterrupted"][0], rel=1e-3
    )  # the steps differ: not a replay of one
    if resumed == 0:
        assert r["resumed_allreduce"].startswith("overlapped with backward")
