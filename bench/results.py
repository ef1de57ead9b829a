"""Self-describing JSON result files: the machine, the versions, then the figures."""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import platform
import re
from pathlib import Path
from typing import Callable

import torch

from usp import RUNS_DIR

from .flops import tflops


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name as torch reports it, or the CPU model."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def machine_info(device: torch.device) -> dict:
    """Where and with what a result was produced."""
    import triton

    return dict(
        device=device_name(device),
        device_type=torch.device(device).type,
        host=platform.node(),
        cpu=cpu_model(),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        triton_interpreter=os.environ.get("TRITON_INTERPRET", "0") == "1",
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def new_run_dir(name: str) -> Path:
    """A fresh folder ``runs/<UTC time>-<name>`` under the current directory (``-2``,
    ``-3``... appended when that one exists already)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    RUNS_DIR.mkdir(exist_ok=True)
    return _create_first_free(lambda suffix: RUNS_DIR / f"{stamp}-{name}{suffix}", Path.mkdir)


def _create_first_free(path_for: Callable[[str], Path], create: Callable[[Path], object]) -> Path:
    """The first of ``path_for("")``, ``path_for("-2")``, ``path_for("-3")``... that
    ``create`` makes without raising FileExistsError (it must refuse an existing path)."""
    for n in itertools.count(1):
        path = path_for("" if n == 1 else f"-{n}")
        try:
            create(path)
            return path
        except FileExistsError:
            continue


def write_result(kind: str, device: torch.device, payload: dict, out_dir: Path | str | None = None) -> Path:
    """Write ``{"kind", "created", "machine", **payload}`` as ``<kind>-<device>-<time>.json``
    into ``out_dir`` (default: a new run folder, see ``new_run_dir``); ``-2``, ``-3``... are
    appended to the name when a run of the same kind wrote there in the same second."""
    out_dir = Path(out_dir) if out_dir is not None else new_run_dir(kind)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    machine = machine_info(device)
    document = dict(kind=kind, created=now.isoformat(timespec="seconds"), machine=machine, **payload)
    text = json.dumps(document, indent=1) + "\n"
    stem = f"{kind}-{_slug(machine['device'])}-{now:%Y%m%d-%H%M%S}"

    def write_new(path: Path) -> None:  # mode "x": never over another run's file
        with path.open("x") as file:
            file.write(text)
    return _create_first_free(lambda suffix: out_dir / f"{stem}{suffix}.json", write_new)


# Field names every timing record carries, in this order (ARCHITECTURE.md); scripts and plots rely on them.
TIMING_FIELDS = ("device", "impl", "pass", "dtype", "causal", "batch", "seqlen", "heads", "kv_heads", "head_dim",
                 "ms", "tflops")


def error_reason(error: BaseException, with_type: bool = True) -> str:
    """Why a timing could not run, for records and progress lines: the first line of
    ``error``'s message (at most 160 characters), after its type's name unless ``with_type``
    is false."""
    line = (str(error).strip().splitlines() or [""])[0][:160]
    return f"{type(error).__name__}: {line}" if with_type else line


def timing_record(device: str, impl: str, pass_: str, dtype: str, causal: bool, batch: int, seqlen: int, heads: int,
                  kv_heads: int, head_dim: int, ms: float, flops: float, **extra) -> dict:
    """One timing record: the DESIGN fields in their order (``tflops`` from ``flops`` and
    ``ms``), then ``flops`` and ``extra``."""
    return {"device": device, "impl": impl, "pass": pass_, "dtype": dtype, "causal": causal, "batch": batch,
            "seqlen": seqlen, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "ms": ms,
            "tflops": tflops(flops, ms), "flops": flops, **extra}


def sp_method(ulysses_degree: int, ring_degree: int) -> str:
    """The method a ``u x r`` mesh runs: ring when ``u = 1``, Ulysses when ``r = 1``, else USP."""
    return "ring" if ulysses_degree == 1 else "ulysses" if ring_degree == 1 else "usp"


def sp_impl_name(ulysses_degree: int, ring_degree: int, layout: str, method: str | None = None) -> str:
    """A sequence-parallel method's ``impl`` in result files, e.g. ``usp-u2r4-zigzag``
    (Ulysses has no ring layout). ``method``: default ``sp_method`` of the mesh."""
    method = method or sp_method(ulysses_degree, ring_degree)
    name = f"{method}-u{ulysses_degree}r{ring_degree}"
    return name if method == "ulysses" else f"{name}-{layout}"
