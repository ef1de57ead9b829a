"""Packed documents and sliding windows across ranks: the layouts with documents, the
sharding helpers, and Ulysses, ring and USP attention on gloo processes against the
float64 oracle on the whole packed sequence (``document_mask``), forward and the three
gradients, with the ring steps computed and skipped counted against the oracle's mask;
bad input raises the same error on every rank."""

import itertools

import pytest
import torch

from errors import error_of
from usp.attention import (document_mask, gather_sequence, naive_attention, pad_documents, sequence_positions,
                           shard_sequence, ulysses_attention, usp_attention)
from usp.attention.layout import ring_positions
from usp.bench.balance import schedule_bytes
from usp.bench.launch import run
from usp.comm import init_mesh, traffic
from usp.comm.traffic import record_traffic


def _offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


# --- layouts with documents (no processes needed) --------------------------------------

def test_zigzag_cuts_every_document():
    """Documents of 8 and 4 tokens over a ring of 2: chunks of 2 and 1 tokens; ring rank 0
    holds chunks 0 and 3 of each document, rank 1 chunks 1 and 2."""
    documents = (0, 8, 12)
    assert ring_positions(12, 2, 0, "zigzag", documents).tolist() == [0, 1, 6, 7, 8, 11]
    assert ring_positions(12, 2, 1, "zigzag", documents).tolist() == [2, 3, 4, 5, 9, 10]
    # the other layouts ignore document boundaries
    assert ring_positions(12, 2, 1, "contiguous", documents).tolist() == list(range(6, 12))
    assert ring_positions(12, 2, 1, "stripe", documents).tolist() == list(range(1, 12, 2))


def test_zigzag_with_documents_balances_causal_work_per_document():
    """Causal pairs each ring rank computes, for documents of 64, 16 and 48 tokens over a ring of 4."""
    documents = (0, 64, 80, 128)
    mask = document_mask(torch.tensor(documents, dtype=torch.int32), torch.tensor(documents, dtype=torch.int32),
                         causal=True)
    work = {layout: [int(mask[ring_positions(128, 4, rank, layout, documents)].sum()) for rank in range(4)]
            for layout in ("contiguous", "zigzag")}
    assert len(set(work["zigzag"])) == 1  # every rank the same
    assert max(work["contiguous"]) > 1.5 * min(work["contiguous"])


class _FakeMesh:
    """The coordinates the sharding helpers read, without processes."""

    def __init__(self, u, r, ulysses_rank, ring_rank):
        self.ulysses_degree, self.ring_degree = u, r
        self.ulysses_rank, self.ring_rank = ulysses_rank, ring_rank


def test_positions_restart_per_document(monkeypatch):
    monkeypatch.setattr("usp.attention.sequence.check_mesh", lambda mesh: None)
    cu = _offsets([6, 2])
    positions = [sequence_positions(8, _FakeMesh(2, 1, j, 0), "contiguous", cu_seqlens=cu).tolist() for j in (0, 1)]
    assert positions == [[0, 1, 2, 3], [4, 5, 0, 1]]
    zigzag = sequence_positions(8, _FakeMesh(1, 2, 0, 1), "zigzag", cu_seqlens=_offsets([4, 4])).tolist()
    assert zigzag == [1, 2, 1, 2]  # chunks 1 and 2 of each document


def test_pad_documents():
    x = torch.arange(1, 8).view(1, 7)
    padded, cu = pad_documents(x, _offsets([3, 0, 4]), 4, dim=1, value=-100)
    assert padded.tolist() == [[1, 2, 3, -100, 4, 5, 6, 7]]
    assert cu.tolist() == [0, 4, 4, 8] and cu.dtype == torch.int32


def test_zigzag_names_the_padding_a_document_needs(monkeypatch):
    monkeypatch.setattr("usp.attention.sequence.check_mesh", lambda mesh: None)
    message = error_of(lambda: shard_sequence(torch.zeros(1, 16), _FakeMesh(1, 2, 0, 0), cu_seqlens=_offsets([6, 10])))
    assert ("the zigzag layout cuts every document into 2 x ring_degree = 4 chunks: document 0 has 6 tokens, "
            "pad it to 8") in message


