"""Ring, Ulysses and USP attention on gloo processes against float64 naive attention on
the whole sequence, and the traffic they generate against its formula.

One launch per world size runs every case of that size (``bench.dist_checks``); the
tests below read its results, so each case still passes or fails on its own.
"""

import functools
import itertools

import pytest
import torch

from usp.attention.volume import attention_volume
from usp.bench.dist_checks import DistCase, check_cases
from usp.bench.launch import run

FP64, FP32 = torch.float64, torch.float32
HEADS = (8, 2, 1)  # K/V heads for 8 query heads: MHA, GQA, MQA (replicated when below u)
LAYOUTS = ("zigzag", "contiguous")  # stripe: the cases that name it
PLACEMENTS = ("ulysses_inner", "ring_inner")


def _product(method, u, r, world, placements=PLACEMENTS[:1], layouts=LAYOUTS, heads=HEADS, **kw):
    return [DistCase(method, u, r, world, placement=p, layout=lay, causal=c, kv_heads=h, **kw)
            for p, lay, c, h in itertools.product(placements, layouts, (False, True), heads)]


def _uneven(method, u, r, world, kv_heads) -> list[DistCase]:
    """6 query heads over u = 4: shares 2, 2, 1, 1 (K/V heads repeated as the shares need)."""
    return [DistCase(method, u, r, world, placement=p, layout="zigzag" if r > 1 else "contiguous", causal=c, heads=6,
                     kv_heads=h) for p, c, h in itertools.product(PLACEMENTS if r > 1 else PLACEMENTS[:1],
                                                                  (False, True), kv_heads)]


def _cases(world: int) -> list[DistCase]:
    if world == 1:
        return (_product("usp", 1, 1, 1, layouts=("zigzag",), heads=(2,))
                + [DistCase("ring", 1, 1, 1, backend="torch", dtype=FP32),
                   DistCase("ulysses", 1, 1, 1, kv_heads=1)])
    if world == 2:
        return (_product("ring", 1, 2, 2) + _product("ulysses", 2, 1, 2, layouts=("contiguous",))
                + _product("usp", 1, 2, 2, heads=(2,)) + _product("usp", 2, 1, 2, layouts=("zigzag",), heads=(1,))
                + _product("ring", 1, 2, 2, heads=(2,), backend="torch", dtype=FP32)
                + _product("ring", 1, 2, 2, layouts=("stripe",), heads=(8, 2)))
    if world == 4:
        return (_product("ring", 1, 4, 4, heads=(8, 1)) + _product("ulysses", 4, 1, 4, layouts=("contiguous",))
                + _product("usp", 2, 2, 4, placements=PLACEMENTS)
                + _product("usp", 2, 2, 4, placements=PLACEMENTS, heads=(1,), backend="torch", dtype=FP32)
                + _uneven("ulysses", 4, 1, 4, kv_heads=(6, 2, 1))
                + _product("ring", 1, 4, 4, layouts=("stripe",), heads=(2,))
                + _product("usp", 2, 2, 4, layouts=("stripe",), heads=(2,))
                + _product("usp", 2, 2, 4, layouts=("stripe",), heads=(1,), backend="torch", dtype=FP32)
                + [DistCase("ulysses", 4, 1, 4, causal=True, heads=6, kv_heads=2, backend="torch", dtype=FP32),
                   DistCase("usp", 2, 2, 4, layout="zigzag", causal=True, kv_heads=2, backend="triton", dtype=FP32),
                   DistCase("usp", 2, 2, 4, layout="contiguous", causal=False, kv_heads=1, backend="triton",
                            dtype=FP32, placement="ring_inner")])
    if world == 8:
        return (_product("usp", 2, 4, 8, placements=PLACEMENTS, heads=(8, 2))
                + _product("usp", 4, 2, 8, placements=PLACEMENTS, heads=(8, 2))
                + _product("usp", 2, 2, 8, placements=PLACEMENTS, heads=(2,))  # dp = 2
                + _product("ring", 1, 8, 8, layouts=("zigzag",), heads=(2,))
                + _product("ulysses", 8, 1, 8, layouts=("contiguous",), heads=(1,))
                + _product("usp", 4, 2, 8, layouts=("zigzag",), heads=(2,), backend="torch", dtype=FP32)
                + _uneven("usp", 4, 2, 8, kv_heads=(6, 3))
                + _product("usp", 2, 4, 8, layouts=("stripe",), heads=(2,)))
    raise ValueError(world)


WORLDS = (1, 2, 4, 8)
# the 8-rank launch (about 25 s on 2 cores) runs in the slow step
ALL_CASES = [pytest.param(case, marks=pytest.mark.slow) if world == 8 else case
             for world in WORLDS for case in _cases(world)]


