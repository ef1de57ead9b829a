"""GQA in the ``torch`` backend shares each K/V head among its query heads inside
PyTorch's op: no K/V copy expanded to the query heads, forward or backward (on a CPU;
on CUDA in fp16/bf16, measured against the expanded path by a gpu test).

Measured with the profiler's CPU memory events, in units of one ``[B, S, Hq, D]``
float32 tensor. What a call must allocate: out (1) and lse (1/D) forward; dq (1) and
dk, dv (Hkv/Hq each) backward. Expanding K and V would add 2 units forward and 4
backward (the copies, then their gradients), so the bounds below leave a quarter of a
unit for the ops' own buffers and still catch any expansion.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from usp.kernels import get_backend, torch_fused

B, S, HQ, HKV, D = 1, 128, 8, 2, 64  # too short for the CPU causal cut (torch_fused._square)
UNIT = B * S * HQ * D * 4


def _allocated_units(call) -> float:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0 and e.cpu_parent is None) / UNIT


@pytest.mark.skipif(not torch_fused._CPU_OP_SHARES_KV_HEADS, reason="PyTorch's CPU op shares K/V heads from 2.9 on")
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_allocates_no_expanded_kv(causal):
    backend = get_backend("torch")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, S, h, D, generator=generator) for h in (HQ, HKV, HKV))
    out, lse = backend.forward(q, k, v, causal=causal)
    forward = _allocated_units(lambda: backend.forward(q, k, v, causal=causal))
    backward = _allocated_units(lambda: backend.backward(out, q, k, v, out, lse, causal=causal))
    assert 1.0 <= forward <= 1.0 + 1 / D + 0.25, forward
    assert 1.0 + 2 * HKV / HQ <= backward <= 1.0 + 2 * HKV / HQ + 0.25, backward


def _peak_bytes(call) -> int:
    """The most CUDA memory ``call`` held beyond what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.gpu
@pytest.mark.skipif(not torch_fused._CUDA_FLASH_SHARES_KV_HEADS, reason="the flash op shares K/V heads from "
                    "PyTorch 2.5 on, on CUDA (not ROCm)")
def test_gqa_on_the_cuda_flash_op_makes_no_kv_copies(monkeypatch):
    """bf16 on CUDA: with K/V heads shared inside the flash op, a call holds two
    ``[B, S, Hq, D]`` tensors less than with K and V expanded (their copies), forward and
    backward, and gives the same results."""
    b, s, hq, hkv, d = 1, 4096, 16, 2, 128
    unit = b * s * hq * d * 2
    backend = get_backend("torch")
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(b, s, h, d, generator=generator, device="cuda", dtype=torch.bfloat16)
                     for h in (hq, hkv, hkv, hq))
    results = {}
    for shares in (True, False):
        monkeypatch.setattr(torch_fused, "_CUDA_FLASH_SHARES_KV_HEADS", shares)
        out, lse = backend.forward(q, k, v, causal=True)
        grads = backend.backward(dout, q, k, v, out, lse, causal=True)
        results[shares] = dict(
            forward=_peak_bytes(lambda: backend.forward(q, k, v, causal=True)),
            backward=_peak_bytes(lambda: backend.backward(dout, q, k, v, out, lse, causal=True)),
            values=(out, lse, *grads))
    assert results[True]["forward"] <= results[False]["forward"] - 1.9 * unit, results
    assert results[True]["backward"] <= results[False]["backward"] - 1.9 * unit, results
    for shared, expanded in zip(results[True]["values"], results[False]["values"]):
        torch.testing.assert_close(shared.float(), expanded.float(), rtol=2e-2, atol=2e-2)
