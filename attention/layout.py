"""How a global sequence is laid out over the ranks of a mesh.

The ring level: ``"contiguous"`` gives ring rank ``i`` the ``i``-th of ``r`` equal
chunks; ``"zigzag"`` cuts the sequence into ``2r`` chunks and gives ring rank ``i``
chunks ``i`` and ``2r - 1 - i`` (in that order), so causal work is balanced;
``"stripe"`` gives ring rank ``i`` every position ``t`` with ``t mod r = i`` (Striped
Attention), balanced too, with nothing to cut but the length into multiples of ``r``.
With packed documents (``documents``: the offsets of ``cu_seqlens``), zigzag cuts each
document into ``2r`` chunks instead and ring rank ``i`` holds chunks ``i`` and
``2r - 1 - i`` of every document, in document order, so causal work balances per
document; the other two layouts ignore document boundaries. The Ulysses
level splits a ring rank's positions contiguously over its ``u`` ranks. So the local
shard of ``(ring_rank, ulysses_rank)`` is piece ``ulysses_rank`` of ring rank
``ring_rank``'s positions, and a Ulysses all-to-all gives back exactly those positions.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from usp.kernels.backends import window_kwargs
from usp.kernels.checks import resolve_window
from usp.kernels.tokens import TokenPositions, position_kwargs

LAYOUTS = ("contiguous", "zigzag", "stripe")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def check_global_seqlen(seqlen: int, ulysses_degree: int, ring_degree: int, layout: str,
                        documents: tuple[int, ...] | None = None) -> None:
    """Raise a ValueError (TypeError for a non-integer) unless ``seqlen`` (packed as
    ``documents``, offsets from 0 to ``seqlen``) can be laid out over the mesh."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int):
        raise TypeError(f"the sequence length must be an int, got {seqlen!r}")
    if seqlen < 1:
        raise ValueError(f"the sequence length must be positive, got {seqlen}")
    check_layout(layout)
    chunks = 2 * ring_degree if layout == "zigzag" else ring_degree
    if seqlen % chunks:
        need = "2 x ring_degree" if layout == "zigzag" else "ring_degree"
        raise ValueError(f"sequence length {seqlen} must be divisible by {need} = {chunks} for the {layout} layout")
    if (seqlen // ring_degree) % ulysses_degree:
        raise ValueError(f"sequence length {seqlen} must be divisible by ulysses_degree x ring_degree = "
                         f"{ulysses_degree * ring_degree}")
    if documents is not None and layout == "zigzag" and ring_degree > 1:
        for index, (start, end) in enumerate(zip(documents, documents[1:])):
            if (end - start) % chunks:
                raise ValueError(
                    f"the zigzag layout cuts every document into 2 x ring_degree = {chunks} chunks: document "
                    f"{index} has {end - start} tokens, pad it to {-(-(end - start) // chunks) * chunks} "
                    f"(usp.attention.pad_documents pads every document)")


def ring_positions(seqlen: int, ring_degree: int, ring_rank: int, layout: str,
                   documents: tuple[int, ...] | None = None) -> torch.Tensor:
    """Global positions held by a ring rank, in local order. ``[seqlen / ring_degree]``."""
    if documents is not None and layout == "zigzag":
        return torch.cat([start + ring_positions(end - start, ring_degree, ring_rank, layout)
                          for start, end in zip(documents, documents[1:])])
    if layout == "stripe":
        return torch.arange(ring_rank, seqlen, ring_degree)
    if layout == "contiguous":
        chunk = seqlen // ring_degree
        return torch.arange(ring_rank * chunk, (ring_rank + 1) * chunk)
    chunk = seqlen // (2 * ring_degree)
    first = torch.arange(ring_rank * chunk, (ring_rank + 1) * chunk)
    last_index = 2 * ring_degree - 1 - ring_rank
    return torch.cat([first, torch.arange(last_index * chunk, (last_index + 1) * chunk)])


def document_ids(positions: torch.Tensor, documents: tuple[int, ...] | None) -> torch.Tensor:
    """The document index of each global position (0 everywhere without documents), int32,
    on the positions' device."""
    if documents is None:
        return torch.zeros(positions.shape, dtype=torch.int32, device=positions.device)
    ends = torch.tensor(documents[1:], dtype=torch.long, device=positions.device)
    return torch.searchsorted(ends, positions.long(), right=True).to(torch.int32)


def token_positions(q_positions: torch.Tensor, k_positions: torch.Tensor,
                    documents: tuple[int, ...] | None, device=None, window=None) -> TokenPositions:
    """The mask by token of queries at global ``q_positions`` against keys at
    ``k_positions`` of a sequence packed as ``documents`` (see ``usp.kernels.tokens``).
    Given ``window = (left, right)`` (each bound None where unbounded; causal is ``right =
    0``), also the spans under that window of each side whose other side's positions
    increase, as a ring rank's do in every layout: each such span starts and ends on a
    visible pair. Keys gathered from several ranks do not increase: their queries get
    no spans (a span would join the ranks' runs, masked blocks between them included)
    and the kernels test each block instead."""
    positions = TokenPositions(q_positions.to(torch.int32), document_ids(q_positions, documents),
                               k_positions.to(torch.int32), document_ids(k_positions, documents))
    if window is not None:
        left, right = window
        q_spans = visible_spans(q_positions, k_positions, documents, left, right) if increasing(k_positions) else None
        k_spans = visible_spans(k_positions, q_positions, documents, right, left) if increasing(q_positions) else None
        if q_spans is not None or k_spans is not None:
            positions = dataclasses.replace(positions, q_spans=q_spans, k_spans=k_spans, spans_window=(left, right))
    return positions.to(device)


def increasing(positions: torch.Tensor) -> bool:
    """Whether ``positions`` (on the host) strictly increase."""
    return bool((positions[1:] > positions[:-1]).all())


def visible_spans(q_pos: torch.Tensor, k_pos: torch.Tensor, documents: tuple[int, ...] | None,
                  left: int | None, right: int | None) -> torch.Tensor:
    """``[2, Sq]`` int32: for each query, the first and past-last index of the keys it
    sees among keys at the increasing positions ``k_pos`` (first >= last: none), from
    ``visible_key_span``. With the roles swapped (keys as ``q_pos``, ``left`` and
    ``right`` exchanged) each key's span of the queries that see it."""
    q_pos, k_pos = q_pos.long(), k_pos.long()
    seqlen = int(max(q_pos.max(), k_pos.max())) + 1 if q_pos.numel() and k_pos.numel() else 1
    return torch.stack(visible_key_span(q_pos, k_pos, seqlen, documents, left, right)).to(torch.int32)


def shard_positions(seqlen: int, ulysses_degree: int, ring_degree: int, ulysses_rank: int, ring_rank: int,
                    layout: str = "zigzag", documents: tuple[int, ...] | None = None) -> torch.Tensor:
    """Global positions of the shard of ``(ulysses_rank, ring_rank)``: ``[seqlen / (u r)]``."""
    check_global_seqlen(seqlen, ulysses_degree, ring_degree, layout, documents)
    positions = ring_positions(seqlen, ring_degree, ring_rank, layout, documents)
    return positions.chunk(ulysses_degree)[ulysses_rank]


@dataclass(frozen=True)
class Block:
    """The work of one ring step: queries ``q_rows`` of the local shard against keys
    ``k_rows`` of the visiting K/V block, with or without the causal mask; with packed
    documents or a window, the mask by token of those rows and keys (``positions``) in
    which causal and ``window_size`` are read."""

    q_rows: slice
    k_rows: slice
    causal: bool
    window_size: tuple[int, int] = (-1, -1)
    positions: TokenPositions | None = None

    def options(self) -> dict:
        """The backend keywords of this block's mask."""
        return dict(causal=self.causal, **window_kwargs(self.window_size), **position_kwargs(self.positions))


# How ring_block decides, for causal attention (a query sees the keys at or before its
# global position). Contiguous: ring rank i holds one chunk, so against source j it sees
# everything when j < i, a lower triangle when j == i, nothing when j > i. Zigzag: the
# positions a rank holds increase along its local order, so its own block is again a
# plain lower triangle. Against another rank, with r = 2 and 8 positions (chunks of 2:
# ring rank 0 holds chunks 0 and 3, ring rank 1 chunks 1 and 2):
#
#     rank 0's queries x rank 1's keys         rank 1's queries x rank 0's keys
#               2 3 4 5                                  0 1 6 7
#           0   . . . .                              2   x x . .
#           1   . . . .                              3   x x . .
#           6   x x x x                              4   x x . .
#           7   x x x x                              5   x x . .
#     (source later: the second half of       (source earlier: every query against the
#      the queries against every key)          first half of the keys)
#
# In general a later source's chunks (j, 2r-1-j) lie between this rank's (i, 2r-1-i):
# only the second local chunk sees them, all of them; an earlier source's first chunk
# lies before both local chunks and its second after both.
#
# Stripe: local index j of ring rank i is position j r + i, so against source s the pair
# (query j, key k) is visible iff k r + s <= j r + i: k <= j when s <= i (its own block
# and earlier sources: the lower triangle with its diagonal), k < j when s > i (later
# sources: the triangle strictly below the diagonal, which is queries 1.. against keys
# ..S-2 with the causal mask, query 0 seeing none of it). With r = 2 and 8 positions
# (ring rank 0 holds 0 2 4 6, ring rank 1 holds 1 3 5 7):
#
#     rank 1's queries x rank 0's keys         rank 0's queries x rank 1's keys
#               0 2 4 6                                  1 3 5 7
#           1   x . . .                              0   . . . .
#           3   x x . .                              2   x . . .
#           5   x x x .                              4   x x . .
#           7   x x x x                              6   x x x .
#
# tests/test_layout.py checks all three layouts against a brute-force mask for every
# rank pair.


def ring_block(rank: int, source: int, seqlen: int, layout: str, causal: bool, ring_size: int = 1,
               documents: tuple[int, ...] | None = None, window_size=(-1, -1), device=None) -> Block | None:
    """What ring rank ``rank`` computes against the K/V that started on ring rank
    ``source``; None when every pair is masked (see the picture above). ``seqlen``: the
    positions each rank holds (causal attention needs as many keys as queries;
    non-causal takes all of both). With packed ``documents`` or a ``window_size``, the
    rows and keys that see something and their mask by token (``token_block``), on
    ``device``, over a ring of ``ring_size``.
    """
    if documents is not None or tuple(window_size) != (-1, -1):
        return on_device(token_block(rank, source, seqlen * ring_size, ring_size, layout, causal, documents,
                                     tuple(window_size)), device)
    everything = slice(None)
    if not causal:
        return Block(everything, everything, False)
    if source == rank:
        return Block(everything, everything, True)
    if layout == "contiguous":
        return Block(everything, everything, False) if source < rank else None
    if layout == "stripe":
        if source < rank:
            return Block(everything, everything, True)
        return Block(slice(1, seqlen), slice(0, seqlen - 1), True) if seqlen > 1 else None
    half = seqlen // 2
    if source < rank:
        return Block(everything, slice(0, half), False)
    return Block(slice(half, seqlen), everything, False)


# With packed documents or a window, the visible pairs of a rank pair are no longer a
# triangle or a half: token_block finds, for each query, the keys of the source it sees
# (a range of the source's local indices, as every layout holds its positions in
# increasing order), keeps the rows that see some key and the keys some row sees, and
# hands the kernels the mask by token of that sub-block, with each query's span of keys
# and each key's of queries. Ranks agree on the plan, so each computes it alone; it is
# cached on the host per (sequence, mesh, mask) and its positions and spans copied to
# the device per call (16 bytes for each of the block's queries and keys), so a long run
# of ever new document mixes holds no device memory.

def on_device(block: Block | None, device) -> Block | None:
    """``block`` with its mask by token on ``device``."""
    if block is None or block.positions is None or device is None:
        return block
    return dataclasses.replace(block, positions=block.positions.to(device))


@functools.lru_cache(maxsize=64)
def token_block(rank: int, source: int, seqlen: int, ring_size: int, layout: str, causal: bool,
                documents: tuple[int, ...] | None, window_size: tuple[int, int]) -> Block | None:
    """The block of ``rank``'s queries against ``source``'s keys in a sequence of
    ``seqlen`` tokens packed as ``documents`` under causal and ``window_size``; None
    when no pair is visible."""
    q_pos = ring_positions(seqlen, ring_size, rank, layout, documents)
    k_pos = ring_positions(seqlen, ring_size, source, layout, documents)
    first, last = visible_key_span(q_pos, k_pos, seqlen, documents, *resolve_window(causal, window_size))
    rows = torch.nonzero(last > first).flatten()
    if rows.numel() == 0:
        return None
    q_rows = slice(int(rows[0]), int(rows[-1]) + 1)
    k_rows = slice(int(first[rows].min()), int(last[rows].max()))
    positions = token_positions(q_pos[q_rows], k_pos[k_rows], documents, window=resolve_window(causal, window_size))
    return Block(q_rows, k_rows, causal, window_size, positions)


def visible_key_span(q_pos: torch.Tensor, k_pos: torch.Tensor, seqlen: int, documents: tuple[int, ...] | None,
                     left: int | None, right: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, the local key indices ``[first, last)`` it sees among keys at the
    increasing positions ``k_pos``: those of its document within ``[p - left, p + right]``."""
    bounds = torch.tensor(documents if documents is not None else (0, seqlen), dtype=torch.long)
    doc = document_ids(q_pos, documents).long()
    low, high = bounds[doc], bounds[doc + 1] - 1  # the query's document, inclusive
    if left is not None:
        low = torch.maximum(low, q_pos - left)
    if right is not None:
        high = torch.minimum(high, q_pos + right)
    keys = k_pos.long().contiguous()
    return torch.searchsorted(keys, low), torch.searchsorted(keys, high, right=True)


@functools.lru_cache(maxsize=16)
def gathered_block(rank: int, seqlen: int, ring_size: int, layout: str, causal: bool,
                   documents: tuple[int, ...] | None, window_size: tuple[int, int]) -> Block:
    """The all-gather schedule's one block: ``rank``'s queries against the keys of every
    ring rank gathered in rank order, in a sequence of ``seqlen`` tokens. Unmasked
    attention needs no mask; otherwise the mask by token of the layout's positions."""
    everything = slice(None)
    if not causal and documents is None and window_size == (-1, -1):
        return Block(everything, everything, False)
    q_pos = ring_positions(seqlen, ring_size, rank, layout, documents)
    k_pos = torch.cat([ring_positions(seqlen, ring_size, source, layout, documents) for source in range(ring_size)])
    return Block(everything, everything, causal, window_size,
                 token_positions(q_pos, k_pos, documents, window=resolve_window(causal, window_size)))
