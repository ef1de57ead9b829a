"""Attention over packed documents (flash-attn's "varlen" layout) on any backend.

Several documents are packed into one sequence: ``q: [total_q, Hq, D]``,
``k, v: [total_k, Hkv, D]``, document d holding query rows
``cu_seqlens_q[d]:cu_seqlens_q[d + 1]`` and keys ``cu_seqlens_k[d]:cu_seqlens_k[d + 1]``
(int32). No token attends across a document boundary; causal and the sliding window
are aligned bottom-right within each document; ``lse: [Hq, total_q]``. The triton
backend runs all documents in one launch; a backend without varlen functions runs one
call per document (empty documents skipped, rows with no key: out 0, lse -inf).
"""

from __future__ import annotations

import torch

from .backends import Backend, get_backend, window_kwargs
from .checks import (check_documents, check_packed_backward_inputs, check_packed_qkv, offsets_tensor,
                     refuse_flash_attn_extras, resolve_window)
from .layout import accum_dtype


def self_attention_offsets(documents: tuple[int, ...], device) -> tuple:
    """The varlen arguments ``cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k`` of
    one packed sequence attending to itself, from its checked offsets (the tensor made
    once per device, never read back)."""
    cu = offsets_tensor(documents, device)
    longest = max(b - a for a, b in zip(documents, documents[1:]))
    return cu, cu, longest, longest


def _document_spans(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, shape):
    """Validated ``[(q_start, q_end, k_start, k_end)]`` per document."""
    offsets_q, offsets_k = check_documents(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, shape)
    return list(zip(offsets_q, offsets_q[1:], offsets_k, offsets_k[1:]))


def varlen_forward(backend: Backend, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                   causal=False, softmax_scale=None, window_size=(-1, -1)):
    """``(out [total_q, Hq, D], lse [Hq, total_q])`` of packed documents on ``backend``."""
    if getattr(backend, "varlen_forward", None) is not None:
        return backend.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      causal=causal, softmax_scale=softmax_scale, window_size=window_size)
    shape = check_packed_qkv(q, k, v, causal)
    window = window_kwargs(window_size)
    out = torch.zeros_like(q)
    lse = torch.full((shape.heads, shape.seqlen_q), float("-inf"), dtype=accum_dtype(q.dtype), device=q.device)
    for qa, qb, ka, kb in _document_spans(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, shape):
        if qb > qa and kb > ka:  # else its rows (if any) see no key
            doc_out, doc_lse = backend.forward(q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], causal=causal,
                                               softmax_scale=softmax_scale, **window)
            out[qa:qb], lse[:, qa:qb] = doc_out[0], doc_lse[0]
    return out, lse


def varlen_backward(backend: Backend, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, *, causal=False, softmax_scale=None, window_size=(-1, -1)):
    """``(dq, dk, dv)`` of packed documents from the given ``out`` and ``lse [Hq, total_q]``."""
    if getattr(backend, "varlen_backward", None) is not None:
        return backend.varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, causal=causal, softmax_scale=softmax_scale,
                                       window_size=window_size)
    shape = check_packed_backward_inputs(dout, q, k, v, out, lse, causal)
    window = window_kwargs(window_size)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qa, qb, ka, kb in _document_spans(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, shape):
        if qb > qa and kb > ka:
            grads = backend.backward(dout[None, qa:qb], q[None, qa:qb], k[None, ka:kb], v[None, ka:kb],
                                     out[None, qa:qb], lse[None, :, qa:qb], causal=causal,
                                     softmax_scale=softmax_scale, **window)
            dq[qa:qb], dk[ka:kb], dv[ka:kb] = (g[0] for g in grads)
    return dq, dk, dv


class _VarlenAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                window_size, backend):
        documents = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        options = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size)
        out, lse = varlen_forward(backend, q, k, v, *documents, **options)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.max_seqlens, ctx.options, ctx.backend = (max_seqlen_q, max_seqlen_k), options, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = varlen_backward(ctx.backend, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                     *ctx.max_seqlens, **ctx.options)
        return dq, dk, dv, *(None,) * 8


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, backend=None):
    """Drop-in for flash-attn's function of the same name: its signature and positional
    order, differentiable. ``q: [total_q, Hq, D]``, ``k, v: [total_k, Hkv, D]``,
    ``cu_seqlens_*`` int32 ``[documents + 1]`` -> ``out [total_q, Hq, D]``; with
    ``return_attn_probs``, ``(out, softmax_lse [Hq, total_q], None)``.

    ``backend``: default the Triton kernels for CUDA tensors, PyTorch's fused ops
    (one call per document) on a CPU. The offsets are checked on the host (one
    device sync). Dropout, softcap, ALiBi and a paged KV cache (``block_table``) raise
    a ValueError unless left at their defaults.
    """
    refuse_flash_attn_extras(dropout_p, softcap, alibi_slopes)
    if block_table is not None:
        raise ValueError("block_table must be None (a paged KV cache is not supported)")
    resolve_window(causal, window_size)
    if backend is None and isinstance(q, torch.Tensor):
        backend = "triton" if q.is_cuda else "torch"
    out, lse = _VarlenAttentionFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              causal, softmax_scale, tuple(window_size), get_backend(backend))
    return (out, lse, None) if return_attn_probs else out
