"""InfoNCE (paper eq. 1 and 2), CLIP's symmetric loss and ViLT's VQA loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import clip_symmetric_loss, global_contrastive_loss, info_nce, vqa_loss

I = [[1.0, 0.0], [0.6, 0.8]]  # noqa: E741  (the paper names image features I)
T = [[0.8, 0.6], [0.0, 2.0]]


def _hand_info_nce(image, text, tau, sim):
    """Eq. (1)/(2) written out term by term: 2M anchors, positive = pair, denominator = all k != a."""
    z = image + text
    m = len(image)

    def s(a, b):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        if sim == "cosine":
            dot /= math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
        return dot / tau

    total = 0.0
    for a in range(2 * m):
        p = a + m if a < m else a - m
        denom = sum(math.exp(s(z[a], z[k])) for k in range(2 * m) if k != a)
        total += -math.log(math.exp(s(z[a], z[p])) / denom)
    return total / (2 * m)


@pytest.mark.parametrize("sim", ["cosine", "dot"])
@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_info_nce_matches_hand_computation(sim, tau):
    got = info_nce(torch.tensor(I), torch.tensor(T), temperature=tau, similarity=sim)
    assert got.item() == pytest.approx(_hand_info_nce(I, T, tau, sim), rel=1e-5)


def test_cosine_ignores_scale_dot_does_not():
    i, t = torch.tensor(I), torch.tensor(T)
    cos = info_nce(i, t, temperature=0.2, similarity="cosine")
    assert info_nce(3 * i, 5 * t, temperature=0.2, similarity="cosine").item() == pytest.approx(
        cos.item(), rel=1e-5
    )
    dot = info_nce(i, t, temperature=0.2, similarity="dot")
    assert info_nce(3 * i, 5 * t, temperature=0.2, similarity="dot").item() != pytest.approx(
        dot.item(), rel=1e-3
    )


def test_clip_symmetric_loss_matches_hand_computation():
    tau = 0.5
    norm = [[x / math.hypot(*v) for x in v] for v in (I + T)]
    ni, nt = norm[:2], norm[2:]
    logits = [
        [sum(a * b for a, b in zip(ni[r], nt[c], strict=True)) / tau for c in range(2)] for r in range(2)
    ]

    def ce(rows):
        return sum(-rows[r][r] + math.log(sum(math.exp(v) for v in rows[r])) for r in range(2)) / 2

    expected = (ce(logits) + ce([list(col) for col in zip(*logits, strict=True)])) / 2
    got = clip_symmetric_loss(torch.tensor(I), torch.tensor(T), temperature=tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("sim", ["cosine", "dot"])
def test_info_nce_finite_for_large_norms_under_bf16_autocast(sim):
    g = torch.Generator().manual_seed(0)
    image = (torch.randn(16, 64, generator=g) * 40).requires_grad_()  # norms ~ 320
    text = (torch.randn(16, 64, generator=g) * 40).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(image.bfloat16(), text.bfloat16(), temperature=0.07, similarity=sim)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()


def test_global_loss_without_process_group_is_the_plain_loss():
    i, t = torch.tensor(I), torch.tensor(T)
    for kind in ("cosine", "dot"):
        assert global_contrastive_loss(i, t, temperature=0.3, kind=kind).item() == pytest.approx(
            info_nce(i, t, temperature=0.3, similarity=kind).item()
        )
    assert global_contrastive_loss(i, t, temperature=0.3, kind="clip").item() == pytest.approx(
        clip_symmetric_loss(i, t, temperature=0.3).item()
    )


def test_vqa_loss_is_bce_times_classes():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    targets = torch.tensor([[0.0, 1.0, 0.3]])
    per = [
        -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))
        for x, y in zip(logits[0].tolist(), targets[0].tolist(), strict=True)
    ]
    assert vqa_loss(logits, targets).item() == pytest.approx(sum(per) / 3 * 3, rel=1e-6)


def test_bad_input_is_a_clear_error():
    i, t = torch.tensor(I), torch.tensor(T)
    with pytest.raises(ValueError, match="unknown similarity 'euclid'"):
        info_nce(i, t, temperature=0.1, similarity="euclid")
    with pytest.raises(ValueError, match=r"must have the same shape"):
        info_nce(i, torch.ones(3, 2), temperature=0.1, similarity="dot")
    with pytest.raises(ValueError, match="2-D"):
        info_nce(torch.ones(2), torch.ones(2), temperature=0.1, similarity="dot")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        info_nce(i, t, temperature=0.0, similarity="cosine")
    with pytest.raises(ValueError, match="unknown kind"):
        global_contrastive_loss(i, t, temperature=0.1, kind="triplet")
