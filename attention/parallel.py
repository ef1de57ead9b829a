"""One sequence-parallel attention call, forward and backward, for ring, Ulysses and
USP alike: the Ulysses all-to-alls around the ring loops.

``sp_forward`` / ``sp_backward`` are the whole call on local shards. A Ulysses group of
one rank (or none) skips the all-to-alls; a ring of one rank (or none) is one call of
the local kernel. They run in two ways:

- eagerly, through one autograd function (``parallel_attention``);
- under ``torch.compile``, as the registered custom ops ``usp::sp_attention_forward``
  and ``usp::sp_attention_backward`` (opaque to the compiler, with fake
  implementations that give the shapes while tracing, and autograd between them), so
  a model's attention call compiles into one graph without a break. There the groups
  travel by name, the backend by name, and the rank-agreement check (and
  ``check_finite``) runs inside the forward op, at run time.

What backward needs is what forward made: the head-sharded q, k, v, the local output
and lse (the same tensors the ring loops keep).

Packed documents and sliding windows: in a ring of one, after the Ulysses all-to-all
each rank holds the whole packed sequence (batch 1) for its heads, so one varlen call
(``usp.kernels.varlen``) with the global offsets is exact; in a longer ring each step
computes its block under a mask by token (``usp.attention.layout.token_block``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from usp.comm import traffic
from usp.comm.agreement import Agreement, call_fields, post_agreement
from usp.comm.all_to_all import post_head_to_seq, post_seq_to_head
from usp.comm.heads import head_shares, kv_copies, kv_head_shares, replicate_kv_heads
from usp.comm.ring import RingComm
from usp.kernels import BACKENDS, get_backend, varlen_backward, varlen_forward
from usp.kernels.backends import window_kwargs
from usp.kernels.layout import accum_dtype, reduce_kv_grad
from usp.kernels.varlen import self_attention_offsets

from .allgather import GatherComm, allgather_backward, allgather_forward
from .ring import ring_backward, ring_forward


@dataclass(frozen=True)
class Plan:
    """The static part of a call: the groups (None: none), the options, the backend, the
    packed documents' global offsets (None: one sequence per batch row), and how K/V
    reach the ring's ranks (``schedule``: "ring" or "allgather")."""

    ulysses: dist.ProcessGroup | None
    ring: dist.ProcessGroup | None
    causal: bool
    scale: float
    layout: str
    backend: object
    documents: tuple[int, ...] | None = None
    window_size: tuple[int, int] = (-1, -1)
    schedule: str = "ring"

    def local_forward(self, q, k, v):
        """``(out, lse)`` of the whole (head-sharded) sequence on this rank's backend."""
        options = dict(causal=self.causal, softmax_scale=self.scale)
        if self.documents is None:
            return self.backend.forward(q, k, v, **options, **window_kwargs(self.window_size))
        out, lse = varlen_forward(self.backend, q[0], k[0], v[0], *self_attention_offsets(self.documents, q.device),
                                  **options, window_size=self.window_size)
        return out[None], lse[None]

    def local_backward(self, dout, q, k, v, out, lse):
        """``(dq, dk, dv)`` of ``local_forward``'s call."""
        options = dict(causal=self.causal, softmax_scale=self.scale)
        if self.documents is None:
            return self.backend.backward(dout, q, k, v, out, lse, **options, **window_kwargs(self.window_size))
        grads = varlen_backward(self.backend, dout[0], q[0], k[0], v[0], out[0], lse[0],
                                *self_attention_offsets(self.documents, q.device), **options,
                                window_size=self.window_size)
        return tuple(g[None] for g in grads)

    def ulysses_size(self) -> int:
        return 1 if self.ulysses is None else dist.get_world_size(self.ulysses)

    def ring_transport(self, after: Agreement | None = None) -> RingComm | None:
        return None if self.ring is None or dist.get_world_size(self.ring) == 1 else RingComm(self.ring, after=after)

    def ring_options(self) -> tuple:
        """The ring's mask arguments of ``ring_forward`` / ``allgather_forward``, after the tensors and the group."""
        return self.causal, self.scale, self.layout, self.backend, self.documents, self.window_size


