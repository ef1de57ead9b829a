"""Small helpers on ``[B, S, H, D]`` tensors shared by the torch-based backends."""

from __future__ import annotations

import torch


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that softmax statistics and accumulators use: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B, S, Hkv * group, D], each K/V head repeated for its query heads."""
    return x if group == 1 else x.repeat_interleave(group, dim=2)


def reduce_kv_grad(dx: torch.Tensor, group: int) -> torch.Tensor:
    """[B, S, Hkv * group, D] -> [B, S, Hkv, D], summing the gradients of a head's copies."""
    if group == 1:
        return dx
    b, s, h, d = dx.shape
    return dx.view(b, s, h // group, group, d).sum(dim=3)
