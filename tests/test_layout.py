"""The sequence layouts and the ring's per-step block plan, checked against brute force."""

import itertools

import pytest
import torch

from usp.attention.layout import LAYOUTS, Block, check_global_seqlen, ring_block, ring_positions, shard_positions
from usp.comm.heads import (head_shares, heads_per_rank, heads_problem, kv_copies, kv_head_shares,
                            kv_heads_per_rank, replicate_kv_heads)
from usp.comm.mesh import mesh_coordinates, mesh_position, mesh_shapes


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
    """Which (query, key) pairs see each other, from their global positions."""
    if not causal:
        return torch.ones(len(q_pos), len(k_pos), dtype=torch.bool)
    return k_pos[None, :] <= q_pos[:, None]


def _covered(block: Block | None, n_q: int, n_k: int) -> torch.Tensor:
    """The pairs a block computes, with the causal flag read as a lower triangle of the block."""
    covered = torch.zeros(n_q, n_k, dtype=torch.bool)
    if block is None:
        return covered
    rows = torch.arange(n_q)[block.q_rows]
    keys = torch.arange(n_k)[block.k_rows]
    sub = torch.ones(len(rows), len(keys), dtype=torch.bool)
    if block.causal:
        sub = torch.tril(sub, diagonal=len(keys) - len(rows))  # bottom-right, as the backends align it
    covered[rows[:, None], keys[None, :]] = sub
    return covered


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ring_degree", [1, 2, 3, 4, 8])
def test_ring_block_computes_exactly_the_visible_pairs(layout, causal, ring_degree):
    seqlen = 2 * ring_degree * 3
    for rank, source in itertools.product(range(ring_degree), repeat=2):
        q_pos = ring_positions(seqlen, ring_degree, rank, layout)
        k_pos = ring_positions(seqlen, ring_degree, source, layout)
        block = ring_block(rank, source, len(q_pos), layout, causal)
        expected = _visible(q_pos, k_pos, causal)
        assert torch.equal(_covered(block, len(q_pos), len(k_pos)), expected), (rank, source)
        if block is not None:  # no step is scheduled that computes nothing
            assert expected.any()


def _causal_work(layout: str, ring_degree: int, seqlen: int) -> list[int]:
    """Visible (query, key) pairs of each ring rank's queries under causal attention."""
    return [int(_visible(ring_positions(seqlen, ring_degree, rank, layout), torch.arange(seqlen), True).sum())
            for rank in range(ring_degree)]


def test_zigzag_and_stripe_balance_causal_work():
    assert len(set(_causal_work("zigzag", 4, 64))) == 1
    # stripe: rank i's queries sit i places after rank 0's, so each sees i more pairs per query row
    assert _causal_work("stripe", 4, 64) == [496 + 16 * rank for rank in range(4)]  # 1.03x the mean at most
    contiguous = _causal_work("contiguous", 4, 64)
    assert max(contiguous) / (sum(contiguous) / 4) > 1.7  # the imbalance the other two remove


def test_stripe_positions_deal_tokens_round_robin():
    assert ring_positions(8, 2, 0, "stripe").tolist() == [0, 2, 4, 6]
    assert ring_positions(8, 2, 1, "stripe").tolist() == [1, 3, 5, 7]
    assert shard_positions(8, 2, 2, 1, 1, "stripe").tolist() == [5, 7]  # Ulysses splits a ring rank's part


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ulysses_degree, ring_degree", [(1, 1), (1, 4), (4, 1), (2, 2), (3, 2), (2, 4)])
def test_shards_partition_the_sequence(layout, ulysses_degree, ring_degree):
    seqlen = 2 * ulysses_degree * ring_degree * 2
    held = torch.cat([shard_positions(seqlen, ulysses_degree, ring_degree, u, r, layout)
                      for r in range(ring_degree) for u in range(ulysses_degree)])
    assert torch.equal(held.sort().values, torch.arange(seqlen))


def test_zigzag_positions_follow_the_paper():
    # 2 ring ranks: 4 chunks of 3; ring rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert ring_positions(12, 2, 0, "zigzag").tolist() == [0, 1, 2, 9, 10, 11]
    assert ring_positions(12, 2, 1, "zigzag").tolist() == [3, 4, 5, 6, 7, 8]
    # Ulysses ranks split a ring rank's positions contiguously.
    assert shard_positions(12, 2, 2, 1, 0, "zigzag").tolist() == [9, 10, 11]


def test_sequence_length_errors_name_the_requirement():
    with pytest.raises(ValueError, match="2 x ring_degree = 4"):
        check_global_seqlen(6, 1, 2, "zigzag")
    with pytest.raises(ValueError, match="ring_degree = 4"):
        check_global_seqlen(6, 1, 4, "contiguous")
    with pytest.raises(ValueError, match="ulysses_degree x ring_degree = 6"):
        check_global_seqlen(8, 3, 2, "contiguous")
    with pytest.raises(ValueError, match="ring_degree = 3 for the stripe layout"):
        check_global_seqlen(8, 1, 3, "stripe")
    with pytest.raises(ValueError, match="layout must be one of"):
        check_global_seqlen(8, 1, 1, "striped")
    with pytest.raises(TypeError, match="must be an int, got 8.0"):
        check_global_seqlen(8.0, 1, 1, "zigzag")
    with pytest.raises(ValueError, match="must be positive, got -4"):
        check_global_seqlen(-4, 1, 1, "contiguous")


