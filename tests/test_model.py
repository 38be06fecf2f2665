"""The fused ViLT+CLIP model and the baseline: all variants, attention and embedding parity, pretrained loading."""

from __future__ import annotations

import dataclasses

import open_clip
import pytest
import torch
from transformers import ViltConfig, ViltForQuestionAnswering, ViltModel

from tests.helpers.tiny import (
    N_ANSWERS,
    TINY_MODEL,
    VOCAB,
    check_one_training_step,
    synthetic_batch,
    tiny_config,
)
from trainer.config.config import VARIANTS, ConfigError, ModelConfig
from trainer.modeling.model import FusedViltClip, ModelBuildError
from trainer.modeling.task import build_task


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_trains_one_step(variant):
    torch.manual_seed(0)
    cfg = tiny_config(variant)
    task = build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB)
    out = check_one_training_step(task, synthetic_batch(4, seed=1), cfg)
    assert out["logits"].shape == (4, N_ANSWERS)
    assert (out["infonce_loss"] > 0) == (cfg.model.contrastive != "none")
    unused = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"parameters without gradient (DeepSpeed would carry them for nothing): {unused}"
    zero_dim = [n for n, p in task.named_parameters() if p.ndim == 0]
    assert not zero_dim, f"0-dim parameters break DeepSpeed's broadcast: {zero_dim}"


def test_param_groups_follow_vilt_recipe():
    cfg = tiny_config("clip-infonce-dot")
    task = build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB)
    groups = {g["name"]: g for g in task.param_groups(cfg.optim)}
    assert groups["head"]["lr"] == pytest.approx(cfg.optim.lr * 10)
    assert groups["fusion"]["lr"] == pytest.approx(cfg.optim.lr)
    assert all(g["weight_decay"] == 0 for n, g in groups.items() if n.endswith("no_decay"))
    assert all(p.ndim >= 2 for n, g in groups.items() if not n.endswith("no_decay") for p in g["params"])
    n_grouped = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_grouped == sum(p.numel() for p in task.parameters())
    frozen = dataclasses.replace(cfg.optim, freeze_clip=True, clip_lr=None)
    names = [g["name"] for g in task.param_groups(frozen)]
    assert not any(n.startswith("clip") for n in names)


@pytest.mark.parametrize("variant", ["baseline", "clip-infonce-cos"])
def test_sdpa_attention_equals_stock_attention(variant):
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY_MODEL, variant=variant)
    sdpa = FusedViltClip(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB).eval()
    eager = FusedViltClip(
        dataclasses.replace(cfg, attention="eager"), n_answers=N_ANSWERS, vilt_vocab_size=VOCAB
    )
    eager.load_state_dict(sdpa.state_dict())
    eager.eval()
    b = synthetic_batch(3, seed=2)
    args = (b["pixels"], b["vilt_ids"], b["vilt_mask"], b["clip_ids"])
    torch.testing.assert_close(sdpa(*args)["logits"], eager(*args)["logits"], rtol=1e-5, atol=1e-5)