# --- on gloo processes -------------------------------------------------------------------

# (documents, causal, window, kv_heads, backend, dtype)
CASES = [
    ((5, 0, 1, 20, 6), True, (-1, -1), 2, "naive", torch.float64),
    ((5, 0, 1, 20, 6), True, (4, 0), 1, "naive", torch.float64),
    ((16, 16), False, (3, 2), 4, "naive", torch.float64),
    ((32,), True, (6, 0), 2, "torch", torch.float32),
    ((7, 9, 1, 15), False, (-1, -1), 2, "torch", torch.float32),
    ((12, 20), True, (5, 0), 2, "triton", torch.float32),
]


def _ulysses_documents():
    """Every case on a Ulysses group of 4 (and a USP 4 x 1 mesh), against the oracle."""
    mesh = init_mesh(4, 1)
    results = []
    for index, (lengths, causal, window, kv_heads, backend, dtype) in enumerate(CASES):
        cu = _offsets(lengths)
        total = sum(lengths)
        g = torch.Generator().manual_seed(index)
        q, k, v, dout = (torch.randn(1, total, h, 16, generator=g, dtype=torch.float64)
                         for h in (4, kv_heads, kv_heads, 4))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        expected, _ = naive_attention(*leaves, mask=document_mask(cu, cu, causal, window))
        expected.backward(dout)
        local = [shard_sequence(x, mesh, layout="contiguous", cu_seqlens=cu).to(dtype).requires_grad_()
                 for x in (q, k, v)]
        out = ulysses_attention(*local, mesh.ulysses_group, causal, backend=backend, cu_seqlens=cu,
                                window_size=window)
        out.backward(shard_sequence(dout, mesh, layout="contiguous", cu_seqlens=cu).to(dtype))
        got = [gather_sequence(x, mesh, layout="contiguous", cu_seqlens=cu).double()
               for x in (out.detach(), *(leaf.grad for leaf in local))]
        want = [expected.detach(), *(leaf.grad for leaf in leaves)]
        errors = [(a - b).abs().max().item() for a, b in zip(got, want)]
        same = torch.equal(usp_attention(*local, mesh, causal, None, "zigzag", backend, cu_seqlens=cu,
                                         window_size=window), out)
        results.append(dict(errors=errors, usp_equal=same))
    return results


@pytest.fixture(scope="module")
def ulysses_results():
    return run(4, _ulysses_documents, pg_timeout_s=120)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}-causal{int(c[1])}-window{c[2]}-{c[4]}"
                                                          for c in CASES])
def test_ulysses_attention_with_documents_matches_the_oracle(ulysses_results, index):
    tolerance = 1e-12 if CASES[index][5] == torch.float64 else 2e-5
    for rank, results in enumerate(ulysses_results):
        assert max(results[index]["errors"]) <= tolerance, (rank, results[index])
        assert results[index]["usp_equal"]  # usp_attention on a u x 1 mesh: the same call


# Rings and USP meshes: (ulysses, ring, layout, documents, causal, window, backend, dtype,
# schedule). 64 tokens; every document length divides into 2 x ring chunks (zigzag needs it).
RING_DOCUMENTS = (24, 0, 8, 32)
RING_CASES = [
    (1, 4, "zigzag", RING_DOCUMENTS, True, (-1, -1), "naive", torch.float64, "ring"),
    (1, 4, "stripe", RING_DOCUMENTS, True, (6, 0), "naive", torch.float64, "ring"),
    (1, 4, "contiguous", RING_DOCUMENTS, False, (5, 3), "torch", torch.float32, "ring"),
    (2, 2, "zigzag", RING_DOCUMENTS, True, (9, 0), "naive", torch.float64, "ring"),
    (2, 2, "stripe", None, True, (7, 0), "torch", torch.float32, "ring"),
    (1, 4, "zigzag", RING_DOCUMENTS, True, (10, 0), "triton", torch.float32, "ring"),
    (1, 4, "zigzag", RING_DOCUMENTS, True, (-1, -1), "naive", torch.float64, "allgather"),
    (2, 2, "stripe", RING_DOCUMENTS, True, (6, 0), "torch", torch.float32, "allgather"),
    (2, 2, "contiguous", RING_DOCUMENTS, True, (-1, -1), "triton", torch.float32, "allgather"),
    (2, 2, "zigzag", None, False, (-1, -1), "naive", torch.float64, "allgather"),
]


