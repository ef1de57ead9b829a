"""Ring attention: the queries stay, the K/V shards travel once around the ring.

At each step a rank posts the transfer of the K/V block it holds to the next rank (and
the receive of the previous rank's), computes its queries against the block it holds
(full, causal diagonal, half block or nothing: ``layout.ring_block``), merges the
partial result through the LSE (inside the kernel when the backend has ``forward_into``),
and only then waits for the transfer. Backward (each block's dQ added inside the kernel
when the backend has ``backward_into``) sends
K/V around again; the dK/dV accumulator of each block (float32, float64 for float64
inputs) travels one hop behind it and is back at its owner after the last step. Every
step's backward uses the global (merged) out and lse, as the backend contract requires.
With packed documents or a window a step computes the rows and keys that see each other
under a mask by token, and a step with nothing visible is skipped (noted in the traffic
log as ``traffic.SKIP``); the K/V still travel on, as the next rank may need them.

``ring_forward`` and ``ring_backward`` are the one schedule: ring and USP attention
(``usp.attention.parallel``) run them over ``RingComm``, the emulator over a transport
that replays the transfers.
"""

from __future__ import annotations

import torch

from usp.comm import traffic
from usp.comm.ring import Delivered, RingTransport
from usp.kernels.merge import PartialResults, backward_block
from usp.kernels.layout import accum_dtype

from .layout import ring_block


def ring_forward(q, k, v, ring: RingTransport, causal: bool, scale: float, layout: str, backend,
                 documents=None, window_size=(-1, -1)):
    """This rank's ``out [B, S, Hq, D]`` (q's dtype) and its rows of the global ``lse
    [B, Hq, S]`` (float32, float64 for float64 inputs), from its shards ``q, k, v``;
    ``documents``: the packed documents' global offsets (batch 1)."""
    seqlen, mask = q.shape[1], (ring.size, documents, window_size, q.device)
    partial = PartialResults(q.shape, accum_dtype(q.dtype), q.device)
    kv = [k, v]  # the block visiting now: at step s, the one ring rank (rank - s) started with
    for step in range(ring.size):
        if step + 1 < ring.size:  # the next step's block travels while this one is computed
            incoming = ring.send_recv(kv, traffic.KV_FORWARD, step + 1)
        block = ring_block(ring.rank, (ring.rank - step) % ring.size, seqlen, layout, causal, *mask)
        if block is None:  # every pair masked: nothing to compute
            traffic.note(traffic.SKIP, label=traffic.FORWARD, step=step)
        else:
            rows, keys = block.q_rows, block.k_rows
            with traffic.span(traffic.COMPUTE, label=traffic.FORWARD, step=step):
                partial.attend(backend, rows, q[:, rows], kv[0][:, keys], kv[1][:, keys], softmax_scale=scale,
                               **block.options())
        if step + 1 < ring.size:
            kv = incoming.wait()
    out, lse = partial.result()
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, ring: RingTransport, causal: bool, scale: float, layout: str, backend,
                  documents=None, window_size=(-1, -1)):
    """``dq, dk, dv`` of this rank's shards (their input dtypes), from the global ``out`` and ``lse`` rows."""
    seqlen, acc, mask = q.shape[1], accum_dtype(q.dtype), (ring.size, documents, window_size, q.device)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = [k, v]
    # dK, dV of the visiting block so far; step 0's block is this rank's own, nothing yet
    arriving = Delivered([torch.zeros(x.shape, dtype=acc, device=x.device) for x in (k, v)])
    for step in range(ring.size):
        if step + 1 < ring.size:
            incoming = ring.send_recv(kv, traffic.KV_BACKWARD, step + 1)
        block = ring_block(ring.rank, (ring.rank - step) % ring.size, seqlen, layout, causal, *mask)
        if block is None:
            traffic.note(traffic.SKIP, label=traffic.BACKWARD, step=step)
        else:
            rows, keys = block.q_rows, block.k_rows
            with traffic.span(traffic.COMPUTE, label=traffic.BACKWARD, step=step):
                block_dk, block_dv = backward_block(backend, dq, rows, dout[:, rows], q[:, rows], kv[0][:, keys],
                                                    kv[1][:, keys], out[:, rows], lse[:, :, rows],
                                                    softmax_scale=scale, **block.options())
        dkv = arriving.wait()  # from the ranks this block visited before, sent during the compute
        if block is not None:
            with traffic.span(traffic.COMPUTE, label=traffic.ACCUMULATE, step=step):
                dkv[0][:, keys] += block_dk
                dkv[1][:, keys] += block_dv
        arriving = ring.send_recv(dkv, traffic.DKV_BACKWARD, step)  # on, one hop behind its block
        if step + 1 < ring.size:
            kv = incoming.wait()
    dk, dv = arriving.wait()  # after the last hop each accumulator is home
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


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
