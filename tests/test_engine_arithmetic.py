"""The real DeepSpeed engine (trainer/engine/engine.py) on a tiny task in one process: gradient accumulation against the
plain step on the joined batch, the logged learning rate against the one applied, the optimizer's state and the RNG
after a checkpoint round trip, and the batch sizes DeepSpeed is given for several ranks. A linear model in float64
keeps each test well under a second after DeepSpeed's import."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from trainer.config.config import OptimConfig, TrainConfig
from trainer.engine import dist as D
from trainer.engine.engine import CONFIG_DIR, Engine, load_ds_config, resolve_ds_config
from trainer.engine.optim import build_adamw

OPTIM = OptimConfig(lr=0.05, weight_decay=0.01, warmup_ratio=0.3)


class TinyTask(nn.Module):
    """A linear regression with the VQATask's interface (forward(batch) -> losses, param_groups(optim))."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Linear(4, 3).double()
        g = torch.Generator().manual_seed(
            0
        )  # the same weights every time, without touching the global stream
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        return [{"params": list(self.parameters()), "lr": optim.lr, "weight_decay": optim.weight_decay}]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        err = self.model(batch["x"]) - batch["y"]
        loss = (err**2).sum(dim=1).mean()  # a per-sample mean, as the VQA loss
        return {"loss": loss, "vqa_loss": loss, "infonce_loss": torch.zeros((), dtype=loss.dtype)}


def _batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, 4, generator=g, dtype=torch.float64),
        "y": torch.randn(n, 3, generator=g).double(),
    }