def _visible_sources(mask, layout, r, ring_rank, documents, seqlen) -> int:
    """How many ring ranks' keys some query of ``ring_rank`` sees, from the oracle's mask."""
    rows = ring_positions(seqlen, r, ring_rank, layout, documents)
    return sum(bool(mask[rows][:, ring_positions(seqlen, r, source, layout, documents)].any()) for source in range(r))


def _ring_cases(cases, seqlen: int = 64, heads=(4, 2)):
    """Every case against the oracle, with the ring steps each rank computed and skipped
    and the bytes it sent by label."""
    results = []
    for index, (u, r, layout, lengths, causal, window, backend, dtype, schedule) in enumerate(cases):
        mesh = init_mesh(u, r)
        cu = None if lengths is None else _offsets(lengths)
        whole = _offsets([seqlen]) if cu is None else cu
        g = torch.Generator().manual_seed(100 + index)
        q, k, v, dout = (torch.randn(1, seqlen, h, 16, generator=g, dtype=torch.float64)
                         for h in (heads[0], heads[1], heads[1], heads[0]))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        mask = document_mask(whole, whole, causal, window)
        expected, _ = naive_attention(*leaves, mask=mask)
        expected.backward(dout)

        def shard(x):
            return shard_sequence(x, mesh, layout=layout, cu_seqlens=cu).to(dtype)
        local = [shard(x).requires_grad_() for x in (q, k, v)]
        with record_traffic() as log:
            out = usp_attention(*local, mesh, causal, None, layout, backend, cu_seqlens=cu, window_size=window,
                                schedule=schedule)
            out.backward(shard(dout))
        got = [gather_sequence(x, mesh, layout=layout, cu_seqlens=cu).double()
               for x in (out.detach(), *(leaf.grad for leaf in local))]
        want = [expected.detach(), *(leaf.grad for leaf in leaves)]
        steps = {kind: [e.label for e in log.of_kind(kind)] for kind in (traffic.COMPUTE, traffic.SKIP)}
        moved = {}
        for e in log.events:
            if e.kind in (traffic.P2P, traffic.ALL_GATHER, traffic.REDUCE_SCATTER):
                moved[e.label] = moved.get(e.label, 0) + e.bytes_sent
        results.append(dict(errors=[(a - b).abs().max().item() for a, b in zip(got, want)],
                            computed=steps[traffic.COMPUTE].count(traffic.FORWARD),
                            skipped=steps[traffic.SKIP].count(traffic.FORWARD),
                            skipped_backward=steps[traffic.SKIP].count(traffic.BACKWARD), moved=moved,
                            shard_bytes=local[1].numel() * local[1].element_size(),  # as many after Ulysses
                            visible=_visible_sources(mask, layout, r, mesh.ring_rank, None if cu is None else
                                                     tuple(cu.tolist()), seqlen)))
    return results


@pytest.fixture(scope="module")
def ring_results():
    return run(4, _ring_cases, (RING_CASES,), pg_timeout_s=180)


@pytest.mark.parametrize("index", range(len(RING_CASES)), ids=[
    f"u{c[0]}r{c[1]}-{c[2]}-{'docs' if c[3] else 'dense'}-causal{int(c[4])}-window{c[5]}-{c[6]}-{c[8]}"
    for c in RING_CASES])
