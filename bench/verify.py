"""``python -m bench verify``: every available backend against float64 naive attention."""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from kernels import AttentionShape
from kernels.configs import interpreter_active

from .numerics import DTYPE_NAMES, QUANTITIES, TOLERANCE_RULE, Case, CaseResult, run_case
from .results import write_result

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim): MHA, MQA, GQA 4:1, Sq < Sk,
# Sq > Sk (causal rows that see nothing), one query row, padded head dims.
CPU_SHAPES = [
    (1, 64, 64, 2, 2, 64),
    (2, 17, 17, 4, 1, 80),
    (1, 129, 200, 8, 2, 16),
    (1, 200, 129, 2, 2, 128),
    (1, 1, 64, 2, 1, 32),
]
GPU_SHAPES = [
    (2, 512, 512, 8, 8, 64),
    (1, 1000, 1000, 8, 2, 128),
    (1, 333, 777, 4, 1, 96),
    (1, 777, 333, 4, 4, 256),
    (1, 1, 1024, 8, 1, 128),
    (2, 2048, 2048, 4, 4, 128),
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` here, or None when it can."""
    if backend == "triton" and device.type != "cuda" and not interpreter_active():
        return "the Triton kernels need a CUDA device or TRITON_INTERPRET=1"
    return None


def backend_dtypes(backend: str) -> list[torch.dtype]:
    """The dtypes a backend is verified in."""
    if backend == "triton" and interpreter_active():
        return [torch.float32, torch.float16]  # the interpreter computes bf16 wrongly
    return [torch.float32, torch.float16, torch.bfloat16]


def default_cases(device: torch.device, backends, dtypes=None) -> list[Case]:
    """Every backend x dtype x shape x causal, on the shapes for this kind of device."""
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    cases = []
    for backend in backends:
        for dtype in backend_dtypes(backend):
            if dtypes and dtype not in dtypes:
                continue
            for shape, causal in itertools.product(shapes, (False, True)):
                cases.append(Case(backend, dtype, AttentionShape(*shape), causal))
    return cases


def format_row(result: CaseResult) -> str:
    c, s = result.case, result.case.shape
    shape = f"b{s.batch} sq{s.seqlen_q} sk{s.seqlen_k} h{s.heads}/{s.kv_heads} d{s.head_dim}"
    errs = " ".join(f"{result.errors[n]:9.2e}" for n in QUANTITIES)
    return (f"{c.backend:<8}{DTYPE_NAMES[c.dtype]:<6}{shape:<32}{'yes' if c.causal else 'no':<7}{errs}  "
            f"{'pass' if result.passed else 'FAIL'}")


HEADER = f"{'backend':<8}{'dtype':<6}{'shape':<32}{'causal':<7}" + " ".join(f"{n:>9}" for n in QUANTITIES) + "  result"


def worst_ratios(results: list[CaseResult]) -> dict[str, float]:
    """Per backend and dtype, the largest error / tolerance seen (under 1 passes)."""
    worst: dict[str, float] = {}
    for r in results:
        key = f"{r.case.backend} {DTYPE_NAMES[r.case.dtype]}"
        worst[key] = max(worst.get(key, 0.0), r.worst_ratio)
    return worst


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    if device.type not in ("cuda", "cpu"):
        raise argparse.ArgumentTypeError(f"expected cuda or cpu, got {text!r}")
    return device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", action="append", choices=["triton", "torch", "naive"],
                        help="backend to verify (repeatable; default: all)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="dtype (repeatable; default: all)")
    parser.add_argument("--device", type=_device, default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--out-dir", default=None, help="where to write the JSON (default: bench/results)")


def run(args: argparse.Namespace) -> int:
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = []
    for backend in args.backend or ["triton", "torch", "naive"]:
        reason = unavailable_reason(backend, device)
        if reason:
            print(f"skipping {backend}: {reason}")
        else:
            backends.append(backend)
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else None
    cases = default_cases(device, backends, dtypes)
    if not cases:
        print("no cases to run for these options", file=sys.stderr)
        return 2
    mode = " (Triton interpreter)" if interpreter_active() else ""
    print(f"verify: {len(cases)} cases on {device}{mode}; max abs error against float64 naive attention")
    print(" " * 9 + HEADER)
    results = []
    for index, case in enumerate(cases, 1):
        result = run_case(case, device=device, seed=args.seed + index)
        results.append(result)
        print(f"[{index:>3}/{len(cases)}] {format_row(result)}", flush=True)
        for failure in result.failures:
            print(f"          {failure}", flush=True)
    failed = [r for r in results if not r.passed]
    worst = worst_ratios(results)
    print("worst error / tolerance: " + ", ".join(f"{key} {ratio:.2f}" for key, ratio in worst.items()))
    path = write_result("verify", device, dict(
        config=dict(backends=backends, seed=args.seed, tolerance=TOLERANCE_RULE),
        summary=dict(cases=len(results), passed=len(results) - len(failed), failed=len(failed),
                     worst_ratio=worst),
        records=[r.record() for r in results]), args.out_dir)
    print(f"{len(results) - len(failed)}/{len(results)} passed; wrote {path}")
    return 1 if failed else 0
