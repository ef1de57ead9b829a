"""Ring attention: the queries stay, the K/V shards travel once around the ring.

Each step computes this rank's queries against the K/V block that is visiting (full,
causal diagonal, half block or nothing, per ``layout.ring_block``) and merges the
partial result through the LSE, while the next block is already in flight. Backward
sends K/V around again; the float32 (float64 for float64 inputs) dK/dV accumulator of
each block travels one hop behind it and arrives back at its owner after the last step. Every step's backward
uses the global (merged) out and lse, as the backend contract requires.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp.comm import traffic
from usp.comm.agreement import call_fields, ensure_ranks_agree
from usp.comm.ring import RingComm
from usp.kernels import get_backend, merge_attention
from usp.kernels.checks import check_qkv, resolve_softmax_scale
from usp.kernels.layout import accum_dtype

from .layout import check_layout, ring_block


def _forward(q, k, v, comm: RingComm, causal: bool, scale: float, layout: str, backend):
    """Local ``out [B, S, Hq, D]`` (q's dtype) and global ``lse [B, Hq, S]`` (float32,
    or float64 for float64 inputs, like the accumulators)."""
    batch, seqlen, heads, _ = q.shape
    acc = accum_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((batch, heads, seqlen), float("-inf"), dtype=acc, device=q.device)
    for step, source, (k_block, v_block) in comm.rotate([k, v], label="kv forward"):
        block = ring_block(comm.rank, source, seqlen, layout, causal)
        if block is None:
            continue
        rows, keys = block.q_rows, block.k_rows
        with traffic.span("compute", label="forward", step=step):
            block_out, block_lse = backend.forward(q[:, rows], k_block[:, keys], v_block[:, keys],
                                                   causal=block.causal, softmax_scale=scale)
            out[:, rows], lse[:, :, rows] = merge_attention(out[:, rows], lse[:, :, rows], block_out, block_lse)
    return out.to(q.dtype), lse


def _backward(dout, q, k, v, out, lse, comm: RingComm, causal: bool, scale: float, layout: str, backend):
    """``dq, dk, dv`` of the local shards, in their input dtypes."""
    seqlen, acc = q.shape[1], accum_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    accumulator = None  # dK/dV of the block visiting now, summed over the ranks it visited
    for step, source, (k_block, v_block) in comm.rotate([k, v], label="kv backward"):
        block = ring_block(comm.rank, source, seqlen, layout, causal)
        grads = None
        if block is not None:
            rows, keys = block.q_rows, block.k_rows
            with traffic.span("compute", label="backward", step=step):
                grads = backend.backward(dout[:, rows], q[:, rows], k_block[:, keys], v_block[:, keys],
                                         out[:, rows], lse[:, :, rows], causal=block.causal, softmax_scale=scale)
                dq[:, rows] += grads[0]
        if accumulator is None:
            dk, dv = (torch.zeros(k.shape, dtype=acc, device=k.device) for _ in range(2))
        else:
            dk, dv = accumulator.wait()
        if grads is not None:
            with traffic.span("compute", label="backward accumulate", step=step):
                dk[:, keys] += grads[1]
                dv[:, keys] += grads[2]
        accumulator = comm.pass_along([dk, dv], step, label="dkv backward")
    dk, dv = accumulator.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm, causal, scale, layout, backend):
        out, lse = _forward(q, k, v, comm, causal, scale, layout, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (comm, causal, scale, layout, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, *ctx.settings)
        return dq, dk, dv, None, None, None, None, None


def check_sequence_split(seqlen_q: int, seqlen_k: int, causal: bool, ring_size: int, layout: str,
                         what: str = "local") -> None:
    """ValueErrors for shards the ring cannot split: causal needs equal q and k lengths,
    zigzag an even length per ring rank."""
    if causal and seqlen_q != seqlen_k:
        raise ValueError(f"causal attention needs q and k with the same {what} sequence length, got "
                         f"{seqlen_q} and {seqlen_k}")
    if layout == "zigzag" and ring_size > 1 and (seqlen_q % 2 or seqlen_k % 2):
        raise ValueError(f"the zigzag layout holds two chunks per ring rank: the {what} sequence length must be "
                         f"even, got q {seqlen_q} and k {seqlen_k} (global length not divisible by "
                         f"2 x ring_degree = {2 * ring_size})")


def ring_attention(q, k, v, group: dist.ProcessGroup | None, causal: bool = False, softmax_scale=None,
                   layout: str = "zigzag", backend=None, *, check_ranks: bool = True):
    """Attention over a sequence sharded across the ranks of ``group`` (default: world).

    ``q: [B, S, Hq, D]``, ``k, v: [B, S, Hkv, D]``: this rank's shard, laid out by
    ``layout`` (see ``attention.layout``; ``shard_sequence`` makes one). Returns this
    rank's shard of the output, ``[B, S, Hq, D]``, differentiable in q, k and v.
    ``backend``: a ``kernels`` backend name (default: triton on CUDA, else torch).
    ``check_ranks``: first make sure every rank passes the same shapes and options
    (one small all-gather; a mismatch raises a ValueError on every rank).
    """
    check_qkv(q, k, v, causal)
    check_layout(layout)
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    backend = get_backend(backend)
    comm = RingComm(group or dist.group.WORLD)
    check_sequence_split(q.shape[1], k.shape[1], causal, comm.size, layout)
    if check_ranks:
        ensure_ranks_agree(comm.group, "ring_attention", call_fields(q, k, v, causal, scale, layout, backend.name),
                           q.device)
    return _RingAttention.apply(q, k, v, comm, causal, scale, layout, backend)
