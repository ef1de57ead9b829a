"""Ulysses all-to-all: sequence-sharded ``[B, S/u, H, D]`` <-> head-sharded ``[B, S, H/u, D]``.

Rank ``j`` of a Ulysses group of ``u`` ranks holds the ``j``-th contiguous piece of the
sequence; after ``seq_to_head`` it holds the whole sequence (pieces in rank order) for
heads ``j·H/u .. (j+1)·H/u - 1``. Both directions are autograd functions whose backward
is the opposite all-to-all (``comm.heads`` says how K/V heads fewer than ``u`` are
replicated first).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import traffic
from .mesh import check_group


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, label: str) -> torch.Tensor:
    """Exchange the ``u`` equal slices of dim 0: slice ``j`` goes to rank ``j``, and
    slice ``j`` of the result came from rank ``j``."""
    size = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty_like(x)
    with traffic.span(traffic.ALL_TO_ALL, x.numel() * x.element_size() * (size - 1) // size, size - 1, label):
        dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_head(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return x
    b, s_local, h, d = x.shape
    # [B, S/u, u, H/u, D] -> [u(head piece), B, S/u, H/u, D]: slice j is rank j's heads.
    pieces = x.reshape(b, s_local, size, h // size, d).permute(2, 0, 1, 3, 4)
    received = _all_to_all(pieces, group, traffic.SEQ_TO_HEAD)  # [u(sequence piece), B, S/u, H/u, D]
    return received.permute(1, 0, 2, 3, 4).reshape(b, size * s_local, h // size, d)


def _head_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return x
    b, s, h_local, d = x.shape
    # [B, u, S/u, H/u, D] -> [u(sequence piece), B, S/u, H/u, D]: slice j is rank j's positions.
    pieces = x.reshape(b, size, s // size, h_local, d).permute(1, 0, 2, 3, 4)
    received = _all_to_all(pieces, group, traffic.HEAD_TO_SEQ)  # [u(head piece), B, S/u, H/u, D]
    return received.permute(1, 2, 0, 3, 4).reshape(b, s // size, size * h_local, d)


class _Redistribute(torch.autograd.Function):
    """One all-to-all direction; its backward is the other."""

    @staticmethod
    def forward(ctx, x, group, there, back):
        ctx.group, ctx.back = group, back
        return there(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.back(grad, ctx.group), None, None, None


def seq_to_head(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[B, S/u, H, D]`` (this rank's sequence piece, all heads) -> ``[B, S, H/u, D]``.
    ``group``: the Ulysses group (a process group; None is the world)."""
    group = check_group(group)
    size = dist.get_world_size(group)
    if x.dim() != 4 or x.shape[2] % size:
        raise ValueError(f"seq_to_head needs [batch, seqlen, heads, head_dim] with heads divisible by the "
                         f"group size {size}, got shape {tuple(x.shape)}")
    return _Redistribute.apply(x, group, _seq_to_head, _head_to_seq)


def head_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[B, S, H/u, D]`` (all positions, this rank's heads) -> ``[B, S/u, H, D]``.
    ``group``: the Ulysses group (a process group; None is the world)."""
    group = check_group(group)
    size = dist.get_world_size(group)
    if x.dim() != 4 or x.shape[1] % size:
        raise ValueError(f"head_to_seq needs [batch, seqlen, heads, head_dim] with seqlen divisible by the "
                         f"group size {size}, got shape {tuple(x.shape)}")
    return _Redistribute.apply(x, group, _head_to_seq, _seq_to_head)
