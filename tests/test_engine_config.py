"""The DeepSpeed boundary without DeepSpeed running: config ownership, batch arithmetic, schedule, presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError, RunConfig, TrainConfig, apply_overrides
from trainer.engine import CONFIG_DIR, WarmupLinearDecay, load_ds_config, resolve_ds_config
from trainer.presets import PRESETS, get_preset

CPU = torch.device("cpu")
GPU = torch.device("cuda", 0)


def test_every_shipped_deepspeed_config_parses_and_sets_gradient_clipping() -> None:
    names = sorted(p.name for p in CONFIG_DIR.glob("*.json"))
    for stage in (1, 2, 3):
        assert f"zero{stage}_bf16.json" in names and f"zero{stage}_fp32.json" in names
    assert any("offload" in n for n in names)
    for name in names:
        ds = load_ds_config(CONFIG_DIR / name)
        assert "gradient_clipping" in ds, name
        assert ds["bf16"]["enabled"] == ("bf16" in name), name
        if "offload" in name:
            assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert (CONFIG_DIR / "README.md").is_file()


def test_resolved_config_takes_batches_and_optimizer_from_the_trainer() -> None:
    cfg = get_preset("tiny")  # global 16, micro 8
    base = load_ds_config(CONFIG_DIR / "zero2_fp32.json")
    ds = resolve_ds_config(base, cfg, world_size=1, device=CPU)
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (
        16,
        8,
        2,
    )
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW"
    assert params["torch_adam"] is True and params["fused"] is True  # torch's fused AdamW, no JIT build
    assert (params["lr"], params["weight_decay"], params["eps"], tuple(params["betas"])) == (
        1e-4,
        0.01,
        1e-8,
        (0.9, 0.98),
    )
    gpu = resolve_ds_config(base, cfg, world_size=2, device=GPU)["optimizer"]["params"]
    assert gpu["torch_adam"] is True and gpu["fused"] is True  # torch's fused AdamW: no JIT build
    offload = resolve_ds_config(load_ds_config(CONFIG_DIR / "zero2_offload_bf16.json"), cfg, 2, GPU)
    assert "torch_adam" not in offload["optimizer"]["params"]  # DeepSpeed's CPU Adam does the offloaded step
    assert "checkpoint" not in ds
    assert resolve_ds_config(base, cfg, 2, CPU, load_universal=True)["checkpoint"]["load_universal"] is True


def test_batch_sizes_that_do_not_add_up_fail_plainly() -> None:
    cfg = apply_overrides(get_preset("tiny"), ["train.global_batch_size=20", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match=r"not a multiple of train.micro_batch_size 8 x world size 2 = 16"):
        cfg.train.grad_accum(2)
    base = {"gradient_clipping": 0.0, "train_micro_batch_size_per_gpu": 4}
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4 but the trainer config gives 8"):
        resolve_ds_config(base, get_preset("tiny"), 2, CPU)


def test_trainer_owned_or_missing_settings_in_the_json_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "opt.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}, "gradient_clipping": 1.0}))
    with pytest.raises(ConfigError, match="sets 'optimizer', which the trainer config owns"):
        load_ds_config(bad)
    with pytest.raises(ConfigError, match="gradient_clipping explicitly"):
        resolve_ds_config({"zero_optimization": {"stage": 2}}, get_preset("tiny"), 1, CPU)
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2,}')
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_ds_config(broken)
    with pytest.raises(ConfigError, match="no such file"):
        load_ds_config(tmp_path / "absent.json")


def test_schedule_warms_up_then_decays_to_zero_and_keeps_group_ratios() -> None:
    s = WarmupLinearDecay(total=100, warmup=10)
    assert [s(0), s(5), s(10), s(55), s(100), s(120)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 1e-3}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: s(step))
    for _ in range(30):
        opt.step()
        sched.step()
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[1] == pytest.approx(10 * lrs[0])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * s(30))


def test_presets_default_to_the_papers_proposal() -> None:
    assert {"tiny", "vqa2-base"} <= set(PRESETS)
    for name in PRESETS:
        assert get_preset(name).model.variant == "clip-infonce-dot", name
    base = get_preset("vqa2-base")
    m = base.model
    assert (m.hidden_size, m.num_layers, m.clip_arch, m.image_size, m.max_text_len) == (
        768,
        12,
        "ViT-B-32",
        384,
        40,
    )
    # ViLT: 10 epochs over VQA v2 train+val (658,111 questions) at batch 256.
    assert base.train.global_batch_size == 256 and base.train.max_steps == 25_708
    assert base.optim.head_lr_mult == 10 and base.optim.warmup_ratio == 0.1
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        get_preset("nope")


def test_config_round_trips_and_validates(tmp_path: Path) -> None:
    from trainer.config import config_from_dict

    cfg = apply_overrides(get_preset("tiny"), ["train.eval_at_start=true", "optim.betas=0.8,0.9"])
    cfg.save(tmp_path / "c.json")
    assert config_from_dict(json.loads((tmp_path / "c.json").read_text())) == cfg
    with pytest.raises(ConfigError, match="train.log_every must be >= 1"):
        TrainConfig(log_every=0)
    with pytest.raises(ConfigError, match="on_nonfinite"):
        apply_overrides(RunConfig(), ["train.on_nonfinite=ignore"])
