"""The speed settings against the unoptimised fp32 path: model.compile (trainer/modeling/compiling.py compile_model), bf16 with
the losses in fp32, and the shipped bf16 DeepSpeed settings (deepspeed_configs/README.md, "Speed on one GPU").

On the CPU, torch.compile is exercised with the `aot_eager` backend: dynamo captures the fused model with static
shapes and AOTAutograd builds forward and backward graphs (8 s here), but no inductor kernels are generated (inductor
took 135 s for the tiny preset on 2 cores). The inductor comparison runs where a GPU is present.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import trainer.engine.engine as engine_module
from tests.helpers.tiny import N_ANSWERS, VOCAB, synthetic_batch, tiny_config
from trainer.engine import dist as D
from trainer.engine.engine import CONFIG_DIR, Engine, load_ds_config, resolve_ds_config
from trainer.modeling.compiling import compile_model
from trainer.modeling.task import build_task


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
@pytest.mark.slow
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
    with caplog.at_level(logging.WARNING, logger="trainer.engine.engine"):
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


def _engine(cfg, ds_file: str, dist: D.DistInfo, stage: int | None = None) -> Engine:
    """A 1-rank engine from a shipped JSON as the trainer resolves it; `stage` forces a ZeRO stage instead, with the
    JSON's own precision (bf16 weights for a bf16 file), as several ranks run it."""
    torch.manual_seed(0)
    task = build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB)
    base = load_ds_config(CONFIG_DIR / ds_file)
    ds = resolve_ds_config(base, cfg.train, cfg.optim, 1)
    if stage is not None:
        ds["zero_optimization"]["stage"] = stage
        ds["bf16"] = base["bf16"]
        ds.pop("torch_autocast", None)
    return Engine(task, ds, dist, optim=cfg.optim, max_steps=cfg.train.max_steps, compile=cfg.model.compile)


def _train(engine: Engine, steps: int, first: int = 0) -> list[float]:
    losses = []
    for step in range(first, first + steps):
        out = engine.forward(synthetic_batch(8, seed=10 + step, cfg=engine.task.model.cfg))
        engine.backward(out["loss"])
        engine.step(measure_grad_norm=True)
        losses.append(float(out["loss"].detach()))
    return losses


def _engine_losses(
    cfg, ds_file: str, dist: D.DistInfo, steps: int = 3, stage: int | None = None
) -> tuple[list[float], Engine]:
    engine = _engine(cfg, ds_file, dist, stage)
    return _train(engine, steps), engine


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
        # ZeRO-2 with bf16 weights, as several ranks run the file (one rank runs it at stage 0 in autocast).
        bf16, engine = _engine_losses(cfg, "zero2_bf16.json", dist, stage=2)
        # The settings of deepspeed_configs/README.md reached DeepSpeed 0.19.8 (no silent key typo).
        assert engine.zero_stage == 2 and engine.dtype == torch.bfloat16 and engine.autocast_dtype is None
        assert engine.precision == "bfloat16" and not engine.engine.tput_timer.config.enabled
        zero = engine.engine.optimizer
        assert not zero.overlap_comm and not zero.check_grad_overflow
        assert engine.grad_norm() is not None  # the trainer still logs train/grad_norm
        # First step: same weights, bf16 arithmetic. Later steps drift apart as bf16 training does.
        assert bf16[0] == pytest.approx(fp32[0], rel=1e-2)
        assert all(abs(b - f) / f < 0.1 for b, f in zip(bf16, fp32, strict=True))

        # model.compile through the engine, ZeRO-2 as on several ranks (its gradient hooks on a compiled forward) and
        # stage 0 as on one: the same losses.
        torch._dynamo.reset()
        graphs: list = []
        monkeypatch.setattr(
            engine_module, "compile_model", lambda m: compile_model(m, backend=_counting_aot_eager(graphs))
        )
        compiled, _ = _engine_losses(_train_cfg(compile=True), "zero2_fp32.json", dist, stage=2)
        assert len(graphs) == 1
        assert compiled == pytest.approx(fp32, rel=1e-5)
        compiled, _ = _engine_losses(_train_cfg(compile=True), "zero2_fp32.json", dist)
        assert compiled == pytest.approx(fp32, rel=1e-5)
    finally:
        D.destroy()


