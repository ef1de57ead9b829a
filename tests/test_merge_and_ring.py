"""merge_attention, and ring semantics in one process: the ring loops of
usp.attention.ring on a ring of threads, and attention over K/V blocks, one block per
call, merged through the LSE (forward) and fed the global out and lse (backward), equal
attention over the whole sequence."""

import itertools

import pytest
import torch

from conftest import DEVICE
from thread_ring import ring_by_threads
from usp.attention.layout import LAYOUTS
from usp.bench.numerics import DTYPE_NAMES, Case, compare, reference, run_backend
from usp.kernels import AttentionShape, get_backend, merge_attention
from usp.kernels.merge import PartialResults, merge_attention_

INF = float("inf")


def _randn(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def test_merge_of_two_key_halves_is_exact():
    naive = get_backend("naive")
    q, k, v = _randn(2, 9, 3, 16, seed=1), _randn(2, 20, 3, 16, seed=2), _randn(2, 20, 3, 16, seed=3)
    out, lse = naive.forward(q, k, v)
    out_a, lse_a = naive.forward(q, k[:, :7], v[:, :7])
    out_b, lse_b = naive.forward(q, k[:, 7:], v[:, 7:])
    merged, merged_lse = merge_attention(out_a, lse_a, out_b, lse_b)  # float64: exact up to ~1e-15 rounding
    torch.testing.assert_close(merged, out, rtol=0, atol=1e-14)
    torch.testing.assert_close(merged_lse, lse, rtol=0, atol=1e-14)


def test_merge_handles_empty_sides():
    out = _randn(1, 3, 1, 4, seed=4)
    block = _randn(1, 3, 1, 4, seed=5)
    lse = torch.tensor([[[-INF, 0.5, -INF]]], device=DEVICE, dtype=torch.float64)
    block_lse = torch.tensor([[[1.5, -INF, -INF]]], device=DEVICE, dtype=torch.float64)
    out[:, 0] = 0  # a side with lse = -inf has out = 0 by contract
    out[:, 2] = 0
    block[:, 1:] = 0
    merged, merged_lse = merge_attention(out, lse, block, block_lse)
    assert not merged.isnan().any() and not merged_lse.isnan().any()
    torch.testing.assert_close(merged[:, 0], block[:, 0])  # only the block saw keys
    torch.testing.assert_close(merged[:, 1], out[:, 1])  # only the accumulator saw keys
    assert (merged[:, 2] == 0).all() and merged_lse[0, 0, 2] == -INF  # nobody saw keys
    torch.testing.assert_close(merged_lse[0, 0, :2], torch.tensor([1.5, 0.5], device=DEVICE, dtype=torch.float64))


def test_merge_keeps_a_float32_accumulator_from_half_blocks():
    out = torch.zeros(1, 2, 1, 16, device=DEVICE, dtype=torch.float32)
    lse = torch.full((1, 1, 2), -INF, device=DEVICE)
    block = _randn(1, 2, 1, 16, dtype=torch.float16, seed=6)
    merged, merged_lse = merge_attention(out, lse, block, torch.zeros(1, 1, 2, device=DEVICE))
    assert merged.dtype == torch.float32 and merged_lse.dtype == torch.float32
    torch.testing.assert_close(merged, block.float())


def test_merge_rejects_mismatched_shapes():
    out, lse = torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="block_out"):
        merge_attention(out, lse, torch.zeros(1, 4, 2, 4), lse)
    with pytest.raises(ValueError, match="block_lse"):
        merge_attention(out, lse, out, torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="lse must have shape"):
        merge_attention(out, torch.zeros(1, 4, 2), out, torch.zeros(1, 4, 2))


def _blocks_of_keys(q, k, v, cuts):
    """The naive backend's partial results over the key ranges between ``cuts``."""
    naive = get_backend("naive")
    return [naive.forward(q, k[:, a:b], v[:, a:b]) for a, b in zip(cuts, cuts[1:])]


