"""The fused forward (trainer/modeling/model.py) against references built here, in float64.

- baseline: the whole forward against transformers' own `ViltModel` with the same weights, on the same ids, mask and
  pixels (square and non-square images): the pooled vector the VQA head reads, the head's logits, and the final
  hidden states (the image tokens up to order: the stock embedding shuffles them, attention does not see order).
- clip-* variants: what the fused forward hands the first ViLT layer (tokens, attention mask) against the
  assembly written out here from CLIP's tower output (captured by a hook): ViLT's text embedding, then the projected
  CLIP tokens (class token first for ViT towers), modality type 0 on text and 1 on image tokens, and a mask that
  hides only the padded question tokens. The pooled vector is also checked against `ViltModel` given the projected
  CLIP tokens as `image_embeds`, and I and T against CLIP's own encoders.

Every model is built from a configuration with random weights: nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import ViltConfig, ViltModel

from trainer.config.config import ModelConfig
from trainer.modeling.model import FusedViltClip

VOCAB = 60
N_ANSWERS = 5
BATCH = 3


def _cfg(variant: str, *, clip_arch: str = "ViT-tiny-8", image_size: int = 32, attention: str = "sdpa"):
    return ModelConfig(
        variant=variant,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        patch_size=8,
        clip_arch=clip_arch,
        image_size=image_size,
        max_text_len=9,
        clip_context_length=12,
        attention=attention,
        init_std=0.2,  # wide weights: every difference shows well above float64 round-off
    )


def _model(cfg: ModelConfig) -> FusedViltClip:
    torch.manual_seed(0)
    model = FusedViltClip(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB).double().eval()
    with torch.no_grad():  # ViLT starts its modality and class embeddings at zero: make every one count
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.2)
    return model


def _reference_vilt(model: FusedViltClip, cfg: ModelConfig) -> tuple[ViltModel, list[str]]:
    """transformers' ViltModel, configured here from `cfg`, stock attention, with the fused model's ViLT weights."""
    positions = model.vilt.embeddings.text_embeddings.position_embeddings.num_embeddings
    config = ViltConfig(
        vocab_size=VOCAB,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        max_position_embeddings=positions,
        max_image_length=-1,  # every patch, none sampled away
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = "eager"
    ref = ViltModel(config).double().eval()
    missing, unexpected = ref.load_state_dict(model.vilt.state_dict(), strict=False)
    assert not unexpected, unexpected
    return ref, sorted(missing)


def _inputs(cfg: ModelConfig, height: int, width: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    length = cfg.max_text_len
    ids = torch.randint(5, VOCAB, (BATCH, length), generator=g)
    lengths = torch.tensor([length, 4, 2])  # one full question, two padded ones
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask  # padding id 0, as the tokenizer pads
    clip_ids = torch.randint(1, 1000, (BATCH, cfg.clip_context_length), generator=g)
    clip_ids[:, 5] = 49407  # CLIP's end-of-text token: the text feature is read there
    pixels = torch.randn(BATCH, 3, height, width, generator=g, dtype=torch.float64)
    return {"pixels": pixels, "vilt_ids": ids, "vilt_mask": mask, "clip_ids": clip_ids}


def _run_fused(model: FusedViltClip, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward, capturing the head's input (pooled), the final layer norm's output and the first layer's input."""
    seen: dict[str, torch.Tensor] = {}

    def layer_input(module, args, kwargs):
        seen["tokens"] = args[0] if args else kwargs["hidden_states"]
        seen["mask"] = args[1] if len(args) > 1 else kwargs.get("attention_mask")

    hooks = [
        model.classifier.register_forward_pre_hook(lambda m, args: seen.update(pooled=args[0])),
        model.vilt.layernorm.register_forward_hook(lambda m, args, out: seen.update(hidden=out)),
        model.vilt.encoder.layer[0].register_forward_pre_hook(layer_input, with_kwargs=True),
    ]
    if model.clip is not None:
        visual = model.clip.visual
        # The tower's last block: the ViT's last residual block ([B, 1 + patches, C]) or the ResNet's last stage.
        tower = visual.transformer.resblocks[-1] if hasattr(visual, "transformer") else visual.layer4
        hooks.append(tower.register_forward_hook(lambda m, args, out: seen.update(tower=out)))
    try:
        with torch.no_grad():
            out = model(x["pixels"], x["vilt_ids"], x["vilt_mask"], x["clip_ids"])
    finally:
        for h in hooks:
            h.remove()
    return {**seen, **out}


