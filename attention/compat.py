"""``LongContextAttention``: the paper's library's module (yunchang) on our USP.

Code written against yunchang builds the module and calls it the same way, except that
the constructor takes the ``Mesh`` (yunchang reads process groups set globally) and the
shards must come from ``shard_sequence`` with the matching layout::

    attention = LongContextAttention(mesh)   # ring_impl_type="basic": contiguous shards
    out = attention(q, k, v, causal=True)   # [B, S/(u r), H, D] shards in and out
"""

from __future__ import annotations

from torch import nn

from usp.comm.mesh import Mesh, check_mesh
from usp.kernels.checks import refuse_flash_attn_extras

from .functions import usp_attention

RING_IMPL_LAYOUTS = {"basic": "contiguous", "zigzag": "zigzag", "strip": "stripe"}  # yunchang's ring kinds -> ours


class LongContextAttention(nn.Module):
    """USP attention with the call signature of yunchang's ``LongContextAttention``.

    ``ring_impl_type``: "basic" (the contiguous split, yunchang's default), "zigzag" or
    "strip" (the balanced ones, better for causal attention: our zigzag and stripe);
    ``backend``, ``check_ranks``, ``check_finite``: as for ``usp_attention``.
    ``forward(query, key, value, dropout_p=0.0, softmax_scale=None, causal=False,
    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False)`` -> the output shard (only the output, as yunchang returns,
    whatever ``return_attn_probs``); options the kernels do not implement raise a
    ValueError unless left at their defaults."""

    def __init__(self, mesh: Mesh, ring_impl_type: str = "basic", *, backend=None, check_ranks: bool = True,
                 check_finite: bool = False):
        super().__init__()
        check_mesh(mesh)
        if ring_impl_type not in RING_IMPL_LAYOUTS:
            raise ValueError(f"ring_impl_type must be one of {sorted(RING_IMPL_LAYOUTS)}, got {ring_impl_type!r}")
        self.mesh, self.layout, self.backend = mesh, RING_IMPL_LAYOUTS[ring_impl_type], backend
        self.check_ranks, self.check_finite = check_ranks, check_finite

    def forward(self, query, key, value, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        refuse_flash_attn_extras(dropout_p, softcap, alibi_slopes)
        return usp_attention(query, key, value, self.mesh, causal, softmax_scale, self.layout, self.backend,
                             check_ranks=self.check_ranks, check_finite=self.check_finite, window_size=window_size)

    def extra_repr(self) -> str:
        m = self.mesh
        return f"ulysses_degree={m.ulysses_degree}, ring_degree={m.ring_degree}, layout={self.layout}"