def _case_id(case: DistCase) -> str:
    return f"w{case.world_size}-{case.label.replace(' ', '-')}"


@functools.cache
def _results(world: int) -> dict:
    """Every rank's result for every case of this world size (one launch)."""
    cases = _cases(world)
    per_rank = run(world, check_cases, (cases,), pg_timeout_s=120, timeout_s=600)
    return {case: [rank_results[i] for rank_results in per_rank] for i, case in enumerate(cases)}


@pytest.mark.parametrize("case", ALL_CASES, ids=_case_id)
def test_matches_naive_attention(case):
    for rank, result in enumerate(_results(case.world_size)[case]):
        assert not result["failures"], f"rank {rank}: {result['failures']}"


def expected_traffic(case: DistCase, ulysses_rank: int) -> dict:
    """What one rank sends per forward and per backward, by the formula of usp.attention.volume."""
    volume = attention_volume(case.batch, case.seqlen, case.heads, case.kv_heads, case.head_dim, case.ulysses_degree,
                              case.ring_degree, torch.finfo(case.dtype).bits // 8, ulysses_rank)
    return {name: dict(p2p_sends=v.p2p_sends, p2p_bytes=v.p2p_bytes, all_to_alls=v.all_to_alls,
                       all_to_all_bytes=v.all_to_all_bytes)
            for name, v in (("forward", volume.forward), ("backward", volume.backward))}


@pytest.mark.parametrize("case", ALL_CASES, ids=_case_id)
def test_traffic_matches_the_formula_and_overlaps(case):
    for rank, result in enumerate(_results(case.world_size)[case]):
        expected = expected_traffic(case, result["ulysses_rank"])
        assert result["forward"] == expected["forward"], f"rank {rank}"
        assert result["backward"] == expected["backward"], f"rank {rank}"
        assert result["overlapped"], f"rank {rank}: a ring step computed before the next K/V was posted"


def test_recorded_counts_of_one_config():
    """USP u2 x r2, b2, 48 tokens, 8 query / 2 K/V heads, d16, float64: the counts as
    measured, written out so a change in traffic shows up in review."""
    case = DistCase("usp", 2, 2, 4, placement="ulysses_inner", layout="zigzag", causal=True, kv_heads=2)
    result = _results(4)[case][0]
    # After the all-to-all a rank holds 2 x 24 positions x 1 K/V head x 16 x 8 B = 6,144 B of K (and of V):
    # forward, one ring hop of K and V; backward, K and V again plus dK, dV on both steps.
    # The all-to-alls send half of q (24,576 B), k and v (6,144 B each) and out (24,576 B).
    assert result["forward"] == dict(p2p_sends=2, p2p_bytes=12_288, all_to_alls=4, all_to_all_bytes=30_720)
    assert result["backward"] == dict(p2p_sends=6, p2p_bytes=36_864, all_to_alls=4, all_to_all_bytes=30_720)


@pytest.mark.gpu
def test_usp_with_triton_on_nccl_with_one_gpu():
    """The NCCL code path initialises and USP on the triton backend matches the oracle."""
    cases = [DistCase("usp", 1, 1, 1, backend="triton", dtype=dtype, causal=causal, seqlen=1024, heads=8,
                      kv_heads=2, head_dim=128)
             for dtype in (torch.float16, torch.bfloat16) for causal in (False, True)]
    (results,) = run(1, check_cases, (cases, 0, "cuda"), backend="nccl", pg_timeout_s=120)
    for case, result in zip(cases, results):
        assert not result["failures"], (case.label, result["failures"])


def _calls_without_host_syncs():
    """On NCCL: the mesh's checks have gloo twins (on 2 ranks or more), and a checked USP
    call, forward and backward on the triton backend, never synchronises the host with
    the GPU (``torch.cuda.set_sync_debug_mode("error")`` raises at any synchronising call)."""
    import torch.distributed as dist

    from usp.attention import usp_attention
    from usp.comm import init_mesh
    from usp.comm.agreement import host_group

    world = dist.get_world_size()
    mesh = init_mesh(1, world)
    q, k, v = (torch.randn(1, 2048 // world, heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for heads in (8, 2, 2))

    def call():
        usp_attention(q, k, v, mesh, causal=True, backend="triton").sum().backward()

    call()  # compiles the kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return dist.get_backend(host_group(mesh.sp_group)) if world > 1 else "one rank: nothing exchanged"


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2])
def test_a_checked_call_on_nccl_never_syncs_the_host(world):
    """With one GPU this shows the kernels and the ring loop do not synchronise; the
    exchange over the gloo twin runs with two GPUs or more."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    expected = "gloo" if world > 1 else "one rank: nothing exchanged"
    assert run(world, _calls_without_host_syncs, backend="nccl", pg_timeout_s=120) == [expected] * world
