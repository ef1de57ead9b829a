"""Rows that see no key (causal with more queries than keys): out 0, lse -inf, zero
gradients, and no NaN anywhere, in every backend."""

import pytest
import torch

from conftest import DEVICE
from usp.kernels import flash_attn_func, get_backend


@pytest.mark.parametrize("backend", ["triton", "torch", "naive"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(40, 7), (33, 1)])
def test_fully_masked_rows(backend, seqlen_q, seqlen_k):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, seqlen_q, 4, 32, generator=g).to(DEVICE)
    k = torch.randn(2, seqlen_k, 2, 32, generator=g).to(DEVICE)
    v = torch.randn(2, seqlen_k, 2, 32, generator=g).to(DEVICE)
    dout = torch.randn(2, seqlen_q, 4, 32, generator=g).to(DEVICE)
    be = get_backend(backend)
    out, lse = be.forward(q, k, v, causal=True, softmax_scale=None)
    dq, dk, dv = be.backward(dout, q, k, v, out, lse, causal=True, softmax_scale=None)
    empty = seqlen_q - seqlen_k  # query i sees key j iff j <= i - empty
    for name, x in dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv).items():
        assert not x.isnan().any(), f"{name} has NaN"
    assert (out[:, :empty] == 0).all()
    assert (lse[:, :, :empty] == float("-inf")).all()
    assert torch.isfinite(lse[:, :, empty:]).all()
    assert (dq[:, :empty] == 0).all()
    assert dk.abs().sum() > 0 and dv.abs().sum() > 0  # the rows that see keys still send gradients


def test_flash_attn_func_gradients_of_masked_rows_are_zero():
    q = torch.randn(1, 10, 2, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 4, 2, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 4, 2, 16, device=DEVICE, requires_grad=True)
    for backend in ("triton", "torch"):
        out = flash_attn_func(q, k, v, causal=True, backend=backend)
        q.grad = None
        out.sum().backward()
        assert (out[:, :6] == 0).all(), backend
        assert not q.grad.isnan().any() and (q.grad[:, :6] == 0).all(), backend
