"""Sliding windows and packed documents (varlen) on every backend against the float64
oracle, whose mask is built independently from document ids and distances to each
document's end (``usp.attention.naive.document_mask``). The tolerance rule is the one of
test_numerics (``usp.bench.numerics.TOLERANCE_RULE``)."""

import itertools
import zlib

import pytest
import torch

from conftest import DEVICE
from errors import error_of
from usp.attention.naive import document_mask
from usp.bench.numerics import Case, run_case
from usp.kernels import AttentionShape, flash_attn_func, flash_attn_varlen_func
from usp.kernels.flash_bwd import _run_backward
from usp.kernels.flash_fwd import _run_forward
from usp.kernels.triton_common import MaskSpec

# (left, right) windows: a left edge, a right edge, both, the diagonal alone, a wide one.
WINDOWS = [(3, -1), (-1, 2), (5, 0), (0, 0), (20, 7)]
# (batch, Sq, Sk, heads, kv heads, head dim): square, Sq < Sk, Sq > Sk (rows that see nothing).
WINDOW_SHAPES = [(2, 40, 40, 2, 1, 16), (1, 17, 40, 2, 1, 32), (1, 40, 23, 2, 2, 16)]
# Documents as (query length, key length): lengths 1 and 0 (an empty document, a repeated
# offset), shorter and longer than the interpreter's 16-row tile; query and key lengths
# that differ; one document; queries without keys; many small documents.
DOCUMENTS = {
    "mixed": ((5, 5), (0, 0), (1, 1), (20, 20), (3, 3)),
    "uneven": ((7, 9), (33, 17), (2, 2)),
    "one": ((40, 40),),
    "keyless": ((3, 0), (4, 6)),
    "many": tuple((n, n) for n in (4, 0, 9, 1, 7, 2, 0, 5, 8, 3, 6, 1)),
}


def _case(backend, dtype, causal, window=(-1, -1), documents=None, shape=None):
    if documents is not None:
        totals = [sum(lengths) for lengths in zip(*DOCUMENTS[documents])]
        shape = (1, *totals, 4, 2, 16)
        documents = DOCUMENTS[documents]
    return Case(backend, dtype, AttentionShape(*shape), causal, window_size=window, documents=documents)


def _run(case):
    return run_case(case, device=DEVICE, seed=zlib.crc32(case.label.encode()))


DEFAULT_CASES = (
    [_case("triton", torch.float32, causal, w, shape=WINDOW_SHAPES[0])
     for causal, w in ((False, (3, -1)), (True, (5, 0)), (False, (20, 7)))]
    + [_case("triton", torch.float16, True, (5, 0), shape=WINDOW_SHAPES[2])]
    + [_case("triton", torch.float32, causal, w, docs) for docs, causal, w in (
        ("mixed", True, (-1, -1)), ("uneven", False, (4, -1)), ("keyless", True, (2, 3)))]
    + [_case("triton", torch.float16, True, (3, 0), "mixed")]
    + [_case(backend, dtype, True, w, docs) for backend, dtype in (("torch", torch.float32), ("naive", torch.float64))
       for docs, w in (("mixed", (4, 0)), ("keyless", (2, 5)))]
    + [_case(backend, dtype, causal, w, shape=WINDOW_SHAPES[2]) for backend, dtype in
       (("torch", torch.float32), ("naive", torch.float64)) for causal, w in ((True, (5, 0)), (False, (0, 0)))]
)
SLOW_CASES = (
    [_case("triton", torch.float32, causal, w, docs)
     for docs, causal, w in itertools.product(DOCUMENTS, (False, True), [(-1, -1), *WINDOWS])]
    + [_case(backend, dtype, causal, w, docs)
       for backend, dtype in (("triton", torch.float16), ("torch", torch.float32), ("naive", torch.float64))
       for docs, causal, w in itertools.product(DOCUMENTS, (False, True), [(-1, -1), (5, 0), (20, 7)])]
    + [_case(backend, torch.float32, causal, w, shape=s) for backend in ("triton", "torch")
       for s, causal, w in itertools.product(WINDOW_SHAPES, (False, True), WINDOWS)]
)
SLOW_CASES = [c for c in SLOW_CASES if c not in DEFAULT_CASES]


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_window_and_documents_match_the_oracle(case):
    result = _run(case)
    assert result.passed, f"{case.label}: {result.failures}"


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_every_window_and_document_mix(case):
    result = _run(case)
    assert result.passed, f"{case.label}: {result.failures}"


