"""The ``torch`` backend: PyTorch's fused attention ops that expose the LSE.

CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward.
CUDA: the flash ops for fp16/bf16, the memory-efficient ops for fp32.

These ops align a causal mask top-left, our convention is bottom-right, and both
agree on square blocks. So a causal call is cut into pieces that are either
unmasked or square-causal: for ``Sk >= Sq`` the first ``Sk - Sq`` keys are seen
by every query (an unmasked piece) and the last ``Sq`` keys form a square causal
piece; for ``Sk < Sq`` the first ``Sq - Sk`` queries see nothing and the rest form
a square causal piece. On the CPU in float32 and float64, with PyTorch on one thread, a
causal square is cut further, in halves (``_square``), where PyTorch's op is slow on
it. Pieces are merged exactly through their LSE (forward) or their gradients summed
(backward).
A sliding window (``window_size``) or a mask by token (``positions``, see
``usp.kernels.tokens``) runs on the CPU as one call with an additive mask of
``[Sq, Sk]`` (in the input dtype: memory grows with Sq x Sk); on CUDA it is refused,
the triton backend takes it. GQA/MQA: the ops that can take fewer K/V heads than query
heads are given them (each K/V head shared by its group of query heads, its gradient
summed inside the op), so no K/V copy is made: the CPU op of PyTorch 2.9 and newer, and
the CUDA flash op (fp16/bf16; FlashAttention-2 shares K/V heads, as SDPA's
``enable_gqa`` relies on from PyTorch 2.5; its backward still sums dK and dV from
query-head-sized buffers of its own). The CUDA memory-efficient op (fp32) and older CPU
builds get K/V heads expanded to the query heads and their gradients summed back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import check_backward_inputs, check_qkv, resolve_softmax_scale, resolve_window
from .layout import accum_dtype, expand_kv, reduce_kv_grad
from .merge import PartialResults
from .naive import visibility_mask

aten = torch.ops.aten


@dataclass(frozen=True)
class _Piece:
    rows: slice
    keys: slice
    causal: bool


def _pieces(seqlen_q: int, seqlen_k: int, causal: bool, cut: tuple[int, int | None] | None = None) -> list[_Piece]:
    """The unmasked and square-causal pieces of a call, rows in increasing order; ``cut``
    as in ``_square`` (its low bound at least 2)."""
    if cut is not None and cut[0] < 2:
        raise ValueError(f"a causal square is cut down to pieces of one row at least: low bound >= 2, got {cut}")
    if not causal:
        return [_Piece(slice(0, seqlen_q), slice(0, seqlen_k), False)]
    if seqlen_k >= seqlen_q:
        offset = seqlen_k - seqlen_q
        square = _square(0, offset, seqlen_q, cut)
        return [_Piece(slice(0, seqlen_q), slice(0, offset), False), *square] if offset else square
    return _square(seqlen_q - seqlen_k, 0, seqlen_k, cut)


def _square(row: int, key: int, size: int, cut: tuple[int, int | None] | None) -> list[_Piece]:
    """The square causal piece of ``size`` rows from ``row`` and keys from ``key``, cut
    in two while ``cut = (low, high)`` holds ``low <= size < high`` (high None: no
    bound): its halves (the second one row longer for an odd size) are square-causal
    and the block between them unmasked (rows 4-7 of 8 see keys 0-3 whole)::

        x . . . . . . .      causal 4 x 4 |
        x x . . . . . .                   |
        x x x . . . . .                   |
        x x x x . . . .                   |
        x x x x x . . .      unmasked     | causal 4 x 4
        x x x x x x . .      4 x 4        |
        x x x x x x x .                   |
        x x x x x x x x                   |
    """
    if cut is None or size < cut[0] or (cut[1] is not None and size >= cut[1]):
        return [_Piece(slice(row, row + size), slice(key, key + size), True)]
    half = size // 2
    return [*_square(row, key, half, cut), _Piece(slice(row + half, row + size), slice(key, key + half), False),
            *_square(row + half, key + half, size - half, cut)]


# PyTorch's CPU flash op (2.13, one thread) is slow on causal squares: below 768 rows
# (its query blocks are then 64 rows or fewer) a causal square takes about as long as
# the unmasked one, and its causal backward loses at every length. Cut in halves down
# to pieces under 384 rows (forward) or 256 (backward), a causal call takes, merges
# included, 8 heads, d64, float32: forward 0.87x the time at 512 rows, 0.96-0.99x at
# 384 and 640; backward 0.84x at 384, 0.70x at 512, 0.78-0.84x at 640-1024, 0.90x at
# 2048, 0.93x at 4096, 0.97x at 8192 (longer ones are cut too, unmeasured); float64
# alike (kernels/NOTES.md). Measured with one thread (the only case ``_cut`` cuts);
# other PyTorch versions may block their op differently. Not in float16/bfloat16: each
# piece's output would be rounded to the input dtype before the merge, and the
# bfloat16 backward ran 1.36x slower cut.
_CPU_CAUSAL_CUT = {"forward": (384, 768), "backward": (256, None)}


def _cut(q, direction: str) -> tuple[int, int | None] | None:
    """The ``_square`` cut for a call on ``q``'s device and dtype (None: never cut): on
    the CPU in float32 and float64, and only where PyTorch runs its op on one thread (as
    each rank of a multi-process run does); on two threads the cut backward took 0.79x
    the time at 512 rows but 1.05x at 2048, and more threads share out smaller pieces
    worse still."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64) or torch.get_num_threads() != 1:
        return None
    return _CPU_CAUSAL_CUT[direction]


