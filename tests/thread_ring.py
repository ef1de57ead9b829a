"""A ring of ranks that are threads of this process, for running the ring loops of
``usp.attention.ring`` exactly, without processes: each ``send_recv`` puts a copy of
its tensors in the next rank's mailbox, and ``wait`` takes the previous rank's. One
thread computes at a time (a baton passed on at every wait), as Triton's interpreter
is not thread-safe."""

from __future__ import annotations

import dataclasses
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from usp.attention.layout import ring_positions
from usp.attention.ring import ring_backward, ring_forward
from usp.kernels import get_backend

TIMEOUT_S = 60.0


class _Mailboxes:
    def __init__(self):
        self._lock = threading.Lock()
        self._boxes: dict[tuple, queue.Queue] = {}
        self.baton = threading.Lock()  # held by the one thread that computes

    def box(self, rank: int, label: str, step: int) -> queue.Queue:
        with self._lock:
            return self._boxes.setdefault((rank, label, step), queue.Queue())


class _Arriving:
    def __init__(self, box: queue.Queue, baton: threading.Lock):
        self._box, self._baton = box, baton

    def wait(self):
        self._baton.release()
        try:
            return self._box.get(timeout=TIMEOUT_S)
        finally:
            self._baton.acquire()


class ThreadRing:
    """The ``RingTransport`` of ring rank ``rank`` of ``size``."""

    def __init__(self, rank: int, size: int, mailboxes: _Mailboxes):
        self.rank, self.size, self._mailboxes = rank, size, mailboxes

    def send_recv(self, tensors, label: str, step: int) -> _Arriving:
        self._mailboxes.box((self.rank + 1) % self.size, label, step).put([t.clone() for t in tensors])
        return _Arriving(self._mailboxes.box(self.rank, label, step), self._mailboxes.baton)


def run_on_ring(size: int, fn) -> list:
    """``fn(ring)`` on every rank of a ring of ``size`` threads; the results in rank order."""
    mailboxes = _Mailboxes()

    def rank_main(rank: int):
        with mailboxes.baton:
            return fn(ThreadRing(rank, size, mailboxes))
    with ThreadPoolExecutor(max_workers=size) as pool:
        futures = [pool.submit(rank_main, rank) for rank in range(size)]
        return [future.result(timeout=TIMEOUT_S) for future in futures]


def triton_through_into(pass_: str):
    """``(backend, calls)``: the triton backend whose plain ``pass_`` ("forward" or
    "backward") raises and whose ``<pass_>_into`` appends to ``calls`` each time it runs,
    for checking that a ring does every step of that pass inside the kernel."""
    triton, calls = get_backend("triton"), []

    def counted(*args, **kwargs):
        calls.append(1)
        return getattr(triton, f"{pass_}_into")(*args, **kwargs)

    def refused(*args, **kwargs):
        raise AssertionError(f"every step should go through {pass_}_into")

    return dataclasses.replace(triton, name="counted", **{pass_: refused, f"{pass_}_into": counted}), calls


def ring_by_threads(backend, q, k, v, dout, causal: bool, ring_size: int, layout: str) -> dict:
    """Out, lse and gradients of the ring loops of ``usp.attention.ring`` run on a ring of
    threads, each rank on its shard of the whole sequence, gathered back in order."""
    be = get_backend(backend)
    positions = [ring_positions(q.shape[1], ring_size, rank, layout) for rank in range(ring_size)]
    scale = q.shape[-1] ** -0.5

    def rank_main(ring):
        mine = lambda x: x[:, positions[ring.rank]]  # noqa: E731
        out, lse = ring_forward(mine(q), mine(k), mine(v), ring, causal, scale, layout, be)
        grads = ring_backward(mine(dout), mine(q), mine(k), mine(v), out, lse, ring, causal, scale, layout, be)
        return out, lse, *grads

    per_rank = run_on_ring(ring_size, rank_main)
    order = torch.cat(positions).argsort().to(q.device)
    gather = lambda i, dim=1: torch.cat([r[i] for r in per_rank], dim=dim).index_select(dim, order)  # noqa: E731
    return dict(out=gather(0), lse=gather(1, dim=2), dq=gather(2), dk=gather(3), dv=gather(4))
