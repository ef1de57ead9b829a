"""Argument types, options and help formatting shared by the ``usp-bench`` commands."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


# Nominal per-direction bandwidths per GPU, GB/s (1e9 B/s): NVLink 4 on H100 SXM is 900 GB/s
# both directions together; InfiniBand NDR is 400 Gb/s per port (one port per GPU).
DEFAULT_BANDWIDTHS = {"nvlink4": 450.0, "ib-ndr": 50.0}


def plain(text: str | None) -> str:
    """A docstring as help text: ``code`` markup becomes plain code."""
    return re.sub(r"``(.+?)``", r"\1", text or "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default. Options whose
    default is None say in their own help what that means (a test checks it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is None:
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {default})"


def device_type(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    if device.type not in ("cuda", "cpu"):
        raise argparse.ArgumentTypeError(f"expected cuda or cpu, got {text!r}")
    return device


def bounded_int(low: int, high: int | None = None):
    """An argparse type: an integer in ``[low, high]``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


world_size_type = bounded_int(1, 64)


def mesh_type(text: str) -> tuple[int, int]:
    """An argparse type: a mesh ``UxR`` (Ulysses degree x ring degree) as ``(u, r)``."""
    try:
        u, r = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a mesh like 2x4 (ulysses x ring), got {text!r}") from None
    if u < 1 or r < 1:
        raise argparse.ArgumentTypeError(f"degrees must be at least 1, got {text!r}")
    return u, r


def default_device(device: torch.device | None) -> torch.device:
    """The command's device (CUDA when available unless one is given); a GPU given by
    index becomes the current one, so that CUDA events and streams are that GPU's too."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device_type, default=None,
                        help="cuda or cpu (default: cuda when available, else cpu)")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", default=None,
                        help="where to write the JSON (default: a new folder runs/<UTC time>-<command> under the "
                             "current directory)")


def add_jobs_argument(parser: argparse.ArgumentParser, work: str) -> None:
    """``--jobs``: processes doing ``work`` side by side, so that Triton's compiles use the
    cores; ``jobs_for`` gives the default for the device."""
    parser.add_argument("--jobs", type=bounded_int(1), default=None,
                        help=f"processes {work} side by side (1: none; default: up to 8 when the device is a GPU, "
                             "1 on a CPU, whose cores the work itself uses)")


def jobs_for(jobs: int | None, device: torch.device) -> int:
    """``--jobs`` as given, or its default for ``device``."""
    if jobs is not None:
        return jobs
    return min(8, os.cpu_count() or 1) if torch.device(device).type == "cuda" else 1


def process_pool(jobs: int) -> ProcessPoolExecutor:
    """``jobs`` spawned worker processes (a forked child cannot use CUDA)."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


def add_timing_arguments(parser: argparse.ArgumentParser, warmup: int, repeats: int) -> None:
    parser.add_argument("--warmup", type=bounded_int(0), default=warmup, help="untimed calls first")
    parser.add_argument("--repeats", type=bounded_int(1), default=repeats, help="timed calls; the median is reported")
