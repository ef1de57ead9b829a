"""Pieces shared by the Triton forward and backward kernels and their launchers.

Conventions inside the kernels: scores live in the log2 domain (``qk_scale`` is the
softmax scale times log2(e), so ``exp2`` replaces ``exp``); a query row ``i`` sees key
``j`` iff ``j <= i + seqlen_k - seqlen_q`` when causal (bottom-right alignment).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .configs import interpreter_active

LOG2E = math.log2(math.e)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def program_tile(BLOCK: tl.constexpr, heads):
    """This program's tile: (first row, flat batch*heads index, batch, head), the last two int64."""
    bh = tl.program_id(1)
    return tl.program_id(0) * BLOCK, bh, (bh // heads).to(tl.int64), (bh % heads).to(tl.int64)


@triton.jit
def tile_pointers(base, b, h, row0, rows, cols, stride_b, stride_s, stride_h, stride_d):
    """Pointers to rows ``row0 + rows`` and head dims ``cols`` of head ``h``, batch ``b`` of a
    [B, S, H, D] tensor. The origin (``b, h, row0``: int64) takes the large offsets, so long
    sequences cannot overflow 32 bits; ``rows`` and ``cols`` stay within a tile."""
    return base + b * stride_b + h * stride_h + row0 * stride_s + rows[:, None] * stride_s + cols[None, :] * stride_d


@triton.jit
def load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a [len(rows), len(cols)] tile, zero outside ``rows < n_rows`` and ``cols < n_cols``."""
    if CHECK_ROWS:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def store_tile(ptrs, tile, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Store a tile, skipping elements outside ``rows < n_rows`` and ``cols < n_cols``."""
    if CHECK_ROWS:
        if CHECK_COLS:
            tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
        else:
            tl.store(ptrs, tile, mask=rows[:, None] < n_rows)
    else:
        if CHECK_COLS:
            tl.store(ptrs, tile, mask=cols[None, :] < n_cols)
        else:
            tl.store(ptrs, tile)


@triton.jit
def load_row_stats(lse2_ptr, delta_ptr, rows, n_rows, CHECK_ROWS: tl.constexpr):
    """The backward's per-row log2-domain LSE and delta; rows past ``n_rows`` get lse2 = +inf
    and delta = 0, so their probabilities and gradients are exactly 0."""
    if CHECK_ROWS:
        lse2 = tl.load(lse2_ptr + rows, mask=rows < n_rows, other=float("inf"))
        delta = tl.load(delta_ptr + rows, mask=rows < n_rows, other=0.0)
    else:
        lse2 = tl.load(lse2_ptr + rows)
        delta = tl.load(delta_ptr + rows)
    return lse2, delta


# Which key blocks a query tile visits, and which query blocks a key tile visits, causal
# and bottom-right aligned: query i sees key j iff j <= i + offset, offset = Sk - Sq. An
# example with Sq = 6, Sk = 10 (offset 4) and 4 x 4 tiles (x: visible):
#
#                 keys  0 1 2 3 | 4 5 6 7 | 8 9
#     query tile 0  0   x x x x | x . . . | . .    key_block_range(0): keys [0, 4) need no
#                   1   x x x x | x x . . | . .    mask (row 0 sees up to 4), [4, 8) need the
#                   2   x x x x | x x x . | . .    mask, 8 and 9 are never visited (row 3
#                   3   x x x x | x x x x | . .    sees up to 7)
#     query tile 1  4   x x x x | x x x x | x .    key_block_range(4): [0, 8) unmasked,
#                   5   x x x x | x x x x | x x    [8, 10) masked
#
# For query rows [m, m + BLOCK_M): row m sees keys up to m + offset, so keys before
# m + offset + 1, rounded down to a block, need no mask (full_end); the last row sees up to
# m + BLOCK_M - 1 + offset, so keys from m + BLOCK_M + offset on are never visited (end).
# For key rows [n, n + BLOCK_N) (the dK/dV kernel): query n - offset is the first to see
# key n, so query blocks start at it, rounded down to a block (begin); from query
# n + BLOCK_N - 1 - offset on a row sees the whole key tile, so query blocks from there,
# rounded up to a block, need no mask (full_begin). Key tile [4, 8) above: begin 0,
# full_begin 4; key tile [8, 12): begin 4, full_begin 8 (no query block after it).
# Both clamp to the sequence ends; without causal every block is unmasked.


@triton.jit
def key_block_range(start_m, seqlen_q, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """For query rows [start_m, start_m + BLOCK_M): keys [0, full_end) need no mask,
    keys [full_end, end) need the causal and bounds masks, later keys are never seen."""
    if CAUSAL:
        offset = seqlen_k - seqlen_q
        end = tl.minimum(tl.maximum(start_m + BLOCK_M + offset, 0), seqlen_k)
        full_end = tl.minimum(tl.maximum(start_m + offset + 1, 0), seqlen_k)
    else:
        end = seqlen_k
        full_end = seqlen_k
    full_end = full_end // BLOCK_N * BLOCK_N
    return full_end, end


@triton.jit
def query_block_range(start_n, seqlen_q, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """For key rows [start_n, start_n + BLOCK_N): queries before ``begin`` see none of them,
    queries [begin, full_begin) need the causal mask, queries from ``full_begin`` on see all."""
    if CAUSAL:
        offset = seqlen_k - seqlen_q
        first_row = tl.minimum(tl.maximum(start_n - offset, 0), seqlen_q)
        full_row = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), seqlen_q)
        begin = first_row // BLOCK_M * BLOCK_M
        full_begin = tl.cdiv(full_row, BLOCK_M) * BLOCK_M
    else:
        begin = 0
        full_begin = 0
    return begin, full_begin


@triton.jit
def causal_visible(rows, cols, seqlen_q, seqlen_k):
    """[len(rows), len(cols)] booleans: does query ``rows[i]`` see key ``cols[j]``."""
    return cols[None, :] <= rows[:, None] + (seqlen_k - seqlen_q)


def check_triton_inputs(q: torch.Tensor) -> None:
    """The Triton kernels need CUDA tensors (or the interpreter) and a dtype they compute right."""
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"the triton backend supports float16, bfloat16 and float32, got q of dtype {q.dtype}")
    if interpreter_active():
        if q.dtype == torch.bfloat16:
            raise TypeError("q is bfloat16, which Triton's CPU interpreter computes wrongly; "
                            "use float16 or float32 under TRITON_INTERPRET=1, or run on a GPU")
    elif q.device.type != "cuda":
        raise ValueError(f"the triton backend needs CUDA tensors, got q on {q.device} "
                         "(set TRITON_INTERPRET=1 before importing kernels to run it on the CPU)")


def device_guard(device: torch.device):
    """Launch on the tensors' GPU rather than the current one."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact float32 products, not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass
class Launch:
    """One kernel launch, described so that it can be run or compiled ahead of time."""

    kernel: object  # a @triton.jit function
    grid: tuple[int, int]
    args: tuple  # runtime arguments, in the kernel's order
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    """Element strides of a [B, S, H, D] tensor; any layout works, views included."""
    return tuple(x.stride())
