"""Masks given by token (``usp.kernels.tokens``): the block of one sequence-parallel shard's
queries against another shard's keys, on every backend, against the float64 oracle. The
oracle's mask is the whole packed sequence's ``document_mask`` (built from document ids
and distances to each document's end), cut to the block's rows and columns. The
tolerance rule is the one of test_numerics (``usp.bench.numerics.TOLERANCE_RULE``)."""

import zlib

import pytest
import torch

from conftest import DEVICE
from usp.attention.layout import ring_positions, token_positions
from usp.attention.naive import document_mask
from usp.bench.numerics import Case, compare, poisoned_allocations, reference, run_backend
from usp.kernels import AttentionShape
from usp.kernels.checks import resolve_window
from usp.kernels.flash_bwd import _run_backward
from usp.kernels.flash_fwd import _run_forward
from usp.kernels.triton_common import MaskSpec
from usp.kernels.tokens import TokenPositions

SEQLEN = 64
DOCUMENTS = (0, 24, 24, 32, 64)  # 24, an empty one, 8 and 32 tokens: each divides into 4 zigzag chunks


def _block(layout, ring, rank, source, documents):
    """Global positions of ``rank``'s queries and of ``source``'s keys (source None: all
    ranks' keys gathered in rank order)."""
    q_pos = ring_positions(SEQLEN, ring, rank, layout, documents)
    sources = range(ring) if source is None else [source]
    k_pos = torch.cat([ring_positions(SEQLEN, ring, s, layout, documents) for s in sources])
    return q_pos, k_pos


def _compare(backend, dtype, layout, rank, source, causal, window, documents, ring=2, heads=(4, 2), spans=False):
    """Run the block on ``backend`` and judge it against the oracle: ``(failures, the
    backend's results, the oracle's mask)``; a failure names the quantity and its error.
    ``spans``: the positions carry their spans under this window (as the layers' do)."""
    q_pos, k_pos = _block(layout, ring, rank, source, documents)
    cu = torch.tensor(documents or (0, SEQLEN), dtype=torch.int32)
    mask = document_mask(cu, cu, causal, window)[q_pos][:, k_pos]
    label = f"{backend}-{dtype}-{layout}-{rank}-{source}-{causal}-{window}-{documents is not None}"
    g = torch.Generator().manual_seed(zlib.crc32(label.encode()))
    shape = AttentionShape(1, len(q_pos), len(k_pos), *heads, 16)

    def randn(rows, h):
        return torch.randn(1, rows, h, 16, generator=g).to(DEVICE, dtype)
    q, dout, k, v = randn(len(q_pos), heads[0]), randn(len(q_pos), heads[0]), *(randn(len(k_pos), heads[1])
                                                                                    for _ in range(2))
    ref = reference(q, k, v, dout, False, mask=mask)
    positions = token_positions(q_pos, k_pos, documents, DEVICE,
                                window=resolve_window(causal, window) if spans else None)
    options = dict(window_size=window, positions=positions)
    with poisoned_allocations():
        results = run_backend(backend, q, k, v, dout, causal, **options)
    baseline = None if dtype == torch.float64 else run_backend("naive", q, k, v, dout, causal, **options)
    _, _, failures = compare(Case(backend, dtype, shape, causal), results, ref, baseline)
    return [f"{label}: {failure}" for failure in failures], results, mask


# (layout, rank, source, causal, window, documents): zigzag documents against an earlier
# and a later rank, stripe and contiguous with windows, and all ranks' keys gathered.
BLOCKS = [
    ("zigzag", 1, 0, True, (-1, -1), DOCUMENTS),
    ("zigzag", 0, 1, True, (6, 0), DOCUMENTS),
    ("stripe", 1, 0, True, (9, 0), None),
    ("contiguous", 1, 0, False, (5, 3), None),
    ("zigzag", 1, None, True, (10, 0), DOCUMENTS),
    ("stripe", 0, None, False, (-1, -1), DOCUMENTS),
]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}-{b[1]}-{b[2]}-w{b[4][0]}.{b[4][1]}")
@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("torch", torch.float32),
                                           ("naive", torch.float64)])
