"""All-gather and reduce-scatter along the sequence, for the all-gather schedule.

``post_gather_sequence(x, group, label)`` posts the all-gather of every rank's shard
``x: [B, S, H, D]``; ``wait()`` gives ``[B, r S, H, D]`` with rank ``i``'s shard at rows
``i S .. (i + 1) S``. ``post_reduce_scatter_sequence(x, group, label)`` is its
transpose: every rank gives partial sums ``[B, r S, H, D]`` laid out so, and ``wait()``
gives this rank's rows summed over the ranks, ``[B, S, H, D]``. Both work on NCCL and
gloo and note what this rank sends to the others in the traffic log: an all-gather
sends its shard to ``r - 1`` ranks, a reduce-scatter the ``r - 1`` pieces of its input
that other ranks own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import traffic

# torch 2.13 renames reduce_scatter_tensor (same arguments); older releases have only the old name
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _Collective:
    """A posted collective: ``wait()`` blocks until it is done and gives the result."""

    def __init__(self, work, result, unpack, kind: str, sent: int, peers: int, label: str):
        self.work, self.result, self.unpack = work, result, unpack
        self.kind, self.sent, self.peers, self.label = kind, sent, peers, label

    def wait(self) -> torch.Tensor:
        with traffic.span(self.kind, self.sent, self.peers, self.label):  # the time spent waiting
            self.work.wait()
        return self.unpack(self.result)


def post_gather_sequence(x: torch.Tensor, group: dist.ProcessGroup, label: str) -> _Collective:
    """Post the all-gather of ``x: [B, S, H, D]`` over ``group`` along the sequence."""
    size = dist.get_world_size(group)
    b, s, h, d = x.shape
    gathered = x.new_empty(size * b, s, h, d)  # [r * B, S, H, D]: rank i's shard at rows i B ..
    work = dist.all_gather_into_tensor(gathered, x.contiguous(), group=group, async_op=True)

    def unpack(got):  # [r, B, S, H, D] -> [B, r S, H, D] (a view when B = 1)
        return got.view(size, b, s, h, d).transpose(0, 1).reshape(b, size * s, h, d)
    return _Collective(work, gathered, unpack, traffic.ALL_GATHER, (size - 1) * x.numel() * x.element_size(),
                       size - 1, label)


def post_reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup, label: str) -> _Collective:
    """Post the reduce-scatter (sum) of ``x: [B, r S, H, D]`` over ``group`` along the sequence."""
    size = dist.get_world_size(group)
    b, total, h, d = x.shape
    s = total // size
    pieces = x.view(b, size, s, h, d).transpose(0, 1).contiguous()  # [r, B, S, H, D]: piece i for rank i
    mine = x.new_empty(b, s, h, d)
    work = _reduce_scatter(mine, pieces.view(size * b, s, h, d), group=group, async_op=True)
    return _Collective(work, mine, lambda got: got, traffic.REDUCE_SCATTER,
                       (size - 1) * mine.numel() * mine.element_size(), size - 1, label)
