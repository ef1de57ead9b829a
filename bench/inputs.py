"""Random attention inputs for the benchmarks, the same on every rank that asks with the same seed."""

from __future__ import annotations

import torch


def random_inputs(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device, seed: int, heads_first: bool = False):
    """``q, k, v, dout`` from one generator on ``device`` seeded with ``seed``:
    ``[B, S, H, D]`` (``[B, H, S, D]`` with ``heads_first``, as SDPA takes them);
    q and dout have ``heads`` heads, k and v ``kv_heads``."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(h):
        shape = (batch, h, seqlen, head_dim) if heads_first else (batch, seqlen, h, head_dim)
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return randn(heads), randn(kv_heads), randn(kv_heads), randn(heads)
