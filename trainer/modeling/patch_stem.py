"""Patch stems as one matrix product: CLIP's `visual.conv1` and the baseline's ViLT patch projection.

A convolution whose stride equals its kernel, without padding, dilation or groups, sees every pixel once: its output
at a grid cell is the cell's patch (C x kh x kw values) times the weight viewed as [out, C * kh * kw], plus the bias.
cuDNN runs such a convolution on kernels that do not use the tensor cores (docs/performance.md, "Less work per
sample"); as a matrix product it is a plain
GEMM. `PatchConv2d` keeps `weight` and `bias` as they are (same names, shapes and values), so every checkpoint,
export and pretrained weight loads unchanged; only `forward` differs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def is_patchify(conv: nn.Conv2d) -> bool:
    """Whether `conv` is a patch stem: stride == kernel, no padding, no dilation, one group."""
    return (
        type(conv) in (nn.Conv2d, PatchConv2d)
        and tuple(conv.stride) == tuple(conv.kernel_size)
        and conv.padding in ((0, 0), "valid")
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
    )


class PatchConv2d(nn.Conv2d):
    """A stride == kernel convolution computed as patches @ weight.view(out, -1).T (+ bias); NCHW in and out.

    Like the convolution, the rows and columns that do not fill a whole patch are ignored. The output is a
    channels-last view ([B, gh, gw, out] permuted to [B, out, gh, gw]), so the callers' flatten(2).transpose(1, 2)
    to tokens is a view, not a copy."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        kh, kw = self.kernel_size
        gh, gw = h // kh, w // kw
        if h != gh * kh or w != gw * kw:
            x = x[:, :, : gh * kh, : gw * kw]
        patches = x.reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * kh * kw)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(b, gh, gw, self.out_channels).permute(0, 3, 1, 2)


def as_matmul(conv: nn.Conv2d) -> nn.Conv2d:
    """`conv` as a PatchConv2d sharing its parameters (the same Parameter objects), or `conv` itself where it is not a
    patch stem (its convolution is then kept)."""
    if isinstance(conv, PatchConv2d) or not is_patchify(conv):
        return conv
    stem = PatchConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        bias=conv.bias is not None,
        device="meta",
    )
    stem.weight = conv.weight
    stem.bias = conv.bias
    stem.train(conv.training)
    return stem


__all__ = ["PatchConv2d", "as_matmul", "is_patchify"]
