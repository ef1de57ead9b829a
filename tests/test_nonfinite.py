"""What a NaN or an infinity in q, k or v does, on every backend (the README's
"Non-finite inputs" says the same):

- finite values at keys a row cannot see never change that row, bit for bit;
- a NaN or infinity in q, or in k, reaches only the rows that see it; their output is
  NaN and their lse NaN (or +inf where a score is +inf), never -inf, the "saw no key" value;
- a NaN in v reaches every row that sees it, and may reach rows that do not (0 x NaN
  in the product of the probabilities with V over a block that mixes visible and
  masked keys); the lse of every row stays finite, as no score is affected.
"""

import pytest
import torch

from conftest import DEVICE
from usp.kernels import get_backend

BACKENDS = ["triton", "torch", "naive"]
SEQLEN, KEY, ROW = 40, 25, 5  # causal, square: row i sees keys 0 .. i


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, SEQLEN, 2, 16, generator=g).to(DEVICE)
    k = torch.randn(1, SEQLEN, 1, 16, generator=g).to(DEVICE)
    v = torch.randn(1, SEQLEN, 1, 16, generator=g).to(DEVICE)
    return q, k, v


def _forward(backend, q, k, v):
    return get_backend(backend).forward(q, k, v, causal=True, softmax_scale=None)


def _nan_rows(out) -> set[int]:
    return set(out.isnan().any(-1).any(-1)[0].nonzero().flatten().tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_values_at_masked_keys_never_change_a_row(backend):
    q, k, v = _inputs()
    out, lse = _forward(backend, q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, KEY + 1:] = 1e4 * torch.randn_like(k2[:, KEY + 1:])
    v2[:, KEY + 1:] = -1e4
    out2, lse2 = _forward(backend, q, k2, v2)
    assert torch.equal(out2[:, :KEY + 1], out[:, :KEY + 1]) and torch.equal(lse2[..., :KEY + 1], lse[..., :KEY + 1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where, value", [("q", float("nan")), ("q", float("inf")), ("k", float("nan")),
                                          ("k", float("inf"))])
def test_a_non_finite_q_or_k_reaches_only_the_rows_that_see_it(backend, where, value):
    q, k, v = _inputs(1)
    (q if where == "q" else k)[0, ROW if where == "q" else KEY, 0, 3] = value
    out, lse = _forward(backend, q, k, v)
    bad = _nan_rows(out)
    seeing = {ROW} if where == "q" else set(range(KEY, SEQLEN))
    if value != value:  # NaN: every row that sees it
        assert bad == seeing
    else:  # inf: the rows whose score with it is +inf (or NaN), where the sign of q allows
        assert bad and bad <= seeing
    for row in bad:
        heads = out[0, row].isnan().any(-1)
        assert not (lse[0, heads, row] == float("-inf")).any(), (row, lse[0, :, row])
        assert (lse[0, heads, row].isnan() | (lse[0, heads, row] == float("inf"))).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_in_v_reaches_every_row_that_sees_it(backend):
    q, k, v = _inputs(2)
    v[0, KEY, 0, 3] = float("nan")
    out, lse = _forward(backend, q, k, v)
    assert set(range(KEY, SEQLEN)) <= _nan_rows(out)
    assert torch.isfinite(lse).all()
