"""Point-to-point transfers around a ring of ranks, overlapped with compute.

``RingComm.rotate`` walks a set of tensors once around the ring: at each step it posts
the send of the tensors it holds to the next rank and the receive of the previous
rank's into a spare buffer (``batch_isend_irecv``), *then* hands the current tensors to
the caller's compute, and only waits when the next step needs what was received. Two
buffer sets are allocated once and alternate (double buffering). ``pass_along`` sends a
tensor one hop further after compute, for accumulators that travel lagging one step.
Works on gloo and NCCL: peers are addressed by global rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from . import traffic

KV_TAG, ACCUMULATOR_TAG = 0, 1


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Pending:
    """Posted transfers and the buffers they fill."""

    def __init__(self, requests, received: list[torch.Tensor], label: str = "", step: int = -1):
        self._requests, self.received = requests, received
        self._label, self._step = label, step

    def wait(self) -> list[torch.Tensor]:
        with traffic.span("wait", label=self._label, step=self._step):
            for request in self._requests:
                request.wait()
        return self.received


class RingComm:
    """Transfers to the next rank of ``group`` and from the previous one."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next_rank = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev_rank = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def post(self, tensors: Sequence[torch.Tensor], into: Sequence[torch.Tensor], tag: int, label: str,
             step: int) -> _Pending:
        """Send ``tensors`` to the next rank and receive the previous rank's into ``into``."""
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next_rank, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group, tag) for t in into]
        traffic.note("p2p", _nbytes(tensors), len(tensors), label, step)
        return _Pending(dist.batch_isend_irecv(ops), list(into), label, step)

    def rotate(self, tensors: Sequence[torch.Tensor], label: str = "kv") -> Iterator[tuple[int, int, list]]:
        """Yield ``(step, source, tensors)`` for ``step = 0 .. size - 1``: the tensors that
        started on ring rank ``source = rank - step``. The next step's transfer is already
        in flight while the caller computes on a step's tensors."""
        current = [t.contiguous() for t in tensors]
        spares = [[torch.empty_like(t) for t in current] for _ in range(2 if self.size > 2 else 1)]
        for step in range(self.size):
            pending = None
            if step + 1 < self.size:
                pending = self.post(current, spares[step % len(spares)], KV_TAG, label, step + 1)
            yield step, (self.rank - step) % self.size, current
            if pending is not None:
                current = pending.wait()

    def pass_along(self, tensors: Sequence[torch.Tensor], step: int, label: str = "accumulator") -> _Pending:
        """Send ``tensors`` (computed at ``step``) to the next rank; the returned transfer
        receives the previous rank's. On a ring of one, they come straight back."""
        if self.size == 1:
            return _Pending([], list(tensors))
        return self.post(tensors, [torch.empty_like(t) for t in tensors], ACCUMULATOR_TAG, label, step)