def test_rings_with_documents_and_windows_match_the_oracle(ring_results, index):
    """The ring schedule computes exactly the steps whose block holds a visible pair and
    notes the others as skipped, in forward and in backward; the all-gather schedule
    computes one block. Each moves the bytes of its formula, per rank, with ``B`` the
    bytes of one K (or V) shard after the Ulysses all-to-all and ``A`` the same in the
    accumulation dtype (here the input dtype): ring, (r - 1) 2B of K/V forward, as much
    again backward, and r 2A of dK/dV accumulators; all-gather, (r - 1) 2B gathered in
    each pass and (r - 1) 2A reduce-scattered."""
    _check_case(RING_CASES[index], [results[index] for results in ring_results])


def _check_case(case, per_rank) -> None:
    tolerance = 1e-12 if case[7] == torch.float64 else 2e-5
    ring, schedule = case[1], case[8]
    for rank, result in enumerate(per_rank):
        assert max(result["errors"]) <= tolerance, (rank, case, result)
        kv = 2 * result["shard_bytes"]
        if ring == 1:
            continue
        if schedule == "ring":
            assert result["computed"] == result["visible"], (rank, case, result)
            assert result["skipped"] == result["skipped_backward"] == ring - result["visible"], (rank, case, result)
            expected = {traffic.KV_FORWARD: (ring - 1) * kv, traffic.KV_BACKWARD: (ring - 1) * kv,
                        traffic.DKV_BACKWARD: ring * kv}
        else:
            assert (result["computed"], result["skipped"]) == (1, 0), (rank, case, result)
            expected = {traffic.KV_GATHER: 2 * (ring - 1) * kv, traffic.DKV_REDUCE: (ring - 1) * kv}
        assert result["moved"] == expected, (rank, case, result["moved"], expected)
        # the formula usp-bench balance prices the schedules with (accumulators in the input dtype here)
        formula = schedule_bytes(schedule, ring, result["shard_bytes"], result["shard_bytes"])
        assert sum(result["moved"].values()) == formula["fwd"] + formula["bwd"]


