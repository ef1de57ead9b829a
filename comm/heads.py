"""How the heads of one attention call are split over a Ulysses group of ``u`` ranks.

Query heads must divide by ``u``: rank ``j`` takes heads ``j·H/u .. (j+1)·H/u - 1``.
K/V heads must be a multiple of ``u`` (rank ``j`` takes ``Hkv/u`` of them, the ones its
query heads use) or a divisor of it: then each K/V head is repeated ``u/Hkv`` times
before the all-to-all, so every rank holds exactly the one head its query heads use,
and autograd sums the copies' gradients. Example: 8 query heads, 2 K/V heads, ``u = 4``:
K/V heads ``[a, b]`` become ``[a, a, b, b]``; rank 1 gets query heads 2, 3 and K/V
head ``a``, which is what GQA maps query heads 2 and 3 to.
"""

from __future__ import annotations

import torch


def heads_problem(heads: int, kv_heads: int, ulysses_degree: int) -> str | None:
    """Why ``heads`` query and ``kv_heads`` K/V heads cannot be split over ``ulysses_degree``
    ranks, or None when they can."""
    if heads % ulysses_degree:
        return f"the heads of q ({heads}) must be divisible by the Ulysses degree ({ulysses_degree})"
    return kv_heads_problem(kv_heads, ulysses_degree)


def kv_heads_problem(kv_heads: int, ulysses_degree: int) -> str | None:
    """Why ``kv_heads`` K/V heads cannot be split over ``ulysses_degree`` ranks, or None."""
    if kv_heads % ulysses_degree and ulysses_degree % kv_heads:
        return (f"the heads of k and v ({kv_heads}) must be a multiple or a divisor of the Ulysses degree "
                f"({ulysses_degree})")
    return None


def check_heads(heads: int, kv_heads: int, ulysses_degree: int) -> None:
    """Raise a ValueError unless the heads can be split over the Ulysses group."""
    problem = heads_problem(heads, kv_heads, ulysses_degree)
    if problem:
        raise ValueError(problem)


def kv_heads_sent(kv_heads: int, ulysses_degree: int) -> int:
    """K/V heads a rank holds before the all-to-all, after replication: ``max(Hkv, u)``."""
    return max(kv_heads, ulysses_degree)


def kv_heads_per_rank(kv_heads: int, ulysses_degree: int) -> int:
    """K/V heads a rank holds after the all-to-all: ``max(Hkv / u, 1)``."""
    return kv_heads_sent(kv_heads, ulysses_degree) // ulysses_degree


def replicate_kv_heads(x: torch.Tensor, ulysses_degree: int) -> torch.Tensor:
    """K or V ``[B, S, Hkv, D]`` -> ``[B, S, max(Hkv, u), D]``: unchanged when ``u`` divides
    ``Hkv``, else each head repeated ``u / Hkv`` times (see the module doc)."""
    kv_heads = x.shape[2]
    problem = kv_heads_problem(kv_heads, ulysses_degree)
    if problem:
        raise ValueError(problem)
    copies = kv_heads_sent(kv_heads, ulysses_degree) // kv_heads
    return x if copies == 1 else x.repeat_interleave(copies, dim=2)
