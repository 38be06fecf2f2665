"""The DeepSpeed boundary without DeepSpeed running: config ownership, batch arithmetic, schedule, presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.config.config import ConfigError, RunConfig, TrainConfig, apply_overrides
from trainer.config.presets import PRESETS, get_preset
from trainer.engine.engine import CONFIG_DIR, load_ds_config, resolve_ds_config
from trainer.engine.optim import WarmupLinearDecay


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
    ds = resolve_ds_config(base, cfg.train, cfg.optim, world_size=1)
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
    two = resolve_ds_config(base, cfg.train, cfg.optim, world_size=2)["optimizer"]["params"]
    assert (
        two["torch_adam"] is True and two["fused"] is True
    )  # torch's fused AdamW on every device: no JIT build
    offload = resolve_ds_config(
        load_ds_config(CONFIG_DIR / "zero2_offload_bf16.json"), cfg.train, cfg.optim, 2
    )
    assert "torch_adam" not in offload["optimizer"]["params"]  # DeepSpeed's CPU Adam does the offloaded step
    assert "checkpoint" not in ds
    assert (
        resolve_ds_config(base, cfg.train, cfg.optim, 2, load_universal=True)["checkpoint"]["load_universal"]
        is True
    )


def test_one_rank_runs_without_zero_and_everything_else_keeps_the_json_stage() -> None:
    """trainer/engine/engine.py's single-rank choice (`plain_single_rank`): one rank has nothing to shard, and ZeRO's flat
    copies cost the CPU step 15-25% (docs/performance.md); several ranks stay sharded, offload keeps ZeRO, and so does
    a run that loads a universal checkpoint (only a ZeRO optimizer restores one)."""
    cfg = get_preset("tiny")
    for stage in (1, 2, 3):
        base = load_ds_config(CONFIG_DIR / f"zero{stage}_fp32.json")
        one = resolve_ds_config(base, cfg.train, cfg.optim, world_size=1)
        assert one["zero_optimization"]["stage"] == 0 and "torch_autocast" not in one
        assert not one["bf16"]["enabled"]  # fp32 stays fp32
        # The JSON's other ZeRO settings stay for a resume under ZeRO (Engine.load); the JSON itself is untouched.
        assert {k: v for k, v in one["zero_optimization"].items() if k != "stage"} == {
            k: v for k, v in base["zero_optimization"].items() if k != "stage"
        }
        assert base["zero_optimization"]["stage"] == stage
        assert resolve_ds_config(base, cfg.train, cfg.optim, 2)["zero_optimization"]["stage"] == stage
        assert (
            resolve_ds_config(base, cfg.train, cfg.optim, 1, load_universal=True)["zero_optimization"][
                "stage"
            ]
            == stage
        )
    offload = {
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "gradient_clipping": 0.0,
    }
    assert resolve_ds_config(offload, cfg.train, cfg.optim, 1)["zero_optimization"]["stage"] == 2


AUTOCAST_BF16 = {"enabled": True, "dtype": "bfloat16"}


@pytest.mark.parametrize("name", ["zero1_bf16.json", "zero2_bf16.json", "zero3_bf16.json"])
def test_one_bf16_rank_runs_at_stage_0_with_fp32_weights_and_autocast_and_several_keep_zero_bf16(
    name: str,
) -> None:
    """One GPU in bf16 runs as plain PyTorch does (an H200 ran the ZeRO-2 bf16 engine at 1,392 samples/s and plain
    PyTorch with autocast at 1,635, deepspeed_configs/README.md): stage 0, bf16 off (fp32 weights, so DeepSpeed wraps
    no optimizer around torch's fused AdamW) and DeepSpeed's torch_autocast in bf16. Several ranks keep the JSON."""
    cfg = get_preset("tiny")
    base = load_ds_config(CONFIG_DIR / name)
    one = resolve_ds_config(base, cfg.train, cfg.optim, 1)
    assert one["zero_optimization"]["stage"] == 0
    assert one["bf16"] == {**base["bf16"], "enabled": False}
    assert one["torch_autocast"] == AUTOCAST_BF16
    assert one["optimizer"]["params"]["torch_adam"] is True and one["optimizer"]["params"]["fused"] is True
    assert {k: v for k, v in one["zero_optimization"].items() if k != "stage"} == {
        k: v for k, v in base["zero_optimization"].items() if k != "stage"
    }
    assert base["bf16"]["enabled"] and "torch_autocast" not in base  # the JSON itself is untouched
    # Several ranks, or a universal checkpoint on one: ZeRO with bf16 weights, as the JSON says.
    for world_size, universal in ((2, False), (1, True)):
        ds = resolve_ds_config(base, cfg.train, cfg.optim, world_size, load_universal=universal)
        assert ds["zero_optimization"] == base["zero_optimization"], (world_size, universal)
        assert ds["bf16"] == base["bf16"] and "torch_autocast" not in ds


def test_bf16_with_offload_fp16_or_its_own_autocast_section_keeps_the_json() -> None:
    cfg = get_preset("tiny")
    offload = load_ds_config(CONFIG_DIR / "zero2_offload_bf16.json")
    for world_size in (1, 2):
        ds = resolve_ds_config(offload, cfg.train, cfg.optim, world_size)
        assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and "torch_autocast" not in ds
    zero2 = load_ds_config(CONFIG_DIR / "zero2_bf16.json")
    # A file that sets torch_autocast itself states its precision: the way to run ZeRO-2 bf16 on one GPU.
    own = {**zero2, "torch_autocast": {"enabled": False}}
    ds = resolve_ds_config(own, cfg.train, cfg.optim, 1)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    assert ds["torch_autocast"] == {"enabled": False}
    # The older "bfloat16" key DeepSpeed also reads.
    old = {k: v for k, v in zero2.items() if k != "bf16"} | {"bfloat16": {"enabled": True}}
    ds = resolve_ds_config(old, cfg.train, cfg.optim, 1)
    assert ds["zero_optimization"]["stage"] == 0 and not ds["bfloat16"]["enabled"]
    assert ds["torch_autocast"] == AUTOCAST_BF16
    fp16 = {k: v for k, v in zero2.items() if k != "bf16"} | {"fp16": {"enabled": True}}
    ds = resolve_ds_config(fp16, cfg.train, cfg.optim, 1)
    assert ds["zero_optimization"]["stage"] == 2 and "torch_autocast" not in ds


def test_an_fp32_json_with_its_own_autocast_section_keeps_its_zero_stage_on_one_rank() -> None:
    """The same rule in fp32: the way to time the one-rank ZeRO engine against the stage-0 default (what
    scripts/gpu_check.sh's zero stage runs on the CPU); without the section one fp32 rank runs at stage 0."""
    cfg = get_preset("demo")
    zero2 = load_ds_config(CONFIG_DIR / "zero2_fp32.json")
    assert resolve_ds_config(zero2, cfg.train, cfg.optim, 1)["zero_optimization"]["stage"] == 0
    own = {**zero2, "torch_autocast": {"enabled": False}}
    ds = resolve_ds_config(own, cfg.train, cfg.optim, 1)
    assert ds["zero_optimization"] == zero2["zero_optimization"] and not ds["bf16"]["enabled"]
    assert ds["torch_autocast"] == {"enabled": False}


def test_batch_sizes_that_do_not_add_up_fail_plainly() -> None:
    cfg = apply_overrides(get_preset("tiny"), ["train.global_batch_size=20", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match=r"not a multiple of train.micro_batch_size 8 x world size 2 = 16"):
        cfg.train.grad_accum(2)
    base = {"gradient_clipping": 0.0, "train_micro_batch_size_per_gpu": 4}
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4 but the trainer config gives 8"):
        resolve_ds_config(base, get_preset("tiny").train, get_preset("tiny").optim, 2)


def test_trainer_owned_or_missing_settings_in_the_json_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "opt.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}, "gradient_clipping": 1.0}))
    with pytest.raises(ConfigError, match="sets 'optimizer', which the trainer config owns"):
        load_ds_config(bad)
    with pytest.raises(ConfigError, match="gradient_clipping explicitly"):
        resolve_ds_config(
            {"zero_optimization": {"stage": 2}}, get_preset("tiny").train, get_preset("tiny").optim, 1
        )
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
        "ViT-B-32-quickgelu",  # the activation OpenAI's CLIP weights were trained with
        384,
        40,
    )
    # ViLT: 10 epochs over VQA v2 train+val (658,111 questions) at batch 256.
    assert base.train.global_batch_size == 256 and base.train.max_steps == 25_708
    assert base.optim.head_lr_mult == 10 and base.optim.warmup_ratio == 0.1
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        get_preset("nope")


def test_config_round_trips_and_validates(tmp_path: Path) -> None:
    from trainer.config.config import config_from_dict

    cfg = apply_overrides(get_preset("tiny"), ["train.eval_at_start=true", "optim.betas=0.8,0.9"])
    cfg.save(tmp_path / "c.json")
    assert config_from_dict(json.loads((tmp_path / "c.json").read_text())) == cfg
    with pytest.raises(ConfigError, match="train.log_every must be >= 1"):
        TrainConfig(log_every=0)
    with pytest.raises(ConfigError, match="on_nonfinite"):
        apply_overrides(RunConfig(), ["train.on_nonfinite=ignore"])


def test_the_default_is_stage_0_with_the_overlapped_all_reduce_on_every_number_of_ranks() -> None:
    """deepspeed_configs/stage0_*.json (README, deepspeed_configs/README.md "Several ranks"): ZeRO stage 0 for one rank
    and for several; bf16 as autocast over fp32 weights on any number of ranks; the engine's own all-reduce,
    overlapped with backward, on several ranks only (one rank needs none); fp32 on the wire unless the file says bf16."""
    from trainer.engine.engine import default_ds_config_path, overlapped_allreduce

    assert default_ds_config_path(torch.device("cuda", 0)).name == "stage0_bf16.json"
    assert default_ds_config_path(torch.device("cpu")).name == "stage0_fp32.json"
    cfg = get_preset("vqa2-base")
    for name, autocast in (("stage0_bf16.json", True), ("stage0_fp32.json", False)):
        base = load_ds_config(CONFIG_DIR / name)
        for world_size in (1, 2, 8):
            ds = resolve_ds_config(base, cfg.train, cfg.optim, world_size)
            assert ds["zero_optimization"]["stage"] == 0 and not ds["bf16"]["enabled"], (name, world_size)
            assert (ds.get("torch_autocast") == AUTOCAST_BF16) is autocast, (name, world_size)
            assert ds["communication_data_type"] == "fp32"
            assert overlapped_allreduce(ds, world_size) is (world_size > 1)
        # DeepSpeed's own stage-0 all-reduce after backward, and ZeRO, where the file says so.
        after = {**base, "zero_optimization": {**base["zero_optimization"], "overlap_comm": False}}
        assert not overlapped_allreduce(resolve_ds_config(after, cfg.train, cfg.optim, 8), 8)
    zero2 = resolve_ds_config(load_ds_config(CONFIG_DIR / "zero2_bf16.json"), cfg.train, cfg.optim, 8)
    assert zero2["zero_optimization"]["stage"] == 2 and not overlapped_allreduce(zero2, 8)
