"""Autograd over any backend, and ``flash_attn_func`` over the Triton kernels."""

from __future__ import annotations

import torch

from .backends import Backend, get_backend, window_kwargs
from .checks import refuse_flash_attn_extras


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, backend, window):
        out, lse = backend.forward(q, k, v, causal=causal, softmax_scale=softmax_scale, **window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softmax_scale, ctx.backend, ctx.window = causal, softmax_scale, backend, window
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backend.backward(dout, q, k, v, out, lse, causal=ctx.causal,
                                          softmax_scale=ctx.softmax_scale, **ctx.window)
        return dq, dk, dv, None, None, None, None


def local_attention(q, k, v, causal=False, softmax_scale=None, *, backend: str | Backend | None = None,
                    return_lse=False, window_size=(-1, -1)):
    """Differentiable attention through a backend (see ``get_backend``).

    ``q: [B, Sq, Hq, D]``, ``k, v: [B, Sk, Hkv, D]`` -> ``out: [B, Sq, Hq, D]``, and
    ``lse: [B, Hq, Sq]`` (not differentiable) when ``return_lse``. ``window_size``:
    flash-attn's sliding window ``(left, right)``, -1 unbounded, bottom-right aligned.
    """
    out, lse = _AttentionFunction.apply(q, k, v, causal, softmax_scale, get_backend(backend),
                                        window_kwargs(window_size))
    return (out, lse) if return_lse else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, backend=None):
    """Drop-in for flash-attn's function of the same name: its signature and positional
    order. ``q: [B, Sq, Hq, D]``, ``k, v: [B, Sk, Hkv, D]`` (GQA/MQA with fewer K/V heads)
    -> ``out [B, Sq, Hq, D]``; with ``return_attn_probs``, ``(out, softmax_lse
    [B, Hq, Sq], None)`` as flash-attn returns without dropout (the LSE float32, float64
    for float64 inputs; not differentiable). Causal is aligned bottom-right, as in flash-attn.

    ``backend``: default the Triton kernels for CUDA tensors, PyTorch's fused ops on a
    CPU. ``deterministic`` is accepted: every backend's backward is. ``window_size``:
    a sliding window as flash-attn's. Dropout, softcap and ALiBi raise a ValueError
    unless left at their defaults.
    """
    refuse_flash_attn_extras(dropout_p, softcap, alibi_slopes)
    if backend is None and isinstance(q, torch.Tensor):
        backend = "triton" if q.is_cuda else "torch"
    out, lse = local_attention(q, k, v, causal, softmax_scale, backend=backend, return_lse=True,
                               window_size=window_size)
    return (out, lse, None) if return_attn_probs else out