def sp_forward(q, k, v, plan: Plan, agreement: Agreement | None = None):
    """``q: [B, S, Hq, D]``, ``k, v: [B, S_k, Hkv, D]`` (local shards) -> ``out [B, S, Hq, D]``
    and what ``sp_backward`` needs: ``(q_h, k_h, v_h, out_h, lse)``, head-sharded.
    ``agreement``: the call's posted rank check, settled before any transfer (a pure
    ring's first hop waits for it while the first block is computed)."""
    u, heads, kv_heads = plan.ulysses_size(), q.shape[2], k.shape[2]
    if agreement is not None and u > 1:
        agreement.settle()
    shares, kv_shares = head_shares(heads, u), kv_head_shares(heads, kv_heads, u)
    k, v = replicate_kv_heads(k, heads, u), replicate_kv_heads(v, heads, u)
    q_h, k_h, v_h = _exchange(post_seq_to_head, plan.ulysses, ((q, shares), (k, kv_shares), (v, kv_shares)))
    ring = plan.ring_transport(after=agreement)
    if ring is not None and plan.schedule == "allgather" and agreement is not None:
        agreement.settle()  # before the all-gather, the first transfer
    try:
        if ring is not None and plan.schedule == "allgather":
            out_h, lse = allgather_forward(q_h, k_h, v_h, GatherComm(plan.ring), *plan.ring_options())
        elif ring is None:
            with traffic.span(traffic.COMPUTE, label=traffic.FORWARD, step=0):
                out_h, lse = plan.local_forward(q_h, k_h, v_h)
        else:
            out_h, lse = ring_forward(q_h, k_h, v_h, ring, *plan.ring_options())
    except BaseException:  # a rank failing in its first block still takes part in the check: when the
        if agreement is not None:  # ranks disagreed (the likely cause), every rank raises that instead
            agreement.settle()
        raise
    if agreement is not None:  # nothing was sent (one rank), or the ring's first hop settled it already
        agreement.settle()
    (out,) = _exchange(post_head_to_seq, plan.ulysses, ((out_h, shares),))
    return out, (q_h, k_h, v_h, out_h, lse)


def sp_backward(dout, saved, plan: Plan, heads: int, kv_heads: int):
    """``dq, dk, dv`` of the local shards from ``dout [B, S, Hq, D]`` and ``sp_forward``'s saved tensors."""
    q_h, k_h, v_h, out_h, lse = saved
    u = plan.ulysses_size()
    shares, kv_shares = head_shares(heads, u), kv_head_shares(heads, kv_heads, u)
    (dout_h,) = _exchange(post_seq_to_head, plan.ulysses, ((dout, shares),))
    ring = plan.ring_transport()
    if ring is not None and plan.schedule == "allgather":
        dq_h, dk_h, dv_h = allgather_backward(dout_h, q_h, k_h, v_h, out_h, lse, GatherComm(plan.ring),
                                              *plan.ring_options())
    elif ring is None:
        with traffic.span(traffic.COMPUTE, label=traffic.BACKWARD, step=0):
            dq_h, dk_h, dv_h = plan.local_backward(dout_h, q_h, k_h, v_h, out_h, lse)
    else:
        dq_h, dk_h, dv_h = ring_backward(dout_h, q_h, k_h, v_h, out_h, lse, ring, *plan.ring_options())
    if u == 1:
        return dq_h, dk_h, dv_h
    dq, dk, dv = _exchange(post_head_to_seq, plan.ulysses, ((dq_h, shares), (dk_h, kv_shares), (dv_h, kv_shares)))
    copies = kv_copies(heads, kv_heads, u)
    return dq, reduce_kv_grad(dk, copies), reduce_kv_grad(dv, copies)


def _exchange(post, group: dist.ProcessGroup | None, pieces) -> list[torch.Tensor]:
    """Each ``(tensor, shares)`` of ``pieces`` through the all-to-all ``post`` makes, all
    of them in flight at once, then waited for (a Ulysses group of one: as they are)."""
    if group is None or dist.get_world_size(group) == 1:
        return [x for x, _ in pieces]
    posted = [post(x, group, shares) for x, shares in pieces]
    return [exchange.wait() for exchange in posted]


class _ParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, agreement):
        out, saved = sp_forward(q, k, v, plan, agreement)
        ctx.save_for_backward(*saved)
        ctx.plan, ctx.heads, ctx.kv_heads = plan, q.shape[2], k.shape[2]
        return out

    @staticmethod
    def backward(ctx, dout):
        return (*sp_backward(dout, ctx.saved_tensors, ctx.plan, ctx.heads, ctx.kv_heads), None, None)


# --- the same call as custom ops, for torch.compile -------------------------------------

def _group(name: str) -> dist.ProcessGroup | None:
    return _resolve_process_group(name) if name else None


def _plan(ulysses: str, ring: str, causal: bool, scale: float, layout: str, backend: str, documents: list[int],
          window: list[int], schedule: str) -> Plan:
    return Plan(_group(ulysses), _group(ring), causal, scale, layout, get_backend(backend),
                tuple(documents) or None, tuple(window), schedule)


