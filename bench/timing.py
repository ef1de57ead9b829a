"""Timing a callable: CUDA events after warm-up on a GPU, wall clock on a CPU; medians.

On a GPU each timed call is queued behind a short GPU sleep (``hide_host_work``): the
host prepares and launches the call while the GPU sleeps, so the events time the GPU's
work alone, as in a training step where the host runs ahead of the GPU. Without it a call
on an idle GPU counts its Python and launch time too (about 0.1-0.2 ms for a call through
an autograd function), which is not the kernel's speed. The host's own time per call is
kept beside it (``host_ms``): the price of a call when the GPU waits for it.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Callable

import torch

HEAD_START_MS = 2.0  # the GPU's sleep before a timed call: longer than the host work of any call timed here


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=None)
def _sleep_cycles_per_ms(device_index: int) -> float:
    """GPU clock cycles of ``torch.cuda._sleep`` per millisecond on this GPU, measured once."""
    with torch.cuda.device(device_index):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 1 << 21
        torch.cuda._sleep(cycles)  # the first call may carry one-off set-up
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / max(start.elapsed_time(end), 1e-3)


def hide_host_work(device: torch.device) -> None:
    """On a GPU, queue ``HEAD_START_MS`` of sleep on the current stream, so that the host
    work of what is queued next overlaps it (module docstring); nothing on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        with torch.cuda.device(index):
            torch.cuda._sleep(int(HEAD_START_MS * _sleep_cycles_per_ms(index)))


def time_once(fn: Callable[[], object], device: torch.device, hide_host: bool = True) -> tuple[float, float]:
    """``(ms, host_ms)`` of one call. On a GPU: ``ms`` between CUDA events around the call
    on ``device``'s current stream, queued behind ``hide_host_work`` (unless not
    ``hide_host``); ``host_ms`` the wall time until the call returned (its Python and
    launches; longer than ``HEAD_START_MS`` means the GPU waited for the host, or the call
    synchronised with the GPU). On a CPU both are the wall time."""
    device = torch.device(device)
    if device.type != "cuda":
        begin = time.perf_counter()
        fn()
        wall = (time.perf_counter() - begin) * 1e3
        return wall, wall
    with torch.cuda.device(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if hide_host:
            hide_host_work(device)
        start.record()
        begin = time.perf_counter()
        fn()
        host = (time.perf_counter() - begin) * 1e3
        end.record()
        end.synchronize()
    return start.elapsed_time(end), host


def measure_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5,
               hide_host: bool = True) -> dict:
    """``{"ms": median, "ms_min", "ms_max", "repeats", "host_ms"}`` of ``fn`` after
    ``warmup`` untimed calls (``time_once``; ``host_ms`` the median host time).
    ``hide_host=False`` for collectives: each rank's sleep would end at its own moment,
    adding the ranks' skew to the time instead of hiding the host's."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    return _summary([time_once(fn, device, hide_host) for _ in range(repeats)])


def _summary(times: list[tuple[float, float]]) -> dict:
    """``{"ms": median, "ms_min", "ms_max", "repeats", "host_ms"}`` of the repeats'
    ``(ms, host_ms)``."""
    ms = [t for t, _ in times]
    return dict(ms=statistics.median(ms), ms_min=min(ms), ms_max=max(ms), repeats=len(ms),
                host_ms=statistics.median(host for _, host in times))


def measure_interleaved(fns: dict, device: torch.device, warmup: int = 2, repeats: int = 5,
                        errors: tuple[type[Exception], ...] = (Exception,)) -> dict:
    """Each of ``fns`` (any hashable names) timed as ``measure_ms`` times one, but taking
    turns: every warm-up and every repeat is a round that calls each function once, each
    round starting one function later than the one before, so that a slow drift of the
    machine's speed, or what one function leaves behind for the next, falls on all of
    them alike. ``{name: timing}`` with every repeat's time (``ms_all``), or ``{name:
    exception}`` for a function that raised one of ``errors`` (dropped from the later
    rounds, its partial times discarded; the exception kept without its traceback, whose
    frames would hold the call's tensors)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names, results = list(fns), {}
    times: dict = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        turn = round_ % len(names) if names else 0
        for name in names[turn:] + names[:turn]:
            if name in results:
                continue
            try:
                if round_ < warmup:
                    fns[name]()
                    synchronize(device)
                else:
                    times[name].append(time_once(fns[name], device))
            except errors as error:
                error.__context__ = error.__cause__ = None
                results[name] = error.with_traceback(None)
    for name in names:
        if name not in results:
            results[name] = dict(_summary(times[name]), ms_all=[ms for ms, _ in times[name]])
    return {name: results[name] for name in names}