# --- one fused call on [B, S, H, D] tensors with matching heads -------------------------

def _to_bhsd(x):
    """``[B, S, H, D]`` <-> ``[B, H, S, D]`` view. PyTorch's fused kernels assume a
    unit-stride head dim (the CPU one reads garbage otherwise): copy when it is not."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.transpose(1, 2)


def _pad_last_dim(x, multiple: int):
    pad = -x.shape[-1] % multiple
    return F.pad(x, (0, pad)) if pad else x


_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])
# PyTorch's CPU flash op shares K/V heads among query heads itself since 2.9; before,
# it indexed K/V by the query head and would read past them.
_CPU_OP_SHARES_KV_HEADS = _TORCH_VERSION >= (2, 9)
_CUDA_FLASH_SHARES_KV_HEADS = _TORCH_VERSION >= (2, 5) and torch.version.hip is None


def op_shares_kv_heads(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused op for this device and dtype takes fewer K/V heads than query heads."""
    if device.type == "cpu":
        return _CPU_OP_SHARES_KV_HEADS
    return _CUDA_FLASH_SHARES_KV_HEADS and dtype in (torch.float16, torch.bfloat16)


def _kv_group(q, group: int) -> int:
    """How many query heads share a K/V head in the fused calls: ``group`` where the op
    shares K/V heads itself, else 1 (K/V expanded first)."""
    return group if op_shares_kv_heads(q.device, q.dtype) else 1


def _fused_forward(q, k, v, causal: bool, scale: float, bias=None):
    """(out [B, S, H, D], lse [B, H, S]) of one fused call; lse in promote(dtype, float32).
    ``bias``: an additive [Sq, Sk] mask (CPU only)."""
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            _to_bhsd(q), _to_bhsd(k), _to_bhsd(v), 0.0, causal, attn_mask=bias, scale=scale)
        return _to_bhsd(out), lse
    head_dim = q.shape[-1]
    q, k, v = (_to_bhsd(_pad_last_dim(x, 8)) for x in (q, k, v))
    if q.dtype in (torch.float16, torch.bfloat16):
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    elif q.dtype == torch.float32:
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        lse = lse[..., : q.shape[2]]
    else:
        raise TypeError(f"the torch backend on {q.device.type} supports float16, bfloat16 and float32, got {q.dtype}")
    return _to_bhsd(out)[..., :head_dim], lse


def _fused_backward(dout, q, k, v, out, lse, causal: bool, scale: float, bias=None):
    """(dq, dk, dv) of one fused call, from the given out and lse; ``bias`` as in the forward."""
    if q.device.type == "cpu":
        grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _to_bhsd(dout), _to_bhsd(q), _to_bhsd(k), _to_bhsd(v), _to_bhsd(out),
            lse.to(torch.promote_types(q.dtype, torch.float32)), 0.0, causal, attn_mask=bias, scale=scale)
        return tuple(_to_bhsd(g) for g in grads)
    head_dim = q.shape[-1]
    dout, q, k, v, out = (_to_bhsd(_pad_last_dim(x, 8)).contiguous() for x in (dout, q, k, v, out))
    lse = lse.float().contiguous()
    if q.dtype in (torch.float16, torch.bfloat16):
        seed = torch.empty(2, dtype=torch.uint64, device=q.device)
        offset = torch.empty((), dtype=torch.uint64, device=q.device)
        grads = aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, seed, offset, scale=scale)
    else:
        if torch.version.hip is None:  # the CUDA op wants the LSE padded to a multiple of 32 rows
            lse = _pad_last_dim(lse, 32)
        seed = torch.empty((), dtype=torch.int64, device=q.device)
        grads = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, seed, seed, 0.0, [True, True, True, False], causal, scale=scale)[:3]
    return tuple(_to_bhsd(g)[..., :head_dim] for g in grads)


