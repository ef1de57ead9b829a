"""Argument checks shared by every attention backend.

Every backend takes ``q: [B, Sq, Hq, D]`` and ``k, v: [B, Sk, Hkv, D]`` with
``Hq % Hkv == 0``. Bad input raises a ``ValueError`` or ``TypeError`` that names
the offending argument, before any kernel runs.
"""

from __future__ import annotations

import functools
import math
import weakref
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


_DIMS = {4: "[batch, seqlen, heads, head_dim]", 3: "[total_tokens, heads, head_dim] (packed)"}


def _check_tensor(name: str, x, dims: int = 4) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims {_DIMS[dims]}, got shape {tuple(x.shape)}")
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
    _check_lse(lse, shape, q)
    if lse.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"lse must be float32 or float64 (as the forward returns it), got {lse.dtype}")
    return shape


def check_accumulator(q, k, v, out, lse, causal: bool = False) -> AttentionShape:
    """Validate a forward that merges into a running float32 ``(out, lse)`` in place
    (``flash_attn_forward_into``) and return the sizes: ``out`` of q's shape, ``lse`` with
    unit stride along the sequence, neither expanded (the kernel writes every element) nor
    sharing memory with q, k, v or the other."""
    shape = check_qkv(q, k, v, causal)
    _check_tensor("out", out)
    if out.shape != q.shape:
        raise ValueError(f"out must have the shape of q {tuple(q.shape)}, got {tuple(out.shape)}")
    _check_lse(lse, shape, q)
    if out.dtype != torch.float32 or lse.dtype != torch.float32:
        raise ValueError(f"out and lse accumulate in float32, got {out.dtype} and {lse.dtype}")
    if out.device != q.device:
        raise ValueError(f"out is on {out.device} but q is on {q.device}")
    if lse.stride(-1) != 1 and shape.seqlen_q > 1:
        raise ValueError("lse must have unit stride along the sequence")
    _check_written("out and lse", (out, lse), (q, k, v))
    return shape


def check_grad_accumulator(dout, q, k, v, out, lse, dq, causal: bool = False) -> AttentionShape:
    """Validate a backward that adds its dQ into a running float32 ``dq`` in place
    (``flash_attn_backward_into``) and return the sizes: ``dq`` of q's shape on q's
    device, not expanded and not sharing memory with any input."""
    shape = check_backward_inputs(dout, q, k, v, out, lse, causal)
    _check_tensor("dq", dq)
    if dq.shape != q.shape:
        raise ValueError(f"dq must have the shape of q {tuple(q.shape)}, got {tuple(dq.shape)}")
    if dq.dtype != torch.float32:
        raise ValueError(f"dq accumulates in float32, got {dq.dtype}")
    if dq.device != q.device:
        raise ValueError(f"dq is on {dq.device} but q is on {q.device}")
    _check_written("dq", (dq,), (dout, q, k, v, out, lse))
    return shape


def _check_written(what: str, written, inputs) -> None:
    """Tensors a kernel writes in place: no element twice (an expanded tensor), no memory
    shared with the inputs or with each other."""
    if any(stride == 0 and size > 1 for x in written for stride, size in zip(x.stride(), x.shape)):
        raise ValueError(f"{what} must not have elements that overlap (an expanded tensor): the kernel writes them")
    storage = lambda x: x.untyped_storage().data_ptr()  # noqa: E731
    if any(a.numel() and b.numel() and storage(a) == storage(b)
           for i, a in enumerate(written) for b in (*inputs, *written[i + 1:])):
        raise ValueError(f"{what} must not share memory with " + ("q, k, v or each other" if len(written) > 1
                                                                   else "the inputs"))


def _check_lse(lse, shape: AttentionShape, q: torch.Tensor) -> None:
    """``lse [batch, heads, seqlen_q]`` on q's device (its dtype is the caller's rule)."""
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    expected = (shape.batch, shape.heads, shape.seqlen_q)
    if tuple(lse.shape) != expected:
        raise ValueError(f"lse must have shape [batch, heads, seqlen_q] = {list(expected)}, got {list(lse.shape)}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")


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


def resolve_window(causal: bool, window_size) -> tuple[int | None, int | None]:
    """flash-attn's ``window_size=(left, right)`` as ``(left, right)`` bounds, None where
    unbounded (-1): query i sees key j iff ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``.
    Causal sets ``right = 0``, as flash-attn does."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if min(window_size) < -1:
        raise ValueError(f"window_size entries must be >= 0, or -1 for unbounded, got {tuple(window_size)}")
    left, right = (None if w == -1 else w for w in window_size)
    return left, 0 if causal else right


def check_packed_qkv(q, k, v, causal: bool = False) -> AttentionShape:
    """Validate packed ``q: [total_q, Hq, D]``, ``k, v: [total_k, Hkv, D]``; the sizes of
    the equivalent batch of one (``seqlen_*`` are the totals)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, dims=3)
    return check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), causal)


