"""Ulysses (all-to-all) attention and USP, its 2-D hybrid with ring attention.

Ulysses trades the sequence shard for a head shard: after an all-to-all over the
Ulysses group each rank holds every position of that group for ``H/u`` heads, runs
attention on them, and a second all-to-all brings the output back to sequence shards.
USP runs ring attention over the ring group in the middle instead of local attention.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from usp.comm import Mesh
from usp.comm.agreement import call_fields, device_of, ranks_agree
from usp.comm.all_to_all import head_to_seq, seq_to_head
from usp.comm.heads import check_heads, head_shares, kv_head_shares, replicate_kv_heads
from usp.comm.mesh import check_group, check_mesh
from usp.kernels import get_backend, local_attention
from usp.kernels.checks import check_qkv, resolve_softmax_scale

from .layout import check_layout
from .ring import check_sequence_split, ring_attention


def _head_parallel(q, k, v, group, attend):
    """All-to-all q, k, v to head shards (``usp.comm.heads``: shares differing by at most
    one, K/V heads repeated where the shares need it), ``attend`` on them, all-to-all the
    output back."""
    size, heads, kv_heads = dist.get_world_size(group), q.shape[2], k.shape[2]
    shares, kv_shares = head_shares(heads, size), kv_head_shares(heads, kv_heads, size)
    k, v = replicate_kv_heads(k, heads, size), replicate_kv_heads(v, heads, size)
    out = attend(seq_to_head(q, group, shares), seq_to_head(k, group, kv_shares), seq_to_head(v, group, kv_shares))
    return head_to_seq(out, group, shares)


def ulysses_attention(q, k, v, group: dist.ProcessGroup | None, causal: bool = False, softmax_scale=None,
                      backend=None, *, check_ranks: bool = True, check_finite: bool = False):
    """Attention over a sequence sharded contiguously across ``group`` (None: the world).

    ``q: [B, S/u, Hq, D]``, ``k, v: [B, S/u, Hkv, D]`` (rank ``j`` holds the ``j``-th
    piece) -> this rank's output piece ``[B, S/u, Hq, D]``, differentiable. Each rank
    takes a contiguous share of the heads, ``Hq / u`` or, when ``u`` does not divide
    ``Hq``, one more or one less (``Hq >= u``; see ``usp.comm.heads``). ``check_ranks``,
    ``check_finite``: see ``ring_attention``.
    """
    group = check_group(group)
    with ranks_agree(group, "ulysses_attention", device_of(q), check_ranks, check_finite) as call:
        check_qkv(q, k, v, causal)
        scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
        backend = get_backend(backend)
        check_heads(q.shape[2], k.shape[2], dist.get_world_size(group))
        call.fields, call.inputs = call_fields(q, k, v, causal, scale, "-", backend.name), dict(q=q, k=k, v=v)
    return _head_parallel(q, k, v, group, lambda q, k, v: local_attention(q, k, v, causal, scale, backend=backend))


def usp_attention(q, k, v, mesh: Mesh, causal: bool = False, softmax_scale=None, layout: str = "zigzag",
                  backend=None, *, check_ranks: bool = True, check_finite: bool = False):
    """Unified sequence parallel attention: Ulysses over ``mesh.ulysses_group`` around
    ring attention over ``mesh.ring_group``.

    ``q: [B, S/(u r), Hq, D]``, ``k, v: [B, S/(u r), Hkv, D]``: this rank's shard as made
    by ``shard_sequence(x, mesh, layout=layout)`` -> its output shard, differentiable.
    ``ulysses_degree = N`` is pure Ulysses, ``ring_degree = N`` pure ring.
    ``check_ranks``, ``check_finite``: see ``ring_attention`` (one all-gather over
    ``mesh.sp_group``).
    """
    check_mesh(mesh)
    with ranks_agree(mesh.sp_group, "usp_attention", device_of(q), check_ranks, check_finite) as call:
        check_qkv(q, k, v, causal)
        check_layout(layout)
        scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
        backend = get_backend(backend)
        check_heads(q.shape[2], k.shape[2], mesh.ulysses_degree)
        u = mesh.ulysses_degree  # after the all-to-all a rank holds its ring rank's u pieces
        check_sequence_split(q.shape[1] * u, k.shape[1] * u, causal, mesh.ring_degree, layout, what="per-ring-rank")
        call.fields, call.inputs = call_fields(q, k, v, causal, scale, layout, backend.name), dict(q=q, k=k, v=v)

    def ring(q, k, v):
        return ring_attention(q, k, v, mesh.ring_group, causal, scale, layout, backend, check_ranks=False)

    return _head_parallel(q, k, v, mesh.ulysses_group, ring)


class USPAttention(nn.Module):
    """``usp_attention`` as a module: ``forward(q, k, v)`` on local shards ``[B, S_local, H, D]``."""

    def __init__(self, mesh: Mesh, causal: bool = False, softmax_scale=None, layout: str = "zigzag", backend=None,
                 *, check_ranks: bool = True, check_finite: bool = False):
        super().__init__()
        check_mesh(mesh)
        self.mesh, self.causal, self.softmax_scale = mesh, causal, softmax_scale
        self.layout, self.backend = check_layout(layout), backend
        self.check_ranks, self.check_finite = check_ranks, check_finite

    def forward(self, q, k, v):
        return usp_attention(q, k, v, self.mesh, self.causal, self.softmax_scale, self.layout, self.backend,
                             check_ranks=self.check_ranks, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        m = self.mesh
        return (f"ulysses_degree={m.ulysses_degree}, ring_degree={m.ring_degree}, placement={m.placement}, "
                f"causal={self.causal}, layout={self.layout}, backend={self.backend}"
                + (", check_finite=True" if self.check_finite else ""))