def test_partial_results_keep_the_first_whole_block_and_merge_the_rest_in_place():
    q, k, v = _randn(1, 6, 2, 8, seed=7), _randn(1, 15, 2, 8, seed=8), _randn(1, 15, 2, 8, seed=9)
    out, lse = get_backend("naive").forward(q, k, v)
    (first_out, first_lse), *rest = _blocks_of_keys(q, k, v, [0, 4, 9, 15])
    partial = PartialResults(q.shape, torch.float64, q.device)
    partial.add(slice(None), first_out, first_lse)
    assert partial.out is first_out  # kept, not copied
    for block in rest:
        partial.add(slice(0, None), *block)
    merged, merged_lse = partial.result()
    assert merged is first_out  # merged in place
    torch.testing.assert_close(merged, out, rtol=0, atol=1e-14)  # float64: exact up to rounding
    torch.testing.assert_close(merged_lse, lse, rtol=0, atol=1e-14)


def test_partial_results_over_some_rows_start_from_nothing():
    # rows 0-2 see keys [0, 6), rows 3-5 nothing but keys [6, 15), and no block covers row 6
    q, k, v = _randn(1, 7, 2, 8, seed=10), _randn(1, 15, 2, 8, seed=11), _randn(1, 15, 2, 8, seed=12)
    naive = get_backend("naive")
    partial = PartialResults(q.shape, torch.float64, q.device)
    partial.add(slice(0, 3), *naive.forward(q[:, :3], k[:, :6], v[:, :6]))
    partial.add(slice(3, 6), *naive.forward(q[:, 3:6], k[:, 6:], v[:, 6:]))
    out, lse = partial.result()
    torch.testing.assert_close(out[:, :3], naive.forward(q[:, :3], k[:, :6], v[:, :6])[0], rtol=0, atol=0)
    torch.testing.assert_close(lse[:, :, 3:6], naive.forward(q[:, 3:6], k[:, 6:], v[:, 6:])[1], rtol=0, atol=0)
    assert (out[:, 6] == 0).all() and (lse[:, :, 6] == -INF).all()
    nothing = PartialResults((1, 2, 1, 4), torch.float32, torch.device("cpu")).result()
    assert (nothing[0] == 0).all() and (nothing[1] == -INF).all()


