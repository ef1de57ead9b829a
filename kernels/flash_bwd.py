"""Triton flash-attention backward from a given output and log-sum-exp.

Three launches, deterministic (no atomics):
1. ``_bwd_preprocess_kernel``: ``delta = rowsum(dout * out)`` in float32, and the LSE
   moved to the log2 domain with ``-inf`` (a row that sees no key) turned into ``+inf``
   so that its probabilities ``exp2(s - lse)`` are exactly 0.
2. ``_bwd_dkdv_kernel``: one program per key block of one K/V head; it loops over the
   query heads of its GQA group and the query blocks that see the keys.
3. ``_bwd_dq_kernel``: one program per query block of one query head.
The ``out`` and ``lse`` given are used as they are: ring attention passes the global
(merged) ones while it gives the kernels one block of keys at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import (check_backward_inputs, check_grad_accumulator, check_packed_backward_inputs,
                     resolve_softmax_scale)
from .configs import KernelConfig, get_config, padded_head_dim
from .flash_fwd import packed_mask, token_mask
from .triton_common import (LOG2E, Launch, MaskSpec, check_triton_inputs, device_guard, dot_precision,
                            block_visibility, key_block_range, kv_tile_pointers, load_row_stats, load_tile,
                            program_tile, query_block_range, sequence_span, store_tile, strides, tile_pointers,
                            tiles_across_heads)


@triton.jit
def _bwd_preprocess_kernel(
    Out, DO, Lse, Delta, Lse2,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_db, stride_ds, stride_dh, stride_dd,
    seqlen_q, heads, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m, bh, b, h = program_tile(BLOCK_M, heads, False, False)
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_d = tl.arange(0, BLOCK_D)
    m0 = start_m.to(tl.int64)
    o_ptrs = tile_pointers(Out, b, h, m0, rows, offs_d, stride_ob, stride_os, stride_oh, stride_od)
    do_ptrs = tile_pointers(DO, b, h, m0, rows, offs_d, stride_db, stride_ds, stride_dh, stride_dd)
    o = load_tile(o_ptrs, offs_m, seqlen_q, offs_d, head_dim, True, True).to(tl.float32)
    do = load_tile(do_ptrs, offs_m, seqlen_q, offs_d, head_dim, True, True).to(tl.float32)
    row = bh.to(tl.int64) * seqlen_q + offs_m
    in_bounds = offs_m < seqlen_q
    tl.store(Delta + row, tl.sum(o * do, axis=1), mask=in_bounds)
    lse = tl.load(Lse + row, mask=in_bounds, other=0.0)
    tl.store(Lse2 + row, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), mask=in_bounds)


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse2_ptr, delta_ptr, stride_qs, stride_dos,
                       offs_n, offs_d, lo, hi, seqlen_q, seqlen_k, head_dim, qk_scale, window_left, window_right,
                       QPos, QDoc, KPos, KDoc, Visits, visit_slot,
                       MASKED: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, TOKENS: tl.constexpr,
                       COUNT_VISITS: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_M: tl.constexpr,
                       EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate the dK, dV of one key block over query blocks [lo, hi) of one head.

    Works on transposed scores ``s^T: [BLOCK_N, BLOCK_M]``. ``q_ptrs, do_ptrs`` point at
    query row ``lo``; ``lse2_ptr, delta_ptr`` at row 0 of this head. Rows past
    ``seqlen_q`` load as zeros with lse2 = +inf, so they contribute nothing. MASKED
    applies the window (causal is one); only edge blocks need it. With TOKENS the mask
    is given by token (TOKENS_TESTED: a query block with no visible pair is skipped)."""
    offs_m = lo + tl.arange(0, BLOCK_M)
    for _start_m in range(lo, hi, BLOCK_M):
        visible, visit = block_visibility(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right,
                                          QPos, QDoc, KPos, KDoc, MASKED, LEFT, RIGHT, TOKENS)
        if visit > 0:
            if COUNT_VISITS:  # for tests
                tl.atomic_add(Visits + visit_slot, 1)
            q = load_tile(q_ptrs, offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, not EVEN_D)
            do = load_tile(do_ptrs, offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, not EVEN_D)
            lse2, delta = load_row_stats(lse2_ptr, delta_ptr, offs_m, seqlen_q, not EVEN_M)
            p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
            if MASKED:
                p_t = tl.where(tl.trans(visible), p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
        q_ptrs += BLOCK_M * stride_qs
        do_ptrs += BLOCK_M * stride_dos
        offs_m += BLOCK_M
    return dk, dv


@triton.jit
def _dkdv_range(dk, dv, k, v, lo, hi, Q, DO, stats_lse2, stats_delta, b, h, q0, rows, offs_n, offs_d,
                stride_qb, stride_qs, stride_qh, stride_qd, stride_dob, stride_dos, stride_doh, stride_dod,
                seqlen_q, seqlen_k, head_dim, qk_scale, window_left, window_right,
                QPos, QDoc, KPos, KDoc, Visits, visit_slot,
                MASKED: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, TOKENS: tl.constexpr,
                COUNT_VISITS: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
                PRECISION: tl.constexpr):
    """``_dkdv_query_blocks`` over queries [lo, hi) of head ``h`` of sequence ``b``."""
    m0 = q0 + lo
    return _dkdv_query_blocks(
        dk, dv, k, v,
        tile_pointers(Q, b, h, m0, rows, offs_d, stride_qb, stride_qs, stride_qh, stride_qd),
        tile_pointers(DO, b, h, m0, rows, offs_d, stride_dob, stride_dos, stride_doh, stride_dod),
        stats_lse2, stats_delta, stride_qs, stride_dos, offs_n, offs_d, lo, hi, seqlen_q, seqlen_k, head_dim,
        qk_scale, window_left, window_right, QPos, QDoc, KPos, KDoc, Visits, visit_slot,
        MASKED, LEFT, RIGHT, TOKENS, COUNT_VISITS, BLOCK_M, EVEN_M, EVEN_D, PRECISION)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse2, Delta, DK, DV, CuSeqlensQ, CuSeqlensK, Visits, QPos, QDoc, KPos, KDoc, QSpans, KSpans,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, kv_heads, group, head_dim, qk_scale, softmax_scale, window_left, window_right,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, VARLEN: tl.constexpr, TOKENS: tl.constexpr, COUNT_VISITS: tl.constexpr,
    ACROSS_HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    start_n, bh, b, h_kv = program_tile(BLOCK_N, kv_heads, False, ACROSS_HEADS)  # causal: earlier tiles see more
    q0, seqlen_q = sequence_span(CuSeqlensQ, b, seqlen_q, VARLEN)
    k0, seqlen_k = sequence_span(CuSeqlensK, b, seqlen_k, VARLEN)
    if start_n >= seqlen_k:  # a tile past a short document's end
        return
    cols = tl.arange(0, BLOCK_N)
    offs_n = start_n + cols
    offs_d = tl.arange(0, BLOCK_D)
    n0 = k0 + start_n

    k_ptrs = tile_pointers(K, b, h_kv, n0, cols, offs_d, stride_kb, stride_ks, stride_kh, stride_kd)
    v_ptrs = tile_pointers(V, b, h_kv, n0, cols, offs_d, stride_vb, stride_vs, stride_vh, stride_vd)
    k = load_tile(k_ptrs, offs_n, seqlen_k, offs_d, head_dim, not EVEN_N, not EVEN_D)
    v = load_tile(v_ptrs, offs_n, seqlen_k, offs_d, head_dim, not EVEN_N, not EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks [full_begin, full_end) see every key here; [begin, full_begin) and
    # [full_end, end) cross the causal diagonal or a window edge.
    begin, full_begin, full_end, end = query_block_range(start_n, seqlen_q, seqlen_k, window_left, window_right,
                                                         KSpans, LEFT, RIGHT, TOKENS, BLOCK_M, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    window = (seqlen_q, seqlen_k, head_dim, qk_scale, window_left, window_right, QPos, QDoc, KPos, KDoc,
              Visits, bh * tl.num_programs(0) + start_n // BLOCK_N)
    for g in range(group):  # the query heads that share this K/V head
        h = h_kv * group + g
        stats = b * stride_lb + h * stride_lh + q0  # row 0 of this head in lse2 and delta
        queries = (Q, DO, Lse2 + stats, Delta + stats, b, h, q0, rows, offs_n, offs_d,
                   stride_qb, stride_qs, stride_qh, stride_qd, stride_dob, stride_dos, stride_doh, stride_dod)
        dk, dv = _dkdv_range(dk, dv, k, v, begin, full_begin, *queries, *window,
                             True, LEFT, RIGHT, TOKENS, COUNT_VISITS, BLOCK_M, EVEN_M, EVEN_D, PRECISION)
        dk, dv = _dkdv_range(dk, dv, k, v, full_begin, full_end, *queries, *window,
                             False, LEFT, RIGHT, TOKENS, COUNT_VISITS, BLOCK_M, EVEN_M, EVEN_D, PRECISION)
        dk, dv = _dkdv_range(dk, dv, k, v, full_end, end, *queries, *window,
                             True, LEFT, RIGHT, TOKENS, COUNT_VISITS, BLOCK_M, EVEN_M, EVEN_D, PRECISION)

    dk_ptrs = tile_pointers(DK, b, h_kv, n0, cols, offs_d, stride_dkb, stride_dks, stride_dkh, stride_dkd)
    dv_ptrs = tile_pointers(DV, b, h_kv, n0, cols, offs_d, stride_dvb, stride_dvs, stride_dvh, stride_dvd)
    store_tile(dk_ptrs, (dk * softmax_scale).to(DK.dtype.element_ty), offs_n, seqlen_k, offs_d, head_dim,
               not EVEN_N, not EVEN_D)
    store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), offs_n, seqlen_k, offs_d, head_dim, not EVEN_N, not EVEN_D)


@triton.jit
def _dq_key_blocks(dq, q, do, lse2, delta, lo, hi, K, V, b, h_kv, k0, offs_m, offs_n, offs_d,
                   stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
                   seqlen_q, seqlen_k, head_dim, qk_scale, window_left, window_right, QPos, QDoc, KPos, KDoc,
                   MASKED: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, TOKENS: tl.constexpr,
                   BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate the dQ of one query block over key blocks [lo, hi) of K/V head ``h_kv``
    of sequence ``b`` (keys from row ``k0``). With MASKED, keys past ``seqlen_k`` and
    outside a row's window are excluded; with TOKENS the mask is given by token
    (TOKENS_TESTED: a key block with no visible pair is skipped)."""
    k_ptrs, v_ptrs = kv_tile_pointers(K, V, b, h_kv, k0 + lo, offs_n, offs_d, stride_kb, stride_ks, stride_kh,
                                      stride_kd, stride_vb, stride_vs, stride_vh, stride_vd)
    offs_n = lo + offs_n
    for _start_n in range(lo, hi, BLOCK_N):
        visible, visit = block_visibility(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right,
                                          QPos, QDoc, KPos, KDoc, MASKED, LEFT, RIGHT, TOKENS)
        if visit > 0:
            k = load_tile(k_ptrs, offs_n, seqlen_k, offs_d, head_dim, MASKED, not EVEN_D)
            v = load_tile(v_ptrs, offs_n, seqlen_k, offs_d, head_dim, MASKED, not EVEN_D)
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
            if MASKED:
                p = tl.where(visible, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
        offs_n += BLOCK_N
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse2, Delta, DQ, CuSeqlensQ, CuSeqlensK, QPos, QDoc, KPos, KDoc, QSpans, KSpans,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, heads, group, head_dim, qk_scale, softmax_scale, window_left, window_right,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, VARLEN: tl.constexpr, TOKENS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr,
    ACROSS_HEADS: tl.constexpr,
):
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
    do_ptrs = tile_pointers(DO, b, h, m0, rows, offs_d, stride_dob, stride_dos, stride_doh, stride_dod)
    q = load_tile(q_ptrs, offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, not EVEN_D)
    do = load_tile(do_ptrs, offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, not EVEN_D)
    stats = b * stride_lb + h * stride_lh + q0  # row 0 of this head in lse2 and delta
    lse2, delta = load_row_stats(Lse2 + stats, Delta + stats, offs_m, seqlen_q, not EVEN_M)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The forward's key ranges: [full_lo, full_end) unmasked, [lo, full_lo) and [full_end, hi) masked.
    lo, full_lo, full_end, hi = key_block_range(start_m, seqlen_q, seqlen_k, window_left, window_right, QSpans,
                                                LEFT, RIGHT, TOKENS, BLOCK_M, BLOCK_N)
    kv = (K, V, b, h_kv, k0, offs_m, offs_n, offs_d, stride_kb, stride_ks, stride_kh, stride_kd,
          stride_vb, stride_vs, stride_vh, stride_vd)
    window = (seqlen_q, seqlen_k, head_dim, qk_scale, window_left, window_right, QPos, QDoc, KPos, KDoc)
    dq = _dq_key_blocks(dq, q, do, lse2, delta, lo, full_lo, *kv, *window,
                        True, LEFT, RIGHT, TOKENS, BLOCK_N, EVEN_D, PRECISION)
    dq = _dq_key_blocks(dq, q, do, lse2, delta, full_lo, full_end, *kv, *window,
                        False, LEFT, RIGHT, TOKENS, BLOCK_N, EVEN_D, PRECISION)
    dq = _dq_key_blocks(dq, q, do, lse2, delta, full_end, hi, *kv, *window,
                        True, LEFT, RIGHT, TOKENS, BLOCK_N, EVEN_D, PRECISION)

    dq_ptrs = tile_pointers(DQ, b, h, m0, rows, offs_d, stride_dqb, stride_dqs, stride_dqh, stride_dqd)
    dq = dq * softmax_scale
    if ACCUMULATE:  # add to the running float32 dQ of these rows (a ring's earlier blocks of keys)
        dq += load_tile(dq_ptrs, offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, not EVEN_D)
    store_tile(dq_ptrs, dq.to(DQ.dtype.element_ty), offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, not EVEN_D)


def backward_launches(dout, q, k, v, out, lse, delta, lse2, dq, dk, dv, *, mask: MaskSpec, scale: float,
                      configs: dict[str, KernelConfig], visits: torch.Tensor | None = None,
                      accumulate: bool = False) -> list[Launch]:
    """The three backward launches for already-validated inputs (dense, or packed with
    ``mask.varlen``, as ``forward_launch`` takes them); ``lse`` is float32 and contiguous,
    ``delta`` and ``lse2`` are float32 buffers of its shape, ``configs`` maps "bwd_dkdv"
    and "bwd_dq" (with ``accumulate``, "bwd_dq_into") to their configs (the preprocess
    uses the dQ tiling). ``visits``, int32 zeros with one slot per key tile (``bh * tiles
    + tile``, bh over batch rows x K/V heads), receives the query blocks that tile
    visited, over the query heads of its group. ``accumulate``: dQ is added to what ``dq`` holds. The
    gradients are stored in the dtypes of ``dq, dk, dv``, whatever q's."""
    dout4, q4, k4, v4, out4, dq4, dk4, dv4 = (x.unsqueeze(0) if mask.varlen else x
                                              for x in (dout, q, k, v, out, dq, dk, dv))
    batch, seqlen_q, heads, head_dim = q4.shape
    seqlen_k, kv_heads = k4.shape[1], k4.shape[2]
    rows_total = batch * seqlen_q  # the preprocess sees a packed sequence as one batch row
    if mask.varlen:
        batch, seqlen_q, seqlen_k = mask.documents, mask.max_seqlen_q, mask.max_seqlen_k
        lse_strides = (0, lse.stride(0))
    else:
        lse_strides = (lse.stride(0), lse.stride(1))
    group = heads // kv_heads
    block_d = padded_head_dim(head_dim)
    common = dict(LEFT=mask.left is not None, RIGHT=mask.right is not None, VARLEN=mask.varlen,
                  BLOCK_D=block_d,
                  EVEN_D=head_dim == block_d, PRECISION=dot_precision(q.dtype))
    dkdv, dq_cfg = configs["bwd_dkdv"], configs["bwd_dq_into" if accumulate else "bwd_dq"]
    pre_rows = seqlen_q if not mask.varlen else rows_total
    dkdv_grid = (triton.cdiv(seqlen_k, dkdv.block_n), batch * kv_heads)
    dq_grid = (triton.cdiv(seqlen_q, dq_cfg.block_m), batch * heads)
    return [
        Launch(_bwd_preprocess_kernel, (triton.cdiv(pre_rows, dq_cfg.block_m), q4.shape[0] * heads),
               (out4, dout4, lse, delta, lse2, *strides(out4), *strides(dout4), pre_rows, heads, head_dim),
               dict(BLOCK_M=dq_cfg.block_m, BLOCK_D=block_d), dq_cfg.num_warps, 1),
        Launch(_bwd_dkdv_kernel, dkdv_grid,
               (q, k, v, dout, lse2, delta, dk, dv, mask.cu_seqlens_q, mask.cu_seqlens_k, visits, *mask.token_args,
                *mask.strides(q4), *mask.strides(k4), *mask.strides(v4), *mask.strides(dout4),
                *mask.strides(dk4), *mask.strides(dv4), *lse_strides,
                seqlen_q, seqlen_k, kv_heads, group, head_dim, scale * LOG2E, scale, *mask.window_args),
               dict(COUNT_VISITS=visits is not None, TOKENS=mask.token_mode("k"),
                    ACROSS_HEADS=tiles_across_heads(mask, *dkdv_grid, q.device),
                    BLOCK_M=dkdv.block_m, BLOCK_N=dkdv.block_n,
                    EVEN_M=not mask.varlen and seqlen_q % dkdv.block_m == 0,
                    EVEN_N=not mask.varlen and seqlen_k % dkdv.block_n == 0, **common),
               dkdv.num_warps, dkdv.num_stages),
        Launch(_bwd_dq_kernel, dq_grid,
               (q, k, v, dout, lse2, delta, dq, mask.cu_seqlens_q, mask.cu_seqlens_k, *mask.token_args,
                *mask.strides(q4), *mask.strides(k4), *mask.strides(v4), *mask.strides(dout4),
                *mask.strides(dq4), *lse_strides,
                seqlen_q, seqlen_k, heads, group, head_dim, scale * LOG2E, scale, *mask.window_args),
               dict(BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n,
                    EVEN_M=not mask.varlen and seqlen_q % dq_cfg.block_m == 0, ACCUMULATE=accumulate,
                    TOKENS=mask.token_mode("q"), ACROSS_HEADS=tiles_across_heads(mask, *dq_grid, q.device), **common),
               dq_cfg.num_warps, dq_cfg.num_stages),
    ]


def flash_attn_backward(dout, q, k, v, out, lse, causal=False, softmax_scale=None, window_size=(-1, -1),
                        positions=None):
    """Gradients of flash attention from the given ``out`` and ``lse``.

    ``dout, q, out: [B, Sq, Hq, D]``, ``k, v: [B, Sk, Hkv, D]``, ``lse: [B, Hq, Sq]``
    (natural log, -inf for rows that see no key); ``window_size`` and ``positions`` as
    in the forward. Returns ``(dq, dk, dv)`` in the input dtype with the shapes of ``q, k, v``.
    """
    shape = check_backward_inputs(dout, q, k, v, out, lse, causal)
    return _run_backward(dout, q, k, v, out, lse, shape, token_mask(causal, window_size, positions, shape, q.device),
                         softmax_scale)


def flash_attn_backward_into(dout, q, k, v, out, lse, dq, causal=False, softmax_scale=None, window_size=(-1, -1),
                             positions=None):
    """``flash_attn_backward`` of one block of keys inside a running backward: the block's
    dQ is added in place to the float32 accumulator ``dq [B, Sq, Hq, D]`` (a view allowed,
    e.g. some rows of a ring's dQ), and its ``(dk, dv)`` are returned in float32. No
    gradient is rounded to q's dtype before it is summed, and no separate pass adds dQ."""
    shape = check_grad_accumulator(dout, q, k, v, out, lse, dq, causal)
    mask = token_mask(causal, window_size, positions, shape, q.device)
    return _run_backward(dout, q, k, v, out, lse, shape, mask, softmax_scale, dq=dq)[1:]


def flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                               causal=False, softmax_scale=None, window_size=(-1, -1)):
    """Gradients of ``flash_attn_varlen_forward`` from the given ``out`` and ``lse``:
    ``dout, q, out: [total_q, Hq, D]``, ``k, v: [total_k, Hkv, D]``, ``lse: [Hq, total_q]``.
    Returns ``(dq, dk, dv)`` with the shapes of ``q, k, v``."""
    shape = check_packed_backward_inputs(dout, q, k, v, out, lse, causal)
    mask = packed_mask(causal, window_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, shape, q.device)
    return _run_backward(dout, q, k, v, out, lse, shape, mask, softmax_scale)


def _run_backward(dout, q, k, v, out, lse, shape, mask: MaskSpec, softmax_scale, visits=None, dq=None):
    """``(dq, dk, dv)`` in the input dtypes; with ``dq`` (a float32 accumulator) dQ is
    added to it and dK, dV are float32."""
    check_triton_inputs(q)
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    device = q.device
    lse = lse.to(torch.float32).contiguous()
    delta, lse2 = torch.empty_like(lse), torch.empty_like(lse)
    accumulate = dq is not None
    if not accumulate:
        dq = torch.empty(q.shape, dtype=q.dtype, device=device)
    dk, dv = (torch.empty(x.shape, dtype=torch.float32 if accumulate else x.dtype, device=device) for x in (k, v))
    configs = {name: get_config(name, shape.head_dim, q.dtype, device)
               for name in ("bwd_dkdv", "bwd_dq_into" if accumulate else "bwd_dq")}
    with device_guard(device):
        for launch in backward_launches(dout, q, k, v, out, lse, delta, lse2, dq, dk, dv, mask=mask, scale=scale,
                                        configs=configs, visits=visits, accumulate=accumulate):
            launch.run()
    return dq, dk, dv
