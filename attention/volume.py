"""What one rank sends in one ring, Ulysses or USP attention call: the single formula
the tests check the counted traffic against, the emulator prices and the cost model
reports.

A ``u x r`` mesh (``N = u r``) on a global sequence of ``S`` tokens: each rank starts
with ``S/N`` tokens of q (``Hq`` heads) and of K/V (``Hkv x c`` heads after the
repetition of ``usp.comm.heads``); Ulysses rank ``j`` takes ``h_j`` query and ``k_j``
K/V heads (``Hq/u`` and ``Hkv c/u`` when ``u`` divides them evenly).

- Ulysses (``u > 1``): four all-to-alls per pass. Forward, q, k and v go to head shards
  (rank ``j`` keeps ``h_j`` or ``k_j`` of its heads and sends the rest) and the output
  comes back (it sends its ``h_j`` heads of the other ``u - 1`` pieces); backward, dout
  goes to head shards and dq, dk, dv come back. With even shares each sends
  ``(u - 1)/u`` of its tensor.
- Ring (``r > 1``), on ``S/r`` tokens and ``k_j`` K/V heads after the all-to-all:
  forward, K and V make ``r - 1`` hops; backward, K and V make them again and the dK/dV
  accumulators (in ``promote(dtype, float32)``) make ``r`` hops, the last one home.

With uneven shares the ranks send different amounts: the figures are the busiest
rank's (the most bytes per call).
"""

from __future__ import annotations

from dataclasses import dataclass

from usp.comm.heads import head_shares, kv_copies, kv_head_shares


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
                     ring_degree: int, element_size: int, ulysses_rank: int | None = None) -> CallVolume:
    """Per rank, for a global ``seqlen`` (divisible by ``u x r``) in a dtype of
    ``element_size`` bytes; accumulators take ``max(element_size, 4)``. ``ulysses_rank``:
    the rank's index in its Ulysses group (None: the busiest rank's figures)."""
    u, r = ulysses_degree, ring_degree
    if seqlen % (u * r):
        raise ValueError(f"the sequence length {seqlen} must be divisible by u x r = {u * r}")
    head_bytes = batch * seqlen // (u * r) * head_dim * element_size  # one head of one rank's tokens
    kv_sent = kv_heads * kv_copies(heads, kv_heads, u)
    a2a_count = 4 if u > 1 else 0
    accumulator_hops = r if r > 1 else 0

    def rank_volume(q_heads: int, k_heads: int) -> CallVolume:
        forward_a2a = (heads - q_heads) + 2 * (kv_sent - k_heads) + q_heads * (u - 1)  # q, k, v in; out back
        backward_a2a = (heads - q_heads) + q_heads * (u - 1) + 2 * k_heads * (u - 1)  # dout in; dq, dk, dv back
        block = batch * (seqlen // r) * k_heads * head_dim  # elements of K (or V) per ring rank
        kv_hop, accumulator_hop = 2 * block * element_size, 2 * block * max(element_size, 4)
        forward = PassVolume(2 * (r - 1), (r - 1) * kv_hop, a2a_count, forward_a2a * head_bytes if u > 1 else 0)
        backward = PassVolume(2 * (r - 1) + 2 * accumulator_hops,
                              (r - 1) * kv_hop + accumulator_hops * accumulator_hop, a2a_count,
                              backward_a2a * head_bytes if u > 1 else 0)
        return CallVolume(forward, backward, kv_hop, accumulator_hop)

    ranks = [rank_volume(h, k) for h, k in zip(head_shares(heads, u), kv_head_shares(heads, kv_heads, u))]
    if ulysses_rank is not None:
        return ranks[ulysses_rank]
    return max(ranks, key=lambda volume: (volume.bytes, volume.kv_hop_bytes))
