"""Timing a callable: CUDA events after warm-up on a GPU, wall clock on a CPU; medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_once_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events around it on a GPU, the wall clock on a CPU."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def measure_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> dict:
    """``{"ms": median, "ms_min", "ms_max", "repeats"}`` of ``fn`` after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = [time_once_ms(fn, device) for _ in range(repeats)]
    return dict(ms=statistics.median(times), ms_min=min(times), ms_max=max(times), repeats=repeats)


def measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 2,
                        repeats: int = 5, errors: tuple[type[Exception], ...] = (Exception,)) -> dict:
    """Each of ``fns`` timed as ``measure_ms`` times one, but taking turns: every warm-up
    and every repeat is a round that calls each function once, in order, so a drift of
    the machine's speed during the measurement (clocks, heat, other load) reaches them
    all alike. ``{name: timing}``, or ``{name: the exception}`` for a function that raised
    one of ``errors`` (it is dropped from the later rounds)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    live, results = dict(fns), {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in list(live.items()):
            try:
                if round_ < warmup:
                    fn()
                    synchronize(device)
                else:
                    times[name].append(time_once_ms(fn, device))
            except errors as error:
                results[name] = error
                del live[name]
    for name in live:
        results[name] = dict(ms=statistics.median(times[name]), ms_min=min(times[name]), ms_max=max(times[name]),
                             repeats=repeats)
    return {name: results[name] for name in fns}

