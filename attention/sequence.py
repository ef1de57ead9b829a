"""Sharding a global sequence over a mesh, gathering it back, and the position ids
(for RoPE) of a rank's shard. See ``attention.layout`` for who holds what. Each takes
``cu_seqlens``, the int32 document offsets of a packed sequence (batch 1, the same on
every rank): zigzag then cuts every document, and positions restart per document."""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp.comm import Mesh, traffic
from usp.comm.agreement import device_of, ranks_agree
from usp.comm.mesh import check_mesh

from usp.kernels.checks import check_cu_seqlens, check_offsets

from .layout import check_global_seqlen, check_layout, document_ids, shard_positions


def document_offsets(cu_seqlens, seqlen: int) -> tuple[int, ...] | None:
    """The offsets of ``cu_seqlens`` (int32 ``[documents + 1]``, from 0 to ``seqlen``; or
    the same as a tuple of ints, which ``torch.compile`` traces without reading a tensor)
    as a tuple, checked; None for None."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, (tuple, list)) and all(type(x) is int for x in cu_seqlens) and len(cu_seqlens) > 1:
        return tuple(check_offsets("cu_seqlens", list(cu_seqlens), seqlen, seqlen))
    return tuple(check_cu_seqlens("cu_seqlens", cu_seqlens, seqlen, seqlen))


def _shard_indices(seqlen: int, mesh: Mesh, layout: str, documents: tuple[int, ...] | None) -> torch.Tensor:
    return shard_positions(seqlen, mesh.ulysses_degree, mesh.ring_degree, mesh.ulysses_rank, mesh.ring_rank, layout,
                           documents)


def sequence_positions(seqlen: int, mesh: Mesh, layout: str = "zigzag", device=None, *,
                       cu_seqlens=None) -> torch.Tensor:
    """Positions of this rank's shard of a ``seqlen``-long sequence, in local order:
    ``[seqlen / (u r)]`` int64, the position ids to feed RoPE. Global positions, or with
    ``cu_seqlens`` each token's position inside its document."""
    check_mesh(mesh)
    documents = document_offsets(cu_seqlens, seqlen)
    positions = positions_in_documents(_shard_indices(seqlen, mesh, layout, documents), documents)
    return positions.to(device) if device is not None else positions


def positions_in_documents(positions: torch.Tensor, documents: tuple[int, ...] | None) -> torch.Tensor:
    """Each global position's position inside its document (as given without documents)."""
    if documents is None:
        return positions
    starts = torch.tensor(documents, device=positions.device)
    return positions - starts[document_ids(positions, documents).long()]


def _check_dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, mesh: Mesh, dim: int = 1, layout: str = "zigzag", *,
                   cu_seqlens=None) -> torch.Tensor:
    """This rank's shard of the global tensor ``x`` along ``dim`` (a contiguous copy);
    ``cu_seqlens``: the document offsets of a packed ``x``."""
    check_mesh(mesh)
    dim = _check_dim(x, dim)
    documents = document_offsets(cu_seqlens, x.shape[dim])
    return x.index_select(dim, _shard_indices(x.shape[dim], mesh, layout, documents).to(x.device))


def pad_documents(x: torch.Tensor, cu_seqlens: torch.Tensor, multiple: int, dim: int = 1, value=0):
    """Pad every document of the packed ``x`` (along ``dim``) at its end to a multiple of
    ``multiple`` tokens, with ``value`` (for labels, the loss's ignore index): returns the
    padded tensor and its ``cu_seqlens``. The zigzag layout over a ring of ``r`` ranks
    needs documents of a multiple of ``2 r`` tokens. Padding at a document's end changes
    nothing before it under causal attention."""
    dim = _check_dim(x, dim)
    offsets = document_offsets(cu_seqlens, x.shape[dim])
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    pieces, padded = [], [0]
    for start, end in zip(offsets, offsets[1:]):
        pad = -(end - start) % multiple
        filler = x.new_full((*x.shape[:dim], pad, *x.shape[dim + 1:]), value)
        pieces += [x.narrow(dim, start, end - start), filler]
        padded.append(padded[-1] + end - start + pad)
    return torch.cat(pieces, dim), torch.tensor(padded, dtype=torch.int32, device=cu_seqlens.device)


def gather_sequence(x_local: torch.Tensor, mesh: Mesh, dim: int = 1, layout: str = "zigzag", *,
                    check_ranks: bool = True, cu_seqlens=None) -> torch.Tensor:
    """The global tensor, on every rank of ``mesh.sp_group``, from the shards
    ``shard_sequence`` made (same shape on every rank; the same ``cu_seqlens``). Not differentiable.
    ``check_ranks``: first make sure every rank passes the same shape, dtype, dim and
    layout (one small all-gather; a mismatch, or bad arguments on some ranks only,
    raises a ValueError on every rank)."""
    check_mesh(mesh)
    with ranks_agree(mesh.sp_group, "gather_sequence", device_of(x_local), check_ranks) as call:
        if not isinstance(x_local, torch.Tensor):
            raise TypeError(f"x_local must be a torch.Tensor, got {type(x_local).__name__}")
        dim = _check_dim(x_local, dim)
        check_layout(layout)
        documents = document_offsets(cu_seqlens, x_local.shape[dim] * mesh.sp_degree)
        check_global_seqlen(x_local.shape[dim] * mesh.sp_degree, mesh.ulysses_degree, mesh.ring_degree, layout,
                            documents)
        call.fields = dict(shape=tuple(x_local.shape), dtype=x_local.dtype, dim=dim, layout=layout,
                           documents=documents)
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
        index = shard_positions(seqlen, mesh.ulysses_degree, mesh.ring_degree, ulysses_rank, ring_rank, layout,
                                documents)
        whole.index_copy_(dim, index.to(whole.device), piece)
    return whole
