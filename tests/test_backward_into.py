"""The Triton backward that adds its dQ into a running float32 dQ and returns dK, dV in
float32 (``flash_attn_backward_into``), and the ring's and the all-gather schedule's use
of it: gradients against the float64 oracle within the rule of ``usp.bench.numerics``
(the naive backend in the input dtype is the baseline)."""

import pytest
import torch

from conftest import DEVICE
from thread_ring import ring_by_threads, triton_through_into
from usp.attention import naive_attention
from usp.bench.numerics import max_error, tolerance
from usp.kernels import flash_attn_backward, flash_attn_backward_into, flash_attn_forward
import usp.kernels.flash_bwd as flash_bwd
from usp.kernels.configs import HOPPER, KernelConfig, config_override, get_config

# bf16 only on a GPU: the interpreter computes bf16 products wrongly
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu)]


def _randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def _gradients(q, k, v, dout, causal):
    """dq, dk, dv of naive attention in q's dtype (float64: the oracle)."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out, _ = naive_attention(q, k, v, causal=causal)
    return torch.autograd.grad(out, (q, k, v), dout.to(q.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_into_adds_dq_and_returns_float32_dk_dv(dtype):
    """Batch 2, 20 queries over 24 keys, causal, 4 query and 2 K/V heads of 24 (padded in
    the kernel); dq accumulates into rows 3..22 of a transposed float32 tensor holding
    other values: it gains the oracle's dQ, the rows around it keep theirs."""
    q, dout = (_randn(2, 20, 4, 24, dtype=dtype, seed=s) for s in (1, 2))
    k, v = (_randn(2, 24, 2, 24, dtype=dtype, seed=s) for s in (3, 4))
    out, lse = flash_attn_forward(q, k, v, causal=True)
    start = _randn(2, 4, 26, 24, dtype=torch.float32, seed=5).transpose(1, 2)  # [B, S, H, D], not contiguous
    dq = start.clone()
    dk, dv = flash_attn_backward_into(dout, q, k, v, out, lse, dq[:, 3:23], causal=True)
    assert dk.dtype == dv.dtype == torch.float32 and dk.shape == k.shape and dv.shape == v.shape
    expected = _gradients(*(x.double() for x in (q, k, v, dout)), causal=True)
    baseline = _gradients(q, k, v, dout, causal=True)
    for name, got, want, base in zip(("dq", "dk", "dv"), (dq[:, 3:23] - start[:, 3:23], dk, dv), expected, baseline):
        allowed = tolerance(name, dtype, 24, want, max_error(base, want))
        assert max_error(got, want) <= allowed, (name, max_error(got, want), allowed)
    assert torch.equal(dq[:, :3], start[:, :3]) and torch.equal(dq[:, 23:], start[:, 23:])
    if dtype == torch.float32:  # the same kernels as flash_attn_backward, one float32 addition more
        plain = flash_attn_backward(dout, q, k, v, out, lse, causal=True)
        assert torch.equal(dk, plain[1]) and torch.equal(dv, plain[2])
        torch.testing.assert_close(dq[:, 3:23], start[:, 3:23] + plain[0], rtol=1e-6, atol=1e-6)
    elif dtype == torch.float16:  # nothing rounded to fp16 on the way
        assert (dk != dk.half().float()).any() and (dv != dv.half().float()).any()


def test_backward_into_refuses_accumulators_it_cannot_add_into():
    q = _randn(1, 16, 2, 16, dtype=torch.float32, seed=6)
    out, lse = flash_attn_forward(q, q, q)
    dq = torch.zeros(q.shape, device=DEVICE)
    with pytest.raises(ValueError, match="dq accumulates in float32"):
        flash_attn_backward_into(q, q, q, q, out, lse, dq.double())
    with pytest.raises(ValueError, match="dq must have the shape of q"):
        flash_attn_backward_into(q, q, q, q, out, lse, dq[:, :8])
    with pytest.raises(ValueError, match="must not have elements that overlap"):
        flash_attn_backward_into(q, q, q, q, out, lse, torch.zeros(1, 1, 2, 16, device=DEVICE).expand(q.shape))
    with pytest.raises(ValueError, match="dq must not share memory with the inputs"):
        flash_attn_backward_into(q, q, q, q, out, lse, out)


def test_backward_into_runs_its_own_dq_table_entry(monkeypatch):
    """The dQ kernel adding into float32 runs the ``bwd_dq_into`` entry (a tile of its
    own on sm_90 at d128), the plain backward ``bwd_dq``; under another into tile the
    gradients still meet the test rule (fp16, 40 queries over 56 keys: partial tiles)."""
    assert HOPPER.table["bwd_dq_into"][128] != HOPPER.table["bwd_dq"][128]
    into_tile = KernelConfig(32, 16, 1, 1)
    dq_tiles, launches = [], flash_bwd.backward_launches

    def recording(*args, **kwargs):  # the tile of the dQ launch (the last)
        built = launches(*args, **kwargs)
        dq_launch = built[-1]
        dq_tiles.append(KernelConfig(dq_launch.constexprs["BLOCK_M"], dq_launch.constexprs["BLOCK_N"],
                                     dq_launch.num_warps, dq_launch.num_stages))
        return built
    monkeypatch.setattr(flash_bwd, "backward_launches", recording)
    q, dout = (_randn(1, 40, 2, 32, dtype=torch.float16, seed=s) for s in (11, 12))
    k, v = (_randn(1, 56, 1, 32, dtype=torch.float16, seed=s) for s in (13, 14))
    out, lse = flash_attn_forward(q, k, v, causal=True)
    dq = torch.zeros(q.shape, device=DEVICE)
    with config_override("bwd_dq_into", 32, into_tile):
        flash_attn_backward(dout, q, k, v, out, lse, causal=True)
        dk, dv = flash_attn_backward_into(dout, q, k, v, out, lse, dq, causal=True)
    assert dq_tiles == [get_config("bwd_dq", 32, torch.float16, DEVICE), into_tile]
    expected = _gradients(*(x.double() for x in (q, k, v, dout)), causal=True)
    baseline = _gradients(q, k, v, dout, causal=True)
    for name, got, want, base in zip(("dq", "dk", "dv"), (dq, dk, dv), expected, baseline):
        allowed = tolerance(name, torch.float16, 32, want, max_error(base, want))
        assert max_error(got, want) <= allowed, (name, max_error(got, want), allowed)


@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_the_ring_adds_each_steps_dq_inside_the_kernel(layout, dtype):
    """Causal ring of 3 (fp16; bf16 on a GPU): every step's backward goes through
    backward_into (a backend whose plain backward raises), and the gradients meet the
    test rule against float64."""
    backend, calls = triton_through_into("backward")
    q, k, v, dout = (_randn(1, 48, 2, 16, dtype=dtype, seed=s) for s in (7, 8, 9, 10))
    ring = ring_by_threads(backend, q, k, v, dout, True, 3, layout)
    expected = _gradients(*(x.double() for x in (q, k, v, dout)), causal=True)
    baseline = _gradients(q, k, v, dout, causal=True)
    for name, want, base in zip(("dq", "dk", "dv"), expected, baseline):
        allowed = tolerance(name, dtype, 16, want, max_error(base, want))
        assert ring[name].dtype == dtype and max_error(ring[name], want) <= allowed, name
    assert len(calls) == (3 * 3 if layout == "zigzag" else 1 + 2 + 3)
