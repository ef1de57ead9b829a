"""Counting what the communication layer does, for tests and benchmarks.

Inside ``with record_traffic() as log:`` every transfer this process posts through
``comm`` is appended to ``log.events`` (kind, bytes sent to other ranks, peer count),
and the ring loop notes each compute step, so the order "next transfer posted, then
this step computed" can be checked. Outside such a block nothing is recorded. The log
is per thread, so two meshes or two models in one program do not mix their counts.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

_active = threading.local()


@dataclass(frozen=True)
class Event:
    """One thing that happened on this rank: a posted transfer (with the bytes it sends
    to other ranks) or the start of a ring step's compute."""

    kind: str  # "p2p", "all_to_all", "all_gather", "check" (rank agreement) or "compute"
    bytes_sent: int = 0
    sends: int = 0  # point-to-point sends (or peers an all-to-all sends to)
    label: str = ""
    step: int = -1  # the ring step a transfer feeds or a compute belongs to


@dataclass
class TrafficLog:
    events: list[Event] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    def bytes_sent(self, kind: str | None = None) -> int:
        """Bytes this rank sent to other ranks (all kinds, or one)."""
        return sum(e.bytes_sent for e in self.events if kind is None or e.kind == kind)

    def sends(self, kind: str) -> int:
        return sum(e.sends for e in self.of_kind(kind))


@contextlib.contextmanager
def record_traffic():
    """Record this thread's transfers and compute steps into a fresh ``TrafficLog``."""
    log = TrafficLog()
    previous = getattr(_active, "log", None)
    _active.log = log
    try:
        yield log
    finally:
        _active.log = previous


def note(kind: str, bytes_sent: int = 0, sends: int = 0, label: str = "", step: int = -1) -> None:
    """Append an event to the active log, if any."""
    log = getattr(_active, "log", None)
    if log is not None:
        log.events.append(Event(kind, bytes_sent, sends, label, step))
