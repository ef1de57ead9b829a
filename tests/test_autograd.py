"""flash_attn_func and attention(): autograd over the backends, non-contiguous inputs."""

import pytest
import torch

from usp.bench.numerics import Case, compare, reference, run_backend
from conftest import DEVICE
from usp.kernels import AttentionShape, flash_attn_func, local_attention


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    return make(2, 37, 4, 48), make(2, 53, 2, 48), make(2, 53, 2, 48), make(2, 37, 4, 48)


def _autograd(fn, q, k, v, dout):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    out.backward(dout)
    return dict(out=out.detach(), lse=lse, dq=q.grad, dk=k.grad, dv=v.grad)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_matches_the_oracle(causal):
    q, k, v, dout = _inputs()
    got = _autograd(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, return_attn_probs=True,
                                                    backend="triton")[:2], q, k, v, dout)
    assert got["out"].shape == q.shape and got["lse"].shape == (2, 4, 37) and got["lse"].dtype == torch.float32
    case = Case("triton", torch.float32, AttentionShape(2, 37, 53, 4, 2, 48), causal)
    baseline = run_backend("naive", q, k, v, dout, causal)
    _, _, failures = compare(case, got, reference(q, k, v, dout, causal), baseline)
    assert not failures, failures


def test_flash_attn_func_returns_out_only_by_default():
    q, k, v, _ = _inputs()
    out = flash_attn_func(q, k, v, softmax_scale=0.1)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


@pytest.mark.parametrize("backend", ["triton", "torch", "naive"])
def test_non_contiguous_inputs_give_the_contiguous_answer(backend):
    """Transposed views, a head-dim slice and a strided sequence: same result as copies."""
    q, k, v, dout = _inputs(seed=1)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, S, D] memory
    k_view = torch.cat([k, torch.ones_like(k)], dim=-1)[..., :48]  # padded rows
    v_view = v.repeat_interleave(2, dim=1)[:, ::2]  # every other row
    dout_view = dout.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(x.is_contiguous() for x in (q_view, k_view, v_view, dout_view))
    fn = lambda q, k, v: local_attention(q, k, v, causal=True, backend=backend, return_lse=True)  # noqa: E731
    got = _autograd(fn, q_view, k_view, v_view, dout_view)
    want = _autograd(fn, q, k, v, dout)
    for name in want:  # the same values through the same kernels: float32 sums in another order at most
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["triton", "torch", "naive"])
def test_a_head_dim_that_is_not_unit_stride(backend):
    """x.permute(0, 1, 3, 2) of a [B, S, D, H] tensor: the answer of the contiguous copy
    (PyTorch's CPU kernel read such views as garbage)."""
    q, k, v, dout = _inputs(seed=2)
    views = [x.transpose(2, 3).contiguous().transpose(2, 3) for x in (q, k, v, dout)]  # memory [B, S, D, H]
    assert all(x.stride(-1) != 1 for x in views)
    fn = lambda q, k, v: local_attention(q, k, v, causal=True, backend=backend, return_lse=True)  # noqa: E731
    got = _autograd(fn, *views)
    want = _autograd(fn, q, k, v, dout)
    for name in want:  # the same values through the same kernels: float32 sums in another order at most
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
