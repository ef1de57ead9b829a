"""Argument checks shared by every attention backend.

Every backend takes ``q: [B, Sq, Hq, D]`` and ``k, v: [B, Sk, Hkv, D]`` with
``Hq % Hkv == 0``. Bad input raises a ``ValueError`` or ``TypeError`` that names
the offending argument, before any kernel runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class AttentionShape:
    """The sizes of one attention call."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per K/V head (1 for MHA, ``heads`` for MQA)."""
        return self.heads // self.kv_heads


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have 4 dims [batch, seqlen, heads, head_dim], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> AttentionShape:
    """Validate q, k, v (and the causal flag) and return their sizes."""
    if not isinstance(causal, bool):
        # Catches flash-attn's positional order (q, k, v, dropout_p, ...) passed to ours.
        raise TypeError(f"causal must be a bool, got {causal!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    _check_same("k", k, "q", q)
    _check_same("v", v, "q", q)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    batch, seqlen_q, heads, head_dim = q.shape
    _, seqlen_k, kv_heads, _ = k.shape
    if k.shape[0] != batch:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {batch}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {head_dim}")
    if min(batch, seqlen_q, heads, head_dim) < 1:
        raise ValueError(f"q must have no empty dimension, got shape {tuple(q.shape)}")
    if min(seqlen_k, kv_heads) < 1:
        raise ValueError(f"k must have no empty dimension, got shape {tuple(k.shape)}")
    if heads % kv_heads != 0:
        raise ValueError(f"the heads of q ({heads}) must be a multiple of the heads of k and v ({kv_heads})")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {head_dim}; at most {MAX_HEAD_DIM} is supported")
    return AttentionShape(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim)


def check_backward_inputs(dout, q, k, v, out, lse, causal: bool = False) -> AttentionShape:
    """Validate the arguments of a backward call and return the sizes."""
    shape = check_qkv(q, k, v, causal)
    for name, x in (("dout", dout), ("out", out)):
        _check_tensor(name, x)
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
        _check_same(name, x, "q", q)
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    expected = (shape.batch, shape.heads, shape.seqlen_q)
    if tuple(lse.shape) != expected:
        raise ValueError(f"lse must have shape [batch, heads, seqlen_q] = {list(expected)}, got {list(lse.shape)}")
    if lse.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"lse must be float32 or float64 (as the forward returns it), got {lse.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
    return shape


def resolve_softmax_scale(softmax_scale, head_dim: int) -> float:
    """``softmax_scale`` as a float, defaulting to ``head_dim ** -0.5``."""
    if softmax_scale is None:
        return head_dim**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a finite positive number, got {softmax_scale}")
    return float(softmax_scale)


def causal_offset(seqlen_q: int, seqlen_k: int) -> int:
    """Bottom-right causal alignment: query i sees key j iff j <= i + offset."""
    return seqlen_k - seqlen_q


def refuse_flash_attn_extras(dropout_p=0.0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None) -> None:
    """ValueErrors for flash-attn's options that the kernels do not implement, when set
    to anything but their defaults (dropout, sliding window, logit softcap, ALiBi)."""
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (dropout is not supported), got {dropout_p}")
    if tuple(window_size) != (-1, -1):
        raise ValueError(f"window_size must be (-1, -1) (sliding windows are not supported yet), got {window_size}")
    if softcap != 0.0:
        raise ValueError(f"softcap must be 0.0 (logit softcapping is not supported), got {softcap}")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes must be None (ALiBi is not supported)")
