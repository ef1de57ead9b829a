"""``usp-bench tune``: time candidate tile configs of each Triton kernel on this GPU, so
that the config table (``kernels/configs.py``) can be tuned offline, never at import.

For each kernel (``fwd``, ``bwd_dkdv``, ``bwd_dq``, ``bwd_dq_into``), head dim and causal
mode, every candidate ``block_m x block_n, warps, stages`` runs in place of the table's
entry for that kernel alone (``usp.kernels.configs.config_override``): ``fwd`` times the
forward, the backward kernels time the whole backward (the other backward rows keep theirs),
``bwd_dq_into`` through ``flash_attn_backward_into`` adding into a float32 dQ zeroed
before each call (a ring step's backward; the zeroing is in every candidate's time). Each
candidate's results are compared with the table config's (largest difference), and a
candidate the GPU cannot run (too much shared memory, for instance) is reported as
skipped with the reason; a CUDA error, unlike a compile error, can leave the device
unusable for the candidates after it: time a suspect one alone with ``--candidate``.
Before the timing, ``--jobs`` processes compile every candidate side by side (each runs
it once on a short input with the same specialisations), so the timing finds Triton's
cache warm. Prints, per group, each candidate's time and the fastest against the
table's; writes the JSON (``groups``: table config, candidates, best).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time

import torch

from usp.kernels import flash_attn_backward, flash_attn_backward_into, flash_attn_forward
from usp.kernels.configs import KERNELS, KernelConfig, config_override, get_config

from .cli_args import (DTYPES, add_device_argument, add_jobs_argument, add_output_arguments, add_timing_arguments,
                       bounded_int, default_device, jobs_for, process_pool)
from .flops import attention_flops, tflops
from .inputs import random_inputs
from .results import device_name, error_reason, write_result
from .timing import measure_ms

C = KernelConfig
# Tiles worth timing on a Hopper-class GPU, beside the table's own entry: compiled for sm_90
# (bf16, causal) they fit its shared memory and spill little (stack bytes per thread at d64 /
# d128 in kernels/NOTES.md).
CANDIDATES = {
    "fwd": [C(128, 64, 8, 3), C(128, 64, 8, 2), C(64, 128, 8, 2), C(64, 64, 4, 3), C(128, 32, 4, 4),
            C(128, 128, 8, 2)],
    "bwd_dkdv": [C(32, 128, 8, 3), C(16, 128, 8, 3), C(32, 64, 8, 3), C(32, 128, 8, 2), C(16, 64, 4, 3),
                 C(64, 128, 8, 2)],
    "bwd_dq": [C(128, 32, 8, 3), C(128, 64, 8, 2), C(64, 32, 4, 3), C(64, 64, 4, 2), C(128, 32, 4, 3)],
}
CANDIDATES["bwd_dq_into"] = CANDIDATES["bwd_dq"]


# Tokens per sequence of the compile pass (for timed lengths that are multiples of it): a
# multiple of 16 and of every tile, so the kernels specialise as on the timed inputs.
WARM_SEQLEN = 256


def config_type(text: str) -> KernelConfig:
    """``BMxBN,WARPS,STAGES``, e.g. ``128x64,4,3``."""
    try:
        tiles, warps, stages = text.split(",")
        block_m, block_n = tiles.lower().split("x")
        return KernelConfig(int(block_m), int(block_n), int(warps), int(stages))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BMxBN,WARPS,STAGES such as 128x64,4,3, got {text!r}") from None


def label(config: KernelConfig) -> str:
    return f"{config.block_m}x{config.block_n},{config.num_warps},{config.num_stages}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--kernel", choices=KERNELS, nargs="+", default=list(KERNELS), help="kernels to tune")
    parser.add_argument("--head-dim", type=bounded_int(1, 256), nargs="+", default=[64, 128] if gpu else [16],
                        help="head dims")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if gpu else "fp32", help="dtype")
    parser.add_argument("--seqlen", type=bounded_int(1), default=8192 if gpu else 32, help="tokens per sequence")
    parser.add_argument("--tokens", type=bounded_int(1), default=16384 if gpu else 32,
                        help="tokens per call (batch = tokens / seqlen, at least 1)")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                        help="only causal or only full attention (default: both)")
    parser.add_argument("--candidate", type=config_type, action="append", metavar="BMxBN,WARPS,STAGES",
                        help="a config to time, repeatable (default: a list per kernel, beside the table's entry)")
    add_jobs_argument(parser, "compiling the candidates before the timing")
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    add_timing_arguments(parser, warmup=3, repeats=10)
    add_output_arguments(parser)


def _call(kernel: str, inputs: tuple, causal: bool, reference: tuple):
    """The timed call of ``kernel``'s pass: the forward, or the backward from the table's forward results."""
    q, k, v, dout = inputs
    if kernel == "fwd":
        return lambda: flash_attn_forward(q, k, v, causal)[0]
    out, lse = reference
    if kernel == "bwd_dq_into":
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # this call's own accumulator

        def backward_into():
            return dq, *flash_attn_backward_into(dout, q, k, v, out, lse, dq.zero_(), causal)
        return backward_into
    return lambda: flash_attn_backward(dout, q, k, v, out, lse, causal)


def _heads(head_dim: int, device: torch.device) -> int:
    return max(1, 2048 // head_dim) if device.type == "cuda" else 2


def compile_candidate(kernel: str, head_dim: int, causal: bool, config: KernelConfig, dtype: str, device: str,
                      seqlen: int) -> None:
    """Run one candidate once on a ``seqlen``-token input (in a worker process), so that
    Triton compiles it. A candidate that cannot run is left to the timing, which reports why."""
    device = torch.device(device)
    heads = _heads(head_dim, device)
    inputs = random_inputs(1, seqlen, heads, heads, head_dim, DTYPES[dtype], device, 0)
    with contextlib.suppress(Exception):
        forward = flash_attn_forward(*inputs[:3], causal)
        with config_override(kernel, head_dim, config):
            _call(kernel, inputs, causal, forward)()


def compile_all(groups: list[tuple], args, device: torch.device) -> float:
    """Compile every group's candidates in ``args.jobs`` processes; the seconds it took.
    Only a speed-up: a failed pool (a worker killed) is reported and the timing goes on."""
    started = time.perf_counter()
    # the timed length when it is not a multiple of WARM_SEQLEN: the same specialisations
    seqlen = WARM_SEQLEN if args.seqlen % WARM_SEQLEN == 0 else args.seqlen
    work = [(kernel, head_dim, causal, config, args.dtype, str(device), seqlen) for kernel, head_dim, causal in groups
            for config in args.candidate or CANDIDATES[kernel]]
    pool = process_pool(args.jobs)
    try:
        list(pool.map(compile_candidate, *zip(*work)))
    except Exception as error:  # BrokenProcessPool and the like
        print(f"compiling side by side failed ({type(error).__name__}: {error}); the timing compiles instead",
              flush=True)
    finally:
        pool.shutdown(cancel_futures=True)  # Ctrl-C: drop the compiles still queued
    return time.perf_counter() - started


def _outputs(result) -> tuple:
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


def _largest_difference(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(_outputs(a), _outputs(b)))


def tune_group(kernel: str, head_dim: int, causal: bool, candidates: list[KernelConfig], args,
               device: torch.device) -> dict:
    """Every candidate of one (kernel, head dim, causal), against the table's config."""
    dtype = DTYPES[args.dtype]
    batch, heads = max(1, args.tokens // args.seqlen), _heads(head_dim, device)
    inputs = random_inputs(batch, args.seqlen, heads, heads, head_dim, dtype, device, args.seed)
    table = get_config(kernel, head_dim, dtype, device)
    forward = flash_attn_forward(*inputs[:3], causal)
    expected = [x.clone() for x in _outputs(_call(kernel, inputs, causal, forward)())]  # kept apart from any buffer
    pass_ = "fwd" if kernel == "fwd" else "bwd"
    flops = attention_flops(batch, heads, args.seqlen, args.seqlen, head_dim, causal, pass_)
    rows = []
    for config in dict.fromkeys([table, *candidates]):
        row = dict(config=label(config), table=config == table)
        try:
            with config_override(kernel, head_dim, config):
                call = _call(kernel, inputs, causal, forward)
                row["max_difference"] = _largest_difference(call(), expected)
                row.update(measure_ms(call, device, args.warmup, args.repeats))
            row["tflops"] = tflops(flops, row["ms"])
        except Exception as error:  # Triton's OutOfResources, a compile error: this candidate cannot run here
            row["skipped"] = error_reason(error)
        rows.append(row)
    timed = [r for r in rows if "ms" in r]
    best = min(timed, key=lambda r: r["ms"]) if timed else None
    table_ms = next((r["ms"] for r in timed if r["table"]), None)
    return dict(kernel=kernel, head_dim=head_dim, causal=causal, timed_pass=pass_, dtype=args.dtype, batch=batch,
                seqlen=args.seqlen, heads=heads, table=label(table), candidates=rows,
                best=best and best["config"], table_over_best=table_ms / best["ms"] if best and table_ms else None)


def run(args: argparse.Namespace) -> int:
    device = default_device(args.device)
    args.jobs = jobs_for(args.jobs, device)
    causals = [args.causal] if args.causal is not None else [False, True]
    groups = list(itertools.product(args.kernel, args.head_dim, causals))
    where = device_name(device)
    print(f"tune: {len(groups)} (kernel, head dim, causal) groups on {where}, {args.dtype}, {args.seqlen} tokens "
          f"per sequence, {args.tokens} per call; median of {args.repeats} after {args.warmup} warm-up")
    results, compile_s = [], None
    try:
        if args.jobs > 1:
            compile_s = compile_all(groups, args, device)
            print(f"compiled the candidates in {compile_s:.1f} s with {args.jobs} processes", flush=True)
        for index, (kernel, head_dim, causal) in enumerate(groups, 1):
            candidates = args.candidate or CANDIDATES[kernel]
            group = tune_group(kernel, head_dim, causal, candidates, args, device)
            results.append(group)
            print(f"[{index:>2}/{len(groups)}] {kernel} d{head_dim} {'causal' if causal else 'full'} "
                  f"(table {group['table']})", flush=True)
            for row in group["candidates"]:
                mark = "*" if row["config"] == group["best"] else " "
                text = (f"skipped: {row['skipped']}" if "skipped" in row else
                        f"{row['ms']:9.3f} ms {row['tflops']:8.2f} TF/s  max diff {row['max_difference']:.2e}")
                print(f"      {mark} {row['config']:<14}{text}", flush=True)
            if group["table_over_best"] is not None:
                print(f"        fastest {group['best']}: the table's config takes {group['table_over_best']:.3f}x "
                      "its time", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted after {len(results)} of {len(groups)} groups: writing what was measured", file=sys.stderr)
    path = write_result("tune", device, dict(
        config=dict(dtype=args.dtype, seqlen=args.seqlen, tokens=args.tokens, warmup=args.warmup,
                    repeats=args.repeats, seed=args.seed, jobs=args.jobs, compile_seconds=compile_s),
        groups=results), args.out_dir)
    print(f"wrote {path}")
    return 0 if len(results) == len(groups) else 130
