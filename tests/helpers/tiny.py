"""Tiny model configurations and synthetic batches for unit tests (CPU, milliseconds per step)."""

from __future__ import annotations

import dataclasses
import math

import torch

from trainer.config.config import LossConfig, ModelConfig, RunConfig

TINY_MODEL = ModelConfig(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    patch_size=8,
    clip_arch="ViT-tiny-8",
    image_size=32,
    max_text_len=8,
    clip_context_length=12,
)
N_ANSWERS = 7
VOCAB = 50
EOT = 49407  # CLIP's end-of-text id: open_clip pools the text feature at the argmax token


def tiny_config(variant: str, **loss) -> RunConfig:
    return RunConfig(model=dataclasses.replace(TINY_MODEL, variant=variant), loss=LossConfig(**loss))


def synthetic_batch(n: int, seed: int, cfg: ModelConfig = TINY_MODEL) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vilt_ids = torch.randint(5, VOCAB, (n, cfg.max_text_len), generator=g)
    vilt_ids[:, 0] = 2  # [CLS]
    lengths = torch.randint(3, cfg.max_text_len + 1, (n,), generator=g)
    mask = (torch.arange(cfg.max_text_len)[None] < lengths[:, None]).long()
    vilt_ids = vilt_ids * mask
    clip_ids = torch.randint(1, 1000, (n, cfg.clip_context_length), generator=g)
    clip_ids[torch.arange(n), torch.randint(2, cfg.clip_context_length, (n,), generator=g)] = EOT
    targets = torch.zeros(n, N_ANSWERS)
    targets[torch.arange(n), torch.randint(0, N_ANSWERS, (n,), generator=g)] = 1.0
    targets[torch.arange(n), torch.randint(0, N_ANSWERS, (n,), generator=g)] = 0.3
    return {
        "pixels": torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g),
        "vilt_ids": vilt_ids,
        "vilt_mask": mask,
        "clip_ids": clip_ids,
        "targets": targets,
        "question_id": torch.arange(n),
    }


def to_double(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def with_duplicate_questions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same batch where samples 0 and 5 (different ranks of a 2 x 4 split) and 2 and 3 (one rank) ask the same
    question: identical token rows, as identical questions tokenise."""
    out = dict(batch)
    for key in ("vilt_ids", "vilt_mask", "clip_ids"):
        t = out[key].clone()
        t[5], t[3] = t[0], t[2]
        out[key] = t
    return out


def parse_variant(spec: str) -> tuple[str, dict]:
    """`variant[+duplicates]`, e.g. clip-infonce-dot+mask: the variant and its loss settings for the parity tests."""
    variant, _, dup = spec.partition("+")
    return variant, ({"duplicate_questions": dup} if dup else {})


def hand_vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ViLT's VQA loss written out: binary cross-entropy of every answer's sigmoid against its soft score, averaged
    over the batch and summed over the answers."""
    x, y = logits.double(), targets.double()
    per = -(y * torch.nn.functional.logsigmoid(x) + (1 - y) * torch.nn.functional.logsigmoid(-x))
    return per.sum(dim=1).mean()


def check_one_training_step(task: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: RunConfig) -> dict:
    """Forward, backward and one AdamW step on `batch`, checking what the step did: the loss is finite and equals
    its parts (the VQA part computed by hand), every weight that got a non-zero gradient moved, nothing became
    non-finite, and the loss on the same batch went down. Returns the first forward's output."""
    task.train()
    torch.manual_seed(1)  # the same dropout masks in both forwards
    out = task(batch)
    loss = out["loss"]
    assert torch.isfinite(loss), loss
    hand = hand_vqa_loss(out["logits"], batch["targets"]).item()
    assert math.isclose(out["vqa_loss"].item(), hand, rel_tol=1e-5), (out["vqa_loss"].item(), hand)
    weight = cfg.loss.infonce_weight if cfg.model.contrastive != "none" else 0.0
    parts = out["vqa_loss"].item() + weight * out["infonce_loss"].item()
    assert math.isclose(loss.item(), parts, rel_tol=1e-6), (loss.item(), parts)
    loss.backward()
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    torch.optim.AdamW(task.param_groups(cfg.optim)).step()
    stepped = [n for n, p in task.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    assert stepped, "no weight received a gradient"
    still = [n for n in stepped if torch.equal(dict(task.named_parameters())[n].detach(), before[n])]
    assert not still, f"weights with a gradient that the step left unchanged: {still}"
    assert all(torch.isfinite(p).all() for p in task.parameters())
    torch.manual_seed(1)
    with torch.no_grad():
        after = task(batch)["loss"]
    assert after.item() < loss.item(), (loss.item(), after.item())
    return out
