"""Sharding a global sequence over a mesh, gathering it back, and the position ids
(for RoPE) of a rank's shard. See ``attention.layout`` for who holds what."""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp.comm import Mesh, traffic
from usp.comm.agreement import device_of, ranks_agree
from usp.comm.mesh import check_mesh

from .layout import check_global_seqlen, check_layout, shard_positions


def sequence_positions(seqlen: int, mesh: Mesh, layout: str = "zigzag", device=None) -> torch.Tensor:
    """Global positions of this rank's shard of a ``seqlen``-long sequence, in local
    order: ``[seqlen / (u r)]`` int64, the position ids to feed RoPE."""
    check_mesh(mesh)
    positions = shard_positions(seqlen, mesh.ulysses_degree, mesh.ring_degree, mesh.ulysses_rank,
                                mesh.ring_rank, layout)
    return positions.to(device) if device is not None else positions


def _check_dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, mesh: Mesh, dim: int = 1, layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of the global tensor ``x`` along ``dim`` (a contiguous copy)."""
    check_mesh(mesh)
    dim = _check_dim(x, dim)
    positions = sequence_positions(x.shape[dim], mesh, layout, device=x.device)
    return x.index_select(dim, positions)


def gather_sequence(x_local: torch.Tensor, mesh: Mesh, dim: int = 1, layout: str = "zigzag", *,
                    check_ranks: bool = True) -> torch.Tensor:
    """The global tensor, on every rank of ``mesh.sp_group``, from the shards
    ``shard_sequence`` made (same shape on every rank). Not differentiable.
    ``check_ranks``: first make sure every rank passes the same shape, dtype, dim and
    layout (one small all-gather; a mismatch, or bad arguments on some ranks only,
    raises a ValueError on every rank)."""
    check_mesh(mesh)
    with ranks_agree(mesh.sp_group, "gather_sequence", device_of(x_local), check_ranks) as call:
        if not isinstance(x_local, torch.Tensor):
            raise TypeError(f"x_local must be a torch.Tensor, got {type(x_local).__name__}")
        dim = _check_dim(x_local, dim)
        check_layout(layout)
        check_global_seqlen(x_local.shape[dim] * mesh.sp_degree, mesh.ulysses_degree, mesh.ring_degree, layout)
        call.fields = dict(shape=tuple(x_local.shape), dtype=x_local.dtype, dim=dim, layout=layout)
    seqlen = x_local.shape[dim] * mesh.sp_degree
    x_local = x_local.detach().contiguous()
    pieces = [torch.empty_like(x_local) for _ in range(mesh.sp_degree)]
    traffic.note(traffic.ALL_GATHER, x_local.numel() * x_local.element_size() * (mesh.sp_degree - 1),
                 mesh.sp_degree - 1, traffic.GATHER_SEQUENCE)
    dist.all_gather(pieces, x_local, group=mesh.sp_group)
    shape = list(x_local.shape)
    shape[dim] = seqlen
    whole = x_local.new_empty(shape)
    for group_rank, piece in enumerate(pieces):
        position = mesh.ranks.index(dist.get_global_rank(mesh.sp_group, group_rank))
        _, ulysses_rank, ring_rank = mesh.coordinates(position)
        index = shard_positions(seqlen, mesh.ulysses_degree, mesh.ring_degree, ulysses_rank, ring_rank, layout)
        whole.index_copy_(dim, index.to(whole.device), piece)
    return whole
