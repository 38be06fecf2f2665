"""The losses of the paper: ViLT's VQA loss and the InfoNCE alignment of CLIP's image and question features.

InfoNCE is the paper's form (SimCLR's NT-Xent over 2M embeddings): the M image features I and M text features T of a
batch make 2M embeddings z. Each of the 2M anchors z_a has one positive, its pair (I_i <-> T_i), and its denominator
runs over all the other 2M-1 embeddings of both modalities (k != a):

    l_a = -log( exp(s(z_a, z_p(a)) / tau) / sum_{k != a} exp(s(z_a, z_k) / tau) )

with s = cosine similarity (paper eq. 1, `similarity="cosine"`) or the raw inner product (eq. 2, `"dot"`), and the
loss is the mean of l_a over the 2M anchors. The paper prints eq. (1) with tau in the numerator only; that is a typo:
the temperature divides every term, as in SimCLR.

Across ranks, M is the whole global batch: features are all-gathered with a gradient-carrying all-gather and each
rank computes the loss of its own anchors against all 2M global embeddings. Data-parallel averaging of the gradients
(DeepSpeed's) then gives exactly the gradient of the global-batch loss. With gradient accumulation, the negatives come
from one micro-batch on every rank (micro_batch_size * world_size pairs), not from the whole accumulated batch.

Duplicate questions (beyond the paper; `loss.duplicate_questions`). In VQA many samples of a batch ask the same
question word for word ("what color is the shape?"), and their CLIP text features are then identical: the plain loss
takes a copy of the anchor's own positive for a negative, so it cannot fall below log(1 + copies). With `groups` (one
id per sample; equal ids = the same question tokens), "mask" drops every embedding of another sample with the same
question from the anchor's denominator (neither a positive nor a negative), and "positive" counts them as positives:
l_a = -mean_{p in P(a)} log( exp(s(z_a, z_p) / tau) / sum_{k != a} exp(s(z_a, z_k) / tau) ), P(a) = every other
embedding of a sample with the anchor's question (for a unique question, P(a) = {its pair}: the paper's loss).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F
from torch import Tensor

SIMILARITIES = ("cosine", "dot")
DUPLICATE_MODES = ("none", "mask", "positive")


def _wide(x: Tensor) -> Tensor:
    """fp32, or the input's own dtype where it is wider (float64 in exactness tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def vqa_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """ViLT's VQA loss: BCE with logits against soft answer scores, times the number of answer classes."""
    logits = _wide(logits)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype)) * targets.shape[1]


def _check_features(image_features: Tensor, text_features: Tensor) -> None:
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            f"info_nce: features must be 2-D [M, D], got image {tuple(image_features.shape)} "
            f"and text {tuple(text_features.shape)}"
        )
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"info_nce: image features {tuple(image_features.shape)} and text features "
            f"{tuple(text_features.shape)} must have the same shape (one text per image)"
        )


def _anchor_losses(
    z: Tensor,
    rows: Tensor,
    temperature: float,
    similarity: str,
    groups: Tensor | None = None,
    duplicates: str = "none",
) -> Tensor:
    """Per-anchor InfoNCE terms for the anchors `rows` of the 2M embeddings `z` (fp32); `groups` [M]: a question id
    per sample, used by `duplicates` "mask" / "positive" (module docstring)."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"info_nce: unknown similarity '{similarity}' (one of: {', '.join(SIMILARITIES)})")
    if temperature <= 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    if duplicates not in DUPLICATE_MODES:
        raise ValueError(
            f"info_nce: unknown duplicates mode '{duplicates}' (one of: {', '.join(DUPLICATE_MODES)})"
        )
    if similarity == "cosine":
        z = F.normalize(z, dim=-1)
    m = z.shape[0] // 2
    logits = (z[rows] @ z.T) / temperature  # [anchors, 2M]
    # k != a: the anchor itself never enters its own denominator.
    own = F.one_hot(rows, z.shape[0]).bool()
    logits = logits.masked_fill(own, float("-inf"))
    positives = torch.where(rows < m, rows + m, rows - m)
    if duplicates == "none" or groups is None:
        # log-sum-exp keeps this finite for inner products in the tens of thousands (feature norms in the hundreds).
        return torch.logsumexp(logits, dim=-1) - logits.gather(1, positives[:, None]).squeeze(1)
    group_of = groups.repeat(2)  # the question of each of the 2M embeddings (images, then texts)
    same = (group_of[rows][:, None] == group_of[None, :]) & ~own  # other embeddings of the anchor's question
    if duplicates == "mask":
        pair = F.one_hot(positives, z.shape[0]).bool()
        logits = logits.masked_fill(same & ~pair, float("-inf"))
        return torch.logsumexp(logits, dim=-1) - logits.gather(1, positives[:, None]).squeeze(1)
    log_prob = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return -log_prob.masked_fill(~same, 0.0).sum(dim=-1) / same.sum(dim=-1)


def question_groups(tokens: Tensor) -> Tensor:
    """One id per row of question token ids [M, L]: equal ids for identical rows (exact, no hashing)."""
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


def info_nce(
    image_features: Tensor,
    text_features: Tensor,
    *,
    temperature: float,
    similarity: str,
    question_tokens: Tensor | None = None,
    duplicates: str = "none",
) -> Tensor:
    """The paper's InfoNCE (eq. 1 with `similarity="cosine"`, eq. 2 with `"dot"`), mean over all 2M anchors;
    `duplicates` "mask" / "positive" with `question_tokens` [M, L] treats identical questions as the module docstring
    says.

    Computed in fp32 with autocast off, whatever the input dtype.
    """
    _check_features(image_features, text_features)
    groups = _groups(question_tokens, duplicates, image_features.shape[0])
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        z = _wide(torch.cat([image_features, text_features]))
        rows = torch.arange(z.shape[0], device=z.device)
        return _anchor_losses(z, rows, temperature, similarity, groups, duplicates).mean()


