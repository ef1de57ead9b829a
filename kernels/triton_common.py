"""Pieces shared by the Triton forward and backward kernels and their launchers.

Conventions inside the kernels: scores live in the log2 domain (``qk_scale`` is the
softmax scale times log2(e), so ``exp2`` replaces ``exp``); a query row ``i`` sees key
``j`` iff ``j <= i + seqlen_k - seqlen_q`` when causal (bottom-right alignment).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .configs import gpu_index, interpreter_active
from .tokens import TokenPositions

LOG2E = math.log2(math.e)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def program_tile(BLOCK: tl.constexpr, heads, HEAVY_LAST: tl.constexpr, ACROSS_HEADS: tl.constexpr):
    """This program's tile: (first row, flat batch*heads index, batch, head), the last two int64.

    The grid is (tiles, batch * heads), and the GPU starts programs in launch order (axis
    0 fastest). By default a head's tiles are handed out one after another, head after
    head: programs running together share that head's data in L2. With ACROSS_HEADS
    (tiles of unequal work, as under a causal mask) each tile index is handed out for
    every head before the next: the GPU starts every head's longest programs first and
    ends on short ones, instead of ending on the last head's long ones while other SMs
    idle. HEAVY_LAST: the tiles' work grows with their row (query tiles under a causal
    mask; key tiles' work falls with theirs), so the order is last row first:

        causal, 2 heads x 3 query tiles    work     #  ##  ###     #  ##  ###
        program, by head                            2   1    0     5   4    3
        program, ACROSS_HEADS                       4   2    0     5   3    1
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    if ACROSS_HEADS:
        flat = bh * tl.num_programs(0) + tile
        tile = flat // tl.num_programs(1)
        bh = flat % tl.num_programs(1)
    if HEAVY_LAST:
        tile = tl.num_programs(0) - 1 - tile
    return tile * BLOCK, bh, (bh // heads).to(tl.int64), (bh % heads).to(tl.int64)


@triton.jit
def tile_pointers(base, b, h, row0, rows, cols, stride_b, stride_s, stride_h, stride_d):
    """Pointers to rows ``row0 + rows`` and head dims ``cols`` of head ``h``, batch ``b`` of a
    [B, S, H, D] tensor. The origin (``b, h, row0``: int64) takes the large offsets, so long
    sequences cannot overflow 32 bits; ``rows`` and ``cols`` stay within a tile."""
    return base + b * stride_b + h * stride_h + row0 * stride_s + rows[:, None] * stride_s + cols[None, :] * stride_d


@triton.jit
def kv_tile_pointers(K, V, b, h_kv, row0, rows, cols, stride_kb, stride_ks, stride_kh, stride_kd,
                     stride_vb, stride_vs, stride_vh, stride_vd):
    """``tile_pointers`` into K and into V (K/V head ``h_kv``, batch row or document ``b``)."""
    return (tile_pointers(K, b, h_kv, row0, rows, cols, stride_kb, stride_ks, stride_kh, stride_kd),
            tile_pointers(V, b, h_kv, row0, rows, cols, stride_vb, stride_vs, stride_vh, stride_vd))


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


# The kernels' TOKENS switch: no mask by token, a mask by token whose every block is
# tested for a visible pair and skipped without one (a branch in the loop, which Triton
# then does not pipeline), or a mask by token whose tiles visit only the union of their
# rows' spans (``TokenPositions.q_spans`` / ``k_spans``) with no test: every block
# computed.
TOKENS_NONE = tl.constexpr(0)
TOKENS_TESTED = tl.constexpr(1)
TOKENS_SPANS = tl.constexpr(2)


@triton.jit
def span_union(Spans, rows, n_rows, other_side):
    """``[first, last)``: the smallest range holding the spans of ``rows`` (those below
    ``n_rows``) in ``Spans``, an int32 ``[2, n_rows]`` of each row's first and past-last
    visible index on the other side. Rows that see nothing are left out; if none sees
    anything, ``first = other_side > last = 0``."""
    in_bounds = rows < n_rows
    first = tl.load(Spans + rows, mask=in_bounds, other=0)
    last = tl.load(Spans + n_rows + rows, mask=in_bounds, other=0)
    sees = first < last
    first = tl.maximum(tl.min(tl.where(sees, first, other_side), 0), 0)  # clamped: spans given by hand
    return first, tl.minimum(tl.max(tl.where(sees, last, 0), 0), other_side)


# Which key blocks a query tile visits, and which query blocks a key tile visits. Query i
# sees key j iff ``i + offset - left <= j <= i + offset + right`` (offset = Sk - Sq,
# bottom-right alignment; each bound applies only when its LEFT / RIGHT switch is on;
# causal is right = 0). For query rows [m, m + BLOCK_M) the rows together see keys
# [m + offset - left, m + BLOCK_M - 1 + offset + right] (the union) and each row sees
# [m + BLOCK_M - 1 + offset - left, m + offset + right] (the intersection), both clipped to
# [0, Sk). Blocks wholly inside the intersection need no mask ([full_lo, full_end): its
# start rounded up, its end down, to blocks); the other blocks of the union are masked
# ([lo, full_lo) and [full_end, hi)); the rest are never visited. An example: causal,
# left = 8, Sq = Sk = 16, 4 x 4 tiles (x: visible, .: masked in a visited block):
#
#            keys  0 1 2 3 | 4 5 6 7 | 8 9 10 11 | 12 13 14 15
#     query   8    x x x x | x x x x | x .  .  . |                  rows 8-11: [0, 4) masked,
#             9    . x x x | x x x x | x x  .  . |                  [4, 8) whole, [8, 12)
#            10    . . x x | x x x x | x x  x  . |                  masked, 12-15 not visited
#            11    . . . x | x x x x | x x  x  x |
#            12            | x x x x | x x  x  x | x  .  .  .       rows 12-15: 0-3 not
#            13            | . x x x | x x  x  x | x  x  .  .       visited, [4, 8) masked,
#            14            | . . x x | x x  x  x | x  x  x  .       [8, 12) whole,
#            15            | . . . x | x x  x  x | x  x  x  x       [12, 16) masked
#
# When no block is whole, one masked range [lo, hi) covers the union. The dK/dV kernel
# reads the rule from a key tile [n, n + BLOCK_N): key j is seen by queries
# [j - offset - right, j - offset + left], so the union is queries
# [n - offset - right, n + BLOCK_N - 1 - offset + left] and the intersection
# [n + BLOCK_N - 1 - offset - right, n - offset + left]. Query rows past Sq load as zeros
# with an LSE of +inf (probability 0), so query ranges may run past Sq; keys past Sk are
# masked.


@triton.jit
def key_block_range(start_m, seqlen_q, seqlen_k, window_left, window_right, QSpans, LEFT: tl.constexpr,
                    RIGHT: tl.constexpr, TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query rows [start_m, start_m + BLOCK_M): keys [lo, full_lo) and [full_end, hi)
    need the mask, keys [full_lo, full_end) are seen by every row; others by none. All but
    hi are multiples of BLOCK_N. A mask by token (TOKENS) is one masked range: [0, Sk),
    each block tested as it comes (TOKENS_TESTED), or the union of the rows' spans
    (TOKENS_SPANS: ``QSpans``)."""
    offset = seqlen_k - seqlen_q
    lo = 0
    full_lo = 0
    hi = seqlen_k
    full_end = seqlen_k
    if TOKENS == TOKENS_SPANS:
        lo, hi = span_union(QSpans, start_m + tl.arange(0, BLOCK_M), seqlen_q, seqlen_k)
        lo = lo // BLOCK_N * BLOCK_N
        full_lo = lo
        full_end = lo
    elif TOKENS:
        full_end = 0
    else:
        if LEFT:
            lo = tl.minimum(tl.maximum(start_m + offset - window_left, 0), seqlen_k)
            full_lo = tl.minimum(tl.maximum(start_m + BLOCK_M - 1 + offset - window_left, 0), seqlen_k)
        if RIGHT:
            hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset + window_right, 0), seqlen_k)
            full_end = tl.minimum(tl.maximum(start_m + offset + window_right + 1, 0), seqlen_k)
        lo = lo // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
        full_end = full_end // BLOCK_N * BLOCK_N
        no_whole_block = full_lo >= full_end
        full_lo = tl.where(no_whole_block, lo, full_lo)
        full_end = tl.where(no_whole_block, lo, full_end)
    return lo, full_lo, full_end, hi


@triton.jit
def query_block_range(start_n, seqlen_q, seqlen_k, window_left, window_right, KSpans, LEFT: tl.constexpr,
                      RIGHT: tl.constexpr, TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For key rows [start_n, start_n + BLOCK_N): queries [begin, full_begin) and
    [full_end, end) need the mask, queries [full_begin, full_end) see every key of the
    tile; others see none. All are multiples of BLOCK_M (rows past Sq contribute 0). A
    mask by token (TOKENS): one masked range, over every query block (TOKENS_TESTED) or
    over the union of the keys' spans (TOKENS_SPANS: ``KSpans``)."""
    offset = seqlen_k - seqlen_q
    begin = 0
    full_begin = 0
    full_end = seqlen_q
    end = seqlen_q
    if TOKENS == TOKENS_SPANS:
        first, last = span_union(KSpans, start_n + tl.arange(0, BLOCK_N), seqlen_k, seqlen_q)
        full_end = first // BLOCK_M * BLOCK_M
        end = tl.cdiv(last, BLOCK_M) * BLOCK_M
        begin = full_end
        full_begin = full_end
    elif TOKENS:
        full_end = 0
        end = tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
    else:
        if RIGHT:
            begin = tl.minimum(tl.maximum(start_n - offset - window_right, 0), seqlen_q)
            full_begin = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - offset - window_right, 0), seqlen_q)
        if LEFT:
            end = tl.minimum(tl.maximum(start_n + BLOCK_N - offset + window_left, 0), seqlen_q)
            full_end = tl.minimum(tl.maximum(start_n - offset + window_left + 1, 0), seqlen_q)
        begin = begin // BLOCK_M * BLOCK_M
        full_begin = tl.cdiv(full_begin, BLOCK_M) * BLOCK_M
        # up to Sq, the last partial block is whole too: its rows past Sq contribute nothing
        full_end = tl.where(full_end == seqlen_q, tl.cdiv(seqlen_q, BLOCK_M), full_end // BLOCK_M) * BLOCK_M
        end = tl.cdiv(end, BLOCK_M) * BLOCK_M
        no_whole_block = full_begin >= full_end
        full_begin = tl.where(no_whole_block, begin, full_begin)
        full_end = tl.where(no_whole_block, begin, full_end)
    return begin, full_begin, full_end, end


@triton.jit
def window_visible(rows, cols, seqlen_q, seqlen_k, window_left, window_right, LEFT: tl.constexpr,
                   RIGHT: tl.constexpr):
    """[len(rows), len(cols)] booleans: does query ``rows[i]`` see key ``cols[j]`` (the
    window and causal bounds only; keys past Sk are the caller's to mask)."""
    diagonal = rows[:, None] + (seqlen_k - seqlen_q)
    visible = cols[None, :] >= 0
    if LEFT:
        visible = visible & (cols[None, :] >= diagonal - window_left)
    if RIGHT:
        visible = visible & (cols[None, :] <= diagonal + window_right)
    return visible


@triton.jit
def sequence_span(cu_seqlens, index, seqlen, VARLEN: tl.constexpr):
    """(first row, length) of sequence ``index``: row 0 and ``seqlen`` of a batch row, or
    ``cu_seqlens[index]`` and the document's length in a packed (varlen) sequence."""
    if VARLEN:
        start = tl.load(cu_seqlens + index)
        return start.to(tl.int64), tl.load(cu_seqlens + index + 1) - start
    else:
        return index * 0, seqlen


@triton.jit
def tokens_visible(offs_m, offs_n, seqlen_q, seqlen_k, QPos, QDoc, KPos, KDoc, window_left, window_right,
                   LEFT: tl.constexpr, RIGHT: tl.constexpr):
    """[len(offs_m), len(offs_n)] booleans of a mask given by token (``usp.kernels.tokens``):
    query ``offs_m[i]`` sees key ``offs_n[j]`` iff both exist, share a document and the
    key's global position lies within the query's ``[pos - left, pos + right]``."""
    q_in, k_in = offs_m < seqlen_q, offs_n < seqlen_k
    q_doc = tl.load(QDoc + offs_m, mask=q_in, other=-1)
    k_doc = tl.load(KDoc + offs_n, mask=k_in, other=-2)  # never equal to a missing query's
    visible = q_doc[:, None] == k_doc[None, :]
    if LEFT or RIGHT:
        q_pos = tl.load(QPos + offs_m, mask=q_in, other=0)
        k_pos = tl.load(KPos + offs_n, mask=k_in, other=0)
        if LEFT:
            visible = visible & (k_pos[None, :] >= q_pos[:, None] - window_left)
        if RIGHT:
            visible = visible & (k_pos[None, :] <= q_pos[:, None] + window_right)
    return visible


@triton.jit
def block_visibility(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right, QPos, QDoc, KPos, KDoc,
                     MASKED: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, TOKENS: tl.constexpr):
    """``(visible, visit)`` of the block of queries ``offs_m`` and keys ``offs_n``: the
    [M, N] pairs that count (keys past Sk never; MASKED: the window, TOKENS: the mask by
    token) and whether to compute the block at all (TOKENS_TESTED skips a block with no
    visible pair; otherwise ``visit`` is the constant 1, so the loop has no branch and
    Triton can pipeline its loads). An unmasked block: nothing to mask, always computed."""
    visible = 0
    visit = 1
    if TOKENS:
        visible = tokens_visible(offs_m, offs_n, seqlen_q, seqlen_k, QPos, QDoc, KPos, KDoc, window_left,
                                 window_right, LEFT, RIGHT)
        if TOKENS == TOKENS_TESTED:
            visit = tl.max(tl.max(visible.to(tl.int32), 1), 0)
    elif MASKED:
        visible = (offs_n[None, :] < seqlen_k) & window_visible(
            offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right, LEFT, RIGHT)
    return visible, visit


@dataclass(frozen=True)
class MaskSpec:
    """Which keys each query sees, as the kernels take it: the window bounds (None:
    unbounded; causal is ``right = 0``) and, for packed sequences, the document offsets
    (int32 ``[documents + 1]`` on the device) and the longest document; or, with
    ``tokens``, the window read in each token's global position and document."""

    left: int | None = None
    right: int | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    tokens: TokenPositions | None = None

    @property
    def token_args(self) -> tuple:
        """The kernels' ``QPos, QDoc, KPos, KDoc, QSpans, KSpans`` (None where absent or
        not used: ``token_mode``)."""
        t = self.tokens
        if t is None:
            return (None,) * 6
        return (t.q_pos, t.q_doc, t.k_pos, t.k_doc,
                t.q_spans if self.token_mode("q") == TOKENS_SPANS.value else None,
                t.k_spans if self.token_mode("k") == TOKENS_SPANS.value else None)

    def token_mode(self, tiles: str) -> int:
        """The TOKENS switch of the kernels over query tiles (``tiles="q"``: forward, dQ),
        which walk ``q_spans``, or over key tiles (``"k"``: dK/dV), which walk ``k_spans``:
        spans when that side has them, found for this very window
        (``TokenPositions.spans_window``); else every block tested."""
        if self.tokens is None:
            return TOKENS_NONE.value
        spans = self.tokens.q_spans if tiles == "q" else self.tokens.k_spans
        if spans is not None and self.tokens.spans_window == (self.left, self.right):
            return TOKENS_SPANS.value
        return TOKENS_TESTED.value

    @property
    def triangular(self) -> bool:
        """A right edge and no left one (causal): a query tile's work grows with its row
        and a key tile's falls."""
        return self.right is not None and self.left is None and self.tokens is None

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def documents(self) -> int:
        return self.cu_seqlens_q.numel() - 1

    @property
    def window_args(self) -> tuple[int, int]:
        """The kernels' ``window_left, window_right`` (0 where unbounded: not read)."""
        return (self.left or 0, self.right or 0)

    def strides(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        """Strides of a [B, S, H, D] view; packed tensors get batch stride 0 (documents are rows)."""
        return (0, *x.stride()[1:]) if self.varlen else tuple(x.stride())


TILE_ORDERS = ("rule", "by-head", "across-heads")
# how tiles_across_heads decides; changed only by tile_order_override. A module global on
# purpose: autograd runs a CUDA backward on its own thread, which a ContextVar or a
# thread-local set by the caller would not reach.
_tile_order = "rule"


@contextlib.contextmanager
def tile_order_override(order: str):
    """Within the block every launch hands its tiles out ``order``: "by-head" or
    "across-heads" whatever the mask, or by the "rule" (``tiles_across_heads``): for
    timing the orders against each other (``usp-bench kernels --tile-order``), never for
    production calls."""
    global _tile_order
    if order not in TILE_ORDERS:
        raise ValueError(f"order must be one of {TILE_ORDERS}, got {order!r}")
    saved, _tile_order = _tile_order, order
    try:
        yield
    finally:
        _tile_order = saved


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    """The SM count of GPU ``index``, asked once."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def tiles_across_heads(mask: MaskSpec, tiles: int, heads: int, device: torch.device) -> bool:
    """Whether a launch of ``tiles`` tiles for each of ``heads`` (batch rows x heads) hands
    them out across heads (``program_tile``'s ACROSS_HEADS): under a causal mask, when a
    head's tiles fit in one wave (at most one per SM) and at least two programs of each
    head run side by side (at most half as many heads as SMs). Otherwise head after head:
    many heads, or many tiles per head, lose more to programs of different heads
    competing for L2 than they gain. For tensors off CUDA devices (the interpreter on the
    CPU, ahead-of-time compiles on meta tensors) every causal launch goes across heads.
    Measured on an H200 (kernels/NOTES.md). ``tile_order_override`` forces either order."""
    if _tile_order != "rule":
        return _tile_order == "across-heads"
    if not mask.triangular:
        return False
    if device.type != "cuda":
        return True
    sms = _multiprocessors(gpu_index(device))
    return tiles <= sms and 2 * heads <= sms


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
    """Launch on the tensors' GPU rather than the current one; nothing to switch (and no
    host time spent switching) when it is the current one."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
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
