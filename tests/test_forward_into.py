"""The Triton forward that merges into a running result (``flash_attn_forward_into``), and
the ring's use of it: a block computed into the accumulator equals the float64 oracle over
the union of the keys, within the rule of ``usp.bench.numerics`` (the naive backend in the
input dtype over all the keys is the baseline)."""

import pytest
import torch

from conftest import DEVICE
from thread_ring import ring_by_threads, triton_through_into
from usp.attention import naive_attention
from usp.bench.numerics import max_error, tolerance
from usp.kernels import get_backend
from usp.kernels.flash_fwd import flash_attn_forward, flash_attn_forward_into
from usp.kernels.merge import PartialResults, merge_attention_

INF = float("inf")


def _randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def _causal(sq: int, sk: int) -> torch.Tensor:
    """Bottom-right causal: query i sees keys j <= i + sk - sq (rows below 0 see nothing)."""
    return torch.arange(sk, device=DEVICE)[None, :] <= torch.arange(sq, device=DEVICE)[:, None] + sk - sq


# (first block causal, second block causal): the accumulator's first rows see nothing from a
# causal first block (sk < sq), or the second block adds nothing to them
SPLITS = [(False, False), (True, False), (False, True)]


# bf16 only on a GPU: the interpreter computes bf16 products wrongly
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first_causal, second_causal", SPLITS, ids=["full-full", "causal-full", "full-causal"])
def test_forward_into_equals_attention_over_both_blocks(dtype, first_causal, second_causal):
    """Rows 8..47 of a 56-row accumulator (a view, as a zigzag step's half), 4 query and 2
    K/V heads of 16; keys 30 + 21 in two blocks."""
    sq, sk1, sk2, heads, kv_heads, d = 40, 30, 21, 4, 2, 16
    q = _randn(1, sq, heads, d, dtype=dtype, seed=1)
    k, v = (_randn(1, sk1 + sk2, kv_heads, d, dtype=dtype, seed=s) for s in (2, 3))
    first = flash_attn_forward(q, k[:, :sk1], v[:, :sk1], causal=first_causal)
    out = torch.zeros(1, 56, heads, d, device=DEVICE)
    lse = torch.full((1, heads, 56), -INF, device=DEVICE)
    out[:, 8:48], lse[:, :, 8:48] = first[0].float(), first[1]
    flash_attn_forward_into(q, k[:, sk1:], v[:, sk1:], out[:, 8:48], lse[:, :, 8:48], causal=second_causal)

    mask = torch.cat([_causal(sq, sk1) if first_causal else torch.ones(sq, sk1, dtype=torch.bool, device=DEVICE),
                      _causal(sq, sk2) if second_causal else torch.ones(sq, sk2, dtype=torch.bool, device=DEVICE)], 1)
    expected_out, expected_lse = naive_attention(*(x.double() for x in (q, k, v)), mask=mask)
    baseline_out, baseline_lse = naive_attention(q, k, v, mask=mask)  # the input dtype, all keys at once
    for name, got, want, baseline in (("out", out[:, 8:48], expected_out, baseline_out),
                                      ("lse", lse[:, :, 8:48], expected_lse, baseline_lse)):
        allowed = tolerance(name, dtype, d, want, max_error(baseline, want))
        assert max_error(got, want) <= allowed, (name, max_error(got, want), allowed)
    assert (out[:, :8] == 0).all() and (out[:, 48:] == 0).all() and (lse[:, :, :8] == -INF).all()


def test_forward_into_keeps_rows_that_see_nothing_empty():
    """A causal block with more queries than keys adds nothing to its first rows; rows that
    held nothing before and get nothing stay out 0, lse -inf (no NaN)."""
    q, k, v = (_randn(1, n, 1, 16, dtype=torch.float32, seed=s) for n, s in ((24, 4), (8, 5), (8, 6)))
    out = torch.zeros(1, 24, 1, 16, device=DEVICE)
    lse = torch.full((1, 1, 24), -INF, device=DEVICE)
    flash_attn_forward_into(q, k, v, out, lse, causal=True)
    assert (out[:, :16] == 0).all() and (lse[..., :16] == -INF).all()
    expected_out, expected_lse = naive_attention(*(x.double() for x in (q, k, v)), mask=_causal(24, 8))
    torch.testing.assert_close(out[:, 16:].double(), expected_out[:, 16:], rtol=0, atol=1e-5)
    torch.testing.assert_close(lse[..., 16:].double(), expected_lse[..., 16:], rtol=0, atol=1e-5)


