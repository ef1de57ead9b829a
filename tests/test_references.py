"""The pieces ``usp-bench scaling`` checks other implementations with: the float64 oracle
shared out between ranks, and the shim that runs PyTorch's context parallel on CPU."""

import torch

from usp.attention import naive_attention, sequence_positions
from usp.bench.launch import run
from usp.bench.oracle import global_oracle
from usp.comm import init_mesh

SEQLEN = 32


def _inputs(kv_heads: int):
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(1, SEQLEN, heads, 8, generator=generator) for heads in (4, kv_heads, kv_heads, 4)]


def _whole_oracle(q, k, v, dout, causal):
    leaves = [x.double().requires_grad_(True) for x in (q, k, v)]
    out, _ = naive_attention(*leaves, causal)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.double()))


ORACLE_CASES = [(causal, block_elements) for causal in (True, False)
                # blocks of 3 rows, the last one ragged; one block
                for block_elements in (4 * SEQLEN * 3, 10 ** 9)]


def _oracle_rank():
    q, k, v, dout = _inputs(2)
    return [[x.numpy() for x in global_oracle(q, k, v, dout, causal, block_elements=block_elements)]  # by value
            for causal, block_elements in ORACLE_CASES]


def test_shared_oracle_equals_the_whole_float64_computation():
    # float64 sums in another order: equal to rounding, far below any tolerance of the benchmark
    for per_case in run(3, _oracle_rank, timeout_s=120):
        for (causal, _), shares in zip(ORACLE_CASES, per_case):
            assert len(shares) == 4
            for got, want in zip(shares, _whole_oracle(*_inputs(2), causal)):
                torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=1e-12)


CP_CASES = [(layout, causal, rotate) for layout, causal in (("zigzag", True), ("contiguous", True), ("zigzag", False))
            for rotate in ("allgather", "alltoall")]
KV_HEADS = 2  # GQA, through SDPA's enable_gqa


def _torch_cp_rank():
    from usp.bench.torch_cp import context_parallel_attention
    mesh = init_mesh(1, 2)
    q, k, v, dout = _inputs(KV_HEADS)
    results = []
    for layout, causal, rotate in CP_CASES:
        positions = sequence_positions(SEQLEN, mesh, layout)
        leaves = [x.index_select(1, positions).requires_grad_(True) for x in (q, k, v)]
        call = context_parallel_attention(mesh.ring_group, rotate, causal, layout == "zigzag")
        out = call(*leaves)  # [B, S_local, H, D] shards, as ours
        grads = torch.autograd.grad(out, leaves, dout.index_select(1, positions))
        results.append((positions.numpy(), [x.detach().double().numpy() for x in (out, *grads)]))
    return results


def test_torch_context_parallel_runs_on_cpu_and_is_exact():
    # fp32 against float64: the CPU kernel and torch's merge (float32) stay within 1e-5 here
    for per_case in run(2, _torch_cp_rank, timeout_s=120):
        for (layout, causal, rotate), (positions, results) in zip(CP_CASES, per_case):
            expected = _whole_oracle(*_inputs(KV_HEADS), causal)
            for got, want in zip(results, expected):
                torch.testing.assert_close(torch.from_numpy(got), want[:, positions], rtol=0, atol=1e-5,
                                           msg=lambda m: f"{layout} causal={causal} {rotate}: {m}")
