"""Forward (out, lse) and backward (dq, dk, dv) of every backend against float64 naive attention."""

import contextlib
import itertools
import zlib

import pytest
import torch
import triton
import triton.language as tl

from usp.bench.numerics import Case, compare, reference, run_backend, run_case
from conftest import DEVICE
from usp.kernels import AttentionShape
from usp.kernels.configs import KERNELS, KernelConfig, config_override, get_config
from usp.kernels.triton_common import program_tile

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim). Together they cover head dims
# 16/64/80/96/128/256, lengths 1/17/64/129/200, Sq < Sk and Sq > Sk, MHA, GQA 2:1 with two
# K/V heads, and MQA (4 or 2 query heads on one K/V head).
SHAPES = [
    (1, 1, 1, 2, 2, 16),
    (2, 17, 17, 2, 2, 64),
    (1, 64, 64, 4, 1, 80),
    (1, 129, 129, 4, 1, 128),
    (1, 200, 200, 2, 2, 16),
    (1, 17, 129, 4, 1, 64),
    (1, 200, 64, 4, 2, 80),
    (1, 1, 200, 2, 2, 128),
    (1, 129, 1, 2, 1, 16),
    (1, 64, 100, 2, 2, 96),
    (1, 33, 17, 2, 1, 256),
]
# The naive backend is the baseline of the others; in float64 its hand-written backward
# is held to a few ulps of autograd's.
DTYPES = {
    "triton": (torch.float32, torch.float16),
    "torch": (torch.float32, torch.float16) + ((torch.float64,) if DEVICE.type == "cpu" else ()),
    "naive": (torch.float64, torch.float32),
}
CASES = [
    Case(backend, dtype, AttentionShape(*shape), causal)
    for backend, dtypes in DTYPES.items()
    for dtype, shape, causal in itertools.product(dtypes, SHAPES, (False, True))
]


# A softmax scale other than the default, large enough to make the softmax peaky.
CASES += [Case(backend, torch.float32, AttentionShape(1, 65, 90, 4, 2, 64), causal, softmax_scale=0.5)
          for backend in DTYPES for causal in (False, True)]


def _seed(case: Case) -> int:
    return zlib.crc32(case.label.encode())


# Long shapes the interpreter keeps in the default run in fp32: a partial last tile
# after several blocks, with Sq < Sk and with Sq > Sk.
INTERPRETED_LONG = {(1, 17, 129, 4, 1, 64), (1, 129, 1, 2, 1, 16)}


def _slow_under_the_interpreter(case: Case) -> bool:
    """The interpreter's longest runs, the triton backend at 129 tokens or more, go to the
    slow step on a CPU, but for the fp32 shapes of INTERPRETED_LONG (every shorter shape
    stays in the default run)."""
    s = case.shape
    shape = (s.batch, s.seqlen_q, s.seqlen_k, s.heads, s.kv_heads, s.head_dim)
    return (DEVICE.type == "cpu" and case.backend == "triton" and max(s.seqlen_q, s.seqlen_k) >= 129
            and not (case.dtype == torch.float32 and shape in INTERPRETED_LONG))


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if _slow_under_the_interpreter(c) else c
                                  for c in CASES], ids=lambda c: c.label.replace(" ", "-"))