def test_a_block_by_token_matches_the_oracle(backend, dtype, block):
    layout, rank, source, causal, window, documents = block
    failures, _, mask = _compare(backend, dtype, layout, rank, source, causal, window, documents)
    assert not failures, failures
    assert mask.any() and not mask.all()  # the case masks something and leaves something


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}-{b[1]}-{b[2]}-w{b[4][0]}.{b[4][1]}")
def test_triton_with_spans_matches_the_oracle_and_the_kernels_testing_every_block(block):
    """The kernels walking only their rows' spans compute the same blocks' visible pairs
    in the same order as those testing every block, so the results are identical: the
    blocks a span adds hold no visible pair (adding exact zeros), and none it leaves out
    holds one."""
    failures, spans, _ = _compare("triton", torch.float32, *block, spans=True)
    assert not failures, failures
    _, tested, _ = _compare("triton", torch.float32, *block)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert torch.equal(spans[name], tested[name]), name


def test_with_spans_a_tile_walks_its_span_and_tests_nothing():
    """Zigzag ring of 2 over 64 tokens, causal: rank 1's queries (positions 16-47)
    against every rank's keys gathered (positions 0-15, 48-63, 16-31, 32-47), 16-row
    tiles. Testing each block, query tile 0 visits key blocks 0 and 2, tile 1 blocks 0,
    2 and 3; key tile 0 query blocks 0 and 1, key tile 1 none, 2 both, 3 the second.
    Given spans that hold every query (and every key) but see nothing more, the kernels
    walk all of them and skip nothing (every probability of an invisible pair is 0):
    the same results, more visits."""
    q_pos, k_pos = _block("zigzag", 2, 1, None, None)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 32, 1, 16, generator=g).to(DEVICE)
    k = torch.randn(1, 64, 1, 16, generator=g).to(DEVICE)
    shape = AttentionShape(1, 32, 64, 1, 1, 16)
    tested = token_positions(q_pos, k_pos, None, DEVICE)
    loose = TokenPositions(tested.q_pos, tested.q_doc, tested.k_pos, tested.k_doc,
                           torch.tensor([[0] * 32, [64] * 32], dtype=torch.int32, device=DEVICE),
                           torch.tensor([[0] * 64, [32] * 64], dtype=torch.int32, device=DEVICE), (None, 0))
    runs = {}
    for name, positions in (("tested", tested), ("spans", loose)):
        mask = MaskSpec(right=0, tokens=positions)
        fwd = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
        out, lse = _run_forward(q, k, k, torch.empty_like(q), torch.empty(1, 1, 32, device=DEVICE), shape, mask,
                                None, visits=fwd)
        bwd = torch.zeros(1, 4, dtype=torch.int32, device=DEVICE)
        dq, dk, dv = _run_backward(torch.ones_like(q), q, k, k, out, lse, shape, mask, None, visits=bwd)
        runs[name] = (fwd.cpu().tolist(), bwd.cpu().tolist()), (out, lse, dq, dk, dv)
    assert runs["tested"][0] == ([[2, 3]], [[2, 0, 2, 1]])
    assert runs["spans"][0] == ([[4, 4]], [[2, 2, 2, 2]])
    assert all(torch.equal(a, b) for a, b in zip(runs["tested"][1], runs["spans"][1]))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("window", [(-1, 0), (5, 0), (3, 2), (-1, -1)])