@pytest.mark.parametrize("placement", ["ulysses_inner", "ring_inner"])
def test_mesh_coordinates_round_trip(placement):
    u, r, world = 2, 4, 16
    seen = set()
    for position in range(world):
        dp, ul, ri = mesh_coordinates(position, u, r, placement)
        assert mesh_position(dp, ul, ri, u, r, placement) == position
        seen.add((dp, ul, ri))
    assert len(seen) == world
    inner = [mesh_coordinates(p, u, r, placement) for p in range(u if placement == "ulysses_inner" else r)]
    varying = 1 if placement == "ulysses_inner" else 2
    assert [c[varying] for c in inner] == list(range(len(inner)))  # consecutive ranks vary the inner axis


def test_mesh_shapes_and_the_heads_they_allow():
    assert mesh_shapes(8) == [(1, 8), (2, 4), (4, 2), (8, 1)]
    assert mesh_shapes(6) == [(1, 6), (2, 3), (3, 2), (6, 1)]
    # 6 query heads: u = 8 would leave ranks without one; uneven shares (u = 4) are fine
    assert mesh_shapes(8, heads=6, kv_heads=3) == [(1, 8), (2, 4), (4, 2)]
    assert mesh_shapes(8, heads=32, kv_heads=8) == mesh_shapes(8)


def _gqa_is_kept(heads: int, kv_heads: int, u: int, copies: int) -> bool:
    """Brute force: with each K/V head sent ``copies`` times and split in proportion to
    the query heads, does rank j's i-th local query head, using local K/V head
    ``i // (h_j / k_j)`` as the kernels do, get the K/V head GQA gives that query head?"""
    repeated = [head // copies for head in range(kv_heads * copies)]  # original K/V head of each sent head
    first_q = first_kv = 0
    for share in head_shares(heads, u):
        kv_share, rest = divmod(share * kv_heads * copies, heads)
        if rest or kv_share == 0 or share % kv_share:
            return False
        for i in range(share):
            if repeated[first_kv + i // (share // kv_share)] != (first_q + i) // (heads // kv_heads):
                return False
        first_q, first_kv = first_q + share, first_kv + kv_share
    return True


def test_the_head_split_rule():
    assert head_shares(8, 4) == [2, 2, 2, 2] and head_shares(6, 4) == [2, 2, 1, 1] and head_shares(7, 3) == [3, 2, 2]
    assert heads_problem(8, 2, 4) is None and heads_problem(6, 6, 4) is None and heads_problem(12, 3, 4) is None
    assert heads_problem(2, 2, 4) == ("the heads of q (2) must be at least the Ulysses degree (4): every rank takes "
                                      "one or more")
    assert heads_problem(6, 4, 2) == "the heads of q (6) must be a multiple of the heads of k and v (4)"
    assert (kv_copies(8, 2, 4), kv_head_shares(8, 2, 4)) == (2, [1, 1, 1, 1])  # each K/V head twice
    assert (kv_copies(8, 8, 4), kv_head_shares(8, 8, 4)) == (1, [2, 2, 2, 2])
    assert (kv_copies(12, 3, 2), kv_head_shares(12, 3, 2)) == (2, [3, 3])  # 6 query heads per rank, 3 K/V
    assert (kv_copies(6, 2, 4), kv_head_shares(6, 2, 4)) == (3, [2, 2, 1, 1])  # uneven: one copy per query head
    assert (heads_per_rank(6, 4), kv_heads_per_rank(6, 2, 4)) == (2, 2)
    for heads in range(1, 17):
        for kv_heads in (k for k in range(1, heads + 1) if heads % k == 0):
            group = heads // kv_heads
            for u in range(1, heads + 1):
                copies = kv_copies(heads, kv_heads, u)
                assert _gqa_is_kept(heads, kv_heads, u, copies), (heads, kv_heads, u)
                assert not any(_gqa_is_kept(heads, kv_heads, u, c) for c in range(1, copies) if group % c == 0)
                assert kv_head_shares(heads, kv_heads, u) == [h * kv_heads * copies // heads
                                                              for h in head_shares(heads, u)]
    # K/V heads [a, b] over 4 ranks become [a, a, b, b]: rank j gets the head its query heads 2j, 2j+1 use
    kv = torch.arange(2.0).reshape(1, 1, 2, 1)
    assert replicate_kv_heads(kv, 8, 4).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert replicate_kv_heads(kv, 8, 2) is kv
    with pytest.raises(ValueError, match="at least the Ulysses degree"):
        replicate_kv_heads(torch.zeros(1, 1, 3, 1), 3, 4)
