"""Tile sizes, warps and pipeline stages of the Triton kernels, one small table per GPU family.

Keys are the padded head dim (the next power of two, at least 16). ``block_m`` tiles
query rows and ``block_n`` key rows in every kernel. ``bwd_dq_into`` is the dQ kernel
adding into a float32 accumulator (a ring step's, ``flash_attn_backward_into``): its
float32 epilogue favours another tile than the plain dQ kernel at some head dims. The
tables are chosen offline (never autotuned at import) and every entry is compiled for
its target on CPU by the test suite (``kernels.aot``), which also checks that its
shared memory fits and reads its register spills. The sm90 d64 and d128 rows are timed
on an H200 with ``usp-bench tune`` (``kernels/NOTES.md``: every change with its
prediction and result).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace

import torch
import triton

KERNELS = ("fwd", "bwd_dkdv", "bwd_dq", "bwd_dq_into")
PADDED_HEAD_DIMS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class GpuFamily:
    """A table of configs and the CUDA target it is compiled and checked for."""

    name: str
    capability: tuple[int, int]
    shared_memory_bytes: int  # the most one program may use (opt-in limit)
    table: dict[str, dict[int, KernelConfig]]


def _table(fwd, dkdv, dq, dq_into=None):
    """One row per kernel, one entry per padded head dim; ``dq_into`` defaults to ``dq``."""
    return {kernel: dict(zip(PADDED_HEAD_DIMS, rows)) for kernel, rows in
            (("fwd", fwd), ("bwd_dkdv", dkdv), ("bwd_dq", dq), ("bwd_dq_into", dq_into or dq))}


C = KernelConfig
HOPPER = GpuFamily("sm90", (9, 0), 232448, _table(
    fwd=[C(128, 64, 4, 3), C(128, 64, 4, 3), C(64, 64, 4, 3), C(128, 64, 8, 3), C(64, 64, 4, 2)],
    dkdv=[C(32, 128, 4, 3), C(32, 128, 4, 3), C(16, 64, 4, 3), C(32, 128, 8, 3), C(32, 64, 4, 2)],
    dq=[C(128, 32, 4, 3), C(128, 32, 4, 3), C(64, 32, 4, 3), C(128, 32, 8, 3), C(64, 32, 4, 2)],
    dq_into=[C(128, 32, 4, 3), C(128, 32, 4, 3), C(64, 32, 4, 3), C(64, 32, 4, 3), C(64, 32, 4, 2)],
))
AMPERE = GpuFamily("sm80", (8, 0), 166912, _table(
    fwd=[C(128, 64, 4, 3), C(128, 64, 4, 3), C(128, 64, 4, 3), C(128, 64, 8, 2), C(64, 64, 4, 2)],
    dkdv=[C(32, 128, 4, 2), C(32, 128, 4, 2), C(32, 128, 8, 2), C(32, 128, 8, 2), C(32, 64, 4, 2)],
    dq=[C(128, 32, 4, 2), C(128, 32, 4, 2), C(128, 32, 4, 2), C(128, 32, 8, 2), C(64, 32, 4, 2)],
))
# Consumer and workstation parts (sm_86, sm_89, sm_120) have about 100 KB per program.
SMALL_SMEM = GpuFamily("sm86", (8, 6), 101376, _table(
    fwd=[C(64, 64, 4, 2), C(64, 64, 4, 2), C(64, 64, 4, 2), C(64, 64, 4, 2), C(64, 32, 4, 1)],
    dkdv=[C(32, 64, 4, 2), C(32, 64, 4, 2), C(32, 64, 8, 2), C(32, 64, 8, 2), C(16, 32, 4, 1)],
    dq=[C(64, 32, 4, 2), C(64, 32, 4, 2), C(64, 32, 4, 2), C(64, 32, 4, 2), C(32, 32, 4, 1)],
))
GPU_FAMILIES = (HOPPER, AMPERE, SMALL_SMEM)

# The Triton interpreter runs programs one after another: one tiny tile for everything.
INTERPRETER_CONFIG = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)

_OVERRIDES: dict[tuple[str, int], KernelConfig] = {}  # (kernel, padded head dim) -> config, for tuning


@contextlib.contextmanager
def config_override(kernel: str, head_dim: int, config: KernelConfig):
    """Within the block, ``kernel`` (one of KERNELS) at this head dim runs ``config``, as
    given for every dtype and device, instead of its table entry: for tuning the table
    (``usp-bench tune``), never for production calls."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    key = (kernel, padded_head_dim(head_dim))
    saved = _OVERRIDES.get(key)
    _OVERRIDES[key] = config
    try:
        yield
    finally:
        if saved is None:
            del _OVERRIDES[key]
        else:
            _OVERRIDES[key] = saved


@triton.jit
def _probe():
    pass


def interpreter_active() -> bool:
    """True when this package's ``@triton.jit`` functions run on the CPU through Triton's
    interpreter, i.e. ``TRITON_INTERPRET`` was on when the package was imported."""
    return not isinstance(_probe, triton.runtime.JITFunction)


def padded_head_dim(head_dim: int) -> int:
    """The tile width used for a head dim: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


def family_for(capability: tuple[int, int]) -> GpuFamily:
    """The config table for a CUDA compute capability."""
    if capability[0] == 9:
        return HOPPER
    if capability in ((8, 0), (8, 7)) or capability[0] == 10:
        return AMPERE
    return SMALL_SMEM


def config_for_dtype(config: KernelConfig, dtype: torch.dtype) -> KernelConfig:
    """float32 tiles take twice the bytes: halve both tile sizes (not below 16)."""
    if dtype.itemsize < 4:
        return config
    return replace(config, block_m=max(16, config.block_m // 2), block_n=max(16, config.block_n // 2),
                   num_stages=min(config.num_stages, 2))


def gpu_index(device: torch.device) -> int:
    """The index of a CUDA ``device``; the current GPU's for a bare "cuda"."""
    return torch.cuda.current_device() if device.index is None else device.index


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    """The compute capability of GPU ``index``, asked once: the query costs tens of
    microseconds of host time per call on some hosts, and every kernel call needs it."""
    return torch.cuda.get_device_capability(index)


def get_config(kernel: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """The config of ``kernel`` (one of KERNELS) for this head dim, dtype and device."""
    override = _OVERRIDES.get((kernel, padded_head_dim(head_dim)))
    if override is not None:
        return override
    if interpreter_active():
        return INTERPRETER_CONFIG
    if device.type != "cuda":
        raise ValueError(f"the triton kernels' configs are for CUDA devices, got {device}")
    family = family_for(_capability(gpu_index(device)))
    return config_for_dtype(family.table[kernel][padded_head_dim(head_dim)], dtype)
