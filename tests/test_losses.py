"""InfoNCE (paper eq. 1 and 2), CLIP's symmetric loss and ViLT's VQA loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.modeling.losses import clip_symmetric_loss, global_contrastive_loss, info_nce, vqa_loss

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
def test_info_nce_under_bf16_autocast_is_the_fp32_loss_for_large_norms(sim):
    """bf16 features (norms ~320, inner products ~1e5) under bf16 autocast: the loss is the fp32 loss of the same
    values, within fp32 round-off of the float64 loss (rel 1e-6; the loss computed in bf16 is ~1e-3 off), and the
    gradients are the float64 ones rounded once to bf16, at the cast (rel 2 x bf16's unit round-off 2^-8; abs fp32
    round-off of the largest, for entries that cancel to ~0)."""
    g = torch.Generator().manual_seed(0)
    # Values that bf16 holds exactly, so that the float64 reference sees the same features.
    image = (torch.randn(16, 64, generator=g) * 40).bfloat16().float().requires_grad_()
    text = (torch.randn(16, 64, generator=g) * 40).bfloat16().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(image.bfloat16(), text.bfloat16(), temperature=0.07, similarity=sim)
    assert loss.dtype == torch.float32
    loss.backward()
    image64, text64 = (x.detach().double().requires_grad_() for x in (image, text))
    ref = info_nce(image64, text64, temperature=0.07, similarity=sim)
    ref.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for got, want in ((image.grad, image64.grad), (text.grad, text64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=2**-7, atol=1e-6 * want.abs().max().item())


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


# -- duplicate questions (loss.duplicate_questions) ----------------------------------------------------------------
I3 = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.5]]
T3 = [[0.8, 0.6], [0.0, 2.0], [0.8, 0.6]]  # samples 0 and 2 ask the same question: the same text feature
Q3 = [[5, 7, 9], [5, 8, 9], [5, 7, 9]]  # their question token ids


def _hand_duplicates(image, text, questions, tau, sim, mode):
    """The module docstring's formulas written out: same question = same token row."""
    z = image + text
    m = len(image)
    q = questions + questions  # the question of each of the 2M embeddings

    def s(a, b):
        dot = sum(x * y for x, y in zip(z[a], z[b], strict=True))
        if sim == "cosine":
            dot /= math.sqrt(sum(x * x for x in z[a])) * math.sqrt(sum(y * y for y in z[b]))
        return dot / tau

    total = 0.0
    for a in range(2 * m):
        p = a + m if a < m else a - m
        same = [k for k in range(2 * m) if k != a and q[k] == q[a]]
        if mode == "mask":
            denom = sum(math.exp(s(a, k)) for k in range(2 * m) if k != a and (k == p or k not in same))
            total += -math.log(math.exp(s(a, p)) / denom)
        else:
            denom = sum(math.exp(s(a, k)) for k in range(2 * m) if k != a)
            total += -sum(math.log(math.exp(s(a, k)) / denom) for k in same) / len(same)
    return total / (2 * m)


@pytest.mark.parametrize("mode", ["mask", "positive"])
@pytest.mark.parametrize("sim", ["cosine", "dot"])
def test_duplicate_questions_match_hand_computation(mode, sim):
    got = info_nce(
        torch.tensor(I3), torch.tensor(T3), temperature=0.5, similarity=sim, question_tokens=torch.tensor(Q3),
        duplicates=mode,
    )  # fmt: skip
    assert got.item() == pytest.approx(_hand_duplicates(I3, T3, Q3, 0.5, sim, mode), rel=1e-6)
    # The modes differ from the paper's loss exactly because of the duplicate pair.
    plain = info_nce(torch.tensor(I3), torch.tensor(T3), temperature=0.5, similarity=sim)
    assert got.item() != pytest.approx(plain.item(), rel=1e-3)
    # With every question different, every mode is the paper's loss.
    unique = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    same_as_paper = info_nce(
        torch.tensor(I3),
        torch.tensor(T3),
        temperature=0.5,
        similarity=sim,
        question_tokens=unique,
        duplicates=mode,
    )
    assert same_as_paper.item() == pytest.approx(plain.item(), rel=1e-6)