def _attends(mask: torch.Tensor) -> torch.Tensor:
    """Which keys each sample attends to, from a boolean (True = attend) or additive float mask [B, 1, 1, N]."""
    assert mask.shape[1:3] == (1, 1), mask.shape  # one row per sample, broadcast over heads and queries
    return mask[:, 0, 0] if mask.dtype == torch.bool else mask[:, 0, 0] == 0


def _matching(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """For each row of `theirs`, the index of the nearest row of `ours` (per sample); asserts a permutation."""
    index = torch.cdist(theirs, ours).argmin(dim=-1)
    for row in index:
        assert sorted(row.tolist()) == list(range(ours.shape[1])), "image tokens do not pair off one to one"
    return index


TIGHT = {"rtol": 1e-9, "atol": 1e-10}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("height,width", [(32, 32), (48, 40)])
def test_baseline_forward_matches_transformers_vilt(attention: str, height: int, width: int) -> None:
    cfg = _cfg("baseline", attention=attention)
    model = _model(cfg)
    ref, missing = _reference_vilt(model, cfg)
    assert missing == []  # the baseline keeps every ViLT weight, patch projection included
    x = _inputs(cfg, height, width)
    ours = _run_fused(model, x)
    torch.manual_seed(3)  # the stock visual embedding draws a random patch order
    with torch.no_grad():
        theirs = ref(
            input_ids=x["vilt_ids"],
            attention_mask=x["vilt_mask"],
            pixel_values=x["pixels"],
            pixel_mask=torch.ones(BATCH, height, width, dtype=torch.long),
        )
    torch.testing.assert_close(ours["pooled"], theirs.pooler_output, **TIGHT)
    with torch.no_grad():
        torch.testing.assert_close(ours["logits"], model.classifier(theirs.pooler_output), **TIGHT)

    length = cfg.max_text_len
    patches = (height // cfg.patch_size) * (width // cfg.patch_size)
    assert ours["hidden"].shape == theirs.last_hidden_state.shape == (BATCH, length + 1 + patches, 32)
    # Text tokens and the image class token keep their places; the patch tokens come in the stock model's
    # shuffled order.
    torch.testing.assert_close(
        ours["hidden"][:, : length + 1], theirs.last_hidden_state[:, : length + 1], **TIGHT
    )
    ours_patches, their_patches = ours["hidden"][:, length + 1 :], theirs.last_hidden_state[:, length + 1 :]
    index = _matching(ours_patches, their_patches)
    paired = torch.gather(ours_patches, 1, index[..., None].expand_as(ours_patches))
    torch.testing.assert_close(paired, their_patches, **TIGHT)


def test_baseline_padding_changes_nothing_but_the_padded_tokens() -> None:
    """Padded question tokens are masked out: other ids there give the same pooled vector and logits."""
    cfg = _cfg("baseline")
    model = _model(cfg)
    x = _inputs(cfg, 32, 32)
    other = dict(x, vilt_ids=torch.where(x["vilt_mask"].bool(), x["vilt_ids"], 7))
    a, b = _run_fused(model, x), _run_fused(model, other)
    torch.testing.assert_close(a["pooled"], b["pooled"], **TIGHT)
    torch.testing.assert_close(a["logits"], b["logits"], **TIGHT)
    assert not torch.allclose(a["hidden"][1, 5], b["hidden"][1, 5])  # the padded position itself did change


CLIP_CASES = [
    ("clip-infonce-dot", "ViT-tiny-8", 32, "sdpa"),
    ("clip-infonce-dot", "ViT-tiny-8", 32, "eager"),
    ("clip-no-infonce", "ViT-tiny-8", 32, "sdpa"),
    ("clip-infonce-cos", "RN-tiny", 64, "sdpa"),  # convolutional tower: a feature map, no class token
]


@pytest.mark.parametrize("variant,arch,size,attention", CLIP_CASES)
def test_clip_variant_assembles_text_and_image_tokens_as_vilt_does(
    variant: str, arch: str, size: int, attention: str
) -> None:
    cfg = _cfg(variant, clip_arch=arch, image_size=size, attention=attention)
    model = _model(cfg)
    x = _inputs(cfg, size, size)
    ours = _run_fused(model, x)
    emb, visual = model.vilt.embeddings, model.clip.visual

    # The text side, from the embedding tables: word + position + BERT token type 0, layer norm, then modality 0.
    t = emb.text_embeddings
    length = cfg.max_text_len
    text = t.word_embeddings.weight[x["vilt_ids"]] + t.position_embeddings.weight[:length]
    text = text + t.token_type_embeddings.weight[0]
    text = F.layer_norm(text, (32,), t.LayerNorm.weight, t.LayerNorm.bias, t.LayerNorm.eps)
    text = text + emb.token_type_embeddings.weight[0]

    # The image side, from the tower's own output: ViT tokens after its final norm ([class, patches] in raster
    # order), or the convolutional feature map flattened in raster order; projected to ViLT's width; modality 1.
    tower = ours["tower"]
    if arch.startswith("ViT"):
        n_patches = (size // 8) ** 2
        assert tower.shape[:2] == (BATCH, 1 + n_patches)
        clip_tokens = visual.ln_post(tower)
    else:
        clip_tokens = tower.flatten(2).transpose(1, 2)
    with torch.no_grad():
        image = model.visual_proj(clip_tokens) + emb.token_type_embeddings.weight[1]
        expected = torch.cat([text, image], dim=1)
    torch.testing.assert_close(ours["tokens"], expected, **TIGHT)
    n_image = image.shape[1]
    keep = torch.cat([x["vilt_mask"].bool(), torch.ones(BATCH, n_image, dtype=torch.bool)], dim=1)
    assert torch.equal(_attends(ours["mask"]), keep)
    if attention == "eager":  # an additive mask: 0 where attended, the dtype's most negative value elsewhere
        assert ours["mask"].dtype == torch.float64
        hidden = ours["mask"][:, 0, 0][~keep]
        assert hidden.numel() > 0 and bool((hidden == torch.finfo(torch.float64).min).all())

    # The same projected tokens through transformers' ViltModel as `image_embeds`: the same pooled vector.
    ref, missing = _reference_vilt(model, cfg)
    assert missing == [
        "embeddings.cls_token",
        "embeddings.patch_embeddings.projection.bias",
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.position_embeddings",
    ]  # only the baseline's patch embedding, which the CLIP variants do not use
    with torch.no_grad():
        theirs = ref(
            input_ids=x["vilt_ids"],
            attention_mask=x["vilt_mask"],
            image_embeds=model.visual_proj(clip_tokens),
            pixel_mask=torch.ones(BATCH, n_image, dtype=torch.long),
        )
    torch.testing.assert_close(ours["pooled"], theirs.pooler_output, **TIGHT)
    torch.testing.assert_close(ours["hidden"], theirs.last_hidden_state, **TIGHT)

    # I and T are CLIP's own features (the contrastive variants only).
    with torch.no_grad():
        if cfg.contrastive == "none":
            assert "text_features" not in ours
        else:
            torch.testing.assert_close(ours["image_features"], model.clip.encode_image(x["pixels"]), **TIGHT)
            torch.testing.assert_close(ours["text_features"], model.clip.encode_text(x["clip_ids"]), **TIGHT)
