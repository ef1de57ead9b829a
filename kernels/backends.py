"""The local attention backends behind one contract, ``Backend``.

``q: [B, Sq, Hq, D]``, ``k, v: [B, Sk, Hkv, D]``, ``lse: [B, Hq, Sq]`` (natural log).
``triton`` (our kernels), ``torch`` (PyTorch's fused ops) and ``naive`` (plain torch)
are registered here; any object with the same attributes can be passed wherever a
backend name is taken. A sliding window reaches a backend as the keyword
``window_size``, and a mask given by token (``usp.kernels.tokens``: ring steps and the
all-gather schedule with documents or a window) as ``positions``, each passed only when
set, so a backend without them still serves every other call. Packed documents
(``usp.kernels.varlen``) use a backend's own ``varlen_forward`` / ``varlen_backward``
where it has them (triton), else one call per document. A backend's ``forward_into``
(triton), where it has one, merges a block's result into a running float32 ``(out, lse)``
in place, and its ``backward_into`` adds a block's dQ into a running float32 dQ and
returns dK, dV in float32: the ring's steps use them instead of separate merges and
additions, and no block's result or gradient is rounded to the input dtype on the way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

from . import naive, torch_fused
from .checks import resolve_window
from .flash_bwd import flash_attn_backward, flash_attn_backward_into, flash_attn_varlen_backward
from .flash_fwd import flash_attn_forward, flash_attn_forward_into, flash_attn_varlen_forward


@runtime_checkable
class Backend(Protocol):
    """Attention on one device that returns the log-sum-exp, and its gradients."""

    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                softmax_scale: float | None, **window_size) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [B, Sq, Hq, D] in q's dtype, lse [B, Hq, Sq] float32 or wider)``."""

    def backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, *, causal: bool, softmax_scale: float | None, **window_size
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dq, dk, dv)`` from the ``out`` and ``lse`` given, used as they are (ring
        attention passes the global, merged ones while it hands over one K/V block)."""


@dataclass(frozen=True)
class FunctionBackend:
    """A ``Backend`` made of two functions."""

    name: str
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    varlen_forward: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    varlen_backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    forward_into: Callable[..., None] | None = None
    backward_into: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


def window_kwargs(window_size) -> dict:
    """The keywords that hand ``window_size`` (checked here) to a backend: none for no window."""
    resolve_window(False, window_size)
    return {} if tuple(window_size) == (-1, -1) else {"window_size": tuple(window_size)}


BACKENDS: dict[str, Backend] = {
    "triton": FunctionBackend("triton", flash_attn_forward, flash_attn_backward, flash_attn_varlen_forward,
                              flash_attn_varlen_backward, flash_attn_forward_into, flash_attn_backward_into),
    "torch": FunctionBackend("torch", torch_fused.forward, torch_fused.backward),
    "naive": FunctionBackend("naive", naive.forward, naive.backward),
}


def get_backend(name: str | Backend | None = None) -> Backend:
    """The backend called ``name`` (one of ``BACKENDS``), or ``name`` itself when it is a
    ``Backend``; with no name, triton when CUDA is available, else torch."""
    if name is None:
        name = "triton" if torch.cuda.is_available() else "torch"
    if isinstance(name, str):
        try:
            return BACKENDS[name]
        except KeyError:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {name!r}") from None
    if isinstance(name, Backend):
        return name
    raise TypeError(f"backend must be a name in {sorted(BACKENDS)}, a Backend or None, got {type(name).__name__}")