def _groups(question_tokens: Tensor | None, duplicates: str, m: int) -> Tensor | None:
    if duplicates == "none":
        return None
    if question_tokens is None or question_tokens.shape[0] != m:
        raise ValueError(
            f"info_nce: duplicates='{duplicates}' needs the question token ids of the {m} samples, got "
            f"{None if question_tokens is None else tuple(question_tokens.shape)}"
        )
    return question_groups(question_tokens)


def clip_symmetric_loss(image_features: Tensor, text_features: Tensor, *, temperature: float) -> Tensor:
    """CLIP's own loss, for comparison: symmetric image->text and text->image cross-entropy on cosine logits."""
    _check_features(image_features, text_features)
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        i = F.normalize(_wide(image_features), dim=-1)
        t = F.normalize(_wide(text_features), dim=-1)
        return _clip_cross_entropy(i, t, temperature)


def _clip_cross_entropy(i: Tensor, t: Tensor, temperature: float, rows: Tensor | None = None) -> Tensor:
    """CLIP's symmetric cross-entropy over normalised features `i`, `t`: the anchors `rows` (all by default; a rank's
    own under data parallelism) against every feature, image->text and text->image, averaged."""
    if rows is None:
        logits_i = i @ t.T / temperature
        logits_t = logits_i.T  # one product serves both directions when every sample is an anchor
        rows = torch.arange(i.shape[0], device=i.device)
    else:
        logits_i = i[rows] @ t.T / temperature
        logits_t = t[rows] @ i.T / temperature
    return (F.cross_entropy(logits_i, rows) + F.cross_entropy(logits_t, rows)) / 2


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather along dim 0 with gradients flowing back to every rank's slice.

    The functional all-gather's backward is a reduce-scatter that sums the incoming gradients onto the owning rank,
    which is what makes the data-parallel mean of the per-rank losses differentiate exactly like the single-process
    global loss. (Gathering into a list and putting the local tensor back gives gradients wrong by a factor of the
    world size.) torch 2.14 deprecates torch.distributed.nn's all_gather for this function.
    """
    # torch 2.14's all_gather_single differentiates; older releases (2.11 on some GPU images) name the differentiable
    # one all_gather_tensor_autograd, with the same arguments and the same reduce-scatter backward.
    gather = fc.all_gather_single if _gather_has_autograd() else fc.all_gather_tensor_autograd
    return fc.wait_tensor(gather(x.contiguous(), 0, dist.group.WORLD))


def _gather_has_autograd() -> bool:
    """True where torch's functional all_gather_single carries gradients (torch >= 2.14)."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 14)


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    *,
    temperature: float,
    kind: str,
    question_tokens: Tensor | None = None,
    duplicates: str = "none",
) -> Tensor:
    """Contrastive loss of this rank's anchors against the features of the whole global batch.

    `kind` is "cosine" or "dot" (the paper's InfoNCE) or "clip" (CLIP's symmetric cross-entropy). Without an
    initialised multi-rank process group this is the single-process loss. The value is this rank's share: the mean
    over ranks (what data-parallel averaging computes) equals the single-process loss on the concatenated batch.
    `duplicates` (InfoNCE only) groups the global batch's samples by their `question_tokens`, gathered from every rank.
    """
    _check_features(image_features, text_features)
    if kind not in (*SIMILARITIES, "clip"):
        raise ValueError(f"contrastive loss: unknown kind '{kind}' (one of: cosine, dot, clip)")
    if kind == "clip" and duplicates != "none":
        raise ValueError(
            "contrastive loss: duplicates applies to the paper's InfoNCE (cosine, dot), not to 'clip'"
        )
    if not _dist_active():
        if kind == "clip":
            return clip_symmetric_loss(image_features, text_features, temperature=temperature)
        return info_nce(
            image_features, text_features, temperature=temperature, similarity=kind,
            question_tokens=question_tokens, duplicates=duplicates,
        )  # fmt: skip

    rank, world = dist.get_rank(), dist.get_world_size()
    m_local = image_features.shape[0]
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        all_i = gather_with_grad(_wide(image_features))
        all_t = gather_with_grad(_wide(text_features))
        if all_i.shape[0] != m_local * world:
            raise RuntimeError("contrastive loss: every rank must contribute the same number of features")
        local = torch.arange(m_local, device=all_i.device) + rank * m_local
        if kind == "clip":
            return _clip_cross_entropy(
                F.normalize(all_i, dim=-1), F.normalize(all_t, dim=-1), temperature, local
            )
        m_global = all_i.shape[0]
        z = torch.cat([all_i, all_t])
        rows = torch.cat([local, local + m_global])  # this rank's image anchors and text anchors
        groups = None
        if duplicates != "none":
            _groups(question_tokens, duplicates, m_local)  # checks the local tokens
            groups = question_groups(_gather_plain(question_tokens))  # the same ids on every rank
        return _anchor_losses(z, rows, temperature, kind, groups, duplicates).mean()


def _gather_plain(x: Tensor) -> Tensor:
    """All-gather along dim 0 without gradients (token ids)."""
    out = x.new_empty((x.shape[0] * dist.get_world_size(), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out
