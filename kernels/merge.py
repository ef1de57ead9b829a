"""Exact combination of partial attention results through their log-sum-exp."""

from __future__ import annotations

import torch


def _check_shapes(out, lse, block_out, block_lse) -> None:
    if out.shape != block_out.shape:
        raise ValueError(f"block_out has shape {tuple(block_out.shape)} but out has {tuple(out.shape)}")
    if lse.shape != block_lse.shape:
        raise ValueError(f"block_lse has shape {tuple(block_lse.shape)} but lse has {tuple(lse.shape)}")
    expected = (out.shape[0], out.shape[2], out.shape[1])
    if tuple(lse.shape) != expected:
        raise ValueError(f"lse must have shape [batch, heads, seqlen] = {list(expected)}, got {list(lse.shape)}")


def merge_attention_(out, lse, block_out, block_lse) -> None:
    """``merge_attention`` in place: ``out`` and ``lse`` (views allowed, e.g. some rows of
    an accumulator; float32 or wider) become the merged result, with no temporary of
    ``out``'s size."""
    _check_shapes(out, lse, block_out, block_lse)
    if out.dtype not in (torch.float32, torch.float64) or lse.dtype != out.dtype:
        raise ValueError(f"merge_attention_ accumulates in out and lse: both float32 or both float64, got "
                         f"{out.dtype} and {lse.dtype}")
    block_lse = block_lse.to(lse.dtype)
    merged_lse = torch.logaddexp(lse, block_lse)
    # exp(x - merged) with merged = -inf would be NaN; such rows have both weights 0.
    reference = merged_lse.masked_fill(merged_lse == float("-inf"), 0.0)
    weight = torch.exp(lse - reference).transpose(1, 2).unsqueeze(-1)
    block_weight = torch.exp(block_lse - reference).transpose(1, 2).unsqueeze(-1)
    out.mul_(weight).addcmul_(block_out, block_weight)  # [B, S, H, D] scaled by [B, S, H, 1]
    lse.copy_(merged_lse)


def merge_attention(out, lse, block_out, block_lse):
    """Combine two partial results over disjoint key sets into the result over their union.

    ``out, block_out: [B, S, H, D]``; ``lse, block_lse: [B, H, S]`` (natural log).
    Returns ``(merged_out, merged_lse)``: the output in ``out``'s dtype (keep ``out`` in
    float32 to accumulate many blocks), the LSE in float32 (float64 if given float64).
    The arithmetic is float32 or wider. A side with ``lse = -inf`` saw no key and
    contributes nothing; rows where both sides are ``-inf`` give out 0 and lse -inf.
    """
    _check_shapes(out, lse, block_out, block_lse)
    acc = torch.promote_types(torch.promote_types(lse.dtype, block_lse.dtype), torch.float32)
    merged, merged_lse = out.to(acc, copy=True), lse.to(acc, copy=True)
    merge_attention_(merged, merged_lse, block_out, block_lse)
    return merged.to(out.dtype), merged_lse


class PartialResults:
    """The running result of attention over blocks of keys, merged one block at a time.

    ``add(rows, block_out, block_lse)`` merges a block's partial result for query rows
    ``rows`` (a slice of the sequence); the first block that covers every row is kept as
    it comes (no merge into zeros, no copy unless its dtype is narrower than the
    accumulator's), a block whose rows all come after every row added so far is copied
    in (nothing to merge with), the others merge in place. The accumulation dtype is
    float32 or float64. ``result()``: ``(out [B, S, H, D], lse [B, H, S])`` in it; rows
    no block covered have out 0 and lse -inf. The blocks' tensors become the
    accumulator's: pass fresh ones.
    ``attend(backend, rows, q, k, v)`` computes a block and merges it, inside the kernel
    where the backend can (``forward_into``)."""

    def __init__(self, shape: tuple, dtype: torch.dtype, device: torch.device):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"PartialResults accumulates in float32 or float64, got {dtype}")
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.out = self.lse = None
        self._untouched_from = 0  # rows from here on hold nothing yet

    def add(self, rows: slice, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
        span = range(self.shape[1])[rows]
        if self.out is None and span == range(self.shape[1]):
            self.out, self.lse = block_out.to(self.dtype), block_lse.to(self.dtype)
        else:
            if self.out is None:
                self._start_empty()
            out, lse = self.out[:, rows], self.lse[:, :, rows]
            if span.start >= self._untouched_from:
                _check_shapes(out, lse, block_out, block_lse)
                out.copy_(block_out)
                lse.copy_(block_lse)
            else:
                merge_attention_(out, lse, block_out, block_lse)
        self._reached(span)

    def attend(self, backend, rows: slice, q, k, v, **options) -> None:
        """Compute attention of ``q`` (the query rows ``rows``) over ``k, v`` with ``backend``
        and merge it: inside the kernel when the backend has ``forward_into`` and the
        accumulator is float32 (the first block too, written in float32 into a zeroed
        accumulator, never rounded to q's dtype), else through ``add``."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise ValueError(f"rows must be a slice of consecutive rows, got {rows!r}")  # a view, not a copy
        forward_into = getattr(backend, "forward_into", None)
        if forward_into is None or self.dtype != torch.float32:
            self.add(rows, *backend.forward(q, k, v, **options))
            return
        if self.out is None:
            self._start_empty()
        forward_into(q, k, v, self.out[:, rows], self.lse[:, :, rows], **options)
        self._reached(range(self.shape[1])[rows])

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.out is None:
            self._start_empty()
        return self.out, self.lse

    def _reached(self, span: range) -> None:
        """Rows ``span`` now hold a result: the rows still untouched start after them."""
        if span:
            self._untouched_from = max(self._untouched_from, span.stop)

    def _start_empty(self) -> None:
        """Out 0 and lse -inf: nothing held."""
        batch, seqlen, heads, _ = self.shape
        self.out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.lse = torch.full((batch, heads, seqlen), float("-inf"), dtype=self.dtype, device=self.device)


def backward_block(backend, dq: torch.Tensor, rows: slice, dout, q, k, v, out, lse, **options):
    """The backward of one block of keys for the query rows ``rows``: its dQ added into
    the running ``dq`` (``[B, S, Hq, D]`` in the accumulation dtype), its ``(dk, dv)``
    returned. Inside the kernel when the backend has ``backward_into`` and ``dq`` is
    float32 (dK, dV then come in float32), else as a separate addition."""
    backward_into = getattr(backend, "backward_into", None)
    if backward_into is not None and dq.dtype == torch.float32:
        return backward_into(dout, q, k, v, out, lse, dq[:, rows], **options)
    block_dq, block_dk, block_dv = backend.backward(dout, q, k, v, out, lse, **options)
    dq[:, rows] += block_dq
    return block_dk, block_dv
