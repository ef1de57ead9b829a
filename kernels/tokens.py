"""A mask given token by token: each query and key carries its global position and document.

A sequence-parallel shard holds tokens from anywhere in the packed sequence (zigzag
chunks, stripes, the keys all-gathered from every rank), so which keys a query of one
shard sees in another is not a band of their local indices. ``TokenPositions`` says it
per token: the query at global position ``p`` of document ``d`` sees the key at
position ``p'`` iff the key belongs to document ``d`` and ``p - left <= p' <= p + right``
(a bound of None is unbounded; causal is ``right = 0``). A backend receives it as the
keyword ``positions``, only when set, and then reads ``causal`` / ``window_size`` in
positions instead of local indices. An example, one rank of a zigzag ring of two
holding global positions 0 1 6 7 of one document, causal, against the keys 2 3 4 5 of
the other rank: rows 0 and 1 see nothing, rows 6 and 7 see all four keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenPositions:
    """``q_pos, q_doc: [Sq]`` and ``k_pos, k_doc: [Sk]``, int32 on the tensors' device:
    each query's and key's global position and document index.

    Optionally the spans of the mask under one window ``spans_window = (left, right)``
    (a bound of None is unbounded): ``q_spans: [2, Sq]``, each query's first and
    past-last key index it sees (first >= last: none), and ``k_spans: [2, Sk]``, each
    key's of the queries that see it, int32, either or both. Every visible pair must lie
    inside its row's span (pairs inside it may still be masked). The Triton kernels over
    query tiles (forward, dQ) then walk only the union of the tile's ``q_spans``, those
    over key tiles (dK/dV) of its ``k_spans``, without testing each block, which lets
    Triton pipeline their loops; without that side's spans, or under another window,
    they test every block."""

    q_pos: torch.Tensor
    q_doc: torch.Tensor
    k_pos: torch.Tensor
    k_doc: torch.Tensor
    q_spans: torch.Tensor | None = None
    k_spans: torch.Tensor | None = None
    spans_window: tuple[int | None, int | None] | None = None

    def check(self, seqlen_q: int, seqlen_k: int, device: torch.device) -> None:
        """ValueError unless every array is int32 and on ``device``, the positions and
        documents ``[length]`` and the spans given ``[2, length]`` of their side (and
        contiguous), with the window they were found under."""
        arrays = [("q_pos", self.q_pos, (seqlen_q,)), ("q_doc", self.q_doc, (seqlen_q,)),
                  ("k_pos", self.k_pos, (seqlen_k,)), ("k_doc", self.k_doc, (seqlen_k,))]
        arrays += [(name, x, (2, length)) for name, x, length in (("q_spans", self.q_spans, seqlen_q),
                                                                   ("k_spans", self.k_spans, seqlen_k))
                   if x is not None]
        if (self.q_spans is not None or self.k_spans is not None) != (self.spans_window is not None):
            raise ValueError("positions.spans_window is the window of q_spans and k_spans: give it with them "
                             "and only with them")
        for name, x, shape in arrays:
            if not isinstance(x, torch.Tensor) or x.dtype != torch.int32 or tuple(x.shape) != shape:
                raise ValueError(f"positions.{name} must be an int32 tensor of shape {list(shape)}, got "
                                 f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
            if x.device != device:
                raise ValueError(f"positions.{name} is on {x.device} but q is on {device}")
            if name.endswith("spans") and not x.is_contiguous():
                raise ValueError(f"positions.{name} must be contiguous")

    def visible(self, left: int | None, right: int | None) -> torch.Tensor:
        """Boolean ``[Sq, Sk]``: does query i see key j."""
        q_pos, k_pos = self.q_pos[:, None].long(), self.k_pos[None, :].long()
        visible = self.q_doc[:, None] == self.k_doc[None, :]
        if left is not None:
            visible &= k_pos >= q_pos - left
        if right is not None:
            visible &= k_pos <= q_pos + right
        return visible

    def to(self, device) -> TokenPositions:
        arrays = (self.q_pos, self.q_doc, self.k_pos, self.k_doc, self.q_spans, self.k_spans)
        return TokenPositions(*(None if x is None else x.to(device) for x in arrays), self.spans_window)


def position_kwargs(positions: TokenPositions | None) -> dict:
    """The keywords that hand ``positions`` to a backend: none when there are none."""
    return {} if positions is None else {"positions": positions}