@pytest.mark.parametrize("gathered", [False, True], ids=["one-source", "gathered"])
def test_spans_are_tight_where_the_other_side_increases(layout, window, gathered):
    """Against ``TokenPositions.visible``: a row's span starts and ends on a pair it sees
    (first >= last when it sees none). A ring rank's positions increase (every layout),
    so both sides get spans against one source's keys; keys gathered from every rank do
    not (but for the contiguous layout's), so their queries get none (every block
    tested) and the keys still get theirs."""
    ring = 4
    q_pos, k_pos = _block(layout, ring, 1, None if gathered else 2, DOCUMENTS)
    left, right = (None if w < 0 else w for w in window)
    positions = token_positions(q_pos, k_pos, DOCUMENTS, window=(left, right))
    assert (positions.q_spans is None) == (gathered and layout != "contiguous") and positions.k_spans is not None
    assert positions.spans_window == (left, right)
    visible = positions.visible(left, right)
    for spans, seen in ((positions.q_spans, visible), (positions.k_spans, visible.T)):
        if spans is None:
            continue
        first, last = spans.long()
        for row in range(seen.shape[0]):
            index = torch.nonzero(seen[row]).flatten()
            if index.numel() == 0:
                assert first[row] >= last[row]
            else:
                assert (first[row], last[row] - 1) == (index.min(), index.max())


def test_each_kernel_walks_its_sides_spans_only_under_their_window():
    """The forward and dQ kernels (query tiles) walk ``q_spans``, the dK/dV kernel (key
    tiles) ``k_spans``, each only when present and found under the call's window; else
    they test every block. No mask by token: 0."""
    from usp.kernels.flash_bwd import backward_launches
    from usp.kernels.flash_fwd import forward_launch
    from usp.kernels.configs import KernelConfig

    q_pos, k_pos = _block("zigzag", 2, 1, None, DOCUMENTS)
    q = torch.zeros(1, len(q_pos), 2, 16, device=DEVICE)
    k = torch.zeros(1, len(k_pos), 2, 16, device=DEVICE)
    lse = torch.zeros(1, 2, len(q_pos), device=DEVICE)
    config = KernelConfig(16, 16, 1, 1)

    def modes(mask):
        fwd = forward_launch(q, k, k, q, lse, mask=mask, scale=0.25, config=config)
        _, dkdv, dq = backward_launches(q, q, k, k, q, lse, lse, lse, q, k, k, mask=mask, scale=0.25,
                                        configs={"bwd_dkdv": config, "bwd_dq": config})
        return [launch.constexprs["TOKENS"] for launch in (fwd, dq, dkdv)]

    one_source = token_positions(*_block("zigzag", 2, 1, 0, DOCUMENTS), DOCUMENTS, DEVICE, window=(None, 0))
    gathered = token_positions(q_pos, k_pos, DOCUMENTS, DEVICE, window=(None, 0))
    plain = token_positions(q_pos, k_pos, DOCUMENTS, DEVICE)
    assert modes(MaskSpec(right=0, tokens=gathered)) == [1, 1, 2]  # the gathered keys' queries: no spans
    assert modes(MaskSpec(left=4, right=0, tokens=gathered)) == [1, 1, 1]  # another window
    assert modes(MaskSpec(right=0, tokens=plain)) == [1, 1, 1]
    assert modes(MaskSpec(right=0)) == [0, 0, 0]
    q, k = (torch.zeros(1, n, 2, 16, device=DEVICE) for n in (len(one_source.q_pos), len(one_source.k_pos)))
    lse = torch.zeros(1, 2, len(one_source.q_pos), device=DEVICE)
    assert modes(MaskSpec(right=0, tokens=one_source)) == [2, 2, 2]


@pytest.mark.parametrize("change, message", [
    (dict(q_spans=torch.zeros(8, dtype=torch.int32)), "positions.q_spans must be an int32 tensor of shape \\[2, 8\\]"),
    (dict(k_spans=torch.zeros(2, 8, dtype=torch.int64)), "positions.k_spans must be an int32 tensor"),
    (dict(q_spans=torch.zeros(8, 2, dtype=torch.int32).T), "positions.q_spans must be contiguous"),
    (dict(spans_window=None), "spans_window is the window of q_spans and k_spans"),
    (dict(q_spans=None, k_spans=None), "spans_window is the window of q_spans and k_spans"),
])
def test_bad_spans_are_refused(change, message):
    fields = dict(q_pos=torch.arange(8, dtype=torch.int32), q_doc=torch.zeros(8, dtype=torch.int32),
                  k_pos=torch.arange(8, dtype=torch.int32), k_doc=torch.zeros(8, dtype=torch.int32),
                  q_spans=torch.zeros(2, 8, dtype=torch.int32), k_spans=torch.zeros(2, 8, dtype=torch.int32),
                  spans_window=(None, 0))
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        TokenPositions(**fields).check(8, 8, torch.device("cpu"))