# --- a sliding window: one call with an additive mask (CPU) --------------------------------

def _window_bias(shape, left, right, q, positions) -> torch.Tensor | None:
    """The additive [Sq, Sk] mask of a window that is not plain causal, or of token
    ``positions``; None when there is none."""
    if positions is None and left is None and right in (None, 0):
        return None
    if q.device.type != "cpu":
        raise ValueError("the torch backend takes a sliding window (window_size) or token positions on the CPU "
                         "only; use the triton backend on CUDA")
    if positions is not None:
        positions.check(shape.seqlen_q, shape.seqlen_k, q.device)
        visible = positions.visible(left, right)
    else:
        visible = visibility_mask(shape.seqlen_q, shape.seqlen_k, left, right, q.device)
    return torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))


def _windowed_forward(q, k, v, bias, scale):
    out, lse = _fused_forward(q, k, v, False, scale, bias)
    # the op gives a row that sees no key lse 0 (and out 0): ours is -inf
    lse = lse.masked_fill((bias == float("-inf")).all(dim=1), float("-inf"))
    return out.contiguous(), lse.contiguous()


def _windowed_backward(dout, q, k, v, out, lse, bias, scale):
    # rows that see no key have p = 0 through the mask whatever their (finite) lse
    lse = lse.masked_fill(lse == float("-inf"), 0.0)
    return _fused_backward(dout, q, k, v, out, lse, False, scale, bias)


# --- the backend contract ---------------------------------------------------------------

def forward(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), positions=None):
    """(out [B, Sq, Hq, D], lse [B, Hq, Sq] in promote(dtype, float32)) through PyTorch's fused kernels."""
    shape = check_qkv(q, k, v, causal)
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    bias = _window_bias(shape, *resolve_window(causal, window_size), q, positions)
    expand = shape.group // _kv_group(q, shape.group)
    k, v = expand_kv(k, expand), expand_kv(v, expand)
    if bias is not None:
        return _windowed_forward(q, k, v, bias, scale)
    pieces = _pieces(shape.seqlen_q, shape.seqlen_k, causal, _cut(q, "forward"))
    if len(pieces) == 1 and pieces[0].rows == slice(0, shape.seqlen_q):
        out, lse = _fused_forward(q, k, v, pieces[0].causal, scale)
        return out.contiguous(), lse.contiguous()
    partial = PartialResults(q.shape, accum_dtype(q.dtype), q.device)
    for piece in pieces:
        rows, keys = piece.rows, piece.keys
        partial.add(rows, *_fused_forward(q[:, rows], k[:, keys], v[:, keys], piece.causal, scale))
    out, lse = partial.result()
    return out.to(q.dtype).contiguous(), lse.contiguous()


def backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, window_size=(-1, -1), positions=None):
    """(dq, dk, dv) from the given out and lse, which may be global ones from ring attention."""
    shape = check_backward_inputs(dout, q, k, v, out, lse, causal)
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    bias = _window_bias(shape, *resolve_window(causal, window_size), q, positions)
    expand = shape.group // _kv_group(q, shape.group)
    ke, ve = expand_kv(k, expand), expand_kv(v, expand)
    pieces = [] if bias is not None else _pieces(shape.seqlen_q, shape.seqlen_k, causal, _cut(q, "backward"))
    if bias is not None:
        dq, dk, dv = _windowed_backward(dout, q, ke, ve, out, lse, bias, scale)
    elif len(pieces) == 1 and pieces[0].rows == slice(0, shape.seqlen_q) and pieces[0].keys == slice(0, shape.seqlen_k):
        dq, dk, dv = _fused_backward(dout, q, ke, ve, out, lse, pieces[0].causal, scale)
    else:
        acc = accum_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(ke.shape, dtype=acc, device=q.device)
        dv = torch.zeros(ve.shape, dtype=acc, device=q.device)
        for piece in pieces:
            rows, keys = piece.rows, piece.keys
            part = _fused_backward(dout[:, rows], q[:, rows], ke[:, keys], ve[:, keys], out[:, rows],
                                   lse[:, :, rows], piece.causal, scale)
            dq[:, rows] += part[0]
            dk[:, keys] += part[1]
            dv[:, keys] += part[2]
            del part  # one piece's gradients held at a time
    return (dq.to(q.dtype).contiguous(), reduce_kv_grad(dk, expand).to(k.dtype).contiguous(),
            reduce_kv_grad(dv, expand).to(v.dtype).contiguous())
