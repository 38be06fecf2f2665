"""The speed settings against the unoptimised fp32 path: model.compile (trainer/engine.py compile_model), bf16 with
the losses in fp32, and the shipped bf16 DeepSpeed settings (deepspeed_configs/README.md, "Speed on one GPU").

On the CPU, torch.compile is exercised with the `aot_eager` backend: dynamo captures the fused model with static
shapes and AOTAutograd builds forward and backward graphs (8 s here), but no inductor kernels are generated (inductor
took 135 s for the tiny preset on 2 cores). The inductor comparison runs where a GPU is present.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

import trainer.engine as engine_module
from tests.helpers.tiny import N_ANSWERS, VOCAB, synthetic_batch, tiny_config
from trainer import dist as D
from trainer.engine import CONFIG_DIR, Engine, compile_model, load_ds_config, resolve_ds_config
from trainer.task import build_task


def _task(variant: str = "clip-infonce-dot", **model):
    cfg = tiny_config(variant)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))
    torch.manual_seed(0)
    return cfg, build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB)


def _grads(task: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in task.named_parameters() if p.grad is not None}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _counting_aot_eager(graphs: list) -> object:
    """The aot_eager backend, recording each graph dynamo hands it (a silent fall-back would record none)."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


@pytest.mark.parametrize("variant", ["baseline", "clip-infonce-dot"])
def test_compiled_model_matches_eager_and_keeps_its_parameter_names(variant: str) -> None:
    torch._dynamo.reset()
    _, eager = _task(variant)
    _, compiled = _task(variant)
    names = list(compiled.state_dict())
    graphs: list = []
    compile_model(compiled.model, backend=_counting_aot_eager(graphs))
    assert list(compiled.state_dict()) == names  # checkpoints of a compiled run load into an eager model
    batch = synthetic_batch(8, seed=1, cfg=tiny_config(variant).model)
    for module in (eager, compiled):
        module(batch)["loss"].backward()
    out_e, out_c = eager(batch), compiled(batch)
    for key in ("loss", "vqa_loss", "infonce_loss", "logits"):
        torch.testing.assert_close(out_c[key], out_e[key], rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1  # the whole fused model is one graph: no graph break, no recompilation
    ge, gc = _grads(eager), _grads(compiled)
    assert ge.keys() == gc.keys()
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compile_falls_back_to_eager_on_a_compiler_error(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def broken_backend(graph, example_inputs):
        calls.append(1)
        raise RuntimeError("no C++ compiler here")

    model = nn.Sequential(nn.Linear(4, 3), nn.GELU())
    x = torch.randn(2, 4)
    expected = model(x)
    compile_model(model, backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="trainer.engine"):
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model(x), expected)
    assert len(calls) == 1  # one attempt, then eager for good
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "running it eagerly" in warnings[0] and "model.compile=false" in warnings[0]


@pytest.mark.parametrize("variant", ["baseline", "clip-infonce-dot"])
def test_bf16_matches_fp32_within_bf16_tolerance(variant: str) -> None:
    """bf16 weights and inputs (DeepSpeed's bf16) and autocast (the plain path) against fp32; losses stay fp32."""
    cfg, ref = _task(variant)
    batch = synthetic_batch(8, seed=2, cfg=cfg.model)
    out = ref(batch)
    out["loss"].backward()
    g_ref = _grads(ref)

    _, pure = _task(variant)
    pure.to(torch.bfloat16)
    out_pure = pure({**batch, "pixels": batch["pixels"].to(torch.bfloat16)})
    _, auto = _task(variant)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_auto = auto(batch)
    for got, module in ((out_pure, pure), (out_auto, auto)):
        for key in ("loss", "vqa_loss", "infonce_loss"):
            assert got[key].dtype == torch.float32, key  # the losses are computed in fp32 under bf16
            torch.testing.assert_close(got[key], out[key], rtol=2e-2, atol=2e-2, msg=key)
        got["loss"].backward()
        g = _grads(module)
        assert g.keys() == g_ref.keys()
        for name in g_ref:
            if g_ref[name].norm() > 1e-6:
                assert _cosine(g[name], g_ref[name]) > 0.99, name


def _engine_losses(cfg, ds_file: str, dist: D.DistInfo, steps: int = 3) -> tuple[list[float], Engine]:
    torch.manual_seed(0)
    task = build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB)
    ds = resolve_ds_config(load_ds_config(CONFIG_DIR / ds_file), cfg, 1, dist.device)
    engine = Engine(task, ds, cfg, dist)
    losses = []
    for step in range(steps):
        out = engine.forward(synthetic_batch(8, seed=10 + step, cfg=cfg.model))
        engine.backward(out["loss"])
        engine.step()
        losses.append(float(out["loss"].detach()))
    return losses, engine


def _train_cfg(**model):
    cfg, _ = _task(**model)
    train = dataclasses.replace(cfg.train, global_batch_size=8, micro_batch_size=8, max_steps=10)
    return dataclasses.replace(cfg, train=train)


@pytest.mark.slow
def test_shipped_bf16_engine_trains_like_fp32_and_compiled_like_eager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dist = D.init_distributed()
    try:
        cfg = _train_cfg()
        fp32, _ = _engine_losses(cfg, "zero2_fp32.json", dist)
        bf16, engine = _engine_losses(cfg, "zero2_bf16.json", dist)
        # The settings of deepspeed_configs/README.md reached DeepSpeed 0.19.8 (no silent key typo).
        assert engine.dtype == torch.bfloat16 and not engine.engine.tput_timer.config.enabled
        zero = engine.engine.optimizer
        assert not zero.overlap_comm and not zero.check_grad_overflow
        assert engine.grad_norm() is not None  # the trainer still logs train/grad_norm
        # First step: same weights, bf16 arithmetic. Later steps drift apart as bf16 training does.
        assert bf16[0] == pytest.approx(fp32[0], rel=1e-2)
        assert all(abs(b - f) / f < 0.1 for b, f in zip(bf16, fp32, strict=True))

        # model.compile through the engine (ZeRO-2 gradient hooks on a compiled forward): the same losses.
        torch._dynamo.reset()
        graphs: list = []
        monkeypatch.setattr(
            engine_module, "compile_model", lambda m: compile_model(m, backend=_counting_aot_eager(graphs))
        )
        compiled, _ = _engine_losses(_train_cfg(compile=True), "zero2_fp32.json", dist)
        assert len(graphs) == 1
        assert compiled == pytest.approx(fp32, rel=1e-5)
    finally:
        D.destroy()


@pytest.mark.gpu
def test_inductor_bf16_on_the_gpu_matches_fp32_eager() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: inductor on the CPU takes minutes for this model")
    cfg, ref = _task()
    _, fast = _task()
    ref, fast = ref.cuda(), fast.cuda()
    batch = {k: v.cuda() for k, v in synthetic_batch(8, seed=3, cfg=cfg.model).items()}
    out = ref(batch)
    out["loss"].backward()
    compile_model(fast.model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = fast(batch)
    got["loss"].backward()
    torch.testing.assert_close(got["loss"], out["loss"], rtol=2e-2, atol=2e-2)
    g_ref, g = _grads(ref), _grads(fast)
    for name in g_ref:
        if g_ref[name].norm() > 1e-6:
            assert _cosine(g[name], g_ref[name]) > 0.99, name
