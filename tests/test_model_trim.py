"""Less work per sample, same outputs: the patch stems as a matrix product equal the convolution, and the text run at
the questions' length equals the full-length model (float64, forward and gradients, every variant); the parameters
keep their names and shapes, so stock and pretrained-format weights load unchanged."""

from __future__ import annotations

import dataclasses

import open_clip
import pytest
import torch
import torch.nn.functional as F
from transformers import ViltModel

from common.clip_configs import register_project_configs
from tests.helpers.tiny import EOT, N_ANSWERS, TINY_MODEL, VOCAB, to_double
from trainer.config.config import VARIANTS, ConfigError, ModelConfig
from trainer.modeling.model import FusedViltClip, ModelBuildError
from trainer.modeling.patch_stem import PatchConv2d, as_matmul, is_patchify

LONG = dataclasses.replace(TINY_MODEL, max_text_len=16, clip_context_length=24)


@pytest.mark.parametrize("shape", [(32, 32), (40, 24), (37, 53)])
def test_patch_stem_equals_convolution_float64(shape):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 10, 8, stride=8).double()
    stem = as_matmul(conv)
    assert isinstance(stem, PatchConv2d) and stem.weight is conv.weight and stem.bias is conv.bias
    x = torch.randn(2, 3, *shape, dtype=torch.float64, requires_grad=True)
    out, ref = stem(x), F.conv2d(x, conv.weight, conv.bias, stride=8)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, [x, conv.weight, conv.bias], g)
    ref_grads = torch.autograd.grad(ref, [x, conv.weight, conv.bias], g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_only_patch_stems_become_matrix_products():
    for conv in (
        torch.nn.Conv2d(3, 4, 8, stride=4),
        torch.nn.Conv2d(3, 4, 8, stride=8, padding=1),
        torch.nn.Conv2d(4, 4, 2, stride=2, groups=2),
        torch.nn.Conv2d(3, 4, 3, stride=3, dilation=2),
    ):
        assert not is_patchify(conv) and as_matmul(conv) is conv
    assert is_patchify(torch.nn.Conv2d(3, 4, (8, 4), stride=(8, 4), bias=False))


@pytest.mark.parametrize("variant", ["baseline", "clip-no-infonce"])
def test_model_stems_are_matrix_products_with_stock_names(variant):
    model = FusedViltClip(
        dataclasses.replace(TINY_MODEL, variant=variant), n_answers=N_ANSWERS, vilt_vocab_size=VOCAB
    )
    stem = (
        model.vilt.embeddings.patch_embeddings.projection if model.clip is None else model.clip.visual.conv1
    )
    assert isinstance(stem, PatchConv2d)
    if model.clip is None:
        stock = ViltModel(model.vilt.config)
        model.vilt.load_state_dict(
            stock.state_dict(), strict=True
        )  # a transformers checkpoint loads as it is
    else:
        register_project_configs()
        stock = open_clip.create_model(TINY_MODEL.clip_arch, force_image_size=TINY_MODEL.image_size)
        model.clip.visual.load_state_dict(
            {k: v for k, v in stock.visual.state_dict().items() if not k.startswith("proj")}, strict=True
        )
    torch.testing.assert_close(
        stem.weight,
        stock.state_dict()[
            "embeddings.patch_embeddings.projection.weight" if model.clip is None else "visual.conv1.weight"
        ],
    )


def _questions(n: int, seed: int, cfg: ModelConfig, vilt_max: int, clip_max: int) -> dict[str, torch.Tensor]:
    """A batch whose questions are at most `vilt_max` WordPiece and `clip_max` BPE tokens long, padded to the
    model's full lengths (as the tokenizer pads them)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, vilt_max + 1, (n,), generator=g)
    mask = (torch.arange(cfg.max_text_len)[None] < lengths[:, None]).long()
    vilt_ids = torch.randint(5, VOCAB, (n, cfg.max_text_len), generator=g) * mask
    vilt_ids[:, 0] = 2
    ends = torch.randint(2, clip_max, (n,), generator=g)
    clip_ids = torch.randint(1, 1000, (n, cfg.clip_context_length), generator=g)
    clip_ids[torch.arange(cfg.clip_context_length)[None] > ends[:, None]] = 0
    clip_ids[torch.arange(n), ends] = EOT
    targets = torch.zeros(n, N_ANSWERS)
    targets[torch.arange(n), torch.randint(0, N_ANSWERS, (n,), generator=g)] = 1.0
    return {
        "pixels": torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g),
        "vilt_ids": vilt_ids, "vilt_mask": mask, "clip_ids": clip_ids, "targets": targets,
        "question_id": torch.arange(n),
    }  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trimmed_text_equals_full_length_float64(variant):
    """Text cut to 8 tokens (ViLT's table holds 16, CLIP's 24) gives the full-length model's logits, features and
    every gradient, for questions that fit."""
    from trainer.config.config import RunConfig
    from trainer.modeling.task import build_task

    cfg = RunConfig(model=dataclasses.replace(LONG, variant=variant))
    torch.manual_seed(0)
    full = build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB).double()
    trimmed = build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB).double()
    trimmed.load_state_dict(full.state_dict())
    trimmed.model.set_text_lengths(8, 8)
    if variant.startswith("clip-infonce"):
        assert trimmed.model.clip_text_len == 8
    batch = to_double(_questions(6, seed=4, cfg=LONG, vilt_max=8, clip_max=8))
    outs = []
    for task in (full, trimmed):
        task.train()
        out = task(batch)
        out["loss"].backward()
        outs.append(out)
    for key in ("logits", "image_features", "text_features", "loss"):
        if key in outs[0]:
            torch.testing.assert_close(outs[1][key], outs[0][key], rtol=1e-10, atol=1e-12)
    for (name, a), (_, b) in zip(full.named_parameters(), trimmed.named_parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None, name
            continue
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_text_lengths_are_checked():
    model = FusedViltClip(
        dataclasses.replace(LONG, variant="clip-infonce-dot"), n_answers=N_ANSWERS, vilt_vocab_size=VOCAB
    )
    with pytest.raises(ModelBuildError, match="model.text_len: 41"):
        model.set_text_lengths(41, None)  # ViLT's table: max(40, max_text_len)
    with pytest.raises(ConfigError, match="model.clip_text_len"):
        dataclasses.replace(LONG, clip_text_len=25)
    fixed = dataclasses.replace(LONG, variant="clip-infonce-dot", text_len=8, clip_text_len=16)
    model = FusedViltClip(fixed, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB)
    assert (model.vilt_text_len, model.clip_text_len) == (8, 16)
    # The checkpoint keeps the full tables.
    assert model.clip.positional_embedding.shape[0] == 24
    assert model.vilt.embeddings.text_embeddings.position_embeddings.weight.shape[0] >= 16