def _joined(*parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _engine(global_batch: int, micro: int, max_steps: int = 10) -> Engine:
    train = TrainConfig(global_batch_size=global_batch, micro_batch_size=micro, max_steps=max_steps)
    ds = resolve_ds_config(load_ds_config(CONFIG_DIR / "zero2_fp32.json"), train, OPTIM, 1)
    return Engine(TinyTask(), ds, D.init_distributed(), optim=OPTIM, max_steps=max_steps)


@pytest.fixture
def one_process(no_launcher: pytest.MonkeyPatch) -> None:
    """A one-rank process group in this process (torn down by conftest's fixture after the test)."""


def test_accumulating_two_micro_batches_is_the_plain_step_on_the_joined_batch(one_process: None) -> None:
    engine = _engine(global_batch=8, micro=4)
    assert engine.grad_accum == 2
    plain = TinyTask()
    opt = build_adamw(plain.param_groups(OPTIM), OPTIM, torch.device("cpu"))
    for group in opt.param_groups:
        group["lr"] = OPTIM.lr * engine.schedule(0)  # the schedule's factor at the first step, as DeepSpeed's
    for step in range(3):
        parts = [_batch(4, 10 * step), _batch(4, 10 * step + 1)]
        losses = []
        for i, part in enumerate(parts):
            out = engine.forward(part)
            engine.backward(out["loss"])
            losses.append(float(out["loss"].detach()))
            if i == 1:
                engine_grads = [p.grad.clone() for p in engine.task.parameters()]
            engine.step()
        joined = plain(_joined(*parts))["loss"]
        joined.backward()
        plain_grads = [p.grad.clone() for p in plain.parameters()]
        for g in opt.param_groups:
            g["lr"] = OPTIM.lr * engine.schedule(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # The loop logs the mean of the micro-batch losses: the loss of the joined batch.
        assert sum(losses) / 2 == pytest.approx(float(joined.detach()), rel=1e-12)
        for ours, theirs in zip(engine_grads, plain_grads, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
        for ours, theirs in zip(engine.task.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-9, atol=1e-12)


def test_the_logged_rate_is_the_rate_the_step_applied(one_process: None) -> None:
    engine = _engine(global_batch=4, micro=4, max_steps=10)  # warm-up over 3 steps, then decay
    applied = []
    seen = []
    for step in range(10):
        out = engine.forward(_batch(4, step))
        engine.backward(out["loss"])
        applied.append(engine.engine.optimizer.param_groups[0]["lr"])  # what this optimizer step uses
        engine.step()
        seen.append(engine.lr())  # what the loop logs as train/lr after the step
    assert seen == pytest.approx(applied, rel=1e-12)
    # Warm-up from 0 over 3 steps to the peak, then linear decay to 0 at step 10.
    assert applied == pytest.approx(
        [OPTIM.lr * f for f in (0, 1 / 3, 2 / 3, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7)]
    )


def test_a_checkpoint_restores_the_schedule_the_optimizer_and_the_random_streams(
    one_process: None, tmp_path: Path
) -> None:
    from trainer.checkpoint.checkpointing import Checkpointer
    from trainer.checkpoint.layout import resolve_resume

    dist = D.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    engine = _engine(global_batch=4, micro=4)
    for step in range(4):
        engine.backward(engine.forward(_batch(4, step))["loss"])
        engine.step()
    torch.manual_seed(777)
    torch.rand(5)  # the training run's streams, somewhere along
    Checkpointer(tmp_path, engine, dist, every=1, keep_last=2).save(
        4, {"step": 4, "epoch": 0, "batch_in_epoch": 4}
    )
    expected_draws = (torch.rand(3), torch.randn(2))
    engine.backward(engine.forward(_batch(4, 99))["loss"])
    engine.step()
    expected_lr, expected_w = engine.lr(), engine.task.model.weight.detach().clone()

    torch.manual_seed(12345)  # a fresh process's streams
    resumed = _engine(global_batch=4, micro=4)
    ck = Checkpointer(tmp_path, resumed, dist, every=1, keep_last=2)
    state = ck.load(resolve_resume(ck.ckpt_dir, "latest", 1))
    assert state["step"] == 4
    draws = (torch.rand(3), torch.randn(2))
    assert all(torch.equal(a, b) for a, b in zip(draws, expected_draws, strict=True)), "RNG not restored"
    assert resumed.engine.lr_scheduler.last_epoch == 4
    resumed.backward(resumed.forward(_batch(4, 99))["loss"])
    resumed.step()
    assert resumed.lr() == pytest.approx(expected_lr, rel=1e-12)
    torch.testing.assert_close(resumed.task.model.weight.detach(), expected_w, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("world", "accum"), [(2, 2), (4, 1)])
def test_deepspeed_is_given_the_batch_of_every_rank(world: int, accum: int) -> None:
    """No processes needed: the config handed to DeepSpeed for `world` ranks (micro 4, global 16)."""
    train = TrainConfig(global_batch_size=16, micro_batch_size=4)
    for name in ("zero2_fp32.json", "zero2_bf16.json", "zero1_fp32.json"):
        base = load_ds_config(CONFIG_DIR / name)
        ds = resolve_ds_config(base, train, OPTIM, world)
        assert ds["train_batch_size"] == 16
        assert ds["train_micro_batch_size_per_gpu"] == 4
        assert ds["gradient_accumulation_steps"] == accum
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * accum * world
        # Several ranks keep the JSON's ZeRO stage and precision (only one rank runs as plain PyTorch).
        assert ds["zero_optimization"]["stage"] == base["zero_optimization"]["stage"]
        assert ds.get("bf16") == base.get("bf16")
    one = resolve_ds_config(load_ds_config(CONFIG_DIR / "zero2_fp32.json"), train, OPTIM, 1)
    assert one["gradient_accumulation_steps"] == 4 and one["zero_optimization"]["stage"] == 0
    with pytest.raises(Exception, match=r"global_batch_size 16 is not a multiple .* world size 3"):
        resolve_ds_config(load_ds_config(CONFIG_DIR / "zero2_fp32.json"), train, OPTIM, 3)
    assert dataclasses.replace(train, micro_batch_size=2).grad_accum(2) == 4
