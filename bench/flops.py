"""The FLOP convention every benchmark figure uses (ARCHITECTURE.md).

Forward ``4·B·Hq·Sq·Sk·D`` (two matmuls of ``2·Sq·Sk·D`` per head), halved for causal
attention (only the unmasked half is counted); backward 2.5x the forward, forward +
backward 3.5x. With packed documents or a window, ``4·B·Hq·D`` per visible (query, key)
pair instead (``masked_attention_flops``).
"""

from __future__ import annotations

FLOP_CONVENTION = ("forward 4*B*Hq*Sq*Sk*D, halved for causal (unmasked work only); with documents or a window "
                   "4*B*Hq*D per visible pair; backward 2.5x forward; fwd+bwd 3.5x forward")
PASSES = ("fwd", "bwd", "fwd+bwd")
_PASS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool,
                    pass_: str = "fwd") -> float:
    """FLOPs of one attention call over ``[B, Sq, Hq, D]`` queries and ``Sk`` keys."""
    if pass_ not in _PASS_FACTOR:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    forward = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    return forward * (0.5 if causal else 1.0) * _PASS_FACTOR[pass_]


def tflops(flops: float, ms: float) -> float:
    """TFLOP/s of ``flops`` done in ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


def masked_attention_flops(batch: int, heads: int, head_dim: int, visible_pairs: int, pass_: str = "fwd") -> float:
    """FLOPs of one attention call that computes only its ``visible_pairs`` (query, key) pairs."""
    if pass_ not in _PASS_FACTOR:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    return 4.0 * batch * heads * head_dim * visible_pairs * _PASS_FACTOR[pass_]
