"""What one rank sends in one ring, Ulysses or USP attention call: the single formula
the tests check the counted traffic against, the emulator prices and the cost model
reports.

A ``u x r`` mesh (``N = u r``) on a global sequence of ``S`` tokens: each rank starts
with ``S/N`` tokens of q (``Hq`` heads) and of K/V (``max(Hkv, u)`` heads after the
replication of ``usp.comm.heads``).

- Ulysses (``u > 1``): four all-to-alls per pass (forward q, k, v in and out back;
  backward dout in and dq, dk, dv back), each sending ``(u - 1)/u`` of its tensor.
- Ring (``r > 1``), on ``S/r`` tokens and ``max(Hkv/u, 1)`` K/V heads after the
  all-to-all: forward, K and V make ``r - 1`` hops; backward, K and V make them again
  and the dK/dV accumulators (in ``promote(dtype, float32)``) make ``r`` hops, the
  last one home.
"""

from __future__ import annotations

from dataclasses import dataclass

from usp.comm.heads import kv_heads_per_rank, kv_heads_sent


@dataclass(frozen=True)
class PassVolume:
    """What one rank sends in one pass (forward or backward)."""

    p2p_sends: int
    p2p_bytes: int
    all_to_alls: int
    all_to_all_bytes: int

    @property
    def bytes(self) -> int:
        return self.p2p_bytes + self.all_to_all_bytes


@dataclass(frozen=True)
class CallVolume:
    """What one rank sends in one attention call, and the sizes of the single transfers."""

    forward: PassVolume
    backward: PassVolume
    kv_hop_bytes: int  # K and V of one ring block
    accumulator_hop_bytes: int  # dK and dV accumulators of one ring block

    @property
    def bytes(self) -> int:
        return self.forward.bytes + self.backward.bytes


def attention_volume(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, ulysses_degree: int,
                     ring_degree: int, element_size: int) -> CallVolume:
    """Per rank, for a global ``seqlen`` (divisible by ``u x r``) in a dtype of
    ``element_size`` bytes; accumulators take ``max(element_size, 4)``."""
    u, r = ulysses_degree, ring_degree
    if seqlen % (u * r):
        raise ValueError(f"the sequence length {seqlen} must be divisible by u x r = {u * r}")
    tokens = batch * seqlen // (u * r)  # per rank, before the all-to-all
    q_bytes = tokens * heads * head_dim * element_size
    kv_bytes = tokens * kv_heads_sent(kv_heads, u) * head_dim * element_size
    all_to_all = (2 * q_bytes + 2 * kv_bytes) * (u - 1) // u
    block = batch * (seqlen // r) * kv_heads_per_rank(kv_heads, u) * head_dim  # elements of K (or V) per ring rank
    kv_hop = 2 * block * element_size
    accumulator_hop = 2 * block * max(element_size, 4)
    a2a_count = 4 if u > 1 else 0
    accumulator_hops = r if r > 1 else 0
    forward = PassVolume(2 * (r - 1), (r - 1) * kv_hop, a2a_count, all_to_all)
    backward = PassVolume(2 * (r - 1) + 2 * accumulator_hops, (r - 1) * kv_hop + accumulator_hops * accumulator_hop,
                          a2a_count, all_to_all)
    return CallVolume(forward, backward, kv_hop, accumulator_hop)