@pytest.mark.slow
def test_one_fp32_rank_steps_torch_fused_adamw_without_zero_and_trains_and_resumes_like_zero2(
    tmp_path: Path,
) -> None:
    """The single-rank choice of trainer/engine/engine.py (deepspeed_configs/README.md): stage 0, DeepSpeed's own optimizer
    is torch's fused AdamW on the module's weights, no 1-rank all-reduce; same losses and gradient norms as ZeRO-2;
    checkpoints resume, a ZeRO-2 one at its own stage."""
    dist = D.init_distributed()
    try:
        cfg = _train_cfg()
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=1))
        plain = _engine(cfg, "zero2_fp32.json", dist)
        ds = plain.engine
        assert plain.zero_stage == 0 and plain.dtype == torch.float32
        assert (
            ds.optimizer is ds.basic_optimizer and type(ds.optimizer) is torch.optim.AdamW
        )  # no ZeRO wrapper
        assert all(g["fused"] for g in ds.optimizer.param_groups)  # as trainer/engine/plain.py's PlainEngine
        assert {id(p) for g in ds.optimizer.param_groups for p in g["params"]} == {
            id(p) for p in plain.task.parameters() if p.requires_grad
        }  # it steps the module's own weights, not a flat copy
        assert not ds.enable_backward_allreduce  # the 1-rank all-reduce (flatten, copy back) is skipped

        zero2 = _engine(cfg, "zero2_fp32.json", dist, stage=2)
        assert zero2.zero_stage == 2
        losses, norms = [], []
        for engine in (plain, zero2):
            losses.append(_train(engine, 2))
            norms.append(engine.grad_norm())
            engine.save(tmp_path, f"stage{engine.zero_stage}")
            losses[-1] += _train(engine, 2, first=2)
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        assert norms[0] is not None and norms[0] == pytest.approx(norms[1], rel=1e-4)  # train/grad_norm stays

        for tag, stage in (("stage0", 0), ("stage2", 2)):
            resumed = _engine(cfg, "zero2_fp32.json", dist)
            resumed.load(tmp_path, tag)
            assert resumed.zero_stage == stage  # a ZeRO checkpoint resumes under ZeRO
            assert _train(resumed, 2, first=2) == pytest.approx(losses[0][2:], rel=1e-5)
    finally:
        D.destroy()


def _autocast_cfg():
    cfg = _train_cfg()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=1))