def check_packed_backward_inputs(dout, q, k, v, out, lse, causal: bool = False) -> AttentionShape:
    """Validate a packed backward call: ``dout, out`` like ``q: [total_q, Hq, D]``, ``lse: [Hq, total_q]``."""
    for name, x in (("q", q), ("k", k), ("v", v), ("dout", dout), ("out", out)):
        _check_tensor(name, x, dims=3)
    if not isinstance(lse, torch.Tensor) or lse.dim() != 2:
        raise ValueError(f"lse must be 2-D [heads, total_q], got {getattr(lse, 'shape', type(lse).__name__)}")
    return check_backward_inputs(dout.unsqueeze(0), q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                 out.unsqueeze(0), lse.unsqueeze(0), causal)


def check_cu_seqlens(name: str, cu_seqlens, total: int, max_seqlen) -> list[int]:
    """Validate document offsets of a packed sequence of ``total`` tokens: an int32 tensor
    ``[documents + 1]`` on any device, non-decreasing from 0 to ``total``, whose longest
    document is at most ``max_seqlen``. Returns the offsets as a list (reading them
    synchronises with the device)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as flash-attn takes it), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D [documents + 1] with at least 2 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    return check_offsets(name, read_offsets(cu_seqlens), total, max_seqlen)


# Offsets read from a GPU, per tensor and version: a model passes the same offsets to every
# layer, and each read is a host synchronisation. An in-place change of the tensor bumps
# its version, so the new values are read again (a write through ``.data`` or DLPack does
# not: make a new tensor instead). CPU tensors, free to read and often views of reused
# numpy buffers, and inference tensors, which keep no version, are read every time.
_offsets_read: dict[int, tuple[int, tuple[int, ...]]] = {}  # id(tensor) -> (version, offsets), while it lives


def read_offsets(cu_seqlens: torch.Tensor) -> list[int]:
    """``cu_seqlens.tolist()``, read from a GPU once per tensor version."""
    cached = _offsets_read.get(id(cu_seqlens))
    if cached is not None and not cu_seqlens.is_inference() and cached[0] == cu_seqlens._version:
        return list(cached[1])
    offsets = cu_seqlens.tolist()
    if cu_seqlens.device.type != "cpu" and not cu_seqlens.is_inference():
        _remember_offsets(cu_seqlens, tuple(offsets))
    return offsets


def _remember_offsets(tensor: torch.Tensor, offsets: tuple[int, ...]) -> None:
    if id(tensor) not in _offsets_read:
        weakref.finalize(tensor, _offsets_read.pop, id(tensor), None)
    _offsets_read[id(tensor)] = (tensor._version, offsets)


def offsets_tensor(offsets: tuple[int, ...], device) -> torch.Tensor:
    """Offsets already checked, as an int32 tensor on ``device`` that ``read_offsets``
    knows without reading it (made once per offsets and device; never write to it)."""
    return _offsets_tensor(tuple(offsets), torch.device(device))


@functools.lru_cache(maxsize=64)
def _offsets_tensor(offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor, with a version, even when first made in inference mode
        tensor = torch.tensor(offsets, dtype=torch.int32, device=device)
    _remember_offsets(tensor, offsets)
    return tensor


def check_documents(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, shape: AttentionShape
                    ) -> tuple[list[int], list[int]]:
    """Validate both offsets of a varlen call (packed lengths from ``shape``) and that
    they hold as many documents; the offsets as lists."""
    offsets_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, shape.seqlen_q, max_seqlen_q)
    offsets_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, shape.seqlen_k, max_seqlen_k)
    if len(offsets_q) != len(offsets_k):
        raise ValueError(f"cu_seqlens_q holds {len(offsets_q) - 1} documents but cu_seqlens_k {len(offsets_k) - 1}")
    return offsets_q, offsets_k


def check_offsets(name: str, offsets: list[int], total: int, max_seqlen) -> list[int]:
    """``check_cu_seqlens`` on offsets already read from the device (a list of ints)."""
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at the packed length {total}, "
                         f"got {offsets[0]} ... {offsets[-1]}")
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    if min(lengths) < 0:
        at = lengths.index(min(lengths))
        raise ValueError(f"{name} must be non-decreasing, got {offsets[at]} then {offsets[at + 1]} at index {at}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen for {name} must be an int, got {type(max_seqlen).__name__}")
    if max_seqlen < max(lengths):
        raise ValueError(f"max_seqlen {max_seqlen} is shorter than the longest document of {name} ({max(lengths)})")
    return offsets


def refuse_flash_attn_extras(dropout_p=0.0, softcap=0.0, alibi_slopes=None) -> None:
    """ValueErrors for flash-attn's options that the kernels do not implement, when set
    to anything but their defaults (dropout, logit softcap, ALiBi)."""
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (dropout is not supported), got {dropout_p}")
    if softcap != 0.0:
        raise ValueError(f"softcap must be 0.0 (logit softcapping is not supported), got {softcap}")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes must be None (ALiBi is not supported)")
