"""``usp-bench kernels``: forward, backward and forward+backward time and TFLOP/s
of our local backends (triton, torch, naive) against PyTorch's
``scaled_dot_product_attention`` with each of its backends that runs here (flash,
efficient, cuDNN, math), over sequence lengths, head dims, dtypes, causal and not.

On a GPU each figure is the median of CUDA-event timings after warm-up, each call queued
behind a short GPU sleep so that the events time the GPU's work and not the host's
(``usp.bench.timing``; the host's time per call is kept as ``host_ms`` and printed on a
GPU); on a CPU, the median wall clock of the repeats. The implementations and passes of one config take
turns, one call each per warm-up and per repeat round, each round starting one later
(naive and sdpa-math, which hold quadratic scores, are timed after them, each alone),
so that a slow drift of the machine's speed falls on them alike. The headline is each backend's speed relative to the
fastest SDPA backend on the same config, measured in the same run. With several
``--tile-order`` values the triton kernels are timed once per order, interleaved like
the other implementations (``triton`` by the rule, ``triton:by-head``,
``triton:across-heads``), and each order's time is given over the first order's. Before
timing, the triton kernels of every (dtype, head dim, causal) in the grid are compiled
once per order, and the seconds that took are reported; the device's dense matmul rate
per dtype is measured too, and each record's TFLOP/s is also given as a fraction of it
(``of_matmul``).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from usp.kernels import local_attention
from usp.kernels.configs import interpreter_active
from usp.kernels.triton_common import TILE_ORDERS, tile_order_override

from .cli_args import (DTYPES, add_device_argument, add_output_arguments, add_timing_arguments, bounded_int,
                       default_device)
from .flops import FLOP_CONVENTION, PASSES, attention_flops
from .inputs import random_inputs
from .results import TIMING_FIELDS, device_name, error_reason, timing_record, write_result
from .timing import measure_interleaved, measure_ms, synchronize

OUR_IMPLS = ("triton", "torch", "naive")
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
IMPLS = OUR_IMPLS + tuple(SDPA_BACKENDS)
NAIVE_MEMORY_FRACTION = 0.4  # of free GPU memory (or of 8 GiB on a CPU) the naive scores may take
# what an implementation that cannot run a config raises (the config is skipped with the reason)
RUN_ERRORS = (RuntimeError, ValueError, NotImplementedError)
QUADRATIC_MEMORY = ("naive", "sdpa-math")  # hold [B, H, S, S] scores
MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}  # n of the n x n x n matmul whose rate is the reference


@dataclass(frozen=True)
class KernelConfig:
    dtype: str
    head_dim: int
    seqlen: int
    causal: bool
    batch: int
    heads: int
    kv_heads: int

    def label(self) -> str:
        return (f"{self.dtype} b{self.batch} s{self.seqlen} h{self.heads}/{self.kv_heads} d{self.head_dim} "
                f"{'causal' if self.causal else 'full'}")


def attention_call(impl: str, config: KernelConfig, q, k, v):
    """A zero-argument function computing the attention output with ``impl``."""
    if impl in SDPA_BACKENDS:
        gqa = config.kv_heads != config.heads

        def run():
            with sdpa_kernel(SDPA_BACKENDS[impl]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=config.causal, enable_gqa=gqa)
        return run
    return lambda: local_attention(q, k, v, config.causal, backend=impl)


def triton_variant(order: str) -> str:
    """The name under which the triton kernels handing out their tiles ``order`` are timed:
    ``triton`` by the rule, ``triton:by-head`` or ``triton:across-heads`` forced."""
    return "triton" if order == "rule" else f"triton:{order}"


def pass_call(pass_: str, impl: str, config: KernelConfig, device: torch.device, seed: int):
    """A zero-argument function doing ``pass_`` ("fwd", "bwd" or "fwd+bwd") with ``impl``
    (a ``triton_variant`` launches every kernel, the backward's too, in its tile order).
    For "bwd" the forward runs once here, and each call is one backward through its graph."""
    backend, _, order = impl.partition(":")
    if not order:
        return _pass_call(pass_, backend, config, device, seed)
    with tile_order_override(order):  # a "bwd" call's setup runs the forward
        run = _pass_call(pass_, backend, config, device, seed)

    def in_order():
        with tile_order_override(order):
            return run()
    return in_order


def _pass_call(pass_: str, impl: str, config: KernelConfig, device: torch.device, seed: int):
    q, k, v, dout = random_inputs(config.batch, config.seqlen, config.heads, config.kv_heads, config.head_dim,
                                  DTYPES[config.dtype], device, seed, heads_first=impl in SDPA_BACKENDS)
    call = attention_call(impl, config, q, k, v)
    if pass_ == "fwd":
        def forward():
            with torch.no_grad():
                return call()
        return forward
    for tensor in (q, k, v):
        tensor.requires_grad_(True)
    if pass_ == "bwd":
        out = call()
        return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    return lambda: torch.autograd.grad(call(), (q, k, v), dout)


def naive_too_large(config: KernelConfig, device: torch.device) -> str | None:
    """Why the naive backend is skipped for this config (its ``[B, H, S, S]`` float32
    scores, probabilities and their gradients would not fit), or None."""
    need = 3 * config.batch * config.heads * config.seqlen ** 2 * 4
    budget = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 * 2 ** 30) * NAIVE_MEMORY_FRACTION
    if need > budget:
        return f"naive attention would need ~{need / 2 ** 30:.1f} GiB for its scores (budget {budget / 2 ** 30:.1f})"
    return None


def default_configs(device: torch.device, args) -> list[KernelConfig]:
    """The grid: the command line's values, or small CPU / realistic GPU defaults."""
    gpu = device.type == "cuda"
    seqlens = args.seqlen or ([1024, 2048, 4096, 8192, 16384] if gpu else [256, 512, 1024, 2048])
    head_dims = args.head_dim or ([64, 128] if gpu else [64])
    dtypes = args.dtype or (["bf16", "fp16"] if gpu else ["fp32"])
    causals = [args.causal] if args.causal is not None else [False, True]
    configs = []
    for dtype, head_dim, seqlen, causal in itertools.product(dtypes, head_dims, seqlens, causals):
        heads = args.heads or (max(1, 2048 // head_dim) if gpu else 4)
        batch = args.batch or (max(1, 16384 // seqlen) if gpu else 1)
        kv_heads = args.kv_heads or heads
        if heads % kv_heads:
            raise SystemExit(f"--heads {heads} must be a multiple of --kv-heads {kv_heads}")
        configs.append(KernelConfig(dtype, head_dim, seqlen, causal, batch, heads, kv_heads))
    return configs


def default_impls(device: torch.device, requested: list[str] | None,
                  tile_orders: list[str]) -> tuple[list[str], list[str]]:
    """The implementations to time (triton once per tile order, ``triton_variant``; the
    orders without repeats) and a note for each one left out."""
    notes = []
    if requested:
        impls = list(dict.fromkeys(requested))
    else:
        impls = list(IMPLS)
        if device.type != "cuda":
            impls.remove("triton")
            notes.append("triton: left out on a CPU (it would run in the Triton interpreter; pass --impl triton "
                         "to time that anyway)")
            for impl in ("sdpa-efficient", "sdpa-cudnn"):
                impls.remove(impl)
            notes.append("sdpa-efficient, sdpa-cudnn: PyTorch has no CPU kernel for these")
    if "triton" in impls and device.type != "cuda" and not interpreter_active():
        impls.remove("triton")
        notes.append("triton: needs a CUDA device or TRITON_INTERPRET=1")
    if "triton" not in impls and tile_orders != ["rule"]:
        notes.append("--tile-order: applies to triton, which is not timed here")
    if "triton" in impls:
        at = impls.index("triton")
        impls[at:at + 1] = [triton_variant(order) for order in tile_orders]
    return impls, notes


def _case(record: dict) -> tuple:
    """The config and pass a timing record is of."""
    return tuple(record[field] for field in ("dtype", "head_dim", "seqlen", "causal", "batch", "heads", "kv_heads",
                                             "pass"))


def _speedups(records: list[dict]) -> None:
    """Add to each record ``speedup_vs_sdpa``: the best SDPA time on the same config and
    pass divided by this record's time (above 1: faster than every SDPA backend), and
    ``vs_sdpa`` with the ratio against each SDPA backend."""
    sdpa: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r["impl"] in SDPA_BACKENDS:
            sdpa.setdefault(_case(r), {})[r["impl"]] = r["ms"]
    for r in records:
        references = sdpa.get(_case(r), {})
        r["vs_sdpa"] = {name: ms / r["ms"] for name, ms in references.items()}
        r["speedup_vs_sdpa"] = min(references.values()) / r["ms"] if references else None


def headline(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per implementation and pass: the geometric mean of ``speedup_vs_sdpa`` over configs."""
    table: dict[str, dict[str, list[float]]] = {}
    for r in records:
        if r["speedup_vs_sdpa"] is not None:
            table.setdefault(r["impl"], {}).setdefault(r["pass"], []).append(r["speedup_vs_sdpa"])
    return {impl: {p: statistics.geometric_mean(v) for p, v in passes.items()} for impl, passes in table.items()}


def tile_order_ratios(records: list[dict], variants: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per triton variant after the first and pass: its time over the first variant's on
    the same config, ``{"geomean", "min", "max"}`` over the configs both timed."""
    first = {_case(r): r["ms"] for r in records if r["impl"] == variants[0]}
    table: dict[str, dict[str, list[float]]] = {}
    for r in records:
        if r["impl"] in variants[1:] and _case(r) in first:
            table.setdefault(r["impl"], {}).setdefault(r["pass"], []).append(r["ms"] / first[_case(r)])
    return {impl: {p: dict(geomean=statistics.geometric_mean(v), min=min(v), max=max(v))
                   for p, v in passes.items()} for impl, passes in table.items()}


def compile_triton(configs: list[KernelConfig], passes: list[str], variants: list[str], device: torch.device,
                   seed: int) -> dict:
    """Run every triton kernel the grid needs once per variant (tile order), on its
    smallest sequence length per (dtype, head dim, causal, heads): ``{"seconds": total,
    "groups": [{..., "seconds"}]}``, the time of that first call (compilation, or loading
    Triton's cache), and ``error`` where it failed."""
    groups, started = [], time.perf_counter()
    firsts = {}
    for config in configs:
        key = (config.dtype, config.head_dim, config.causal, config.heads, config.kv_heads)
        if key not in firsts or config.seqlen < firsts[key].seqlen:
            firsts[key] = config
    backward = any(p != "fwd" for p in passes)
    for variant, config in itertools.product(variants, firsts.values()):
        begin = time.perf_counter()
        group = dict(impl=variant, dtype=config.dtype, head_dim=config.head_dim, causal=config.causal,
                     heads=config.heads)
        try:
            pass_call("fwd+bwd" if backward else "fwd", variant, config, device, seed)()
            synchronize(device)
        except Exception as error:  # a compile error: timing that config reports it again, as a skip
            group["error"] = error_reason(error)
        groups.append(dict(group, seconds=time.perf_counter() - begin))
    return dict(seconds=time.perf_counter() - started, groups=groups)


def matmul_tflops(dtype: str, device: torch.device, warmup: int, repeats: int) -> float:
    """The device's rate, TFLOP/s, on an ``n x n`` by ``n x n`` matmul of ``dtype``
    (n = 8192 on a GPU, 1024 on a CPU), median of ``repeats``."""
    n = MATMUL_SIZE[device.type]
    a, b = (torch.randn(n, n, device=device, dtype=DTYPES[dtype]) for _ in range(2))
    timing = measure_ms(lambda: a @ b, device, max(warmup, 1), repeats)
    return 2 * n ** 3 / (timing["ms"] * 1e-3) / 1e12


def median_by_impl(records: list[dict], field: str) -> dict[str, dict[str, float]]:
    """Per implementation and pass: the median over configs of the records' ``field``
    (``of_matmul``: TFLOP/s / the matmul rate; ``host_ms``: the host's time per call)."""
    table: dict[str, dict[str, list[float]]] = {}
    for r in records:
        table.setdefault(r["impl"], {}).setdefault(r["pass"], []).append(r[field])
    return {impl: {p: statistics.median(v) for p, v in passes.items()} for impl, passes in table.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--impl", action="append", choices=IMPLS,
                        help="implementation to time, repeatable (default: all that run here; triton only on a GPU)")
    parser.add_argument("--pass", dest="passes", action="append", choices=PASSES,
                        help="pass, repeatable (default: all three)")
    parser.add_argument("--seqlen", type=bounded_int(1), nargs="+",
                        help="sequence lengths of q and k (default: 1024 to 16384 on a GPU, 256 to 2048 on a CPU)")
    parser.add_argument("--head-dim", type=bounded_int(1, 256), nargs="+",
                        help="head dims (default: 64 128 on a GPU, 64 on a CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+",
                        help="dtypes (default: bf16 fp16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                        help="only causal (--causal) or only full (--no-causal) attention (default: both)")
    parser.add_argument("--batch", type=bounded_int(1),
                        help="batch (default: 16K tokens per call on a GPU, 1 on a CPU)")
    parser.add_argument("--heads", type=bounded_int(1), help="query heads (default: 2048 / head dim on a GPU, 4)")
    parser.add_argument("--kv-heads", type=bounded_int(1), help="K/V heads (default: as many as query heads)")
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--tile-order", choices=TILE_ORDERS, nargs="+", default=["rule"],
                        help="how the triton kernels hand out their tiles: by the rule of usp.kernels.triton_common."
                             "tiles_across_heads, or forced head after head or across heads for every launch; with "
                             "several, triton is timed once per order, interleaved, and each order's time is given "
                             "over the first's (default: rule)")
    add_timing_arguments(parser, warmup=1, repeats=5)
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    device = default_device(args.device)
    tile_orders = list(dict.fromkeys(args.tile_order))
    impls, notes = default_impls(device, args.impl, tile_orders)
    for note in notes:
        print(f"note: {note}")
    if not impls:
        print("no implementation to time", file=sys.stderr)
        return 2
    passes = args.passes or list(PASSES)
    configs = default_configs(device, args)
    where = device_name(device)
    clock = ("CUDA events, each call behind a GPU sleep that hides its host work" if device.type == "cuda"
             else "wall clock") + ", implementations interleaved"
    print(f"kernels: {len(configs)} configs x {len(impls)} implementations x {len(passes)} passes on {where} "
          f"({clock}, median of {args.repeats} after {args.warmup} warm-up); FLOPs: {FLOP_CONVENTION}")
    compiled, matmul, records, skipped, done = None, {}, [], [], 0
    variants = [impl for impl in impls if impl.partition(":")[0] == "triton"]
    try:
        if variants:
            compiled = compile_triton(configs, passes, variants, device, args.seed)
            failed = [g for g in compiled["groups"] if "error" in g]
            print(f"compiled the triton kernels of {len(compiled['groups'])} (tile order, dtype, head dim, causal, "
                  f"heads) configurations in {compiled['seconds']:.1f} s (first calls; Triton's cache is reused when "
                  "warm)" + "".join(f"; {g['impl']} d{g['head_dim']} {g['dtype']} failed: {g['error']}"
                                    for g in failed), flush=True)
        for dtype in dict.fromkeys(c.dtype for c in configs):
            matmul[dtype] = matmul_tflops(dtype, device, args.warmup, args.repeats)
        print("matmul rate: " + ", ".join(f"{dtype} {rate:.1f} TFLOP/s" for dtype, rate in matmul.items())
              + f" ({MATMUL_SIZE[device.type]}^3)", flush=True)
        for config in configs:
            config_records = _time_config(config, impls, passes, device, where, args, skipped)
            for record in config_records:
                record["of_matmul"] = record["tflops"] / matmul[config.dtype]
            records += config_records
            done += 1
            _print_config(done, len(configs), config, config_records, impls, skipped, device.type == "cuda")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        print(f"interrupted after {done} of {len(configs)} configs: writing what was measured", file=sys.stderr)
    summary = headline(records)
    of_matmul = median_by_impl(records, "of_matmul")
    host_ms = median_by_impl(records, "host_ms") if device.type == "cuda" else None
    for impl, ratios in summary.items():
        if impl not in SDPA_BACKENDS:
            print(f"headline {impl}: " + ", ".join(f"{p} {ratio:.2f}x" for p, ratio in ratios.items())
                  + " the fastest SDPA backend (geometric mean over configs; above 1 is faster)")
    for impl, fractions in of_matmul.items():
        print(f"of the matmul rate, {impl}: " + ", ".join(f"{p} {f:.2f}" for p, f in fractions.items())
              + " (median over configs)")
    for impl, times in (host_ms or {}).items():  # what a call costs when the GPU waits for the host
        print(f"host time per call, {impl}: " + ", ".join(f"{p} {ms:.3f} ms" for p, ms in times.items())
              + " (median over configs)")
    orders = tile_order_ratios(records, variants) if len(variants) > 1 else None
    for impl, ratios in (orders or {}).items():
        print(f"tile order, {impl} over {variants[0]}: "
              + ", ".join(f"{p} {r['geomean']:.3f}x ({r['min']:.3f} to {r['max']:.3f})" for p, r in ratios.items())
              + " the time (geometric mean over configs, range; below 1 is faster)")
    path = write_result("kernels", device, dict(
        flop_convention=FLOP_CONVENTION, timing_fields=list(TIMING_FIELDS),
        config=dict(impls=impls, passes=passes, warmup=args.warmup, repeats=args.repeats, seed=args.seed,
                    timing=clock, tile_orders=tile_orders, grid=[asdict(c) for c in configs]),
        summary=dict(speedup_vs_fastest_sdpa=summary, skipped=len(skipped), configs_done=done,
                     interrupted=done < len(configs), matmul_tflops=matmul, matmul_size=MATMUL_SIZE[device.type],
                     of_matmul=of_matmul, host_ms=host_ms, compile=compiled, tile_order_over_first=orders),
        records=records, skipped=skipped), args.out_dir)
    print(f"{len(records)} timings, {len(skipped)} skipped; wrote {path}")
    if done < len(configs):
        return 130
    return 0 if records else 1


def _time_together(pairs: list[tuple[str, str]], config: KernelConfig, device: torch.device, args) -> dict:
    """The (implementation, pass) ``pairs`` timed interleaved (``measure_interleaved``):
    ``{pair: timing}``, or the reason a pair cannot run. Their inputs live until it returns."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the naive budget reads the free memory
    calls, outcomes = {}, {}
    for impl, pass_ in pairs:
        reason = naive_too_large(config, device) if impl == "naive" else None
        if reason is None:
            try:  # a backward's setup runs the forward once: it can fail here already
                calls[impl, pass_] = pass_call(pass_, impl, config, device, args.seed)
            except RUN_ERRORS as error:
                reason = error_reason(error, with_type=False)
        if reason is not None:
            outcomes[impl, pass_] = reason
    for pair, timing in measure_interleaved(calls, device, args.warmup, args.repeats, errors=RUN_ERRORS).items():
        outcomes[pair] = error_reason(timing, with_type=False) if isinstance(timing, Exception) else timing
    return outcomes


def _time_config(config: KernelConfig, impls: list[str], passes: list[str], device: torch.device, where: str, args,
                 skipped: list[dict]) -> list[dict]:
    """Every implementation and pass on one config; what cannot run is added to ``skipped``.
    They are timed interleaved, except the two that hold ``[B, H, S, S]`` scores (naive,
    sdpa-math), timed after, each alone, so that no two of those are in memory at once."""
    pairs = list(itertools.product(impls, passes))
    outcomes = _time_together([p for p in pairs if p[0] not in QUADRATIC_MEMORY], config, device, args)
    for pair in pairs:
        if pair[0] in QUADRATIC_MEMORY:
            outcomes.update(_time_together([pair], config, device, args))
    records = []
    for (impl, pass_), timing in ((pair, outcomes[pair]) for pair in pairs):
        if isinstance(timing, str):
            skipped.append(dict(impl=impl, config=config.label(), reason=timing))
            continue
        flops = attention_flops(config.batch, config.heads, config.seqlen, config.seqlen, config.head_dim,
                                config.causal, pass_)
        records.append(timing_record(where, impl, pass_, config.dtype, config.causal, config.batch, config.seqlen,
                                     config.heads, config.kv_heads, config.head_dim, timing["ms"], flops,
                                     **{k: v for k, v in timing.items() if k != "ms"}))
    _speedups(records)
    return records


def _print_config(index: int, total: int, config: KernelConfig, records: list[dict], impls: list[str],
                  skipped: list[dict], show_host: bool) -> None:
    print(f"[{index:>3}/{total}] {config.label()}", flush=True)
    for impl in impls:
        mine = {r["pass"]: r for r in records if r["impl"] == impl}
        if not mine:
            reasons = {s["reason"] for s in skipped if s["impl"] == impl and s["config"] == config.label()}
            print(f"        {impl:<21}skipped: {'; '.join(sorted(reasons))}", flush=True)
            continue
        cells = []
        for pass_, r in mine.items():
            ratio = f" {r['speedup_vs_sdpa']:.2f}x" if r["speedup_vs_sdpa"] is not None else ""
            host = f" (host {r['host_ms']:.3f})" if show_host else ""
            cells.append(f"{pass_} {r['ms']:9.3f} ms{host} {r['tflops']:8.3f} TF/s{ratio}")
        print(f"        {impl:<21}" + "   ".join(cells), flush=True)
