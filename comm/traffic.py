"""Counting (and, on request, timing) what the communication layer does, for tests and benchmarks.

Inside ``with record_traffic() as log:`` every transfer this process posts through
``comm`` is appended to ``log.events`` (kind, bytes sent to other ranks, peer count),
and the ring loop notes each compute step, so the order "next transfer posted, then
this step computed" can be checked. Outside such a block nothing is recorded. The log
is per thread, so two meshes or two models in one program do not mix their counts.

``record_traffic(clock=...)`` also times the events: each gets a ``start`` (and, for a
span such as a step's compute or a wait on a transfer, an ``end``) in seconds from the
start of the block. ``HostClock`` reads the wall clock; ``CudaClock`` records CUDA
events on the current stream, so a span measures what that stream spent (a wait on a
transfer is the time the compute stream stalled), and ``log.timeline()`` resolves them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass, field

_active = threading.local()

# Event kinds.
P2P, ALL_TO_ALL, ALL_GATHER, CHECK = "p2p", "all_to_all", "all_gather", "check"  # transfers (CHECK: rank agreement)
REDUCE_SCATTER = "reduce_scatter"
COMPUTE, WAIT = "compute", "wait"  # spans: a ring step's compute, a wait for a transfer
SKIP = "skip"  # a ring step whose block is wholly masked, not computed

# Labels. The ring loops (usp.attention.ring) label their transfers, their waits and their
# compute spans with these; the scaling benchmark and the plots find the loops by them.
KV_FORWARD, KV_BACKWARD, DKV_BACKWARD = "kv forward", "kv backward", "dkv backward"  # transfers and waits
FORWARD, BACKWARD, ACCUMULATE = "forward", "backward", "backward accumulate"  # compute spans
KV_LABELS = (KV_FORWARD, KV_BACKWARD)
SEQ_TO_HEAD, HEAD_TO_SEQ, GATHER_SEQUENCE = "seq_to_head", "head_to_seq", "gather_sequence"
KV_GATHER, DKV_REDUCE = "kv all-gather", "dkv reduce-scatter"  # the all-gather schedule's transfers
# Each ring loop of one attention call: (its compute labels, its transfer/wait labels).
RING_LOOPS = {"forward": ((FORWARD,), (KV_FORWARD,)),
              "backward": ((BACKWARD, ACCUMULATE), (KV_BACKWARD, DKV_BACKWARD))}


@dataclass(frozen=True)
class Event:
    """One thing that happened on this rank: a posted transfer (with the bytes it sends
    to other ranks), a wait for one, or a ring step's compute."""

    kind: str  # P2P, ALL_TO_ALL, ALL_GATHER, REDUCE_SCATTER, CHECK, COMPUTE, WAIT or SKIP
    bytes_sent: int = 0
    sends: int = 0  # point-to-point sends (or peers an all-to-all sends to)
    label: str = ""
    step: int = -1  # the ring step a transfer feeds or a compute belongs to
    start: object = None  # clock marks (timed logs only); seconds after ``timeline()``
    end: object = None


class HostClock:
    """Wall-clock marks (``time.perf_counter``)."""

    def mark(self):
        return time.perf_counter()

    def seconds(self, origin, mark) -> float:
        return mark - origin


class CudaClock:
    """CUDA events recorded on the current stream; resolve after the work has run."""

    def mark(self):
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, origin, mark) -> float:
        mark.synchronize()
        return origin.elapsed_time(mark) / 1000.0


@dataclass
class TrafficLog:
    events: list[Event] = field(default_factory=list)
    clock: HostClock | CudaClock | None = None
    origin: object = None

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    def bytes_sent(self, kind: str | None = None) -> int:
        """Bytes this rank sent to other ranks (all kinds, or one)."""
        return sum(e.bytes_sent for e in self.events if kind is None or e.kind == kind)

    def sends(self, kind: str) -> int:
        return sum(e.sends for e in self.of_kind(kind))

    def elapsed(self) -> float:
        """Seconds from the start of the log until now, on its clock (for a CUDA clock: until
        the work queued so far on the current stream has run). Needs a clock."""
        if self.clock is None:
            raise ValueError("this log was recorded without a clock: use record_traffic(clock=HostClock())")
        return self.clock.seconds(self.origin, self.clock.mark())

    def timeline(self) -> list[Event]:
        """The events with ``start`` / ``end`` in seconds from the start of the log
        (``end`` None for instants such as a posted transfer). Needs a clock."""
        if self.clock is None:
            raise ValueError("this log was recorded without a clock: use record_traffic(clock=HostClock())")
        resolve = lambda mark: None if mark is None else self.clock.seconds(self.origin, mark)
        return [dataclasses.replace(e, start=resolve(e.start), end=resolve(e.end)) for e in self.events]


@contextlib.contextmanager
def record_traffic(clock: HostClock | CudaClock | None = None):
    """Record this thread's transfers and compute steps into a fresh ``TrafficLog``,
    timed by ``clock`` when one is given."""
    log = TrafficLog(clock=clock, origin=clock.mark() if clock is not None else None)
    previous = getattr(_active, "log", None)
    _active.log = log
    try:
        yield log
    finally:
        _active.log = previous


def note(kind: str, bytes_sent: int = 0, sends: int = 0, label: str = "", step: int = -1) -> None:
    """Append an instant event to the active log, if any."""
    log = getattr(_active, "log", None)
    if log is not None:
        log.events.append(Event(kind, bytes_sent, sends, label, step, _mark(log)))


@contextlib.contextmanager
def span(kind: str, bytes_sent: int = 0, sends: int = 0, label: str = "", step: int = -1):
    """Append an event for the work inside the block, timed from entry to exit on a
    timed log. The event is appended on entry, so it orders with the transfers posted
    before the block."""
    log = getattr(_active, "log", None)
    if log is None:
        yield
        return
    index = len(log.events)
    log.events.append(Event(kind, bytes_sent, sends, label, step, _mark(log)))
    try:
        yield
    finally:
        if log.clock is not None:
            log.events[index] = dataclasses.replace(log.events[index], end=log.clock.mark())


def _mark(log: TrafficLog):
    return log.clock.mark() if log.clock is not None else None
