"""Triton flash-attention forward that returns the log-sum-exp.

One program computes one tile of ``BLOCK_M`` query rows of one (batch row or packed
document, head): it walks the key blocks this tile may see (the window's left edge,
masked; the blocks every row sees, unmasked; the causal diagonal, the window's right
edge or the sequence end, masked), keeping the running max ``m``, sum ``l`` and output
accumulator in float32 (online softmax). With a mask given by token (``TOKENS``, see
``usp.kernels.tokens``) it walks the union of its rows' key spans when the positions
carry them, else it tests every key block and skips those with no visible pair.
With ``ACCUMULATE`` the tile's result is merged into the running ``(out, lse)`` already in
``Out`` and ``Lse`` (a ring step's accumulator) instead of overwriting them, so a ring
step needs no separate merge pass over the accumulator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import (check_accumulator, check_documents, check_packed_qkv, check_qkv, resolve_softmax_scale,
                     resolve_window)
from .configs import KernelConfig, get_config, padded_head_dim
from .triton_common import (LOG2E, Launch, MaskSpec, block_visibility, check_triton_inputs, device_guard,
                            dot_precision, key_block_range, kv_tile_pointers, load_tile, program_tile, sequence_span,
                            store_tile, tile_pointers, tiles_across_heads)


@triton.jit
def _attend_key_blocks(acc, m_i, l_i, q, offs_m, lo, hi, K, V, b, h_kv, k0, offs_n, offs_d,
                       stride_kb, stride_kn, stride_kh, stride_kd, stride_vb, stride_vn, stride_vh, stride_vd,
                       seqlen_q, seqlen_k, head_dim, qk_scale, window_left, window_right,
                       QPos, QDoc, KPos, KDoc, Visits, visit_slot,
                       MASKED: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, TOKENS: tl.constexpr,
                       COUNT_VISITS: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Fold key blocks [lo, hi) of K/V head ``h_kv`` of sequence ``b`` (whose keys start
    at row ``k0``) into the online-softmax state (acc, m_i, l_i). With MASKED, keys past
    ``seqlen_k`` and keys outside a row's window (causal is a window) are excluded; with
    TOKENS the mask is given by token (TOKENS_TESTED: a block with no visible pair is
    skipped)."""
    k_ptrs, v_ptrs = kv_tile_pointers(K, V, b, h_kv, k0 + lo, offs_n, offs_d, stride_kb, stride_kn, stride_kh,
                                      stride_kd, stride_vb, stride_vn, stride_vh, stride_vd)
    offs_n = lo + offs_n
    for _start_n in range(lo, hi, BLOCK_N):
        visible, visit = block_visibility(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right,
                                          QPos, QDoc, KPos, KDoc, MASKED, LEFT, RIGHT, TOKENS)
        if visit > 0:
            if COUNT_VISITS:  # for tests
                tl.atomic_add(Visits + visit_slot, 1)
            k = load_tile(k_ptrs, offs_n, seqlen_k, offs_d, head_dim, MASKED, not EVEN_D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            if MASKED:
                s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if MASKED:
                # A row that has seen no key yet keeps m = -inf: shift by 0, not by -inf.
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = load_tile(v_ptrs, offs_n, seqlen_k, offs_d, head_dim, MASKED, not EVEN_D)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        offs_n += BLOCK_N
    return acc, m_i, l_i


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, Out, Lse, CuSeqlensQ, CuSeqlensK, Visits, QPos, QDoc, KPos, KDoc, QSpans, KSpans,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, heads, group, head_dim, qk_scale, window_left, window_right,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, VARLEN: tl.constexpr, TOKENS: tl.constexpr,
    COUNT_VISITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr,
    ACROSS_HEADS: tl.constexpr,
):
    # b is the batch row, or the document when VARLEN (whose batch strides are 0): its
    # queries start at row q0 and its keys at row k0 of the packed tensors.
    start_m, bh, b, h = program_tile(BLOCK_M, heads, RIGHT, ACROSS_HEADS)  # a right edge: later tiles see more keys
    q0, seqlen_q = sequence_span(CuSeqlensQ, b, seqlen_q, VARLEN)
    k0, seqlen_k = sequence_span(CuSeqlensK, b, seqlen_k, VARLEN)
    if start_m >= seqlen_q:  # a tile past a short document's end
        return
    h_kv = h // group
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m0 = q0 + start_m

    q_ptrs = tile_pointers(Q, b, h, m0, rows, offs_d, stride_qb, stride_qs, stride_qh, stride_qd)
    q = load_tile(q_ptrs, offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, not EVEN_D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Key blocks [full_lo, full_end) need no mask; [lo, full_lo) and [full_end, hi) do.
    lo, full_lo, full_end, hi = key_block_range(start_m, seqlen_q, seqlen_k, window_left, window_right, QSpans,
                                                LEFT, RIGHT, TOKENS, BLOCK_M, BLOCK_N)
    kv = (K, V, b, h_kv, k0, offs_n, offs_d, stride_kb, stride_ks, stride_kh, stride_kd,
          stride_vb, stride_vs, stride_vh, stride_vd)
    window = (seqlen_q, seqlen_k, head_dim, qk_scale, window_left, window_right,
              QPos, QDoc, KPos, KDoc, Visits, bh * tl.num_programs(0) + start_m // BLOCK_M)
    acc, m_i, l_i = _attend_key_blocks(acc, m_i, l_i, q, offs_m, lo, full_lo, *kv, *window,
                                       True, LEFT, RIGHT, TOKENS, COUNT_VISITS, BLOCK_N, EVEN_D, PRECISION)
    acc, m_i, l_i = _attend_key_blocks(acc, m_i, l_i, q, offs_m, full_lo, full_end, *kv, *window,
                                       False, LEFT, RIGHT, TOKENS, COUNT_VISITS, BLOCK_N, EVEN_D, PRECISION)
    acc, m_i, l_i = _attend_key_blocks(acc, m_i, l_i, q, offs_m, full_end, hi, *kv, *window,
                                       True, LEFT, RIGHT, TOKENS, COUNT_VISITS, BLOCK_N, EVEN_D, PRECISION)

    # Rows that saw no key (l = 0 exactly; a row that sees one has l >= 1): out = 0, lse = -inf.
    # A NaN l (NaN scores) keeps its NaN in out and lse rather than reporting "saw no key".
    seen = l_i != 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # log2 -> ln

    o_ptrs = tile_pointers(Out, b, h, m0, rows, offs_d, stride_ob, stride_os, stride_oh, stride_od)
    lse_ptrs = Lse + b * stride_lb + h * stride_lh + q0 + offs_m
    if ACCUMULATE:
        # Merge with the running result of these rows: both weighted by exp(lse - merged),
        # merged = logaddexp(lse_before, lse); a side at -inf saw no key and weighs 0, and
        # where both are -inf the reference is 0 so no weight is exp(-inf - -inf) = NaN.
        if EVEN_M:
            lse_before = tl.load(lse_ptrs)
        else:
            lse_before = tl.load(lse_ptrs, mask=offs_m < seqlen_q, other=float("-inf"))
        # A row at -inf holds nothing: its out is not read (a fresh accumulator may be uninitialised).
        held = (lse_before != float("-inf"))[:, None]
        if EVEN_D:
            out_before = tl.load(o_ptrs, mask=held, other=0.0).to(tl.float32)
        else:
            out_before = tl.load(o_ptrs, mask=held & (offs_d[None, :] < head_dim), other=0.0).to(tl.float32)
        top = tl.maximum(lse_before, lse)
        top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.exp(lse_before - top) + tl.exp(lse - top)
        # total = 0: neither side saw a key; a NaN total keeps its NaN
        merged = tl.where(total == 0.0, float("-inf"), top + tl.log(tl.where(total == 0.0, 1.0, total)))
        reference = tl.where(merged == float("-inf"), 0.0, merged)
        out = out_before * tl.exp(lse_before - reference)[:, None] + out * tl.exp(lse - reference)[:, None]
        lse = merged
    store_tile(o_ptrs, out.to(Out.dtype.element_ty), offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, not EVEN_D)
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)


def forward_launch(q, k, v, out, lse, *, mask: MaskSpec, scale: float, config: KernelConfig,
                   visits: torch.Tensor | None = None, accumulate: bool = False) -> Launch:
    """The forward launch writing ``out`` and ``lse`` for already-validated inputs: dense
    ``[B, S, H, D]`` tensors and ``lse [B, H, Sq]``, or, with ``mask.varlen``, packed
    ``[total, H, D]`` ones and ``lse [H, total_q]``; with ``accumulate``, merging into
    them. ``visits``, int32 zeros with one slot per query tile (``bh * tiles + tile``),
    receives the number of key blocks each visited."""
    q4, k4, v4, out4 = (x.unsqueeze(0) if mask.varlen else x for x in (q, k, v, out))
    batch, seqlen_q, heads, head_dim = q4.shape
    seqlen_k, kv_heads = k4.shape[1], k4.shape[2]
    if mask.varlen:
        batch, seqlen_q, seqlen_k = mask.documents, mask.max_seqlen_q, mask.max_seqlen_k
        lse_strides = (0, lse.stride(0))
    else:
        lse_strides = (lse.stride(0), lse.stride(1))
    block_d = padded_head_dim(head_dim)
    grid = (triton.cdiv(seqlen_q, config.block_m), batch * heads)
    return Launch(
        _flash_fwd_kernel, grid,
        (q, k, v, out, lse, mask.cu_seqlens_q, mask.cu_seqlens_k, visits, *mask.token_args,
         *mask.strides(q4), *mask.strides(k4), *mask.strides(v4), *mask.strides(out4), *lse_strides,
         seqlen_q, seqlen_k, heads, heads // kv_heads, head_dim, scale * LOG2E, *mask.window_args),
        dict(LEFT=mask.left is not None, RIGHT=mask.right is not None, VARLEN=mask.varlen,
             TOKENS=mask.token_mode("q"), COUNT_VISITS=visits is not None, BLOCK_M=config.block_m,
             BLOCK_N=config.block_n, BLOCK_D=block_d,
             EVEN_M=not mask.varlen and seqlen_q % config.block_m == 0, EVEN_D=head_dim == block_d,
             PRECISION=dot_precision(q.dtype), ACCUMULATE=accumulate,
             ACROSS_HEADS=tiles_across_heads(mask, *grid, q.device)),
        config.num_warps, config.num_stages)


def flash_attn_forward(q, k, v, causal=False, softmax_scale=None, window_size=(-1, -1), positions=None):
    """Flash attention forward on the GPU (or the Triton interpreter).

    ``q: [B, Sq, Hq, D]``, ``k, v: [B, Sk, Hkv, D]`` in fp16, bf16 or fp32, any strides.
    ``window_size=(left, right)``: flash-attn's sliding window (-1: unbounded), query i
    sees keys ``i + Sk - Sq - left ..= i + Sk - Sq + right``; causal sets right to 0.
    Returns ``out: [B, Sq, Hq, D]`` (q's dtype, contiguous) and ``lse: [B, Hq, Sq]``
    (float32, natural log; -inf for a row that sees no key, whose out is 0).
    ``positions``: a ``usp.kernels.tokens.TokenPositions``, in whose global positions
    and documents causal and the window are read instead (shared by the batch rows).
    """
    shape = check_qkv(q, k, v, causal)
    mask = token_mask(causal, window_size, positions, shape, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((shape.batch, shape.heads, shape.seqlen_q), dtype=torch.float32, device=q.device)
    return _run_forward(q, k, v, out, lse, shape, mask, softmax_scale)


def flash_attn_forward_into(q, k, v, out, lse, causal=False, softmax_scale=None, window_size=(-1, -1),
                            positions=None) -> None:
    """``flash_attn_forward`` of ``q`` over ``k, v`` merged in place into a running result
    over other keys: ``out [B, Sq, Hq, D]`` and ``lse [B, Hq, Sq]``, both float32 (views
    allowed, e.g. some rows of an accumulator; ``lse`` with unit stride along Sq). Rows at
    ``lse = -inf`` hold nothing yet and their ``out`` is not read (it may be uninitialised
    memory, as in a fresh accumulator of ``torch.empty``). Otherwise the same as
    ``merge_attention_(out, lse, *flash_attn_forward(...))`` without the block's own
    output ever reaching memory, or being rounded to q's dtype."""
    shape = check_accumulator(q, k, v, out, lse, causal)
    mask = token_mask(causal, window_size, positions, shape, q.device)
    _run_forward(q, k, v, out, lse, shape, mask, softmax_scale, accumulate=True)


def flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                              softmax_scale=None, window_size=(-1, -1)):
    """Flash attention forward over packed documents, as flash-attn's varlen functions.

    ``q: [total_q, Hq, D]``, ``k, v: [total_k, Hkv, D]``; document d holds query rows
    ``cu_seqlens_q[d]:cu_seqlens_q[d + 1]`` and keys ``cu_seqlens_k[d]:cu_seqlens_k[d + 1]``
    (int32, the same number of documents) and attends only within itself; causal and the
    window are aligned bottom-right per document. Returns ``out: [total_q, Hq, D]`` and
    ``lse: [Hq, total_q]`` (float32; -inf and out 0 for rows that see no key)."""
    shape = check_packed_qkv(q, k, v, causal)
    mask = packed_mask(causal, window_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, shape, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((shape.heads, shape.seqlen_q), dtype=torch.float32, device=q.device)
    return _run_forward(q, k, v, out, lse, shape, mask, softmax_scale)


def packed_mask(causal, window_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, shape, device) -> MaskSpec:
    """The kernels' MaskSpec of a validated varlen call (offsets checked here)."""
    check_documents(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, shape)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.device != device:
            raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    return MaskSpec(*resolve_window(causal, window_size), cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                    max(1, max_seqlen_q), max(1, max_seqlen_k))


def token_mask(causal, window_size, positions, shape, device) -> MaskSpec:
    """The kernels' MaskSpec of a dense call, by token when ``positions`` are given (checked here)."""
    if positions is not None:
        positions.check(shape.seqlen_q, shape.seqlen_k, device)
    return MaskSpec(*resolve_window(causal, window_size), tokens=positions)


def _run_forward(q, k, v, out, lse, shape, mask: MaskSpec, softmax_scale, visits=None, accumulate=False):
    check_triton_inputs(q)
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    config = get_config("fwd", shape.head_dim, q.dtype, q.device)
    with device_guard(q.device):
        forward_launch(q, k, v, out, lse, mask=mask, scale=scale, config=config, visits=visits,
                       accumulate=accumulate).run()
    return out, lse
