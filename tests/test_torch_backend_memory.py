"""GQA in the ``torch`` backend on a CPU shares each K/V head among its query heads
inside PyTorch's op: no K/V copy expanded to the query heads, forward or backward.

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

B, S, HQ, HKV, D = 1, 256, 8, 2, 64
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
