"""Point-to-point transfers around a ring of ranks, for loops that overlap them with compute.

A ring transport (``RingTransport``) has one operation: ``send_recv(tensors, label,
step)`` posts the send of ``tensors`` to the next rank of the ring and the receive of
the previous rank's tensors of the same shapes, and returns at once; the returned
transfer's ``wait()`` blocks until both are done and gives what was received. A ring
loop posts first and waits last, so the transfer runs while it computes::

    incoming = ring.send_recv(kv, KV_FORWARD, step + 1)   # posted: in flight ...
    ...compute on kv...                                   # ... during this step's compute
    kv = incoming.wait()                                  # needed from the next step on

``RingComm`` is the real transport: ``batch_isend_irecv`` on NCCL (peers by global
rank); on gloo, one ``all_to_all_single`` per tensor whose only non-empty pieces go to
the next rank and come from the previous one. Gloo runs a collective posted with
``async_op`` on its own worker thread, but writes a point-to-point send from the calling
thread, which then blocks until the peer has read most of a large message: the compute
the transfer should hide would start late. The ring loops (``usp.attention.ring``) take
any transport, so the emulator in ``usp.bench.emulate`` drives the very same loops with
a transport that replays what would arrive, and the tests run them on threads of one
process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist

from . import traffic
from .mesh import check_group


class Transfer(Protocol):
    def wait(self) -> list[torch.Tensor]:
        """Block until the posted send and receive are done; the received tensors."""


class RingTransport(Protocol):
    """Ring rank ``rank`` of ``size``: transfers to the next rank, from the previous one."""

    rank: int
    size: int

    def send_recv(self, tensors: Sequence[torch.Tensor], label: str, step: int) -> Transfer:
        """Post the send of ``tensors`` to rank ``rank + 1`` and the receive of rank
        ``rank - 1``'s (same shapes and dtypes); ``label`` and ``step`` name the transfer
        in the traffic log. On a ring of one the tensors come straight back."""


class Delivered:
    """A transfer that is already complete."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.received = list(tensors)

    def wait(self) -> list[torch.Tensor]:
        return self.received


class _Posted:
    """Requests in flight and the fresh buffers they fill."""

    def __init__(self, requests, received: list[torch.Tensor], label: str, step: int):
        self._requests, self._received, self._label, self._step = requests, received, label, step

    def wait(self) -> list[torch.Tensor]:
        with traffic.span(traffic.WAIT, label=self._label, step=self._step):
            for request in self._requests:
                request.wait()
        return self._received


class RingComm:
    """The ``RingTransport`` of this process over the ranks of ``group`` (None: the world),
    in group-rank order. ``by_all_to_all``: hop by all-to-all (default: on gloo) or by
    point-to-point operations (default elsewhere). ``after``: a posted rank agreement
    (``usp.comm.agreement.Agreement``) that the first hop waits for: it is posted once
    every rank agreed, and its ``wait()`` raises on every rank if they did not."""

    def __init__(self, group: dist.ProcessGroup | None, by_all_to_all: bool | None = None, after=None):
        self.group = check_group(group)
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self._next, self._prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.next_rank = dist.get_global_rank(self.group, self._next)
        self.prev_rank = dist.get_global_rank(self.group, self._prev)
        self.by_all_to_all = dist.get_backend(self.group) == "gloo" if by_all_to_all is None else by_all_to_all
        self._after = after

    def send_recv(self, tensors: Sequence[torch.Tensor], label: str, step: int) -> Transfer:
        if self.size == 1:  # the next and previous rank are this one
            return Delivered(tensors)
        tensors = [t.contiguous() for t in tensors]
        into = [torch.empty_like(t) for t in tensors]
        traffic.note(traffic.P2P, sum(t.numel() * t.element_size() for t in tensors), len(tensors), label, step)
        post = lambda: _Posted(self._post(tensors, into, label), into, label, step)  # noqa: E731
        after, self._after = self._after, None
        return post() if after is None else after.when_agreed(post)

    def _post(self, tensors: list[torch.Tensor], into: list[torch.Tensor], label: str) -> list:
        """The requests of one hop: ``tensors`` to the next rank, ``into`` from the previous one."""
        if self.by_all_to_all:
            return [dist.all_to_all_single(r.view(-1), t.view(-1), self._pieces(r, self._prev),
                                           self._pieces(t, self._next), group=self.group, async_op=True)
                    for t, r in zip(tensors, into)]
        tag = 0 if label in traffic.KV_LABELS else 1  # K/V and dK/dV travel side by side in backward
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group, tag) for t in into]
        return dist.batch_isend_irecv(ops)

    def _pieces(self, t: torch.Tensor, neighbour: int) -> list[int]:
        """All-to-all split sizes of a hop: all of ``t`` to or from ``neighbour``, nothing else."""
        return [t.numel() if peer == neighbour else 0 for peer in range(self.size)]