def test_baseline_matches_transformers_vilt():
    """The vectorised visual embedding + SDPA fusion gives ViltModel's pooled output for the same weights."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY_MODEL, variant="baseline")
    ours = FusedViltClip(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB).eval()
    ref = ViltModel(ours.vilt.config).eval()
    state = {
        k.replace(".attention.attention.", ".attention.attention."): v
        for k, v in ours.vilt.state_dict().items()
    }
    ref.load_state_dict(state)
    b = synthetic_batch(3, seed=3)
    with torch.no_grad():
        expected = ref(
            input_ids=b["vilt_ids"], attention_mask=b["vilt_mask"], pixel_values=b["pixels"]
        ).pooler_output
        emb = ours.vilt.embeddings
        text = emb.text_embeddings(input_ids=b["vilt_ids"]) + emb.token_type_embeddings(
            torch.zeros_like(b["vilt_ids"])
        )
        image = ours._vilt_visual_embed(b["pixels"]) + emb.token_type_embeddings.weight[1]
        x = torch.cat([text, image], 1)
        keep = torch.cat([b["vilt_mask"].bool(), torch.ones(image.shape[:2], dtype=torch.bool)], 1)
        for layer in ours.vilt.encoder.layer:
            x = layer(x, keep[:, None, None, :])[0]
        got = ours.vilt.pooler(ours.vilt.layernorm(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_pretrained_vilt_round_trip(tmp_path):
    """ViLT weights load from a transformers checkpoint directory (here a ViltForQuestionAnswering save)."""
    torch.manual_seed(0)
    vqa = ViltForQuestionAnswering(
        ViltConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            num_labels=N_ANSWERS,
        )
    )
    vqa.save_pretrained(tmp_path / "vilt")
    cfg = dataclasses.replace(TINY_MODEL, variant="baseline", vilt_pretrained=str(tmp_path / "vilt"))
    model = FusedViltClip(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB)
    for name, value in vqa.vilt.state_dict().items():
        torch.testing.assert_close(model.vilt.state_dict()[name], value, msg=name)


def test_pretrained_clip_round_trip(tmp_path):
    """CLIP weights load from a local open_clip checkpoint file (torch.save of a state dict)."""
    from common.clip_configs import register_project_configs

    register_project_configs()
    torch.manual_seed(1)
    clip = open_clip.create_model("ViT-tiny-8", force_image_size=32, force_context_length=12)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    cfg = dataclasses.replace(
        TINY_MODEL, variant="clip-infonce-dot", clip_pretrained=str(tmp_path / "clip.pt")
    )
    model = FusedViltClip(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB)
    loaded = model.clip.state_dict()
    for name, value in clip.state_dict().items():
        if name == "logit_scale":
            continue  # dropped on purpose: 0-dim, and the loss config owns the temperature
        torch.testing.assert_close(loaded[name], value, msg=name)


def test_missing_checkpoints_are_clear_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelBuildError, match=r"model.vilt_pretrained: cannot load ViLT from '.*nowhere'"):
        FusedViltClip(
            dataclasses.replace(TINY_MODEL, vilt_pretrained=str(missing)), n_answers=3, vilt_vocab_size=VOCAB
        )
    with pytest.raises(ModelBuildError, match=r"model.clip_pretrained: no checkpoint file at '.*clip.pt'"):
        FusedViltClip(
            dataclasses.replace(TINY_MODEL, clip_pretrained=str(missing / "clip.pt")),
            n_answers=3,
            vilt_vocab_size=VOCAB,
        )


def test_bad_model_options_are_clear_errors():
    with pytest.raises(ConfigError, match=r"unknown variant 'clip-infonce-l2' \(one of: baseline"):
        ModelConfig(variant="clip-infonce-l2")
    with pytest.raises(
        ModelBuildError, match=r"'ViT-Q-99' is not an open_clip architecture; valid: .*ViT-B-32"
    ):
        FusedViltClip(
            dataclasses.replace(TINY_MODEL, clip_arch="ViT-Q-99"), n_answers=3, vilt_vocab_size=VOCAB
        )
    with pytest.raises(ConfigError, match="not divisible"):
        ModelConfig(hidden_size=30, num_heads=4)


def test_convolutional_clip_tower():
    """open_clip's convolutional towers work too: their feature map becomes the visual tokens."""
    import json

    from common.clip_configs import CONFIG_DIR

    assert json.loads((CONFIG_DIR / "RN-tiny.json").read_text())["vision_cfg"]["layers"]
    cfg = dataclasses.replace(TINY_MODEL, variant="clip-infonce-cos", clip_arch="RN-tiny")
    task = build_task(
        dataclasses.replace(tiny_config("clip-infonce-cos"), model=cfg), n_answers=3, vilt_vocab_size=VOCAB
    )
    b = synthetic_batch(2, seed=4)
    b["targets"] = b["targets"][:, :3]
    out = task(b)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


