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
    return _summary([time_once_ms(fn, device) for _ in range(repeats)])


def _summary(times: list[float]) -> dict:
    """``{"ms": median, "ms_min", "ms_max", "repeats"}`` of the repeats' times."""
    return dict(ms=statistics.median(times), ms_min=min(times), ms_max=max(times), repeats=len(times))


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
                    times[name].append(time_once_ms(fns[name], device))
            except errors as error:
                error.__context__ = error.__cause__ = None
                results[name] = error.with_traceback(None)
    for name in names:
        if name not in results:
            results[name] = dict(_summary(times[name]), ms_all=times[name])
    return {name: results[name] for name in names}
