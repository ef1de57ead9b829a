"""The all-gather schedule (Llama 3's context parallelism): gather K/V, then one call.

Forward: post the all-gathers of K and V over the ring group (both in flight at once),
wait for them, and compute this rank's queries against every key in one backend call
under the mask by token of the layout's positions (causal, documents and windows alike;
``layout.gathered_block``): the forward and dQ kernels test each key block and skip
those with nothing visible (the gathered keys lie in one increasing run per rank), the
dK/dV kernel walks each key tile's span of queries. Backward:
gather K and V again (nothing is kept between the passes, as the ring keeps nothing),
compute dQ and the dK/dV of every gathered key in one call, and reduce-scatter those
(in the accumulation dtype) so that each rank receives the sums for its own shard.

Against the ring (``usp.attention.ring``): the same K/V bytes leave each rank (its
shard, to ``r - 1`` ranks), but the compute waits for them instead of overlapping them,
and the backward reduce-scatters ``(r - 1) / r`` of the gathered gradients instead of
passing the dK/dV accumulators ``r`` hops. It needs ``r`` times the K/V memory, and one
kernel launch per pass instead of ``r``: a good trade when K/V are small (GQA) or the
ring steps are too short to hide their transfers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp.comm import traffic
from usp.comm.gather import post_gather_sequence, post_reduce_scatter_sequence
from usp.kernels.layout import accum_dtype
from usp.kernels.merge import backward_block

from .layout import gathered_block, on_device

SCHEDULES = ("ring", "allgather")


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return schedule


class GatherComm:
    """The all-gather schedule's transfers over a real group: all-gathers and reduce-scatters
    along the sequence (``usp.comm.gather``), each list of tensors in flight together."""

    def __init__(self, group: dist.ProcessGroup):
        self.group, self.rank, self.size = group, dist.get_rank(group), dist.get_world_size(group)

    def gather(self, tensors, label: str) -> list:
        posted = [post_gather_sequence(x, self.group, label) for x in tensors]
        return [collective.wait() for collective in posted]

    def reduce_scatter(self, tensors, label: str) -> list:
        posted = [post_reduce_scatter_sequence(x, self.group, label) for x in tensors]
        return [collective.wait() for collective in posted]


def _block(q, comm, causal, layout, documents, window_size):
    return on_device(gathered_block(comm.rank, q.shape[1] * comm.size, comm.size, layout, causal, documents,
                                    tuple(window_size)), q.device)


def allgather_forward(q, k, v, comm, causal: bool, scale: float, layout: str, backend, documents=None,
                      window_size=(-1, -1)):
    """This rank's ``out [B, S, Hq, D]`` and ``lse [B, Hq, S]`` from its shards
    ``q: [B, S, Hq, D]``, ``k, v: [B, S, Hkv, D]`` (laid out by ``layout``). ``comm``: a
    ``GatherComm`` (the emulator passes one that replays the transfers)."""
    k_all, v_all = comm.gather((k, v), traffic.KV_GATHER)
    block = _block(q, comm, causal, layout, documents, window_size)
    with traffic.span(traffic.COMPUTE, label=traffic.FORWARD, step=0):
        return backend.forward(q, k_all, v_all, softmax_scale=scale, **block.options())


def allgather_backward(dout, q, k, v, out, lse, comm, causal: bool, scale: float, layout: str, backend,
                       documents=None, window_size=(-1, -1)):
    """``dq, dk, dv`` of this rank's shards from the global ``out`` and ``lse`` rows."""
    k_all, v_all = comm.gather((k, v), traffic.KV_GATHER)
    block = _block(q, comm, causal, layout, documents, window_size)
    acc = accum_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    with traffic.span(traffic.COMPUTE, label=traffic.BACKWARD, step=0):  # dK/dV in float32 where the backend can
        dk_all, dv_all = backward_block(backend, dq, slice(None), dout, q, k_all, v_all, out, lse,
                                        softmax_scale=scale, **block.options())
    dk, dv = comm.reduce_scatter((dk_all.to(acc), dv_all.to(acc)), traffic.DKV_REDUCE)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
