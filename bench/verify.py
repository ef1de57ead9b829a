"""``usp-bench verify``: every available backend against float64 naive attention,
then ring, Ulysses and USP attention on local gloo process groups against the same oracle."""

from __future__ import annotations

import argparse
import itertools
import sys
from concurrent.futures.process import BrokenProcessPool

import torch

from usp.comm.mesh import mesh_shapes
from usp.kernels import BACKENDS, AttentionShape
from usp.kernels.configs import interpreter_active

from .cli_args import (DTYPES, add_device_argument, add_jobs_argument, add_output_arguments, default_device,
                       jobs_for, process_pool, world_size_type)
from .dist_checks import DistCase, DistResult, run_checks
from .numerics import DTYPE_NAMES, QUANTITIES, TOLERANCE_RULE, Case, CaseResult, run_case
from .results import sp_method, write_result

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
VERIFY_DTYPES = ("fp16", "bf16", "fp32")


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


def distributed_cases(world_sizes, backends, dtypes=None) -> list[DistCase]:
    """Per world size: pure ring, pure Ulysses and every 2-D USP mesh (both placements),
    causal zigzag and full contiguous, GQA with 8 query / 2 K/V heads (replicated when
    u > 2), on the torch backend in fp32; plus one naive float64 case (exact to ~1e-15)
    and one triton case under the interpreter."""
    cases = []
    for world in world_sizes:
        for u, r in mesh_shapes(world):
            method = sp_method(u, r)
            placements = ("ulysses_inner", "ring_inner") if method == "usp" else ("ulysses_inner",)
            shapes = (("zigzag", True), ("contiguous", False)) if r > 1 else (("contiguous", True),)
            for placement, (layout, causal) in itertools.product(placements, shapes):
                cases.append(DistCase(method, u, r, world, placement, layout, causal, backend="torch",
                                      dtype=torch.float32, kv_heads=2))
        u = 2 if world % 2 == 0 else 1
        cases.append(DistCase("usp", u, world // u, world, kv_heads=1))  # naive, float64, causal zigzag
        if interpreter_active():
            cases.append(DistCase("usp", u, world // u, world, backend="triton", dtype=torch.float32, kv_heads=2))
    return [c for c in cases if c.backend in backends and (not dtypes or c.dtype in dtypes)]


def format_dist_row(result: DistResult) -> str:
    c = result.case
    shape = f"w{c.world_size} {c.placement} b{c.batch} s{c.seqlen} h{c.heads}/{c.kv_heads} d{c.head_dim}"
    return f"{c.impl:<22}{c.backend:<8}{DTYPE_NAMES[c.dtype]:<6}{shape:<36}{_judgement(c.causal, result)}"


def _judgement(causal: bool, result: CaseResult | DistResult) -> str:
    """The causal flag, the error columns ("-" for a quantity not checked) and the verdict."""
    errors = " ".join(f"{result.errors[n]:9.2e}" if n in result.errors else f"{'-':>9}" for n in QUANTITIES)
    return f"{'yes' if causal else 'no':<7}{errors}  {'pass' if result.passed else 'FAIL'}"


def format_row(result: CaseResult) -> str:
    c, s = result.case, result.case.shape
    shape = f"b{s.batch} sq{s.seqlen_q} sk{s.seqlen_k} h{s.heads}/{s.kv_heads} d{s.head_dim}"
    return f"{c.backend:<8}{DTYPE_NAMES[c.dtype]:<6}{shape:<32}{_judgement(c.causal, result)}"


DIST_HEADER = (f"{'method':<22}{'backend':<8}{'dtype':<6}{'world, placement, shape':<36}{'causal':<7}"
               + " ".join(f"{n:>9}" for n in QUANTITIES) + "  result")
HEADER = f"{'backend':<8}{'dtype':<6}{'shape':<32}{'causal':<7}" + " ".join(f"{n:>9}" for n in QUANTITIES) + "  result"


def worst_ratios(results: list[CaseResult | DistResult]) -> dict[str, float]:
    """Per backend and dtype (and method, for distributed checks), the largest error /
    tolerance seen (under 1 passes)."""
    worst: dict[str, float] = {}
    for r in results:
        method = f"{r.case.method} " if isinstance(r, DistResult) else ""
        key = f"{method}{r.case.backend} {DTYPE_NAMES[r.case.dtype]}"
        worst[key] = max(worst.get(key, 0.0), r.worst_ratio)
    return worst


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", action="append", choices=sorted(BACKENDS),
                        help="backend to verify, repeatable (default: all that run here)")
    parser.add_argument("--dtype", action="append", choices=VERIFY_DTYPES,
                        help="dtype, repeatable (default: all the backend computes right here)")
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    add_jobs_argument(parser, "running the single-device cases (in their order and with their seeds)")
    add_output_arguments(parser)
    parser.add_argument("--world-size", type=world_size_type, action="append",
                        help="gloo world size of the distributed checks, repeatable (default: 4 and 8)")
    parser.add_argument("--no-distributed", action="store_true", help="skip the distributed checks")


def run(args: argparse.Namespace) -> int:
    device = default_device(args.device)
    backends = []
    for backend in args.backend or ["triton", "torch", "naive"]:
        reason = unavailable_reason(backend, device)
        if reason:
            print(f"skipping {backend}: {reason}")
        else:
            backends.append(backend)
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else None
    cases = default_cases(device, backends, dtypes)
    dist_cases = [] if args.no_distributed else distributed_cases(args.world_size or [4, 8], backends, dtypes)
    if not cases and not dist_cases:
        print("no cases to run for these options", file=sys.stderr)
        return 2
    mode = " (Triton interpreter)" if interpreter_active() else ""
    print(f"verify: {len(cases)} cases on {device}{mode}; max abs error against float64 naive attention")
    print(" " * 9 + HEADER)
    results = []
    seeds = [args.seed + index for index in range(1, len(cases) + 1)]  # case i's inputs whatever runs it
    jobs = min(jobs_for(args.jobs, device), len(cases))
    pool = process_pool(jobs) if jobs > 1 else None
    try:
        for index, result in enumerate((pool.map if pool else map)(run_case, cases, itertools.repeat(device), seeds),
                                       1):
            results.append(result)
            print(f"[{index:>3}/{len(cases)}] {format_row(result)}", flush=True)
            for failure in result.failures:
                print(f"          {failure}", flush=True)
    except BrokenProcessPool as error:  # a worker killed (a crash, the OOM killer): its case is unknown
        print(f"verify: a worker process died during case {len(results) + 1} or a later one ({error}); "
              "--jobs 1 runs the cases in this process and shows the error", file=sys.stderr)
        return 1
    finally:
        if pool:  # all done, or Ctrl-C / an error: drop the queued cases without waiting for the running ones
            pool.shutdown(wait=False, cancel_futures=True)
    dist_results = _run_distributed(dist_cases, args.seed) if dist_cases else []
    everything = results + dist_results
    failed = [r for r in everything if not r.passed]
    worst = worst_ratios(everything)
    print("worst error / tolerance: " + ", ".join(f"{key} {ratio:.2f}" for key, ratio in worst.items()))
    path = write_result("verify", device, dict(
        config=dict(backends=backends, seed=args.seed, tolerance=TOLERANCE_RULE,
                    distributed_world_sizes=sorted({c.world_size for c in dist_cases})),
        summary=dict(cases=len(everything), passed=len(everything) - len(failed), failed=len(failed),
                     worst_ratio=worst),
        records=[r.record() for r in results],
        distributed_records=[r.record() for r in dist_results]), args.out_dir)
    print(f"{len(everything) - len(failed)}/{len(everything)} passed; wrote {path}")
    return 1 if failed else 0


def _run_distributed(cases: list[DistCase], seed: int) -> list[DistResult]:
    """The distributed checks, one gloo launch per world size, printed as each finishes."""
    worlds = sorted({c.world_size for c in cases})
    print(f"distributed: {len(cases)} checks on gloo process groups of {', '.join(map(str, worlds))} ranks "
          "(one CPU thread each); max abs error of the gathered out and gradients")
    print(" " * 9 + DIST_HEADER)
    print(f"launching {worlds[0]} processes ...", flush=True)
    done = 0

    def show(world: int, results: list[DistResult]) -> None:
        nonlocal done
        for result in results:
            done += 1
            print(f"[{done:>3}/{len(cases)}] {format_dist_row(result)}", flush=True)
            for failure in result.failures:
                print(f"          {failure}", flush=True)
        later = [w for w in worlds if w > world]
        if later:
            print(f"launching {later[0]} processes ...", flush=True)

    return run_checks(cases, seed, on_world=show)
