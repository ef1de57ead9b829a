"""The float64 oracle every other implementation is checked against."""

from __future__ import annotations

import torch

from usp.kernels import naive


def naive_attention(q, k, v, causal=False, softmax_scale=None, *, window_size=(-1, -1), mask=None):
    """Exact attention computed in float64, whatever the input dtype.

    ``q: [B, Sq, Hq, D]``, ``k, v: [B, Sk, Hkv, D]`` -> ``(out [B, Sq, Hq, D], lse [B, Hq, Sq])``,
    both float64. Causal and ``window_size`` (flash-attn's) are aligned bottom-right;
    ``mask``, a boolean ``[Sq, Sk]`` (True: visible, e.g. ``document_mask``), replaces
    both. A row that sees no key has out 0 and lse -inf. Differentiable: gradients flow
    back to the inputs in their own dtype.
    """
    return naive.forward(q.to(torch.float64), k.to(torch.float64), v.to(torch.float64),
                         causal=causal, softmax_scale=softmax_scale, window_size=window_size, mask=mask)


def _document_positions(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per packed token: its document's index and its distance to the document's last token."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
    document = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    ends = cu_seqlens[1:].long().cpu()[document]
    return document, ends - 1 - torch.arange(len(document))


def document_mask(cu_seqlens_q, cu_seqlens_k, causal=False, window_size=(-1, -1)) -> torch.Tensor:
    """Boolean ``[total_q, total_k]`` of a packed sequence: query i sees key j iff both are
    in the same document and, counting from the document's end (bottom-right alignment),
    j is at most ``left`` tokens before i's aligned key and at most ``right`` after it
    (-1: unbounded; causal: right = 0)."""
    doc_q, from_end_q = _document_positions(cu_seqlens_q)
    doc_k, from_end_k = _document_positions(cu_seqlens_k)
    before = from_end_k[None, :] - from_end_q[:, None]  # > 0: the key precedes the aligned one
    left, right = window_size
    visible = doc_q[:, None] == doc_k[None, :]
    if left >= 0:
        visible &= before <= left
    if causal:
        right = 0
    if right >= 0:
        visible &= -before <= right
    return visible
