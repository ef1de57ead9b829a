"""Autograd over any backend, and ``flash_attn_func`` over the Triton kernels."""

from __future__ import annotations

import torch

from .backends import Backend, get_backend


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, backend):
        out, lse = backend.forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softmax_scale, ctx.backend = causal, softmax_scale, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backend.backward(dout, q, k, v, out, lse, causal=ctx.causal,
                                          softmax_scale=ctx.softmax_scale)
        return dq, dk, dv, None, None, None


def local_attention(q, k, v, causal=False, softmax_scale=None, *, backend: str | Backend | None = None,
              return_lse=False):
    """Differentiable attention through a backend (see ``get_backend``).

    ``q: [B, Sq, Hq, D]``, ``k, v: [B, Sk, Hkv, D]`` -> ``out: [B, Sq, Hq, D]``, and
    ``lse: [B, Hq, Sq]`` (not differentiable) when ``return_lse``.
    """
    out, lse = _AttentionFunction.apply(q, k, v, causal, softmax_scale, get_backend(backend))
    return (out, lse) if return_lse else out


def flash_attn_func(q, k, v, causal=False, softmax_scale=None, *, dropout_p=0.0, return_lse=False):
    """Drop-in for flash-attn's function of the same name, on our Triton kernels.

    Takes and returns ``[B, S, H, D]`` tensors; GQA/MQA when k and v have fewer heads.
    Dropout is not supported: ``dropout_p`` must be 0.
    """
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (dropout is not supported), got {dropout_p}")
    return local_attention(q, k, v, causal, softmax_scale, backend="triton", return_lse=return_lse)
