"""Ring, Ulysses and USP attention on local sequence shards: the public calls.

Each checks its arguments (on every rank together unless ``check_ranks=False``, see
``usp.comm.agreement``) and runs the one sequence-parallel call of
``usp.attention.parallel``: ring attention is a Ulysses group of one, Ulysses a ring of
one, USP both. Ulysses trades the sequence shard for a head shard (an all-to-all over the
Ulysses group), runs attention, or ring attention over the ring group, on its heads, and
a second all-to-all brings the output back to sequence shards.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn

from usp.comm import Mesh
from usp.comm.agreement import call_fields, device_of, ranks_agree
from usp.comm.heads import check_heads
from usp.comm.mesh import check_group, check_mesh
from usp.kernels import BACKENDS, get_backend
from usp.kernels.checks import check_qkv, resolve_softmax_scale, resolve_window

from .allgather import check_schedule
from .layout import check_global_seqlen, check_layout
from .parallel import Plan, parallel_attention
from .ring import check_sequence_split
from .sequence import document_offsets


def _documents_and_window(q, k, cu_seqlens, window_size, layout: str, u: int, r: int) -> tuple[int, ...] | None:
    """Check packed documents and a window against the call; the documents' offsets."""
    windowed = tuple(resolve_window(False, window_size)) != (None, None)
    if (cu_seqlens is not None or (windowed and r > 1)) and k.shape[1] != q.shape[1]:
        raise ValueError(f"packed documents and windows over a ring need q and k of one length, got "
                         f"{q.shape[1]} and {k.shape[1]}")
    if cu_seqlens is None:
        return None
    if q.shape[0] != 1:
        raise ValueError(f"packed documents (cu_seqlens) need batch 1, got q of batch {q.shape[0]}")
    documents = document_offsets(cu_seqlens, q.shape[1] * u * r)
    check_global_seqlen(q.shape[1] * u * r, u, r, layout, documents)
    return documents


def _check_backend_masks(backend, q, window_size, documents, r: int, causal: bool, schedule: str) -> None:
    """A ValueError unless ``backend`` takes the mask keywords this call will hand it: a
    ``window_size``, and the mask by token (``positions``) that ring steps with documents
    or a window, and the all-gather schedule's masked calls, need."""
    windowed = tuple(window_size) != (-1, -1)
    needs = ["window_size"] if windowed else []
    if r > 1 and (documents is not None or windowed or (schedule == "allgather" and causal)):
        needs.append("positions")
    if not needs:
        return
    if backend is BACKENDS["torch"] and q.device.type != "cpu":
        raise ValueError(f"the torch backend takes {' and '.join(needs)} on the CPU only; use the triton backend on "
                         "CUDA")
    missing = []
    for function in (backend.forward, backend.backward):
        parameters = inspect.signature(function).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            missing += [name for name in needs if name not in {p.name for p in parameters} and name not in missing]
    if missing:
        raise ValueError(f"backend {getattr(backend, 'name', backend)!r} takes no {' or '.join(missing)} keyword, "
                         f"which this call needs (documents or a window over a ring of {r}): use triton, torch or "
                         "naive, or give its forward and backward those keywords (usp.kernels.tokens)")


def _attend(what: str, check_group, ulysses, ring, q, k, v, causal, softmax_scale, layout, backend, check_ranks,
            check_finite, cu_seqlens=None, window_size=(-1, -1), schedule="ring"):
    """Check the arguments (together with the other ranks of ``check_group``), then run
    the call. Under ``torch.compile`` the exchange moves into the call, at run time."""
    u = 1 if ulysses is None else dist.get_world_size(ulysses)
    r = 1 if ring is None else dist.get_world_size(ring)

    def arguments():
        check_qkv(q, k, v, causal)
        check_layout(layout)
        check_schedule(schedule)
        check_heads(q.shape[2], k.shape[2], u)
        check_sequence_split(q.shape[1] * u, k.shape[1] * u, causal, r, layout,
                             what="local" if ulysses is None else "per-ring-rank")
        documents = _documents_and_window(q, k, cu_seqlens, window_size, layout, u, r)
        chosen = get_backend(backend)
        _check_backend_masks(chosen, q, window_size, documents, r, causal, schedule)
        return resolve_softmax_scale(softmax_scale, q.shape[-1]), chosen, documents

    agreement = None  # posted here, settled before the call's first transfer
    if torch.compiler.is_compiling():
        scale, backend, documents = arguments()
    else:
        with ranks_agree(check_group, what, device_of(q), check_ranks, check_finite, defer=True) as call:
            scale, backend, documents = arguments()
            call.fields = call_fields(q, k, v, causal, scale, layout if ring is not None else "-", backend.name,
                                      documents, window_size, schedule)
            call.inputs = dict(q=q, k=k, v=v)
        agreement = call.agreement
    plan = Plan(ulysses, ring, causal, scale, layout, backend, documents, tuple(window_size), schedule)
    return parallel_attention(q, k, v, plan, check_group, what, check_ranks, check_finite, agreement)