def test_triton_fp16_by_token_matches_the_oracle():
    failures, _, _ = _compare("triton", torch.float16, "zigzag", 1, None, True, (7, 0), DOCUMENTS, ring=4,
                              heads=(2, 2))
    assert not failures, failures


@pytest.mark.gpu
@pytest.mark.parametrize("spans", [False, True], ids=["tested", "spans"])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}-{b[1]}-{b[2]}-w{b[4][0]}.{b[4][1]}")
def test_bf16_by_token_on_gpu(block, spans):
    failures, _, _ = _compare("triton", torch.bfloat16, *block, spans=spans)
    assert not failures, failures


def test_rows_that_see_nothing_give_zeros():
    """Rank 0 of a causal contiguous ring against rank 1's keys: every pair masked, so out,
    every gradient 0 and lse -inf."""
    failures, results, mask = _compare("triton", torch.float32, "contiguous", 0, 1, True, (-1, -1), None)
    assert not failures, failures
    assert not mask.any()
    assert torch.isneginf(results["lse"]).all()
    assert all((results[name] == 0).all() for name in ("out", "dq", "dk", "dv"))


def test_blocks_without_a_visible_pair_are_skipped():
    """64 queries of document 0 against 64 keys, 16-row tiles, causal with a left window
    of 8: keys 0-31 are in document 0, keys 32-63 in document 1. Query tile 2 (32-47)
    reaches back to key 24 only, tile 3 (48-63) sees no key at all; key tiles 2 and 3
    are never visited."""
    q = torch.randn(1, 64, 1, 16)
    positions = TokenPositions(torch.arange(64, dtype=torch.int32), torch.zeros(64, dtype=torch.int32),
                               torch.arange(64, dtype=torch.int32), (torch.arange(64) >= 32).to(torch.int32))
    mask = MaskSpec(left=8, right=0, tokens=positions)
    shape = AttentionShape(1, 64, 64, 1, 1, 16)
    fwd = torch.zeros(1, 4, dtype=torch.int32)
    out, lse = _run_forward(q, q, q, torch.empty_like(q), torch.empty(1, 1, 64), shape, mask, None, visits=fwd)
    bwd = torch.zeros(1, 4, dtype=torch.int32)
    _run_backward(torch.ones_like(q), q, q, q, out, lse, shape, mask, None, visits=bwd)
    assert fwd.tolist() == [[1, 2, 1, 0]]
    assert bwd.tolist() == [[2, 2, 0, 0]]
    assert torch.isinf(lse[0, 0, 40:]).all() and (out[0, 40:] == 0).all()  # rows past 39 see nothing


@pytest.mark.parametrize("bad, message", [
    (dict(q_pos=torch.arange(5)), "positions.q_pos must be an int32 tensor of shape \\[8\\]"),
    (dict(k_doc=torch.zeros(7, dtype=torch.int32)), "positions.k_doc must be an int32 tensor of shape \\[8\\]"),
])
@pytest.mark.parametrize("backend", ["triton", "torch", "naive"])
def test_bad_positions_are_refused(backend, bad, message):
    from usp.kernels import get_backend
    fields = dict(q_pos=torch.arange(8, dtype=torch.int32), q_doc=torch.zeros(8, dtype=torch.int32),
                  k_pos=torch.arange(8, dtype=torch.int32), k_doc=torch.zeros(8, dtype=torch.int32))
    fields.update(bad)
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=message):
        get_backend(backend).forward(q, q, q, causal=True, softmax_scale=None, positions=TokenPositions(**fields))