GPU_CASES = ([_case("triton", torch.bfloat16, causal, w, docs) for docs in DOCUMENTS
              for causal, w in ((True, (-1, -1)), (True, (5, 0)), (False, (20, 7)))]
             + [_case("triton", torch.bfloat16, causal, w, shape=s) for s in WINDOW_SHAPES
                for causal, w in ((True, (5, 0)), (False, (3, -1)))])


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_bf16_windows_and_documents_on_gpu(case):
    """bf16, which the interpreter computes wrongly: compiled kernels only."""
    result = _run(case)
    assert result.passed, f"{case.label}: {result.failures}"


def test_document_mask_by_hand():
    """Documents [0, 3) and [3, 5) of queries; keys [0, 4) and [4, 5): bottom-right per document."""
    cu_q, cu_k = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([0, 4, 5], dtype=torch.int32)
    expected = torch.tensor([[1, 1, 0, 0, 0],   # query 0 of doc 0 (3 queries, 4 keys): keys 0-1
                             [1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0],   # query 0 of doc 1 (2 queries, 1 key): no key
                             [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(document_mask(cu_q, cu_k, causal=True), expected)
    windowed = torch.tensor([[1, 1, 0, 0, 0],  # a left window of 1: the aligned key and the one before
                             [0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0],
                             [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(document_mask(cu_q, cu_k, causal=True, window_size=(1, -1)), windowed)


# --- the kernels skip blocks: count the key blocks each forward program visits ---------

def _visits(q, k, v, mask: MaskSpec, block=16):
    """Per forward program (query tile), the key blocks it visited; per key tile of the
    dK/dV kernel, the query blocks it visited over the heads of its group."""
    lse = (torch.empty(q.shape[1], q.shape[0]) if mask.varlen else torch.empty(q.shape[0], q.shape[2], q.shape[1]))
    rows = mask.max_seqlen_q if mask.varlen else q.shape[1]
    keys = mask.max_seqlen_k if mask.varlen else k.shape[1]
    programs = mask.documents if mask.varlen else q.shape[0]
    fwd = torch.zeros(programs * q.shape[-2], -(-rows // block), dtype=torch.int32)
    shape = AttentionShape(1, q.shape[-3], k.shape[-3], q.shape[-2], k.shape[-2], q.shape[-1])
    out, lse = _run_forward(q, k, v, torch.empty_like(q), lse, shape, mask, None, visits=fwd)
    bwd = torch.zeros(programs * k.shape[-2], -(-keys // block), dtype=torch.int32)
    _run_backward(torch.ones_like(q), q, k, v, out, lse, shape, mask, None, visits=bwd)
    return fwd, bwd


def test_a_window_visits_only_the_blocks_it_sees():
    """128 tokens in 16-row tiles, causal with a left window of 20: each query tile
    visits the blocks of [start - 20, start + 15] (2 or 3 blocks, not up to 8), and
    each key tile the query blocks of [start, start + 15 + 20]."""
    q = torch.randn(1, 128, 1, 16)
    fwd, bwd = _visits(q, q, q, MaskSpec(left=20, right=0))
    assert fwd[0].tolist() == [1, 2, 3, 3, 3, 3, 3, 3]
    assert bwd[0].tolist() == [3, 3, 3, 3, 3, 3, 2, 1]
    full, full_bwd = _visits(q, q, q, MaskSpec(right=0))  # causal alone: the whole prefix
    assert full[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert full_bwd[0].tolist() == [8, 7, 6, 5, 4, 3, 2, 1]  # key tile n: query blocks n to 7


def test_documents_visit_only_their_own_blocks():
    """Documents of 48, 16 and 64 tokens: a query tile visits its document's blocks up
    to the diagonal, never a block of another document."""
    cu = torch.tensor([0, 48, 64, 128], dtype=torch.int32)
    q = torch.randn(128, 1, 16)
    fwd, bwd = _visits(q, q, q, MaskSpec(right=0, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64,
                                         max_seqlen_k=64))
    # rows: documents; columns: query tiles up to the longest document (0: never launched work)
    assert fwd.tolist() == [[1, 2, 3, 0], [1, 0, 0, 0], [1, 2, 3, 4]]
    assert bwd.tolist() == [[3, 2, 1, 0], [1, 0, 0, 0], [4, 3, 2, 1]]


# --- the public functions ------------------------------------------------------------------

def _packed(lengths, heads=4, kv_heads=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, 16, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(total, kv_heads, 16, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(total, kv_heads, 16, generator=g, dtype=dtype).requires_grad_()
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("backend", ["triton", "torch", "naive"])
def test_flash_attn_varlen_func_autograd_matches_the_oracle(backend):
    lengths = (9, 0, 20, 1)
    q, k, v, cu = _packed(lengths, dtype=torch.float64 if backend == "naive" else torch.float32)
    out, lse, probs = flash_attn_varlen_func(q, k, v, cu, cu, 20, 20, 0.0, None, True, (6, 0),
                                             return_attn_probs=True, backend=backend)
    assert probs is None and lse.shape == (4, 30)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    mask = document_mask(cu, cu, causal=True, window_size=(6, 0))
    from usp.attention import naive_attention
    ref, _ = naive_attention(*(x[None] for x in leaves), mask=mask)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double()[None])
    tol = 1e-12 if backend == "naive" else 1e-5
    torch.testing.assert_close(out.double(), ref[0], atol=tol, rtol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)


def test_flash_attn_func_takes_a_window():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 24, 2, 16, generator=g) for _ in range(3))
    out = flash_attn_func(q, k, v, 0.0, None, False, (4, 1))
    from usp.attention import naive_attention
    ref, _ = naive_attention(q, k, v, window_size=(4, 1))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


BAD_OFFSETS = [
    (torch.tensor([0, 5, 3, 10], dtype=torch.int32), "must be non-decreasing, got 5 then 3 at index 1"),
    (torch.tensor([1, 5, 10], dtype=torch.int32), "must start at 0 and end at the packed length 10"),
    (torch.tensor([0, 5, 9], dtype=torch.int32), "must start at 0 and end at the packed length 10"),
    (torch.tensor([0, 5, 10], dtype=torch.int64), "must be int32"),
    (torch.tensor([[0, 10]], dtype=torch.int32), "must be 1-D"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("offsets, message", BAD_OFFSETS, ids=[m for _, m in BAD_OFFSETS])
def test_bad_offsets_are_refused(backend, offsets, message):
    q, k, v, cu = _packed((5, 5))
    with pytest.raises((ValueError, TypeError), match=message):
        flash_attn_varlen_func(q, k, v, offsets, cu, 10, 10, backend=backend)


def test_bad_varlen_arguments_are_refused():
    q, k, v, cu = _packed((5, 5))
    three = torch.tensor([0, 2, 5, 10], dtype=torch.int32)
    assert "shorter than the longest document of cu_seqlens_q (5)" in error_of(
        lambda: flash_attn_varlen_func(q, k, v, cu, cu, 4, 10, backend="triton"))
    assert "cu_seqlens_q holds 3 documents but cu_seqlens_k 2" in error_of(
        lambda: flash_attn_varlen_func(q, k, v, three, cu, 10, 10, backend="triton"))
    assert "q must have 3 dims [total_tokens, heads, head_dim] (packed)" in error_of(
        lambda: flash_attn_varlen_func(q[None], k, v, cu, cu, 10, 10, backend="torch"))
    assert "block_table must be None" in error_of(
        lambda: flash_attn_varlen_func(q, k, v, cu, cu, 10, 10, block_table=torch.zeros(1)))
    assert "dropout_p must be 0.0" in error_of(lambda: flash_attn_varlen_func(q, k, v, cu, cu, 10, 10, 0.1))


@pytest.mark.parametrize("window, message", [
    ((-2, 0), "window_size entries must be >= 0, or -1 for unbounded, got (-2, 0)"),
    ((3,), "window_size must be a pair of ints"),
    ((1.5, 0), "window_size must be a pair of ints"),
])
def test_bad_windows_are_refused(window, message):
    q = torch.randn(1, 8, 2, 16)
    for backend in ("triton", "torch", "naive"):
        assert message in error_of(lambda: flash_attn_func(q, q, q, window_size=window, backend=backend))


def test_offsets_are_read_once_per_tensor_version(monkeypatch):
    """A model passes the same offsets to every layer: offsets the layers made from checked
    ones are never read back; CPU tensors (free to read, often views of reused numpy
    buffers) are read every time; inference tensors, which keep no version, work."""
    from usp.kernels import checks

    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    reads = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or self.numpy().tolist())
    assert checks.check_cu_seqlens("cu", cu, 8, 5) == [0, 3, 8]
    cu[1] = 9
    with pytest.raises(ValueError, match="cu must be non-decreasing, got 9 then 8"):
        checks.check_cu_seqlens("cu", cu, 8, 9)
    assert len(reads) == 2
    made = checks.offsets_tensor((0, 2, 8), "cpu")  # made from checked offsets: known without a read
    assert checks.check_cu_seqlens("cu", made, 8, 6) == [0, 2, 8] and len(reads) == 2
    assert checks.offsets_tensor((0, 2, 8), "cpu") is made
    with torch.inference_mode():
        inferred = torch.tensor([0, 5, 8], dtype=torch.int32)
        assert checks.check_cu_seqlens("cu", inferred, 8, 5) == [0, 5, 8]
        assert checks.offsets_tensor((0, 1, 8), "cpu").tolist() == [0, 1, 8]