def test_forward_into_keeps_a_nan_where_merge_attention_keeps_it():
    """A NaN query row gives NaN out and lse, as merging its NaN block would; other rows exact."""
    q, k, v = (_randn(1, 16, 1, 16, dtype=torch.float32, seed=s) for s in (12, 13, 14))
    q[0, 3] = float("nan")
    out, lse = (x.float().contiguous() for x in flash_attn_forward(q, k[:, :8], v[:, :8]))
    flash_attn_forward_into(q, k[:, 8:], v[:, 8:], out, lse)
    assert out[0, 3].isnan().all() and lse[0, 0, 3].isnan()
    expected_out, _ = naive_attention(*(x.double() for x in (q, k, v)))
    rows = [i for i in range(16) if i != 3]
    torch.testing.assert_close(out[0, rows].double(), expected_out[0, rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_forward_into_equals_merge_attention_of_the_blocks_result(dtype):
    """Batch 2, head dim 24 (padded in the kernel), GQA, a transposed accumulator viewed at
    an offset, rows before it held nothing (-inf) or NaN: the same as merging the block's
    own float32 result with merge_attention_ (fp16: the block's out rounded to fp16 there)."""
    q = _randn(2, 20, 4, 24, dtype=dtype, seed=15)
    k, v = (_randn(2, 13, 2, 24, dtype=dtype, seed=s) for s in (16, 17))
    start_out = _randn(2, 4, 30, 24, dtype=torch.float32, seed=18).transpose(1, 2)  # [B, S, H, D], not contiguous
    start_lse = _randn(2, 4, 30, dtype=torch.float32, seed=19)
    start_lse[:, :, 5:9], start_out[:, 5:9] = -INF, 0.0  # held nothing
    start_lse[0, 1, 12], start_out[0, 12, 1] = float("nan"), float("nan")  # a NaN already there
    out, lse = start_out.clone(), start_lse.clone()
    flash_attn_forward_into(q, k, v, out[:, 4:24], lse[:, :, 4:24], causal=True)
    expected_out, expected_lse = start_out.clone(), start_lse.clone()
    merge_attention_(expected_out[:, 4:24], expected_lse[:, :, 4:24], *flash_attn_forward(q, k, v, causal=True))
    atol = 1e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out, expected_out, rtol=0, atol=atol, equal_nan=True)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=1e-5, equal_nan=True)
    assert lse[0, 1, 12].isnan() and out[0, 12, 1].isnan().all()


def test_forward_into_refuses_accumulators_it_cannot_merge_into():
    q = _randn(1, 16, 2, 16, dtype=torch.float32, seed=7)
    out, lse = torch.zeros(1, 16, 2, 16, device=DEVICE), torch.zeros(1, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="accumulate in float32"):
        flash_attn_forward_into(q, q, q, out.half(), lse)
    with pytest.raises(ValueError, match="out must have the shape of q"):
        flash_attn_forward_into(q, q, q, out[:, :8], lse)
    with pytest.raises(ValueError, match="unit stride"):
        flash_attn_forward_into(q, q, q, out, torch.zeros(1, 16, 2, device=DEVICE).transpose(1, 2))
    with pytest.raises(ValueError, match="must not have elements that overlap"):
        flash_attn_forward_into(q, q, q, torch.zeros(1, 1, 2, 16, device=DEVICE).expand(1, 16, 2, 16), lse)
    with pytest.raises(ValueError, match="must not share memory"):
        flash_attn_forward_into(q, q, q, q, lse)
    with pytest.raises(ValueError, match="slice of consecutive rows"):
        PartialResults(q.shape, torch.float32, DEVICE).attend(get_backend("triton"), slice(0, 16, 2), q, q, q)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_the_ring_merges_each_step_inside_the_kernel(layout):
    """The triton backend's forward_into takes every step of a causal ring of 3 that
    computes something, the first into a fresh accumulator (zigzag: 3 on each rank;
    contiguous: the diagonal and the earlier sources' blocks, 1 + 2 + 3): the ring's out
    and lse equal the oracle, with no separate merge and no forward."""
    backend, calls = triton_through_into("forward")
    q, k, v, dout = (_randn(1, 48, 2, 16, dtype=torch.float32, seed=s) for s in (8, 9, 10, 11))
    ring = ring_by_threads(backend, q, k, v, dout, True, 3, layout)
    expected_out, expected_lse = naive_attention(*(x.double() for x in (q, k, v)), causal=True)
    torch.testing.assert_close(ring["out"].double(), expected_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(ring["lse"].double(), expected_lse, rtol=0, atol=1e-5)
    assert len(calls) == (3 * 3 if layout == "zigzag" else 1 + 2 + 3)


def test_forward_into_never_reads_the_out_of_rows_that_hold_nothing():
    """Rows at lse = -inf may hold any out, NaN included (uninitialised memory): the
    result is the block's own, bit for bit what flash_attn_forward gives in float32."""
    q, k, v = (_randn(2, 24, 2, 24, dtype=torch.float32, seed=s) for s in (20, 21, 22))
    out = torch.full((2, 24, 2, 24), float("nan"), device=DEVICE)
    lse = torch.full((2, 2, 24), -INF, device=DEVICE)
    flash_attn_forward_into(q, k, v, out, lse, causal=True)
    expected_out, expected_lse = flash_attn_forward(q, k, v, causal=True)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)


def test_the_first_block_reaches_the_accumulator_unrounded():
    """With forward_into the first fp16 block is written in float32 into a fresh accumulator
    (not rounded to fp16 and widened again), within the test rule of the float64 oracle;
    a first block over some rows leaves the others out 0, lse -inf."""
    q, k, v = (_randn(1, 16, 2, 16, dtype=torch.float16, seed=s) for s in (23, 24, 25))
    partial = PartialResults(q.shape, torch.float32, DEVICE)
    partial.attend(get_backend("triton"), slice(0, 16), q, k, v)
    out, lse = partial.result()
    assert (out != out.half().float()).any()  # fp16 would have rounded these
    expected_out, _ = naive_attention(*(x.double() for x in (q, k, v)))
    baseline_out, _ = naive_attention(q, k, v)
    assert max_error(out, expected_out) <= tolerance("out", torch.float16, 16, expected_out,
                                                     max_error(baseline_out, expected_out))
    some = PartialResults(q.shape, torch.float32, DEVICE)
    some.attend(get_backend("triton"), slice(4, 12), q[:, 4:12], k, v)
    out, lse = some.result()
    assert (out[:, :4] == 0).all() and (out[:, 12:] == 0).all() and (lse[:, :, :4] == -INF).all()
    assert torch.equal(out[:, 4:12], partial.out[:, 4:12]) and torch.equal(lse[:, :, 4:12], partial.lse[:, :, 4:12])
