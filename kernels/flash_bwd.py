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

from .checks import check_backward_inputs, resolve_softmax_scale
from .configs import KernelConfig, get_config, padded_head_dim
from .triton_common import (LOG2E, Launch, causal_visible, check_triton_inputs, device_guard, dot_precision,
                            key_block_range, load_row_stats, load_tile, program_tile, query_block_range,
                            store_tile, strides, tile_pointers)


@triton.jit
def _bwd_preprocess_kernel(
    Out, DO, Lse, Delta, Lse2,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_db, stride_ds, stride_dh, stride_dd,
    seqlen_q, heads, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m, bh, b, h = program_tile(BLOCK_M, heads)
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
                       offs_n, offs_d, lo, hi, seqlen_q, seqlen_k, head_dim, qk_scale,
                       MASKED: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_M: tl.constexpr,
                       EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate the dK, dV of one key block over query blocks [lo, hi) of one head.

    Works on transposed scores ``s^T: [BLOCK_N, BLOCK_M]``. ``q_ptrs, do_ptrs`` point at
    query row ``lo``; ``lse2_ptr, delta_ptr`` at row 0 of this head. Rows past
    ``seqlen_q`` load as zeros with lse2 = +inf, so they contribute nothing. MASKED
    applies the causal mask (only diagonal blocks need it)."""
    offs_m = lo + tl.arange(0, BLOCK_M)
    for _start_m in range(lo, hi, BLOCK_M):
        q = load_tile(q_ptrs, offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, not EVEN_D)
        do = load_tile(do_ptrs, offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, not EVEN_D)
        lse2, delta = load_row_stats(lse2_ptr, delta_ptr, offs_m, seqlen_q, not EVEN_M)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
        if MASKED:
            p_t = tl.where(tl.trans(causal_visible(offs_m, offs_n, seqlen_q, seqlen_k)), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
        q_ptrs += BLOCK_M * stride_qs
        do_ptrs += BLOCK_M * stride_dos
        offs_m += BLOCK_M
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse2, Delta, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    seqlen_q, seqlen_k, kv_heads, group, head_dim, qk_scale, softmax_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    start_n, _, b, h_kv = program_tile(BLOCK_N, kv_heads)
    cols = tl.arange(0, BLOCK_N)
    offs_n = start_n + cols
    offs_d = tl.arange(0, BLOCK_D)
    n0 = start_n.to(tl.int64)

    k_ptrs = tile_pointers(K, b, h_kv, n0, cols, offs_d, stride_kb, stride_ks, stride_kh, stride_kd)
    v_ptrs = tile_pointers(V, b, h_kv, n0, cols, offs_d, stride_vb, stride_vs, stride_vh, stride_vd)
    k = load_tile(k_ptrs, offs_n, seqlen_k, offs_d, head_dim, not EVEN_N, not EVEN_D)
    v = load_tile(v_ptrs, offs_n, seqlen_k, offs_d, head_dim, not EVEN_N, not EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks [begin, full_begin) cross the causal diagonal; later ones see every key here.
    begin, full_begin = query_block_range(start_n, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    end = tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    m_begin, m_full = begin.to(tl.int64), full_begin.to(tl.int64)
    for g in range(group):  # the query heads that share this K/V head
        h = h_kv * group + g
        stats = (b * kv_heads * group + h) * seqlen_q  # row 0 of this head in lse2 and delta
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v,
            tile_pointers(Q, b, h, m_begin, rows, offs_d, stride_qb, stride_qs, stride_qh, stride_qd),
            tile_pointers(DO, b, h, m_begin, rows, offs_d, stride_dob, stride_dos, stride_doh, stride_dod),
            Lse2 + stats, Delta + stats, stride_qs, stride_dos, offs_n, offs_d,
            begin, full_begin, seqlen_q, seqlen_k, head_dim, qk_scale,
            True, BLOCK_M, EVEN_M, EVEN_D, PRECISION)
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v,
            tile_pointers(Q, b, h, m_full, rows, offs_d, stride_qb, stride_qs, stride_qh, stride_qd),
            tile_pointers(DO, b, h, m_full, rows, offs_d, stride_dob, stride_dos, stride_doh, stride_dod),
            Lse2 + stats, Delta + stats, stride_qs, stride_dos, offs_n, offs_d,
            full_begin, end, seqlen_q, seqlen_k, head_dim, qk_scale,
            False, BLOCK_M, EVEN_M, EVEN_D, PRECISION)

    dk_ptrs = tile_pointers(DK, b, h_kv, n0, cols, offs_d, stride_dkb, stride_dks, stride_dkh, stride_dkd)
    dv_ptrs = tile_pointers(DV, b, h_kv, n0, cols, offs_d, stride_dvb, stride_dvs, stride_dvh, stride_dvd)
    store_tile(dk_ptrs, (dk * softmax_scale).to(DK.dtype.element_ty), offs_n, seqlen_k, offs_d, head_dim,
               not EVEN_N, not EVEN_D)
    store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), offs_n, seqlen_k, offs_d, head_dim, not EVEN_N, not EVEN_D)


@triton.jit
def _dq_key_blocks(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d,
                   lo, hi, seqlen_q, seqlen_k, head_dim, qk_scale,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                   EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate the dQ of one query block over key blocks [lo, hi); pointers at key ``lo``.
    With MASKED, keys past ``seqlen_k`` and (when causal) after the diagonal are excluded."""
    offs_n = lo + tl.arange(0, BLOCK_N)
    for _start_n in range(lo, hi, BLOCK_N):
        k = load_tile(k_ptrs, offs_n, seqlen_k, offs_d, head_dim, MASKED, not EVEN_D)
        v = load_tile(v_ptrs, offs_n, seqlen_k, offs_d, head_dim, MASKED, not EVEN_D)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
        if MASKED:
            visible = offs_n[None, :] < seqlen_k
            if CAUSAL:
                visible = visible & causal_visible(offs_m, offs_n, seqlen_q, seqlen_k)
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
    Q, K, V, DO, Lse2, Delta, DQ,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    seqlen_q, seqlen_k, heads, group, head_dim, qk_scale, softmax_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m, bh, b, h = program_tile(BLOCK_M, heads)
    h_kv = h // group
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m0 = start_m.to(tl.int64)

    q_ptrs = tile_pointers(Q, b, h, m0, rows, offs_d, stride_qb, stride_qs, stride_qh, stride_qd)
    do_ptrs = tile_pointers(DO, b, h, m0, rows, offs_d, stride_dob, stride_dos, stride_doh, stride_dod)
    q = load_tile(q_ptrs, offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, not EVEN_D)
    do = load_tile(do_ptrs, offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, not EVEN_D)
    stats = bh.to(tl.int64) * seqlen_q  # row 0 of this head in lse2 and delta
    lse2, delta = load_row_stats(Lse2 + stats, Delta + stats, offs_m, seqlen_q, not EVEN_M)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The forward's key ranges: [0, full_end) unmasked, [full_end, end) masked.
    full_end, end = key_block_range(start_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_key_blocks(
        dq, q, do, lse2, delta,
        tile_pointers(K, b, h_kv, 0, offs_n, offs_d, stride_kb, stride_ks, stride_kh, stride_kd),
        tile_pointers(V, b, h_kv, 0, offs_n, offs_d, stride_vb, stride_vs, stride_vh, stride_vd),
        stride_ks, stride_vs, offs_m, offs_d, 0, full_end, seqlen_q, seqlen_k, head_dim, qk_scale,
        False, CAUSAL, BLOCK_N, EVEN_D, PRECISION)
    n0 = full_end.to(tl.int64)
    dq = _dq_key_blocks(
        dq, q, do, lse2, delta,
        tile_pointers(K, b, h_kv, n0, offs_n, offs_d, stride_kb, stride_ks, stride_kh, stride_kd),
        tile_pointers(V, b, h_kv, n0, offs_n, offs_d, stride_vb, stride_vs, stride_vh, stride_vd),
        stride_ks, stride_vs, offs_m, offs_d, full_end, end, seqlen_q, seqlen_k, head_dim, qk_scale,
        True, CAUSAL, BLOCK_N, EVEN_D, PRECISION)

    dq_ptrs = tile_pointers(DQ, b, h, m0, rows, offs_d, stride_dqb, stride_dqs, stride_dqh, stride_dqd)
    store_tile(dq_ptrs, (dq * softmax_scale).to(DQ.dtype.element_ty), offs_m, seqlen_q, offs_d, head_dim,
               not EVEN_M, not EVEN_D)


def backward_launches(dout, q, k, v, out, lse, delta, lse2, dq, dk, dv, *, causal: bool, scale: float,
                      configs: dict[str, KernelConfig]) -> list[Launch]:
    """The three backward launches for already-validated inputs; ``lse`` is float32 and
    contiguous, ``delta`` and ``lse2`` are float32 buffers of its shape, ``configs`` maps
    "bwd_dkdv" and "bwd_dq" to their configs (the preprocess uses the dq tiling)."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    block_d = padded_head_dim(head_dim)
    common = dict(CAUSAL=causal, BLOCK_D=block_d, EVEN_D=head_dim == block_d, PRECISION=dot_precision(q.dtype))
    dkdv, dq_cfg = configs["bwd_dkdv"], configs["bwd_dq"]
    return [
        Launch(_bwd_preprocess_kernel, (triton.cdiv(seqlen_q, dq_cfg.block_m), batch * heads),
               (out, dout, lse, delta, lse2, *strides(out), *strides(dout), seqlen_q, heads, head_dim),
               dict(BLOCK_M=dq_cfg.block_m, BLOCK_D=block_d), dq_cfg.num_warps, 1),
        Launch(_bwd_dkdv_kernel, (triton.cdiv(seqlen_k, dkdv.block_n), batch * kv_heads),
               (q, k, v, dout, lse2, delta, dk, dv,
                *strides(q), *strides(k), *strides(v), *strides(dout), *strides(dk), *strides(dv),
                seqlen_q, seqlen_k, kv_heads, group, head_dim, scale * LOG2E, scale),
               dict(BLOCK_M=dkdv.block_m, BLOCK_N=dkdv.block_n, EVEN_M=seqlen_q % dkdv.block_m == 0,
                    EVEN_N=seqlen_k % dkdv.block_n == 0, **common),
               dkdv.num_warps, dkdv.num_stages),
        Launch(_bwd_dq_kernel, (triton.cdiv(seqlen_q, dq_cfg.block_m), batch * heads),
               (q, k, v, dout, lse2, delta, dq,
                *strides(q), *strides(k), *strides(v), *strides(dout), *strides(dq),
                seqlen_q, seqlen_k, heads, group, head_dim, scale * LOG2E, scale),
               dict(BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n, EVEN_M=seqlen_q % dq_cfg.block_m == 0, **common),
               dq_cfg.num_warps, dq_cfg.num_stages),
    ]


def flash_attn_backward(dout, q, k, v, out, lse, causal=False, softmax_scale=None):
    """Gradients of flash attention from the given ``out`` and ``lse``.

    ``dout, q, out: [B, Sq, Hq, D]``, ``k, v: [B, Sk, Hkv, D]``, ``lse: [B, Hq, Sq]``
    (natural log, -inf for rows that see no key). Returns ``(dq, dk, dv)`` in the
    input dtype with the shapes of ``q, k, v``.
    """
    shape = check_backward_inputs(dout, q, k, v, out, lse, causal)
    check_triton_inputs(q)
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    device = q.device
    lse = lse.to(torch.float32).contiguous()
    delta, lse2 = torch.empty_like(lse), torch.empty_like(lse)
    dq = torch.empty(q.shape, dtype=q.dtype, device=device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=device)
    configs = {name: get_config(name, shape.head_dim, q.dtype, device) for name in ("bwd_dkdv", "bwd_dq")}
    with device_guard(device):
        for launch in backward_launches(dout, q, k, v, out, lse, delta, lse2, dq, dk, dv,
                                        causal=causal, scale=scale, configs=configs):
            launch.run()
    return dq, dk, dv