def test_mask_lifts_the_floor_that_duplicates_put_under_the_paper_loss():
    """Identical questions, perfectly aligned features: the paper's loss cannot fall below log(1 + copies)."""
    texts = torch.tensor([[10.0, 0.0], [10.0, 0.0], [0.0, 10.0]])  # samples 0 and 1 share a question
    images = texts.clone()
    q = torch.tensor([[1, 1], [1, 1], [2, 2]])
    plain = info_nce(images, texts, temperature=0.1, similarity="cosine")
    masked = info_nce(
        images, texts, temperature=0.1, similarity="cosine", question_tokens=q, duplicates="mask"
    )
    assert plain.item() > 0.5 and masked.item() < 1e-3


def test_duplicate_mode_errors_are_clear():
    i, t = torch.tensor(I3), torch.tensor(T3)
    with pytest.raises(ValueError, match="needs the question token ids of the 3 samples"):
        info_nce(i, t, temperature=0.5, similarity="dot", duplicates="mask")
    with pytest.raises(ValueError, match="unknown duplicates mode 'twice'"):
        info_nce(
            i, t, temperature=0.5, similarity="dot", question_tokens=torch.tensor(Q3), duplicates="twice"
        )
    with pytest.raises(ValueError, match="not to 'clip'"):
        global_contrastive_loss(
            i, t, temperature=0.5, kind="clip", question_tokens=torch.tensor(Q3), duplicates="mask"
        )


def test_duplicate_questions_setting_is_checked():
    from tests.helpers.tiny import N_ANSWERS, VOCAB, tiny_config
    from trainer.config.config import ConfigError, LossConfig
    from trainer.modeling.task import build_task

    with pytest.raises(
        ConfigError, match="loss.duplicate_questions: 'twice' is not one of none, mask, positive"
    ):
        LossConfig(duplicate_questions="twice")
    with pytest.raises(ConfigError, match="not to clip-symmetric-ce"):
        build_task(
            tiny_config("clip-symmetric-ce", duplicate_questions="mask"),
            n_answers=N_ANSWERS,
            vilt_vocab_size=VOCAB,
        )


def test_clip_symmetric_loss_averages_both_directions():
    """Image-to-text over rows and text-to-image over columns, on features where the two directions differ."""
    g = torch.Generator().manual_seed(0)
    i, t = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 4, generator=g, dtype=torch.float64),
    )
    logits = (i / i.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T / 0.3
    image_to_text = sum(-torch.log_softmax(logits[r], 0)[r] for r in range(3)) / 3
    text_to_image = sum(-torch.log_softmax(logits[:, c], 0)[c] for c in range(3)) / 3
    assert float(image_to_text) != pytest.approx(float(text_to_image), rel=1e-3)
    got = clip_symmetric_loss(i, t, temperature=0.3)
    assert float(got) == pytest.approx(float(image_to_text + text_to_image) / 2, rel=1e-9)


@pytest.mark.parametrize("kind", ["dot", "cosine", "clip"])
def test_two_ranks_shares_average_to_the_global_batchs_loss(monkeypatch: pytest.MonkeyPatch, kind: str):
    """Each rank's share of the contrastive loss, with the all-gather faked for rank r of 2 in this process: the
    mean of the shares is the single-process loss of the joined batch (rank 1's anchors sit after rank 0's)."""
    from trainer.modeling import losses

    g = torch.Generator().manual_seed(0)
    i, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    whole = (
        clip_symmetric_loss(i, t, temperature=0.3)
        if kind == "clip"
        else info_nce(i, t, temperature=0.3, similarity=kind)
    )
    monkeypatch.setattr(losses, "_dist_active", lambda: True)
    monkeypatch.setattr(losses.dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(
        losses, "gather_with_grad", lambda x: i if any(torch.equal(x, h) for h in i.split(4)) else t
    )
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(losses.dist, "get_rank", lambda *a, _r=rank, **k: _r)
        part = slice(4 * rank, 4 * rank + 4)
        shares.append(float(global_contrastive_loss(i[part], t[part], temperature=0.3, kind=kind)))
    assert sum(shares) / 2 == pytest.approx(float(whole), rel=1e-5)
