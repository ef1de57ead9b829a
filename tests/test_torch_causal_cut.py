"""The torch backend cuts a causal call on the CPU into unmasked and square-causal pieces
for PyTorch's op (``torch_fused._pieces``), and, with PyTorch on one thread, cuts causal
squares in halves (``_square``), where the op is slow on them: the pieces must cover the
bottom-right causal mask exactly, and the results match float64 attention."""

import itertools

import pytest
import torch

from usp.bench.numerics import Case, run_case
from usp.kernels import AttentionShape, torch_fused
from usp.kernels.naive import visibility_mask


@pytest.fixture
def one_thread():
    """PyTorch on one thread, as each rank of a multi-process run: where the cut applies."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _covered(pieces, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """How many pieces see each (query, key) pair; raises if a piece is not square when causal."""
    count = torch.zeros(seqlen_q, seqlen_k, dtype=torch.int64)
    for piece in pieces:
        rows, keys = range(seqlen_q)[piece.rows], range(seqlen_k)[piece.keys]
        if piece.causal:
            assert len(rows) == len(keys), piece
            seen = torch.ones(len(rows), len(keys), dtype=torch.bool).tril()
        else:
            seen = torch.ones(len(rows), len(keys), dtype=torch.bool)
        count[rows.start:rows.stop, keys.start:keys.stop] += seen
    return count


@pytest.mark.parametrize("cut", [None, torch_fused._CPU_CAUSAL_CUT["forward"],
                                 torch_fused._CPU_CAUSAL_CUT["backward"], (2, 100)])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 1), (7, 7), (385, 385), (512, 512), (400, 700), (700, 450),
                                                (1023, 1023), (1024, 1024), (37, 5), (5, 37)])
def test_pieces_cover_the_causal_mask_once(cut, seqlen_q, seqlen_k):
    pieces = torch_fused._pieces(seqlen_q, seqlen_k, True, cut)
    expected = visibility_mask(seqlen_q, seqlen_k, None, 0, torch.device("cpu")).long()
    assert torch.equal(_covered(pieces, seqlen_q, seqlen_k), expected)
    rows = [range(seqlen_q)[p.rows].start for p in pieces]
    assert rows == sorted(rows)  # rows in increasing order: PartialResults copies fresh rows instead of merging
    causal_sizes = [len(range(seqlen_q)[p.rows]) for p in pieces if p.causal]
    if cut is not None:  # cut until no causal square is in range
        low, high = cut
        assert all(size < low or (high is not None and size >= high) for size in causal_sizes), causal_sizes


def test_short_causal_squares_are_cut_on_the_cpu_in_float32_and_float64_only(one_thread):
    for dtype in (torch.float32, torch.float64):
        q = torch.empty(1, 512, 1, 8, dtype=dtype)
        assert len(torch_fused._pieces(512, 512, True, torch_fused._cut(q, "forward"))) == 3  # halves of 256
        assert len(torch_fused._pieces(512, 512, True, torch_fused._cut(q, "backward"))) == 7  # and of 128
    for dtype in (torch.float16, torch.bfloat16):
        assert torch_fused._cut(torch.empty(1, 512, 1, 8, dtype=dtype), "forward") is None
    q = torch.empty(1, 2048, 1, 8)
    assert torch_fused._pieces(2048, 2048, True, torch_fused._cut(q, "forward")) == \
        torch_fused._pieces(2048, 2048, True)  # a long square goes to the op whole forward,
    assert len(torch_fused._pieces(2048, 2048, True, torch_fused._cut(q, "backward"))) == 2 ** 5 - 1  # cut backward
    torch.set_num_threads(2)
    assert torch_fused._cut(q, "backward") is None  # the op shares its work out over threads: no cut


def test_a_cut_below_two_rows_is_refused():
    with pytest.raises(ValueError, match="low bound >= 2"):
        torch_fused._pieces(8, 8, True, (1, None))


# Causal squares in the cut ranges: even and odd, Sq < Sk (an unmasked piece first),
# Sq > Sk (rows that see nothing), GQA.
CUT_SHAPES = [(1, 512, 512, 2, 1, 32), (1, 385, 385, 2, 2, 16), (1, 400, 700, 2, 2, 16), (1, 700, 450, 2, 2, 16)]


@pytest.mark.parametrize("dtype, shape", list(itertools.product([torch.float32, torch.float64], CUT_SHAPES)),
                         ids=lambda x: str(x).replace("torch.", "").replace(" ", ""))
def test_cut_causal_calls_match_float64_attention(dtype, shape, one_thread):
    assert torch_fused._cut(torch.empty(1, 1, 1, 1, dtype=dtype), "backward") is not None
    case = Case("torch", dtype, AttentionShape(*shape), True)
    result = run_case(case, device=torch.device("cpu"), seed=sum(shape))
    assert result.passed, f"{case.label}: {result.failures}"