def test_init_std_sets_vilt_initialisation():
    """model.init_std is ViLT's initializer_range: it scales the random init of the encoder and the VQA head."""
    stds = {}
    for std in (0.02, 0.1):
        torch.manual_seed(0)
        model = FusedViltClip(
            dataclasses.replace(TINY_MODEL, variant="baseline", init_std=std),
            n_answers=3,
            vilt_vocab_size=VOCAB,
        )
        assert model.vilt.config.initializer_range == std
        stds[std] = model.vilt.encoder.layer[0].intermediate.dense.weight.std().item()
        assert stds[std] == pytest.approx(std, rel=0.05)
        assert model.classifier[0].weight.std().item() == pytest.approx(std, rel=0.1)
    with pytest.raises(ConfigError, match="model.init_std must be > 0"):
        ModelConfig(init_std=0.0)


def test_compact_clip_vocabulary_keeps_the_text_features_and_drops_the_rest():
    """model.clip_text_vocab=compact: the same text features for ids in the vocabulary, unseen ids map to the
    unknown row, a fraction of the parameters, and a clear error without a vocabulary."""
    cfg = tiny_config("clip-infonce-dot")
    batch = synthetic_batch(4, seed=2)
    vocab = sorted(set(batch["clip_ids"].flatten().tolist()))
    torch.manual_seed(0)
    full = build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB).eval()
    compact_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, clip_text_vocab="compact"))
    torch.manual_seed(0)
    compact = build_task(compact_cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB, clip_vocab=vocab).eval()

    table = compact.model.clip.token_embedding
    assert table.weight.shape == (len(vocab) + 1, full.model.clip.token_embedding.weight.shape[1])
    assert "clip.token_embedding.index" in compact.model.state_dict()
    saved = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in compact.parameters())
    assert saved == (full.model.clip.token_embedding.num_embeddings - len(vocab) - 1) * table.weight.shape[1]
    with torch.no_grad():
        a, b = full(batch), compact(batch)
    torch.testing.assert_close(b["logits"], a["logits"])
    torch.testing.assert_close(b["infonce_loss"], a["infonce_loss"])

    unseen = next(i for i in range(1, 49407) if i not in vocab)
    rows = table(torch.tensor([[vocab[0], unseen]]))
    torch.testing.assert_close(rows[0, 1], table.weight[0])  # the unknown-token row
    torch.testing.assert_close(rows[0, 0], full.model.clip.token_embedding.weight[vocab[0]])

    with pytest.raises(ModelBuildError, match="model.clip_text_vocab=compact needs the question tokenizer"):
        build_task(compact_cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="model.clip_text_vocab: 'small' is not one of full, compact"):
        ModelConfig(clip_text_vocab="small")


def test_param_groups_with_a_separate_clip_rate():
    """clip_lr != lr: only CLIP's groups take it; the fusion layers keep the base rate, the head 10x the base."""
    cfg = tiny_config("clip-infonce-dot")
    optim = dataclasses.replace(cfg.optim, lr=1e-4, clip_lr=3e-6, head_lr_mult=10.0)
    task = build_task(cfg, n_answers=N_ANSWERS, vilt_vocab_size=VOCAB)
    groups = task.param_groups(optim)
    rates = {g["name"]: g["lr"] for g in groups}
    assert set(rates) == {"clip", "clip_no_decay", "fusion", "fusion_no_decay", "head", "head_no_decay"}
    for name, lr in rates.items():
        want = {"clip": 3e-6, "fusion": 1e-4, "head": 1e-3}[name.removesuffix("_no_decay")]
        assert lr == pytest.approx(want), name
    by_param = {id(p): g["name"] for g in groups for p in g["params"]}
    for name, param in task.model.named_parameters():
        part = "clip" if name.startswith("clip.") else "head" if name.startswith("classifier.") else "fusion"
        assert by_param[id(param)].removesuffix("_no_decay") == part, name
