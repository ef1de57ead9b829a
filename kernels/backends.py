"""The local attention backends behind one contract.

``forward(q, k, v, *, causal, softmax_scale) -> (out, lse)`` and
``backward(dout, q, k, v, out, lse, *, causal, softmax_scale) -> (dq, dk, dv)``, with
``q: [B, Sq, Hq, D]``, ``k, v: [B, Sk, Hkv, D]``, ``lse: [B, Hq, Sq]`` (natural log).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import naive, torch_fused
from .flash_bwd import flash_attn_backward
from .flash_fwd import flash_attn_forward


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable


BACKENDS = {
    "triton": Backend("triton", flash_attn_forward, flash_attn_backward),
    "torch": Backend("torch", torch_fused.forward, torch_fused.backward),
    "naive": Backend("naive", naive.forward, naive.backward),
}


def get_backend(name: str | Backend | None = None) -> Backend:
    """The backend called ``name``; with no name, triton when CUDA is available, else torch."""
    if isinstance(name, Backend):
        return name
    if name is None:
        name = "triton" if torch.cuda.is_available() else "torch"
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {name!r}") from None
