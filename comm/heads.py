"""How the heads of one attention call are split over a Ulysses group of ``u`` ranks.

Query heads: rank ``j`` takes a contiguous share, the shares differing by at most one
(the first ``H mod u`` ranks take one more), so ``u`` need not divide ``H``; every rank
needs at least one head. Example: 6 heads over 4 ranks: shares 2, 2, 1, 1, rank 2 takes
head 4.

K/V heads (GQA: ``g = Hq / Hkv`` query heads share one) are repeated ``c`` times before
the all-to-all (``c = 1``: not at all), with ``c`` the fewest copies, a divisor of ``g``,
such that every rank's query heads begin and end at a multiple of ``g / c``: then each
rank receives whole K/V heads, each shared by ``g / c`` of its query heads, which is the
GQA the local kernels compute. Autograd sums the copies' gradients. Examples:

- 8 query heads, 2 K/V heads, ``u = 4`` (shares 2, 2, 2, 2): ``c = 2``, K/V heads
  ``[a, b]`` become ``[a, a, b, b]``; rank 1 gets query heads 2, 3 and K/V head ``a``.
- 8 and 8 (or 8 and 4) over ``u = 4``: ``c = 1``, each rank gets 2 (or 1) K/V heads.
- 6 query heads, 2 K/V heads, ``u = 4`` (shares 2, 2, 1, 1): only ``c = g = 3`` puts
  every boundary (0, 2, 4, 5, 6) on a K/V head boundary, so K/V go out as one copy per
  query head: uneven splits cost up to ``g`` times the K/V traffic and memory.
"""

from __future__ import annotations

import torch


def head_shares(heads: int, ulysses_degree: int) -> list[int]:
    """Query heads per rank: contiguous shares differing by at most one, larger first."""
    base, extra = heads // ulysses_degree, heads % ulysses_degree  # not divmod: heads may be a SymInt when compiling
    return [base + (rank < extra) for rank in range(ulysses_degree)]


def _boundaries(shares: list[int]) -> list[int]:
    bounds = [0]
    for share in shares:
        bounds.append(bounds[-1] + share)
    return bounds


def heads_problem(heads: int, kv_heads: int, ulysses_degree: int) -> str | None:
    """Why ``heads`` query and ``kv_heads`` K/V heads cannot be split over ``ulysses_degree``
    ranks, or None when they can."""
    if heads < ulysses_degree:
        return (f"the heads of q ({heads}) must be at least the Ulysses degree ({ulysses_degree}): every rank "
                f"takes one or more")
    if kv_heads < 1 or heads % kv_heads:
        return f"the heads of q ({heads}) must be a multiple of the heads of k and v ({kv_heads})"
    return None


def check_heads(heads: int, kv_heads: int, ulysses_degree: int) -> None:
    """Raise a ValueError unless the heads can be split over the Ulysses group."""
    problem = heads_problem(heads, kv_heads, ulysses_degree)
    if problem:
        raise ValueError(problem)


def kv_copies(heads: int, kv_heads: int, ulysses_degree: int) -> int:
    """How many times each K/V head is repeated before the all-to-all (see the module doc)."""
    check_heads(heads, kv_heads, ulysses_degree)
    group = heads // kv_heads
    bounds = _boundaries(head_shares(heads, ulysses_degree))
    return next(c for c in range(1, group + 1) if group % c == 0 and all(b % (group // c) == 0 for b in bounds))


def kv_head_shares(heads: int, kv_heads: int, ulysses_degree: int) -> list[int]:
    """K/V heads per rank after the all-to-all (of the ``kv_heads x kv_copies`` sent)."""
    per_kv_head = heads // (kv_heads * kv_copies(heads, kv_heads, ulysses_degree))
    return [share // per_kv_head for share in head_shares(heads, ulysses_degree)]


def replicate_kv_heads(x: torch.Tensor, heads: int, ulysses_degree: int) -> torch.Tensor:
    """K or V ``[B, S, Hkv, D]`` -> ``[B, S, Hkv x c, D]``, each head repeated ``c =
    kv_copies(heads, Hkv, u)`` times (the same tensor when ``c = 1``)."""
    copies = kv_copies(heads, x.shape[2], ulysses_degree)
    return x if copies == 1 else x.repeat_interleave(copies, dim=2)


def heads_per_rank(heads: int, ulysses_degree: int) -> int:
    """Query heads of the busiest rank after the all-to-all: ``ceil(H / u)``."""
    return max(head_shares(heads, ulysses_degree))


def kv_heads_per_rank(heads: int, kv_heads: int, ulysses_degree: int) -> int:
    """K/V heads of the busiest rank after the all-to-all (``Hkv / u`` or 1 when ``u``
    divides the heads evenly)."""
    return max(kv_head_shares(heads, kv_heads, ulysses_degree))
