"""Exact combination of partial attention results through their log-sum-exp."""

from __future__ import annotations

import torch


def merge_attention(out, lse, block_out, block_lse):
    """Combine two partial results over disjoint key sets into the result over their union.

    ``out, block_out: [B, S, H, D]``; ``lse, block_lse: [B, H, S]`` (natural log).
    Returns ``(merged_out, merged_lse)``: the output in ``out``'s dtype (keep ``out`` in
    float32 to accumulate many blocks), the LSE in float32 (float64 if given float64).
    The arithmetic is float32 or wider. A side with ``lse = -inf`` saw no key and
    contributes nothing; rows where both sides are ``-inf`` give out 0 and lse -inf.
    """
    if out.shape != block_out.shape:
        raise ValueError(f"block_out has shape {tuple(block_out.shape)} but out has {tuple(out.shape)}")
    if lse.shape != block_lse.shape:
        raise ValueError(f"block_lse has shape {tuple(block_lse.shape)} but lse has {tuple(lse.shape)}")
    expected = (out.shape[0], out.shape[2], out.shape[1])
    if tuple(lse.shape) != expected:
        raise ValueError(f"lse must have shape [batch, heads, seqlen] = {list(expected)}, got {list(lse.shape)}")
    acc = torch.promote_types(torch.promote_types(lse.dtype, block_lse.dtype), torch.float32)
    lse, block_lse = lse.to(acc), block_lse.to(acc)
    merged_lse = torch.logaddexp(lse, block_lse)
    # exp(x - merged) with merged = -inf would be NaN; such rows have both weights 0.
    reference = merged_lse.masked_fill(merged_lse == float("-inf"), 0.0)
    weight = torch.exp(lse - reference).transpose(1, 2).unsqueeze(-1)
    block_weight = torch.exp(block_lse - reference).transpose(1, 2).unsqueeze(-1)
    merged = out.to(acc) * weight + block_out.to(acc) * block_weight
    return merged.to(out.dtype), merged_lse
