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