def test_partial_results_copy_rows_nothing_reached_yet_and_merge_the_others():
    # rows 0-2 over keys [0, 4), rows 3-5 over keys [0, 9): copied in; then rows 3-5 over [9, 15): merged
    q, k, v = _randn(1, 6, 2, 8, seed=13), _randn(1, 15, 2, 8, seed=14), _randn(1, 15, 2, 8, seed=15)
    naive = get_backend("naive")
    partial = PartialResults(q.shape, torch.float64, q.device)
    top, bottom = naive.forward(q[:, :3], k[:, :4], v[:, :4]), naive.forward(q[:, 3:], k[:, :9], v[:, :9])
    partial.add(slice(0, 3), *top)
    partial.add(slice(3, 6), *bottom)
    assert torch.equal(partial.out[:, 3:], bottom[0]) and torch.equal(partial.lse[:, :, 3:], bottom[1])
    partial.add(slice(3, 6), *naive.forward(q[:, 3:], k[:, 9:], v[:, 9:]))
    out, lse = partial.result()
    torch.testing.assert_close(out[:, :3], top[0], rtol=0, atol=0)
    expected = naive.forward(q[:, 3:], k, v)
    torch.testing.assert_close(out[:, 3:], expected[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(lse[:, :, 3:], expected[1], rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="block_out has shape"):  # a copy checks shapes as a merge does
        PartialResults(q.shape, torch.float64, q.device).add(slice(0, 4), *bottom)


def test_partial_results_in_any_row_order_equal_the_oracle():
    # the blocks of test_partial_results_copy_rows... backwards, and an empty one: merges where a copy would be wrong
    q, k, v = _randn(1, 6, 2, 8, seed=16), _randn(1, 15, 2, 8, seed=17), _randn(1, 15, 2, 8, seed=18)
    naive = get_backend("naive")
    partial = PartialResults(q.shape, torch.float64, q.device)
    partial.add(slice(3, 6), *naive.forward(q[:, 3:], k[:, 9:], v[:, 9:]))
    partial.add(slice(6, 6), torch.empty(1, 0, 2, 8, dtype=torch.float64), torch.empty(1, 2, 0, dtype=torch.float64))
    partial.add(slice(3, 6), *naive.forward(q[:, 3:], k[:, :9], v[:, :9]))
    partial.add(slice(0, 3), *naive.forward(q[:, :3], k[:, :4], v[:, :4]))
    out, lse = partial.result()
    torch.testing.assert_close(out[:, :3], naive.forward(q[:, :3], k[:, :4], v[:, :4])[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(out[:, 3:], naive.forward(q[:, 3:], k, v)[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(lse[:, :, 3:], naive.forward(q[:, 3:], k, v)[1], rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="float32 or float64"):
        PartialResults(q.shape, torch.float16, q.device)


def test_merge_in_place_needs_a_wide_accumulator():
    out, lse = torch.zeros(1, 2, 1, 4, dtype=torch.float16), torch.zeros(1, 1, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="both float32 or both float64"):
        merge_attention_(out, lse, out, lse)


def _ring_case(layout, dtype, causal, backend):
    """The interpreter's fp16 non-causal Triton rings (the slowest, adding no mask path) run in the slow step."""
    slow = backend == "triton" and dtype == torch.float16 and not causal
    return pytest.param(layout, dtype, causal, backend, marks=[pytest.mark.slow] if slow else [],
                        id=f"{layout}-{DTYPE_NAMES[dtype]}-{'causal' if causal else 'full'}-{backend}")


@pytest.mark.parametrize("layout,dtype,causal,backend", [
    _ring_case(*c) for c in itertools.product(LAYOUTS, (torch.float32, torch.float16), (False, True),
                                              ("triton", "torch", "naive"))])
def test_the_ring_schedule_equals_full_attention(layout, dtype, causal, backend):
    """The ring loops themselves, on 3 ranks, against the float64 oracle (tolerance rule of
    usp.bench.numerics: baseline plain torch on the whole sequence in the input dtype)."""
    batch, seqlen, heads, kv_heads, head_dim = 1, 48, 4, 2, 32
    q = _randn(batch, seqlen, heads, head_dim, dtype=dtype, seed=7)
    k = _randn(batch, seqlen, kv_heads, head_dim, dtype=dtype, seed=8)
    v = _randn(batch, seqlen, kv_heads, head_dim, dtype=dtype, seed=9)
    dout = _randn(batch, seqlen, heads, head_dim, dtype=dtype, seed=10)
    case = Case(backend, dtype, AttentionShape(batch, seqlen, seqlen, heads, kv_heads, head_dim), causal)
    ring = ring_by_threads(backend, q, k, v, dout, causal, 3, layout)
    baseline = run_backend("naive", q, k, v, dout, causal)
    errors, tolerances, failures = compare(case, ring, reference(q, k, v, dout, causal), baseline)
    assert not failures, failures


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ring_over_key_chunks_with_more_keys_than_queries(backend):
    """Non-causal, Sq != Sk: split only K/V into uneven chunks."""
    q = _randn(2, 20, 2, 64, dtype=torch.float32, seed=11)
    k = _randn(2, 70, 1, 64, dtype=torch.float32, seed=12)
    v = _randn(2, 70, 1, 64, dtype=torch.float32, seed=13)
    dout = _randn(2, 20, 2, 64, dtype=torch.float32, seed=14)
    be = get_backend(backend)
    out = torch.zeros(q.shape, device=DEVICE)
    lse = torch.full((2, 2, 20), -INF, device=DEVICE)
    bounds = [0, 17, 33, 70]
    for lo, hi in zip(bounds, bounds[1:]):
        out, lse = merge_attention(out, lse, *be.forward(q, k[:, lo:hi], v[:, lo:hi], causal=False, softmax_scale=None))
    grads = [be.backward(dout, q, k[:, lo:hi], v[:, lo:hi], out, lse, causal=False, softmax_scale=None)
             for lo, hi in zip(bounds, bounds[1:])]
    ring = dict(out=out, lse=lse, dq=sum(g[0] for g in grads), dk=torch.cat([g[1] for g in grads], 1),
                dv=torch.cat([g[2] for g in grads], 1))
    case = Case(backend, torch.float32, AttentionShape(2, 20, 70, 2, 1, 64), False)
    baseline = run_backend("naive", q, k, v, dout, False)
    _, _, failures = compare(case, ring, reference(q, k, v, dout, False), baseline)
    assert not failures, failures
