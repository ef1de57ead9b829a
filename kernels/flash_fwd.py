"""Triton flash-attention forward that returns the log-sum-exp.

One program computes one tile of ``BLOCK_M`` query rows of one (batch, head): it walks
the key blocks this tile may see, first the blocks that need no mask, then the few on
the causal diagonal or the sequence end, keeping the running max ``m``, sum ``l`` and
output accumulator in float32 (online softmax).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_qkv, resolve_softmax_scale
from .configs import KernelConfig, get_config, padded_head_dim
from .triton_common import (LOG2E, Launch, causal_visible, check_triton_inputs, device_guard, dot_precision,
                            key_block_range, load_tile, program_tile, store_tile, strides, tile_pointers)


@triton.jit
def _attend_key_blocks(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_d,
                       lo, hi, seqlen_q, seqlen_k, head_dim, qk_scale,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                       EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Fold key blocks [lo, hi) into the online-softmax state (acc, m_i, l_i).

    ``k_ptrs, v_ptrs`` point at key row ``lo``. With MASKED, keys past ``seqlen_k`` and
    (when causal) keys after a row's diagonal are excluded."""
    offs_n = lo + tl.arange(0, BLOCK_N)
    for _start_n in range(lo, hi, BLOCK_N):
        k = load_tile(k_ptrs, offs_n, seqlen_k, offs_d, head_dim, MASKED, not EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            visible = offs_n[None, :] < seqlen_k
            if CAUSAL:
                visible = visible & causal_visible(offs_m, offs_n, seqlen_q, seqlen_k)
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
    Q, K, V, Out, Lse,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    seqlen_q, seqlen_k, heads, group, head_dim, qk_scale,
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
    q = load_tile(q_ptrs, offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, not EVEN_D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Key blocks [0, full_end) need no mask; [full_end, end) are on the diagonal or the end.
    full_end, end = key_block_range(start_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _attend_key_blocks(
        acc, m_i, l_i, q,
        tile_pointers(K, b, h_kv, 0, offs_n, offs_d, stride_kb, stride_ks, stride_kh, stride_kd),
        tile_pointers(V, b, h_kv, 0, offs_n, offs_d, stride_vb, stride_vs, stride_vh, stride_vd),
        stride_ks, stride_vs, offs_m, offs_d, 0, full_end, seqlen_q, seqlen_k, head_dim, qk_scale,
        False, CAUSAL, BLOCK_N, EVEN_D, PRECISION)
    n0 = full_end.to(tl.int64)
    acc, m_i, l_i = _attend_key_blocks(
        acc, m_i, l_i, q,
        tile_pointers(K, b, h_kv, n0, offs_n, offs_d, stride_kb, stride_ks, stride_kh, stride_kd),
        tile_pointers(V, b, h_kv, n0, offs_n, offs_d, stride_vb, stride_vs, stride_vh, stride_vd),
        stride_ks, stride_vs, offs_m, offs_d, full_end, end, seqlen_q, seqlen_k, head_dim, qk_scale,
        True, CAUSAL, BLOCK_N, EVEN_D, PRECISION)

    # Rows that saw no key (l = 0 exactly; a row that sees one has l >= 1): out = 0, lse = -inf.
    # A NaN l (NaN scores) keeps its NaN in out and lse rather than reporting "saw no key".
    seen = l_i != 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # log2 -> ln

    o_ptrs = tile_pointers(Out, b, h, m0, rows, offs_d, stride_ob, stride_os, stride_oh, stride_od)
    store_tile(o_ptrs, out.to(Out.dtype.element_ty), offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, not EVEN_D)
    lse_ptrs = Lse + bh.to(tl.int64) * seqlen_q + offs_m
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)


def forward_launch(q, k, v, out, lse, *, causal: bool, scale: float, config: KernelConfig) -> Launch:
    """The forward launch writing ``out`` and ``lse`` for already-validated inputs."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    block_d = padded_head_dim(head_dim)
    return Launch(
        _flash_fwd_kernel, (triton.cdiv(seqlen_q, config.block_m), batch * heads),
        (q, k, v, out, lse, *strides(q), *strides(k), *strides(v), *strides(out),
         seqlen_q, seqlen_k, heads, heads // kv_heads, head_dim, scale * LOG2E),
        dict(CAUSAL=causal, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d,
             EVEN_M=seqlen_q % config.block_m == 0, EVEN_D=head_dim == block_d, PRECISION=dot_precision(q.dtype)),
        config.num_warps, config.num_stages)


def flash_attn_forward(q, k, v, causal=False, softmax_scale=None):
    """Flash attention forward on the GPU (or the Triton interpreter).

    ``q: [B, Sq, Hq, D]``, ``k, v: [B, Sk, Hkv, D]`` in fp16, bf16 or fp32, any strides.
    Returns ``out: [B, Sq, Hq, D]`` (q's dtype, contiguous) and ``lse: [B, Hq, Sq]``
    (float32, natural log; -inf for a row that sees no key, whose out is 0).
    """
    shape = check_qkv(q, k, v, causal)
    check_triton_inputs(q)
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((shape.batch, shape.heads, shape.seqlen_q), dtype=torch.float32, device=q.device)
    config = get_config("fwd", shape.head_dim, q.dtype, q.device)
    with device_guard(q.device):
        forward_launch(q, k, v, out, lse, causal=causal, scale=scale, config=config).run()
    return out, lse