@pytest.mark.slow
def test_one_bf16_rank_runs_at_stage_0_in_autocast_and_trains_like_plain_pytorch() -> None:
    """zero2_bf16.json on one rank (trainer/engine/engine.py `plain_single_rank`, deepspeed_configs/README.md): ZeRO stage 0,
    fp32 weights, DeepSpeed's torch_autocast in bf16 around the forward, and torch's fused AdamW stepping the module's
    own parameters: the plain cell of trainer/tools/bench/ (fp32 weights, torch.autocast bf16, fused AdamW), step for
    step."""
    from trainer.engine.plain import PlainEngine

    dist = D.init_distributed()
    try:
        cfg = _autocast_cfg()
        engine = _engine(cfg, "zero2_bf16.json", dist)
        ds = engine.engine
        assert engine.zero_stage == 0 and not ds.bfloat16_enabled() and ds.torch_autocast_enabled()
        assert engine.dtype == torch.float32 and engine.autocast_dtype == torch.bfloat16
        assert engine.precision == "fp32 weights, autocast bf16"  # trainer/tools/bench/'s engine label
        assert all(p.dtype == torch.float32 for p in engine.task.parameters())
        assert ds.optimizer is ds.basic_optimizer and type(ds.optimizer) is torch.optim.AdamW  # no wrapper
        assert all(g["fused"] for g in ds.optimizer.param_groups)
        assert {id(p) for g in ds.optimizer.param_groups for p in g["params"]} == {
            id(p) for p in engine.task.parameters() if p.requires_grad
        }  # the module's own weights, not a flat or fp32 copy
        assert not ds.enable_backward_allreduce  # no 1-rank all-reduce

        torch.manual_seed(0)
        plain = PlainEngine(
            build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB), cfg, dist.device, bf16=True
        )
        assert plain.task.state_dict().keys() == engine.task.state_dict().keys()
        for a, b in zip(plain.task.state_dict().values(), engine.task.state_dict().values(), strict=True):
            assert torch.equal(a, b)  # the same initial weights

        linear_out: list[torch.dtype] = []
        hooks = [
            m.register_forward_hook(lambda m, i, o: linear_out.append(o.dtype))
            for m in engine.task.modules()
            if isinstance(m, nn.Linear)
        ]
        losses: list[list[float]] = [[], []]
        for step in range(3):
            batch = synthetic_batch(8, seed=10 + step, cfg=cfg.model)
            for i, eng in enumerate((engine, plain)):
                out = eng.forward(batch)
                if eng is engine:
                    # DeepSpeed entered autocast in its forward: the model's matmuls ran in bf16, the losses in fp32
                    # (trainer/modeling/losses.py turns autocast off for them); no autocast is left on afterwards.
                    assert linear_out and set(linear_out) == {torch.bfloat16}
                    assert out["logits"].dtype == torch.bfloat16 and not torch.is_autocast_enabled("cpu")
                    for key in ("loss", "vqa_loss", "infonce_loss"):
                        assert out[key].dtype == torch.float32, key
                    linear_out.clear()
                eng.backward(out["loss"])
                if eng is engine:
                    eng.step(measure_grad_norm=step == 2)  # the loop asks on its logging steps
                else:
                    eng.step()
                losses[i].append(float(out["loss"].detach()))
        for h in hooks:
            h.remove()
        assert engine.grad_norm() is not None  # train/grad_norm on a logging step
        assert losses[0] == pytest.approx(losses[1], rel=1e-3)
        for name, p in engine.task.named_parameters():
            torch.testing.assert_close(p, plain.task.get_parameter(name), rtol=1e-3, atol=1e-4, msg=name)

        # The same weights in bf16 (the JSON's ZeRO-2 as several ranks run it): the first loss agrees within bf16
        # tolerance, and differs from the autocast one: a different precision mode ran above.
        zero2 = _engine(cfg, "zero2_bf16.json", dist, stage=2)
        assert zero2.dtype == torch.bfloat16
        first = _train(zero2, 1)[0]
        assert first == pytest.approx(losses[0][0], rel=2e-2) and first != losses[0][0]
    finally:
        D.destroy()


@pytest.mark.slow
def test_one_bf16_rank_resumes_its_own_checkpoints_and_zero2_bf16_ones_under_zero2_bf16(
    tmp_path: Path,
) -> None:
    """A stage-0 autocast checkpoint resumes at stage 0 in autocast; one written by the one-GPU ZeRO-2 bf16 engine
    (before stage 0 was the one-rank choice) resumes under ZeRO-2 with bf16 weights, the precision recorded with its
    shards: both continue the uninterrupted run's losses."""
    dist = D.init_distributed()
    try:
        cfg = _autocast_cfg()
        runs = {}
        for name, stage in (("autocast", None), ("zero2_bf16", 2)):
            engine = _engine(cfg, "zero2_bf16.json", dist, stage=stage)
            losses = _train(engine, 2)
            engine.save(tmp_path, name)
            runs[name] = losses + _train(engine, 2, first=2)
        assert runs["autocast"][:2] == pytest.approx(runs["zero2_bf16"][:2], rel=2e-2)

        for tag, stage, dtype, autocast in (
            ("autocast", 0, torch.float32, torch.bfloat16),
            ("zero2_bf16", 2, torch.bfloat16, None),
        ):
            resumed = _engine(
                cfg, "zero2_bf16.json", dist
            )  # resolved as every one-rank bf16 run: stage 0, autocast
            resumed.load(tmp_path, tag)
            assert (resumed.zero_stage, resumed.dtype, resumed.autocast_dtype) == (stage, dtype, autocast), (
                tag
            )
            assert _train(resumed, 2, first=2) == pytest.approx(runs[tag][2:], rel=1e-4), tag
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