def ring_attention(q, k, v, group: dist.ProcessGroup | None, causal: bool = False, softmax_scale=None,
                   layout: str = "zigzag", backend=None, *, check_ranks: bool = True, check_finite: bool = False,
                   cu_seqlens=None, window_size=(-1, -1), schedule: str = "ring"):
    """Attention over a sequence sharded across the ranks of ``group`` (None: the world).

    ``q: [B, S, Hq, D]``, ``k, v: [B, S, Hkv, D]``: this rank's shard, laid out by
    ``layout`` (see ``usp.attention.layout``; ``shard_sequence`` makes one). Returns this
    rank's shard of the output, ``[B, S, Hq, D]``, differentiable in q, k and v.
    ``backend``: a ``usp.kernels`` backend or its name (default: triton on CUDA, else torch).
    ``check_ranks``: first make sure every rank passes the same shapes and options
    (one small all-gather; a mismatch, or bad arguments on some ranks only, raises a
    ValueError on every rank; exchanged on the host, see ``usp.comm.agreement.host_group``).
    ``check_finite``: in the same all-gather, raise a
    ValueError on every rank, naming the rank and the tensor, when any rank's q, k or v
    holds a NaN or an infinity (costs a sum over each; on a GPU a host synchronisation).
    ``cu_seqlens``: the global offsets of packed documents (an int32 tensor, or a tuple
    of ints, which ``torch.compile`` traces without a graph break; batch 1; the same on
    every rank; no token attends across a document boundary; the shards laid out with
    the same offsets, see ``shard_sequence``); ``window_size``: flash-attn's sliding
    window, in global positions. Each ring step computes only the rows and keys that
    see each other (a mask by token) and skips a step with none. ``schedule``: "ring"
    passes K/V around the ring, overlapped with compute; "allgather" gathers them all
    first and computes in one call (see ``usp.attention.allgather``).
    """
    group = check_group(group)
    return _attend("ring_attention", group, None, group, q, k, v, causal, softmax_scale, layout, backend, check_ranks,
                   check_finite, cu_seqlens, window_size, schedule)


def ulysses_attention(q, k, v, group: dist.ProcessGroup | None, causal: bool = False, softmax_scale=None,
                      backend=None, *, check_ranks: bool = True, check_finite: bool = False, cu_seqlens=None,
                      window_size=(-1, -1)):
    """Attention over a sequence sharded contiguously across ``group`` (None: the world).

    ``q: [B, S/u, Hq, D]``, ``k, v: [B, S/u, Hkv, D]`` (rank ``j`` holds the ``j``-th
    piece) -> this rank's output piece ``[B, S/u, Hq, D]``, differentiable. Each rank
    takes a contiguous share of the heads, ``Hq / u`` or, when ``u`` does not divide
    ``Hq``, one more or one less (``Hq >= u``; see ``usp.comm.heads``). ``check_ranks``,
    ``check_finite``, ``cu_seqlens``, ``window_size``: see ``ring_attention``; each
    rank's heads see the whole packed sequence, so documents and windows are exact.
    """
    group = check_group(group)
    return _attend("ulysses_attention", group, group, None, q, k, v, causal, softmax_scale, "contiguous", backend,
                   check_ranks, check_finite, cu_seqlens, window_size)


def usp_attention(q, k, v, mesh: Mesh, causal: bool = False, softmax_scale=None, layout: str = "zigzag",
                  backend=None, *, check_ranks: bool = True, check_finite: bool = False, cu_seqlens=None,
                  window_size=(-1, -1), schedule: str = "ring"):
    """Unified sequence parallel attention: Ulysses over ``mesh.ulysses_group`` around
    ring attention over ``mesh.ring_group``.

    ``q: [B, S/(u r), Hq, D]``, ``k, v: [B, S/(u r), Hkv, D]``: this rank's shard as made
    by ``shard_sequence(x, mesh, layout=layout)`` -> its output shard, differentiable.
    ``ulysses_degree = N`` is pure Ulysses, ``ring_degree = N`` pure ring.
    ``check_ranks``, ``check_finite``, ``cu_seqlens``, ``window_size``, ``schedule``:
    see ``ring_attention`` (the check is one all-gather over ``mesh.sp_group``).
    """
    check_mesh(mesh)
    return _attend("usp_attention", mesh.sp_group, mesh.ulysses_group, mesh.ring_group, q, k, v, causal,
                   softmax_scale, layout, backend, check_ranks, check_finite, cu_seqlens, window_size, schedule)


class USPAttention(nn.Module):
    """``usp_attention`` as a module: ``forward(q, k, v, cu_seqlens=None)`` on local shards ``[B, S_local, H, D]``."""

    def __init__(self, mesh: Mesh, causal: bool = False, softmax_scale=None, layout: str = "zigzag", backend=None,
                 *, check_ranks: bool = True, check_finite: bool = False, window_size=(-1, -1),
                 schedule: str = "ring"):
        super().__init__()
        check_mesh(mesh)
        resolve_window(causal, window_size)
        self.schedule = check_schedule(schedule)
        self.mesh, self.causal, self.softmax_scale = mesh, causal, softmax_scale
        self.layout, self.backend = check_layout(layout), backend
        self.check_ranks, self.check_finite, self.window_size = check_ranks, check_finite, tuple(window_size)

    def forward(self, q, k, v, cu_seqlens=None):
        """``cu_seqlens``: the global offsets of this batch's packed documents (see ``usp_attention``)."""
        return usp_attention(q, k, v, self.mesh, self.causal, self.softmax_scale, self.layout, self.backend,
                             check_ranks=self.check_ranks, check_finite=self.check_finite, cu_seqlens=cu_seqlens,
                             window_size=self.window_size, schedule=self.schedule)

    def extra_repr(self) -> str:
        m = self.mesh
        return (f"ulysses_degree={m.ulysses_degree}, ring_degree={m.ring_degree}, placement={m.placement}, "
                f"causal={self.causal}, layout={self.layout}, backend={self.backend}"
                + (", check_finite=True" if self.check_finite else "")
                + (f", schedule={self.schedule}" if self.schedule != "ring" else "")
                + (f", window_size={self.window_size}" if self.window_size != (-1, -1) else ""))
