"""The float64 oracle of a whole benchmark case, shared out between the ranks of a run.

Every rank of ``usp-bench scaling`` makes the same global inputs from one seed, so each
can compute any rows of the exact answer. The query rows are cut into blocks dealt out
round robin (rank r takes blocks r, r + N, ...: causal work stays even); a block of
query rows ``[a, b)`` needs the keys ``[0, b)`` when causal (bottom-right alignment then
lets row a + i see keys up to a + i, the global causal rule) and every key otherwise.
Its backward gives dq of those rows and their share of dk and dv; one all-reduce sums
the shares and fills in the rows of other ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp.attention.naive import naive_attention

BLOCK_ELEMENTS = 2 ** 24  # float64 scores of one block (128 MiB), whatever the length


def global_oracle(q, k, v, dout, causal: bool, group=None, grads: bool = True,
                  block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, ...]:
    """``(out, dq, dk, dv)`` (``(out,)`` without ``grads``) in float64 for global inputs
    ``q, dout: [B, S, Hq, D]``, ``k, v: [B, S, Hkv, D]``, the same on every rank of
    ``group``, which each compute a share and receive the whole. A block holds as many
    query rows as keep its scores within ``block_elements``."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    batch, seqlen, heads, _ = q.shape
    block = max(1, block_elements // (batch * heads * seqlen))
    q64, k64, v64 = (x.detach().to(torch.float64).requires_grad_(grads) for x in (q, k, v))
    out = torch.zeros_like(q64, requires_grad=False)
    with torch.set_grad_enabled(grads):
        for start in range(rank * block, seqlen, size * block):
            end = min(start + block, seqlen)
            keys = end if causal else seqlen
            rows, _ = naive_attention(q64[:, start:end], k64[:, :keys], v64[:, :keys], causal)
            if grads:
                rows.backward(dout[:, start:end].to(torch.float64))
            out[:, start:end] = rows.detach()
    results = [out]
    if grads:
        results += [x.grad if x.grad is not None else torch.zeros_like(x, requires_grad=False)
                    for x in (q64, k64, v64)]
    for result in results:
        dist.all_reduce(result, group=group)
    return tuple(results)
