"""Plain torch attention: the readable reference and the fallback backend.

Works for any floating dtype (float64 included) and any device. The score products
(``q·k``, and ``dout·v`` in backward) and the softmax run in ``promote(dtype, float32)``,
as flash kernels accumulate them, so a half-precision score beyond 65504 cannot
overflow; the products with the probabilities and with ``ds`` run in the input dtype.
The forward is made of differentiable torch ops, so float64 autograd through it is
an independent check of every hand-written backward.
"""

from __future__ import annotations

import torch

from .checks import causal_offset, check_backward_inputs, check_qkv, resolve_softmax_scale, resolve_window
from .layout import accum_dtype, expand_kv, reduce_kv_grad


def visibility_mask(seqlen_q: int, seqlen_k: int, left: int | None, right: int | None,
                    device) -> torch.Tensor | None:
    """Boolean [Sq, Sk] mask of the keys each query sees (None: all of them): query i sees
    key j iff ``i + offset - left <= j <= i + offset + right``, offset = Sk - Sq, a bound
    of None being unbounded (causal is right = 0)."""
    if left is None and right is None:
        return None
    diagonal = torch.arange(seqlen_q, device=device)[:, None] + causal_offset(seqlen_q, seqlen_k)
    cols = torch.arange(seqlen_k, device=device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left is not None:
        visible &= cols >= diagonal - left
    if right is not None:
        visible &= cols <= diagonal + right
    return visible


def _mask(shape, causal, window_size, mask, positions, device):
    """The explicit boolean ``mask`` [Sq, Sk] if given, else the causal / window one, read
    in local indices or, with ``positions`` (a ``TokenPositions``), in global positions."""
    if positions is not None:
        positions.check(shape.seqlen_q, shape.seqlen_k, device)
        return positions.visible(*resolve_window(causal, window_size))
    if mask is not None:
        if tuple(mask.shape) != (shape.seqlen_q, shape.seqlen_k) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool [seqlen_q, seqlen_k] = [{shape.seqlen_q}, {shape.seqlen_k}], "
                             f"got {mask.dtype} {list(mask.shape)}")
        return mask.to(device)
    return visibility_mask(shape.seqlen_q, shape.seqlen_k, *resolve_window(causal, window_size), device)


def _probabilities(q, k, scale, mask):
    """Scores -> (p [B, H, Sq, Sk] normalised, lse [B, H, Sq]), in the accumulation dtype.

    Rows that see no key get p = 0 and lse = -inf, without NaN in values or gradients.
    """
    acc = accum_dtype(q.dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
    unnormalised = torch.exp(scores - row_max)
    row_sum = unnormalised.sum(dim=-1, keepdim=True)
    seen = row_sum != 0  # 0 exactly when no key is visible (else >= 1); NaN stays NaN in lse
    safe_sum = torch.where(seen, row_sum, torch.ones_like(row_sum))
    lse = torch.where(seen, row_max + torch.log(safe_sum), torch.full_like(row_sum, float("-inf")))
    return unnormalised / safe_sum, lse.squeeze(-1)


def forward(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), mask=None, positions=None):
    """(out [B, Sq, Hq, D] in q's dtype, lse [B, Hq, Sq] in promote(dtype, float32)).
    ``mask``: an explicit boolean [Sq, Sk] (True: visible) in place of causal and window;
    ``positions``: a ``usp.kernels.tokens.TokenPositions`` they are read in."""
    shape = check_qkv(q, k, v, causal)
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    mask = _mask(shape, causal, window_size, mask, positions, q.device)
    k, v = expand_kv(k, shape.group), expand_kv(v, shape.group)
    p, lse = _probabilities(q, k, scale, mask)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype), v)
    return out, lse


def backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, window_size=(-1, -1), mask=None,
             positions=None):
    """(dq, dk, dv) from the given out and lse, which may be global ones from ring attention."""
    shape = check_backward_inputs(dout, q, k, v, out, lse, causal)
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    acc = accum_dtype(q.dtype)
    ke, ve = expand_kv(k, shape.group), expand_kv(v, shape.group)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), ke.to(acc)) * scale
    lse = lse.to(acc)
    # A row with lse = -inf saw no key: its probabilities are 0.
    lse = lse.masked_fill(lse == float("-inf"), float("inf")).unsqueeze(-1)
    p = torch.exp(scores - lse)
    mask = _mask(shape, causal, window_size, mask, positions, q.device)
    if mask is not None:
        p = p.masked_fill(~mask, 0.0)
    delta = (dout.to(acc) * out.to(acc)).sum(dim=-1).transpose(1, 2).unsqueeze(-1)  # [B, H, Sq, 1]
    dv = torch.einsum("bhqk,bqhd->bkhd", p.to(q.dtype), dout)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout.to(acc), ve.to(acc))
    ds = (p * (dp - delta) * scale).to(q.dtype)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, ke)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q)
    return dq, reduce_kv_grad(dk, shape.group).to(k.dtype), reduce_kv_grad(dv, shape.group).to(v.dtype)