@torch.library.custom_op("usp::sp_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ulysses: str, ring: str, causal: bool,
                scale: float, layout: str, backend: str, documents: list[int], window: list[int], schedule: str,
                check: str, what: str, check_ranks: bool, check_finite: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    agreement = None
    if check_ranks or check_finite:  # the exchange of the checks, at run time, settled before any transfer
        fields = {"error": "", "check_finite": check_finite,
                  **call_fields(q, k, v, causal, scale, layout if ring else "-", backend, tuple(documents) or None,
                                tuple(window), schedule)}
        agreement = post_agreement(_group(check), what, fields if check_ranks else None, q.device,
                                   dict(q=q, k=k, v=v) if check_finite else None)
    plan = _plan(ulysses, ring, causal, scale, layout, backend, documents, window, schedule)
    out, (q_h, k_h, v_h, out_h, lse) = sp_forward(q, k, v, plan, agreement)
    if _size(ulysses) == 1:  # the saved tensors are q, k, v and out themselves: outputs may not alias them
        q_h, k_h, v_h, out_h = (q.new_empty(0) for _ in range(4))
    # contiguous, as the fake implementation promises (a compiler checks the strides)
    return tuple(x.contiguous() for x in (out, q_h, k_h, v_h, out_h, lse))


def _size(group_name: str) -> int:
    return 1 if not group_name else dist.get_world_size(_group(group_name))


@_forward_op.register_fake
def _(q, k, v, ulysses, ring, causal, scale, layout, backend, documents, window, schedule, check, what, check_ranks,
      check_finite):
    u, lse_dtype = _size(ulysses), accum_dtype(q.dtype)
    if u == 1:
        return (q.new_empty(q.shape), *(q.new_empty(0) for _ in range(4)),
                q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=lse_dtype))
    j = dist.get_rank(_group(ulysses))
    h, kv = head_shares(q.shape[2], u)[j], kv_head_shares(q.shape[2], k.shape[2], u)[j]
    batch, seqlen, seqlen_k, dim = q.shape[0], u * q.shape[1], u * k.shape[1], q.shape[3]
    q_h, k_h = q.new_empty(batch, seqlen, h, dim), k.new_empty(batch, seqlen_k, kv, dim)
    lse = q.new_empty(batch, h, seqlen, dtype=lse_dtype)
    return q.new_empty(q.shape), q_h, k_h, k.new_empty(k_h.shape), q.new_empty(q_h.shape), lse


@torch.library.custom_op("usp::sp_attention_backward", mutates_args=())
def _backward_op(dout: torch.Tensor, q_h: torch.Tensor, k_h: torch.Tensor, v_h: torch.Tensor, out_h: torch.Tensor,
                 lse: torch.Tensor, ulysses: str, ring: str, causal: bool, scale: float, layout: str, backend: str,
                 documents: list[int], window: list[int], schedule: str, heads: int, kv_heads: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan(ulysses, ring, causal, scale, layout, backend, documents, window, schedule)
    return tuple(x.contiguous() for x in sp_backward(dout, (q_h, k_h, v_h, out_h, lse), plan, heads, kv_heads))


@_backward_op.register_fake
def _(dout, q_h, k_h, v_h, out_h, lse, ulysses, ring, causal, scale, layout, backend, documents, window, schedule,
      heads, kv_heads):
    dk = k_h.new_empty(dout.shape[0], k_h.shape[1] // _size(ulysses), kv_heads, dout.shape[3])
    return dout.new_empty(dout.shape), dk, k_h.new_empty(dk.shape)


def _setup(ctx, inputs, output):
    q, k, v, ulysses, ring, causal, scale, layout, backend, documents, window, schedule = inputs[:12]
    out, q_h, k_h, v_h, out_h, lse = output
    ctx.save_for_backward(*((q, k, v, out) if _size(ulysses) == 1 else (q_h, k_h, v_h, out_h)), lse)
    ctx.settings = (ulysses, ring, causal, scale, layout, backend, documents, window, schedule, q.shape[2],
                    k.shape[2])


def _backward(ctx, dout, *unused):
    dq, dk, dv = _backward_op(dout, *ctx.saved_tensors, *ctx.settings)
    return dq, dk, dv, *([None] * 13)


_forward_op.register_autograd(_backward, setup_context=_setup)


def _name(group: dist.ProcessGroup | None) -> str:
    return "" if group is None else group.group_name


def parallel_attention(q, k, v, plan: Plan, check: dist.ProcessGroup, what: str, check_ranks: bool,
                       check_finite: bool, agreement: Agreement | None = None):
    """The call, differentiable. Eagerly the checks have been posted already
    (``agreement``, settled before the first transfer) and ``check`` to ``check_finite``
    are not used; under ``torch.compile`` the custom ops run the call, and the forward op
    makes the ranks of ``check`` agree (``check_ranks``) and checks their inputs
    (``check_finite``) at run time, naming the call ``what``."""
    if not torch.compiler.is_compiling():
        return _ParallelAttention.apply(q, k, v, plan, agreement)
    name = getattr(plan.backend, "name", None)
    if BACKENDS.get(name) is not plan.backend:
        raise TypeError("under torch.compile the backend must be one of usp.kernels.BACKENDS, passed by name")
    return _forward_op(q, k, v, _name(plan.ulysses), _name(plan.ring), plan.causal, plan.scale, plan.layout, name,
                       list(plan.documents or ()), list(plan.window_size), plan.schedule, _name(check), what,
                       check_ranks, check_finite)[0]
