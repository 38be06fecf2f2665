"""Every named preset is a complete, valid configuration; the demo's four variants build and train a step."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import check_one_training_step, synthetic_batch
from trainer.config.config import apply_overrides
from trainer.config.presets import PRESETS, get_preset
from trainer.modeling.task import build_task


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_complete(name):
    cfg = get_preset(name)
    assert cfg.train.grad_accum(1) >= 1
    assert cfg.train.max_steps > 0
    assert cfg.model.max_text_len >= 1 and cfg.model.image_size % cfg.model.patch_size == 0


@pytest.mark.parametrize("variant", ["baseline", "clip-no-infonce", "clip-infonce-cos", "clip-infonce-dot"])
def test_demo_preset_variants_train_a_step(variant):
    cfg = apply_overrides(get_preset("demo"), [f"model.variant={variant}"])
    m = cfg.model
    assert m.clip_arch == "RN-tiny" and m.init_std == 0.1 and m.clip_text_vocab == "compact"
    batch = synthetic_batch(4, seed=1, cfg=m)
    torch.manual_seed(0)
    vocab = sorted(set(batch["clip_ids"].flatten().tolist()))
    task = build_task(cfg, n_answers=13, vilt_vocab_size=121, clip_vocab=vocab)
    batch["pixels"] = torch.randn(4, 3, m.image_size, m.image_size)
    batch["targets"] = torch.zeros(4, 13)
    batch["targets"][:, 0] = 1.0
    out = check_one_training_step(task, batch, cfg)
    with_contrastive = variant not in ("baseline", "clip-no-infonce")
    assert (out["infonce_loss"] > 0).item() == with_contrastive
