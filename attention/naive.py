"""The float64 oracle every other implementation is checked against."""

from __future__ import annotations

import torch

from usp.kernels import naive


def naive_attention(q, k, v, causal=False, softmax_scale=None):
    """Exact attention computed in float64, whatever the input dtype.

    ``q: [B, Sq, Hq, D]``, ``k, v: [B, Sk, Hkv, D]`` -> ``(out [B, Sq, Hq, D], lse [B, Hq, Sq])``,
    both float64. Causal is aligned bottom-right; a row that sees no key has out 0 and
    lse -inf. Differentiable: gradients flow back to the inputs in their own dtype.
    """
    return naive.forward(q.to(torch.float64), k.to(torch.float64), v.to(torch.float64),
                         causal=causal, softmax_scale=softmax_scale)