# Every mesh of 8 ranks x layout x schedule, documents of 48, 0, 16 and 64 tokens (each a
# multiple of 2 x 8) and a causal window of 20, naive float64 (the slow step).
EVERY_MESH = [(u, 8 // u, layout, (48, 0, 16, 64), True, (20, 0), "naive", torch.float64, schedule)
              for u in (1, 2, 4) for layout in ("contiguous", "zigzag", "stripe") for schedule in ("ring", "allgather")]
EVERY_MESH.append((8, 1, "zigzag", (48, 0, 16, 64), True, (20, 0), "naive", torch.float64, "ring"))


@pytest.mark.slow
def test_every_mesh_layout_and_schedule_on_8_ranks():
    per_rank = run(8, _ring_cases, (EVERY_MESH, 128, (8, 8)), pg_timeout_s=300)
    for index, case in enumerate(EVERY_MESH):
        _check_case(case, [results[index] for results in per_rank])


def test_a_window_on_a_contiguous_ring_skips_distant_ranks(ring_results):
    """Window (5, 3) and documents of 24, 0, 8, 32 tokens over 4 contiguous shards of 16:
    rank 0 sees rank 1 (document 0 crosses), rank 1 rank 0, ranks 2 and 3 each other
    (document 3); not rank 1 and rank 2 (a document boundary at 32), nor any farther one."""
    index = RING_CASES.index((1, 4, "contiguous", RING_DOCUMENTS, False, (5, 3), "torch", torch.float32, "ring"))
    assert [results[index]["skipped"] for results in ring_results] == [2, 2, 2, 2]


def _plain_backend(forward_takes_masks: bool = False):
    """A custom backend whose backward knows causal attention only (and its forward too,
    unless ``forward_takes_masks``)."""
    from usp.kernels import FunctionBackend, get_backend

    naive = get_backend("naive")
    plain = lambda q, k, v, *, causal, softmax_scale: naive.forward(  # noqa: E731
        q, k, v, causal=causal, softmax_scale=softmax_scale)
    backward = lambda dout, q, k, v, out, lse, *, causal, softmax_scale: naive.backward(  # noqa: E731
        dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale)
    return FunctionBackend("plain", naive.forward if forward_takes_masks else plain, backward)


def _bad_documents():
    mesh = init_mesh(2, 1)
    rank = mesh.ulysses_rank
    x = torch.randn(1, 8, 2, 16, dtype=torch.float64)
    cu = _offsets([4, 4])
    ring = init_mesh(1, 2)
    calls = {
        "offsets differ": lambda: ulysses_attention(x, x, x, mesh.ulysses_group, True, backend="naive",
                                                    cu_seqlens=_offsets([8, 8] if rank else [4, 12])),
        "not non-decreasing": lambda: ulysses_attention(x, x, x, mesh.ulysses_group, backend="naive",
                                                        cu_seqlens=torch.tensor([0, 10, 6, 16], dtype=torch.int32)),
        "int64": lambda: ulysses_attention(x, x, x, mesh.ulysses_group, backend="naive", cu_seqlens=cu.long()),
        "wrong end": lambda: ulysses_attention(x, x, x, mesh.ulysses_group, backend="naive", cu_seqlens=cu),
        "zigzag cannot cut": lambda: usp_attention(x, x, x, ring, True, backend="naive",
                                                   cu_seqlens=_offsets([6, 10])),
        "window on a ring, cross": lambda: usp_attention(x, x[:, :4], x[:, :4], ring, backend="naive",
                                                         window_size=(4, 0)),
        "backend without positions": lambda: usp_attention(x, x, x, ring, True, backend=_plain_backend(),
                                                           cu_seqlens=_offsets([8, 8])),
        "backward without positions": lambda: usp_attention(x, x, x, ring, True, backend=_plain_backend(True),
                                                            window_size=(3, 0)),
        "schedule": lambda: usp_attention(x, x, x, ring, True, backend="naive", schedule="gather"),
        "batch 2": lambda: ulysses_attention(x.expand(2, -1, -1, -1), x.expand(2, -1, -1, -1),
                                             x.expand(2, -1, -1, -1), mesh.ulysses_group, backend="naive",
                                             cu_seqlens=_offsets([8, 8])),
        "only rank 1 bad": lambda: ulysses_attention(x, x, x, mesh.ulysses_group, backend="naive",
                                                     cu_seqlens=_offsets([8, 8]) if rank == 0 else cu.long()),
        "gather with other offsets": lambda: gather_sequence(x, mesh, cu_seqlens=_offsets([8, 8] if rank else [4, 12])),
    }
    return {name: error_of(call) for name, call in calls.items()}


def test_bad_documents_raise_on_every_rank():
    first, second = run(2, _bad_documents, pg_timeout_s=60)
    assert first == second  # the same error on both ranks, none hanging
    expected = {
        "offsets differ": "the ranks of the group disagree on ulysses_attention (documents): rank 0: documents=2 "
                          "documents, offsets",
        "not non-decreasing": "cu_seqlens must be non-decreasing, got 10 then 6 at index 1",
        "int64": "cu_seqlens must be int32",
        "wrong end": "cu_seqlens must start at 0 and end at the packed length 16, got 0 ... 8",
        "zigzag cannot cut": "document 0 has 6 tokens, pad it to 8",
        "window on a ring, cross": "packed documents and windows over a ring need q and k of one length, got 8 and 4",
        "backend without positions": "backend 'plain' takes no positions keyword, which this call needs",
        "backward without positions": "backend 'plain' takes no window_size or positions keyword",
        "schedule": "schedule must be one of ('ring', 'allgather'), got 'gather'",
        "batch 2": "packed documents (cu_seqlens) need batch 1, got q of batch 2",
        "only rank 1 bad": "cu_seqlens must be int32",
        "gather with other offsets": "disagree on gather_sequence (documents)",
    }
    for name, fragment in expected.items():
        assert fragment in first[name], (name, first[name])