def test_backend_matches_float64_oracle(case):
    result = run_case(case, device=DEVICE, seed=_seed(case))
    assert result.passed, f"{case.label}: {result.failures}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape", SHAPES + [(2, 1000, 1000, 8, 2, 128), (1, 777, 333, 4, 4, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_on_gpu(backend, shape, causal):
    case = Case(backend, torch.bfloat16, AttentionShape(*shape), causal)
    result = run_case(case, device=DEVICE, seed=_seed(case))
    assert result.passed, f"{case.label}: {result.failures}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_harness_rejects_a_slightly_wrong_gradient(monkeypatch, dtype):
    """The tolerance catches a 1% error in one gradient of an otherwise exact backend."""
    from usp.kernels import backends

    torch_backend = backends.BACKENDS["torch"]

    def dv_off_by_one_percent(*args, **kwargs):
        dq, dk, dv = torch_backend.backward(*args, **kwargs)
        return dq, dk, dv * 1.01

    wrong = backends.FunctionBackend("wrong", torch_backend.forward, dv_off_by_one_percent)
    monkeypatch.setitem(backends.BACKENDS, "wrong", wrong)
    result = run_case(Case("wrong", dtype, AttentionShape(1, 64, 64, 2, 2, 16), True))
    assert [f.split(":")[0] for f in result.failures] == ["dv"]


def test_harness_rejects_nan():
    from usp.bench.numerics import compare

    case = Case("naive", torch.float32, AttentionShape(1, 2, 2, 1, 1, 16), False)
    ref = {n: torch.zeros(2) for n in ("out", "lse", "dq", "dk", "dv")}
    results = dict(ref, dq=torch.tensor([0.0, float("nan")]))
    _, _, failures = compare(case, results, ref, baseline=ref)
    assert [f.split(":")[0] for f in failures] == ["dq"]


@pytest.mark.parametrize("backend", ["triton", "torch", "naive"])
def test_half_precision_scores_beyond_the_fp16_range(backend):
    """q.k about 1e5 before the softmax scale, over fp16's largest value (65504): every
    backend stays finite and within the rule (the naive one overflowed to NaN)."""
    g = torch.Generator().manual_seed(3)
    make = lambda *s: (40 + torch.randn(*s, generator=g)).to(DEVICE, torch.float16)  # noqa: E731
    q, k = make(1, 32, 2, 64), make(1, 32, 2, 64)
    v = torch.randn(1, 32, 2, 64, generator=g).to(DEVICE, torch.float16)
    dout = torch.randn(1, 32, 2, 64, generator=g).to(DEVICE, torch.float16)
    assert (torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) > 65504).all()
    case = Case(backend, torch.float16, AttentionShape(1, 32, 32, 2, 2, 64), True)
    got = run_backend(backend, q, k, v, dout, True)
    baseline = None if backend == "naive" else run_backend("naive", q, k, v, dout, True)
    _, _, failures = compare(case, got, reference(q, k, v, dout, True), baseline)
    assert not failures, failures


# Tiles other than the interpreter's 16 x 16 (as ``usp-bench tune`` tries them): block_m
# and block_n unequal both ways, over lengths that leave partial tiles.
OTHER_TILES = [KernelConfig(32, 16, 1, 1), KernelConfig(16, 32, 1, 1)]


@pytest.mark.parametrize("tile", OTHER_TILES, ids=lambda t: f"{t.block_m}x{t.block_n}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_the_kernels_are_exact_at_other_tiles(tile, causal):
    case = Case("triton", torch.float32, AttentionShape(1, 40, 56, 2, 1, 32), causal)
    with contextlib.ExitStack() as stack:
        for kernel in KERNELS:
            stack.enter_context(config_override(kernel, 32, tile))
        result = run_case(case, device=DEVICE, seed=_seed(case))
    assert result.passed, f"{case.label} at {tile}: {result.failures}"


@triton.jit
def _record_tiles(Out, heads, BLOCK: tl.constexpr, HEAVY_LAST: tl.constexpr, ACROSS_HEADS: tl.constexpr):
    start, bh, b, h = program_tile(BLOCK, heads, HEAVY_LAST, ACROSS_HEADS)
    slot = Out + (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * 4  # the launch order
    tl.store(slot, start)
    tl.store(slot + 1, bh)
    tl.store(slot + 2, b.to(tl.int32))
    tl.store(slot + 3, h.to(tl.int32))


@pytest.mark.parametrize("across_heads", [False, True], ids=["by-head", "across-heads"])
@pytest.mark.parametrize("heavy_last", [False, True])
def test_program_tiles_cover_every_tile_once_in_the_chosen_order(heavy_last, across_heads):
    """Grid (4 tiles, batch 2 x heads 3), programs in launch order (axis 0 fastest): by
    head, each head's 4 tiles in turn; ACROSS_HEADS, tile 0 of the 6 heads, then tile 1,
    ...; HEAVY_LAST (query tiles under a causal mask) reverses the tiles, longest first.
    Every (tile, head) comes once either way, with batch and head read off it."""
    out = torch.full((6 * 4, 4), -1, dtype=torch.int32, device=DEVICE)
    _record_tiles[(4, 6)](out, 3, BLOCK=16, HEAVY_LAST=heavy_last, ACROSS_HEADS=across_heads)
    tiles = [3, 2, 1, 0] if heavy_last else [0, 1, 2, 3]
    order = ([(t, bh) for t in tiles for bh in range(6)] if across_heads
             else [(t, bh) for bh in range(6) for t in tiles])
    expected = torch.tensor([[16 * t, bh, bh // 3, bh % 3] for t, bh in order], dtype=torch.int32)
    assert torch.equal(out.cpu(), expected)


def test_causal_tiles_go_across_heads_when_each_head_fits_in_a_wave(monkeypatch):
    """The rule measured on an H200 (132 SMs): across heads under a causal mask when a
    head's tiles fit in one wave (tiles <= SMs) and each head keeps two programs side by
    side (heads <= SMs / 2); head after head otherwise, and for every other mask. Without
    a GPU every causal launch goes across heads. The SM count is asked once per device."""
    import usp.kernels.triton_common as common
    from usp.kernels.triton_common import MaskSpec, tiles_across_heads

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: asked.append(index) or type("Props", (), {"multi_processor_count": 132}))
    common._multiprocessors.cache_clear()
    causal, gpu = MaskSpec(right=0), torch.device("cuda", 0)
    try:
        verdicts = {(tiles, heads): tiles_across_heads(causal, tiles, heads, gpu)
                    for tiles, heads in [(64, 8), (64, 32), (128, 16), (132, 66), (133, 16), (512, 8), (8, 256),
                                         (32, 67)]}
        assert verdicts == {(64, 8): True, (64, 32): True, (128, 16): True, (132, 66): True, (133, 16): False,
                            (512, 8): False, (8, 256): False, (32, 67): False}
        assert asked == [0]
    finally:
        common._multiprocessors.cache_clear()
    for mask in (MaskSpec(), MaskSpec(left=8, right=0), MaskSpec(left=8), MaskSpec(right=4)):
        assert tiles_across_heads(mask, 8, 2, torch.device("cpu")) == (mask.left is None and mask.right is not None)
    # and the launchers pass it per launch (here on the CPU: causal goes across)
    from usp.kernels.flash_bwd import backward_launches
    from usp.kernels.flash_fwd import forward_launch

    q = torch.zeros(1, 32, 2, 16)
    lse = torch.zeros(1, 2, 32)
    config = KernelConfig(16, 16, 1, 1)
    for mask in (causal, MaskSpec()):
        launches = [forward_launch(q, q, q, q, lse, mask=mask, scale=0.25, config=config),
                    *backward_launches(q, q, q, q, q, lse, lse, lse, q, q, q, mask=mask, scale=0.25,
                                       configs={"bwd_dkdv": config, "bwd_dq": config})[1:]]
        assert [launch.constexprs["ACROSS_HEADS"] for launch in launches] == [mask is causal] * 3
    # forced either way for every launch inside the override (usp-bench kernels --tile-order), then the rule again
    from usp.kernels.triton_common import tile_order_override
    for order, expected in (("by-head", False), ("across-heads", True)):
        with tile_order_override(order):
            assert tiles_across_heads(causal, 8, 2, gpu) == tiles_across_heads(MaskSpec(), 8, 2, gpu) == expected
    assert tiles_across_heads(causal, 8, 2, torch.device("cpu")) and not tiles_across_heads(MaskSpec(), 8, 2, gpu)
    with pytest.raises(ValueError, match="order must be one of"):
        with tile_order_override("sideways"):
            pass


def test_the_gpu_is_asked_its_capability_once_and_switched_to_only_when_not_current(monkeypatch):
    """Host work per kernel call: ``get_config`` on a GPU reads the table of the device's
    capability, queried once per device; ``device_guard`` switches devices only for a
    tensor on another GPU than the current one (each costs host time on every call)."""
    import usp.kernels.configs as configs
    from usp.kernels.triton_common import device_guard

    asked = []
    monkeypatch.setattr(configs, "interpreter_active", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    configs._capability.cache_clear()
    try:
        for _ in range(3):
            for device in ("cuda:1", "cuda", "cuda:0"):
                config = get_config("bwd_dq_into", 128, torch.bfloat16, torch.device(device))
                assert config == configs.HOPPER.table["bwd_dq_into"][128]
        assert asked == [1, 0]
    finally:
        configs._capability.cache_clear()
    assert isinstance(device_guard(torch.device("cuda:1")), contextlib.nullcontext)
    assert isinstance(device_guard(torch.device("cuda")), contextlib.nullcontext)
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(device_guard(torch.device("cuda:0")), torch.cuda.device)


def test_a_config_override_applies_inside_its_block_only():
    table, forward = (get_config(kernel, 64, torch.float16, DEVICE) for kernel in ("bwd_dq", "fwd"))
    other = KernelConfig(64, 64, 8, 2)
    with config_override("bwd_dq", 60, other):  # head dim 60 runs the padded 64 tiles
        assert get_config("bwd_dq", 64, torch.float16, DEVICE) == other
        assert get_config("fwd", 64, torch.float16, DEVICE) == forward  # the other kernels keep theirs
        with config_override("bwd_dq", 64, KernelConfig(16, 16, 1, 1)):
            assert get_config("bwd_dq", 64, torch.float32, DEVICE) == KernelConfig(16, 16, 1, 1)
        assert get_config("bwd_dq", 64, torch.float16, DEVICE) == other
    assert get_config("bwd_dq", 64, torch.float16, DEVICE) == table
    with pytest.raises(ValueError, match="kernel must be one of"):
        with config_override("fwd_dq", 64, other):
            pass
