"""Ulysses all-to-all: sequence-sharded ``[B, S/u, H, D]`` <-> head-sharded ``[B, S, H_j, D]``.

Rank ``j`` of a Ulysses group of ``u`` ranks holds the ``j``-th contiguous piece of the
sequence; after ``seq_to_head`` it holds the whole sequence (pieces in rank order) for
its contiguous share of the heads, ``H_j`` of them: ``H/u`` when ``u`` divides ``H``, else
the shares of ``usp.comm.heads.head_shares`` (or any ``shares`` given), differing by at
most one. Both directions are autograd functions whose backward is the opposite
all-to-all (``usp.comm.heads`` says how K/V heads are repeated first).

Picture, 6 heads over 2 ranks, 2 positions each (``pXhY``: position X, head Y):

    rank 0 holds p0 p1, heads 0-5      rank 1 holds p2 p3, heads 0-5
        -> rank 0: p0 p1 p2 p3, heads 0-2   rank 1: p0 p1 p2 p3, heads 3-5

Each rank sends rank ``i`` its positions of rank ``i``'s heads (one message per pair,
``B x S/u x H_i x D`` elements) and receives its own heads of every rank's positions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import traffic
from .heads import head_shares
from .mesh import check_group


class _Exchange:
    """An all-to-all in flight (``post_*``) and how to unpack what it receives:
    ``wait()`` gives the result. Several can be in flight at once."""

    def __init__(self, work, received: torch.Tensor, sent: int, peers: int, label: str, unpack):
        self.work, self.received, self.sent, self.peers, self.label, self.unpack = \
            work, received, sent, peers, label, unpack

    def wait(self) -> torch.Tensor:
        with traffic.span(traffic.ALL_TO_ALL, self.sent, self.peers, self.label):  # the time spent waiting
            self.work.wait()
        return self.unpack(self.received)


def _post(send: torch.Tensor, send_sizes: list[int], receive_sizes: list[int], group: dist.ProcessGroup,
          label: str, unpack) -> _Exchange:
    """Post the exchange of pieces of a flat tensor: piece ``i`` (``send_sizes[i]``
    elements) goes to rank ``i``; piece ``i`` of what arrives (``receive_sizes[i]``) came
    from rank ``i``; ``unpack`` turns it into the result."""
    rank = dist.get_rank(group)
    received = send.new_empty(sum(receive_sizes))
    sent = (sum(send_sizes) - send_sizes[rank]) * send.element_size()
    work = dist.all_to_all_single(received, send, receive_sizes, send_sizes, group=group, async_op=True)
    return _Exchange(work, received, sent, dist.get_world_size(group) - 1, label, unpack)


def post_seq_to_head(x: torch.Tensor, group: dist.ProcessGroup, shares: list[int]) -> _Exchange:
    """``_seq_to_head`` posted: ``.wait()`` gives ``[B, S, H_j, D]`` (no checks; ``u > 1``)."""
    size = dist.get_world_size(group)
    b, s_local, _, d = x.shape
    mine, piece = shares[dist.get_rank(group)], b * s_local * d  # piece: elements per head of one sequence piece
    send = x.new_empty(piece * x.shape[2])  # rank i's heads of my positions, for every i, one copy
    start = 0
    for share in shares:
        send[start * piece:(start + share) * piece].view(b, s_local, share, d).copy_(x[:, :, start:start + share])
        start += share
    return _post(send, [piece * share for share in shares], [piece * mine] * size, group, traffic.SEQ_TO_HEAD,
                 # [u(sequence piece), B, S/u, H_j, D] -> [B, S, H_j, D]
                 lambda got: got.view(size, b, s_local, mine, d).permute(1, 0, 2, 3, 4).reshape(b, size * s_local,
                                                                                              mine, d))


def post_head_to_seq(x: torch.Tensor, group: dist.ProcessGroup, shares: list[int]) -> _Exchange:
    """``_head_to_seq`` posted: ``.wait()`` gives ``[B, S/u, H, D]`` (no checks; ``u > 1``)."""
    size = dist.get_world_size(group)
    b, s, mine, d = x.shape
    s_local = s // size
    piece = b * s_local * d
    # [B, u, S/u, H_j, D] -> [u(sequence piece), B, S/u, H_j, D]: piece i is rank i's positions.
    send = x.reshape(b, size, s_local, mine, d).permute(1, 0, 2, 3, 4).reshape(-1)

    def unpack(received):  # rank i's heads of my positions, for every i
        out = x.new_empty(b, s_local, sum(shares), d)
        start = 0
        for share in shares:
            out[:, :, start:start + share] = received[start * piece:(start + share) * piece].view(b, s_local,
                                                                                                  share, d)
            start += share
        return out
    return _post(send, [piece * mine] * size, [piece * share for share in shares], group, traffic.HEAD_TO_SEQ,
                 unpack)


def _seq_to_head(x: torch.Tensor, group: dist.ProcessGroup, shares: list[int]) -> torch.Tensor:
    return x if dist.get_world_size(group) == 1 else post_seq_to_head(x, group, shares).wait()


def _head_to_seq(x: torch.Tensor, group: dist.ProcessGroup, shares: list[int]) -> torch.Tensor:
    return x if dist.get_world_size(group) == 1 else post_head_to_seq(x, group, shares).wait()


class _Redistribute(torch.autograd.Function):
    """One all-to-all direction; its backward is the other."""

    @staticmethod
    def forward(ctx, x, group, shares, there, back):
        ctx.group, ctx.shares, ctx.back = group, shares, back
        return there(x, group, shares)

    @staticmethod
    def backward(ctx, grad):
        return ctx.back(grad, ctx.group, ctx.shares), None, None, None, None


def _check_shares(shares: list[int] | None, heads: int | None, size: int, what: str) -> list[int]:
    if shares is None:
        return head_shares(heads, size)
    shares = [int(s) for s in shares]
    if len(shares) != size or min(shares) < 1:
        raise ValueError(f"{what}: shares must give each of the {size} ranks one head or more, got {shares}")
    return shares


def seq_to_head(x: torch.Tensor, group: dist.ProcessGroup, shares: list[int] | None = None) -> torch.Tensor:
    """``[B, S/u, H, D]`` (this rank's sequence piece, all heads) -> ``[B, S, H_j, D]``.
    ``group``: the Ulysses group (a process group; None is the world); ``shares``: heads
    per rank, summing to ``H`` (default ``head_shares(H, u)``)."""
    group = check_group(group)
    size = dist.get_world_size(group)
    if x.dim() != 4 or x.shape[2] < size:
        raise ValueError(f"seq_to_head needs [batch, seqlen, heads, head_dim] with at least one head per rank of "
                         f"the group ({size}), got shape {tuple(x.shape)}")
    shares = _check_shares(shares, x.shape[2], size, "seq_to_head")
    if sum(shares) != x.shape[2]:
        raise ValueError(f"seq_to_head: shares {shares} must add up to the {x.shape[2]} heads of x")
    return _Redistribute.apply(x, group, shares, _seq_to_head, _head_to_seq)


def head_to_seq(x: torch.Tensor, group: dist.ProcessGroup, shares: list[int] | None = None) -> torch.Tensor:
    """``[B, S, H_j, D]`` (all positions, this rank's heads) -> ``[B, S/u, H, D]``.
    ``group``: the Ulysses group (a process group; None is the world); ``shares``: every
    rank's heads (default: each rank holds as many as this one)."""
    group = check_group(group)
    size = dist.get_world_size(group)
    if x.dim() != 4 or x.shape[1] % size:
        raise ValueError(f"head_to_seq needs [batch, seqlen, heads, head_dim] with seqlen divisible by the "
                         f"group size {size}, got shape {tuple(x.shape)}")
    shares = [x.shape[2]] * size if shares is None else _check_shares(shares, None, size, "head_to_seq")
    if shares[dist.get_rank(group)] != x.shape[2]:
        raise ValueError(f"head_to_seq: this rank holds {x.shape[2]} heads but shares {shares} say "
                         f"{shares[dist.get_rank(group)]}")
    return _Redistribute.apply(x, group, shares, _head_to_seq, _seq_to_head)
