"""``usp-bench scaling``: ring, Ulysses and USP attention on N processes, for every
mesh ``u x r = N``, over global sequence lengths, forward and forward+backward.

Without ``torchrun`` it launches N local processes on a gloo group (one CPU thread
each). Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) every process is one rank of an
NCCL group on its GPU (gloo without CUDA), and rank 0 writes the result file.

Per case and rank it records the time (median over repeats of the slowest rank's
barrier-to-finish time), TFLOP/s per rank (the whole call's FLOPs / N), the bytes it
sent, the time it spent waiting on communication (ring waits and all-to-alls), the
compute time, and how well the ring's transfers hid behind compute: ``overlap`` is
sum over steps of max(step compute, the same transfer timed alone) divided by the
measured time of the ring loop (1 = fully hidden; above 1 when the transfer timed
alone was slower than inside the loop, which happens at small, noisy sizes). Peak memory is the GPU's peak
allocation for the case, or on a CPU the process's peak resident set so far. One traced
call per case also yields a timeline of compute, transfers and waits per ring step.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from usp.attention import shard_sequence, usp_attention
from usp.attention.layout import check_global_seqlen
from usp.comm import RingComm, init_mesh, record_traffic
from usp.comm.traffic import CudaClock, HostClock

from .cli_args import (DTYPES, add_output_arguments, add_timing_arguments, bounded_int, positive_float,
                       world_size_type)
from .dist_checks import sp_impl_name, sp_method
from .flops import FLOP_CONVENTION, attention_flops
from .inputs import random_inputs
from .launch import run as launch_run
from .results import TIMING_FIELDS, device_name, timing_record, write_result

SCALING_PASSES = ("fwd", "fwd+bwd")
# The ring loops' event labels (see attention.ring): compute spans and the waits of each pass.
RING_LOOPS = {"forward": ({"forward"}, {"kv forward"}),
              "backward": ({"backward", "backward accumulate"}, {"kv backward", "dkv backward"})}


@dataclass(frozen=True)
class Settings:
    """What every rank runs (picklable, sent to the spawned processes)."""

    meshes: tuple
    seqlens: tuple
    passes: tuple
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    backend: str
    layout: str
    causal: bool
    placement: str
    warmup: int
    repeats: int
    seed: int


def mesh_options(world_size: int, heads: int, kv_heads: int, requested=None) -> tuple[list, list[str]]:
    """The ``(u, r)`` meshes with ``u x r = world_size`` that these heads allow, and why others are left out."""
    meshes, notes = [], []
    candidates = requested or [(u, world_size // u) for u in range(1, world_size + 1) if world_size % u == 0]
    for u, r in candidates:
        if u * r != world_size:
            notes.append(f"u{u}r{r}: u x r must equal the world size {world_size}")
        elif heads % u:
            notes.append(f"u{u}r{r}: {heads} query heads cannot be split over {u} Ulysses ranks")
        elif kv_heads % u and u % kv_heads:
            notes.append(f"u{u}r{r}: {kv_heads} K/V heads are neither a multiple nor a divisor of u = {u}")
        else:
            meshes.append((u, r))
    return meshes, notes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(fn, device) -> float:
    """Barrier, then the wall-clock milliseconds until this rank's call has finished."""
    dist.barrier()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "gpu_peak_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"


def _transfer_alone_ms(tensors: list[torch.Tensor], comm: RingComm, device, repeats: int) -> float:
    """Milliseconds per ring step of rotating ``tensors`` around the ring with no compute."""
    def rotate():
        for _ in comm.rotate(tensors, label="probe"):
            pass
    rotate()
    return statistics.median(_timed_ms(rotate, device) for _ in range(repeats)) / (comm.size - 1)


def ring_overlap(events: list, ring_size: int, transfer_ms: dict[str, float]) -> dict:
    """Per ring loop (forward, backward) of one traced call: the measured loop time, the
    compute, the waits, and ``overlap`` = sum_s max(compute_s, transfer alone) / measured."""
    result = {}
    for loop, (compute_labels, wait_labels) in RING_LOOPS.items():
        mine = [e for e in events if (e.kind == "compute" and e.label in compute_labels)
                or (e.kind == "wait" and e.label in wait_labels)]
        if not mine or ring_size == 1 or loop not in transfer_ms:
            continue
        measured = (max(e.end for e in mine) - min(e.start for e in mine)) * 1e3
        compute = [0.0] * ring_size
        for e in mine:
            if e.kind == "compute":
                compute[e.step] += (e.end - e.start) * 1e3
        transfer = transfer_ms[loop]
        # forward: the last step receives nothing; backward: every step also passes an accumulator on
        ideal = sum(max(c, transfer if (s < ring_size - 1 or loop == "backward") else 0.0)
                    for s, c in enumerate(compute))
        waits = sum((e.end - e.start) * 1e3 for e in mine if e.kind == "wait")
        result[loop] = dict(measured_ms=measured, compute_ms=sum(compute), wait_ms=waits,
                            transfer_alone_ms_per_step=transfer, ideal_ms=ideal,
                            overlap=ideal / measured if measured > 0 else None)
    return result


def _timeline(events: list) -> list[dict]:
    return [dict(kind=e.kind, label=e.label, step=e.step, bytes=e.bytes_sent, start_ms=e.start * 1e3,
                 end_ms=None if e.end is None else e.end * 1e3) for e in events]


def _measure(settings: Settings, mesh, seqlen: int, pass_: str, device: torch.device) -> dict:
    """This rank's figures for one case."""
    inputs = random_inputs(settings.batch, seqlen, settings.heads, settings.kv_heads, settings.head_dim,
                           DTYPES[settings.dtype], device, settings.seed + seqlen)
    q, k, v, dout = (shard_sequence(x, mesh, layout=settings.layout) for x in inputs)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    call = lambda q_, k_, v_: usp_attention(q_, k_, v_, mesh, settings.causal, None, settings.layout,
                                            settings.backend, check_ranks=False)
    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                call(q, k, v)
    else:
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]

        def fn():
            torch.autograd.grad(call(*leaves), leaves, dout)
    for _ in range(settings.warmup):
        _timed_ms(fn, device)
    times = [_timed_ms(fn, device) for _ in range(settings.repeats)]
    dist.barrier()
    with record_traffic(CudaClock() if device.type == "cuda" else HostClock()) as log:
        fn()
        _sync(device)
    events = log.timeline()
    peak, peak_kind = _peak_memory(device)
    transfer = {}
    if mesh.ring_degree > 1:
        comm = RingComm(mesh.ring_group)
        kv_heads = max(settings.kv_heads // mesh.ulysses_degree, 1)
        block = torch.empty(settings.batch, seqlen // mesh.ring_degree, kv_heads, settings.head_dim, device=device,
                            dtype=DTYPES[settings.dtype])
        transfer["forward"] = _transfer_alone_ms([block, block], comm, device, settings.repeats)
        if pass_ == "fwd+bwd":
            accumulator = block.float() if block.element_size() < 4 else block
            transfer["backward"] = _transfer_alone_ms([block, block, accumulator, accumulator], comm, device,
                                                      settings.repeats)
    span_ms = lambda kinds: sum((e.end - e.start) * 1e3 for e in events if e.kind in kinds and e.end is not None)
    return dict(times_ms=times, bytes_sent=log.bytes_sent(), p2p_bytes=log.bytes_sent("p2p"),
                all_to_all_bytes=log.bytes_sent("all_to_all"), compute_ms=span_ms({"compute"}),
                comm_wait_ms=span_ms({"wait", "all_to_all"}), ring=ring_overlap(events, mesh.ring_degree, transfer),
                peak_memory_bytes=peak, peak_memory_kind=peak_kind, timeline=_timeline(events))


def rank_main(settings: Settings) -> list[dict]:
    """Run every case on this rank (all ranks create the meshes in the same order)."""
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    rank = dist.get_rank()
    results = []
    total = len(settings.meshes) * len(settings.seqlens) * len(settings.passes)
    for u, r in settings.meshes:
        mesh = init_mesh(u, r, settings.placement)
        for seqlen in settings.seqlens:
            for pass_ in settings.passes:
                figures = _measure(settings, mesh, seqlen, pass_, device)
                results.append(dict(ulysses_degree=u, ring_degree=r, seqlen=seqlen, pass_=pass_, **figures))
                if rank == 0:
                    impl = sp_impl_name(sp_method(u, r), u, r, settings.layout)
                    print(f"[{len(results):>3}/{total}] {impl:<22} s{seqlen:<7} {pass_:<8} rank 0: "
                          f"{statistics.median(figures['times_ms']):9.2f} ms, waited {figures['comm_wait_ms']:8.2f} ms,"
                          f" sent {figures['bytes_sent'] / 2 ** 20:8.2f} MiB", flush=True)
    return results


def combine(settings: Settings, per_rank: list[list[dict]], device: str, world_size: int) -> list[dict]:
    """One timing record per case from every rank's figures: ``ms`` is the median over
    repeats of the slowest rank's time; ``ranks`` holds each rank's own figures."""
    records = []
    for cases in zip(*per_rank):
        first = cases[0]
        u, r, seqlen, pass_ = first["ulysses_degree"], first["ring_degree"], first["seqlen"], first["pass_"]
        ms = statistics.median(max(times) for times in zip(*(c["times_ms"] for c in cases)))
        flops = attention_flops(settings.batch, settings.heads, seqlen, seqlen, settings.head_dim, settings.causal,
                                pass_)
        ranks = [{key: value for key, value in c.items() if key not in ("ulysses_degree", "ring_degree", "seqlen",
                                                                         "pass_")} for c in cases]
        for rank_figures in ranks:
            rank_figures["ms"] = statistics.median(rank_figures["times_ms"])
            rank_figures["tflops"] = flops / world_size / (rank_figures["ms"] * 1e-3) / 1e12
        records.append(timing_record(
            device, sp_impl_name(sp_method(u, r), u, r, settings.layout), pass_, settings.dtype, settings.causal,
            settings.batch, seqlen, settings.heads, settings.kv_heads, settings.head_dim, ms, flops / world_size,
            total_flops=flops, tflops_convention="per rank: the call's FLOPs / world size / ms",
            world_size=world_size, ulysses_degree=u, ring_degree=r, placement=settings.placement,
            layout=settings.layout, backend=settings.backend, tokens_per_s=settings.batch * seqlen / (ms * 1e-3),
            bytes_sent_per_rank=max(c["bytes_sent"] for c in ranks),
            comm_wait_ms_max=max(c["comm_wait_ms"] for c in ranks),
            peak_memory_bytes_max=max(c["peak_memory_bytes"] for c in ranks), ranks=ranks))
    return records


def _mesh_type(text: str) -> tuple[int, int]:
    try:
        u, r = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a mesh like 2x4 (ulysses x ring), got {text!r}") from None
    if u < 1 or r < 1:
        raise argparse.ArgumentTypeError(f"degrees must be at least 1, got {text!r}")
    return u, r


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--world-size", type=world_size_type, default=4,
                        help="processes to launch (default 4; under torchrun its WORLD_SIZE is used)")
    parser.add_argument("--mesh", type=_mesh_type, nargs="+", help="only these meshes, e.g. 1x4 2x2 (default: all)")
    parser.add_argument("--seqlen", type=bounded_int(2), nargs="+",
                        help="global sequence lengths (default: 512 to 4096 on CPU, 16K 32K 64K on GPU)")
    parser.add_argument("--pass", dest="passes", action="append", choices=SCALING_PASSES,
                        help="pass (repeatable; default both)")
    parser.add_argument("--batch", type=bounded_int(1), default=1, help="batch (default 1)")
    parser.add_argument("--heads", type=bounded_int(1), default=32 if gpu else 8, help="query heads")
    parser.add_argument("--kv-heads", type=bounded_int(1), default=8, help="K/V heads (default 8)")
    parser.add_argument("--head-dim", type=bounded_int(1, 256), default=128 if gpu else 64, help="head dim")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if gpu else "fp32", help="dtype")
    parser.add_argument("--backend", choices=["triton", "torch", "naive"], default="triton" if gpu else "torch",
                        help="local attention backend (default: triton on GPU, torch on CPU)")
    parser.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag", help="ring layout")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal (default)")
    parser.add_argument("--placement", choices=["ulysses_inner", "ring_inner"], default="ulysses_inner",
                        help="which axis gets contiguous ranks (default: Ulysses)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--timeout", type=positive_float, default=1800.0,
                        help="seconds before a launched run is killed (default 1800)")
    add_timing_arguments(parser, warmup=1, repeats=3)
    add_output_arguments(parser)


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def run(args: argparse.Namespace) -> int:
    torchrun = _under_torchrun()
    world_size = int(os.environ["WORLD_SIZE"]) if torchrun else args.world_size
    gpu = torchrun and torch.cuda.is_available()
    meshes, notes = mesh_options(world_size, args.heads, args.kv_heads, args.mesh)
    seqlens = args.seqlen or ([16384, 32768, 65536] if gpu else [512, 1024, 2048, 4096])
    for seqlen in seqlens:
        for u, r in meshes:
            try:
                check_global_seqlen(seqlen, u, r, args.layout)
            except ValueError as error:
                raise SystemExit(f"--seqlen {seqlen}: {error}") from None
    settings = Settings(tuple(meshes), tuple(seqlens), tuple(args.passes or SCALING_PASSES), args.batch, args.heads,
                        args.kv_heads, args.head_dim, args.dtype, args.backend, args.layout, args.causal,
                        args.placement, args.warmup, args.repeats, args.seed)
    if torchrun:
        return _run_under_torchrun(settings, notes, args)
    for note in notes:
        print(f"note: {note}")
    if not meshes:
        print("no mesh to run", file=sys.stderr)
        return 2
    print(f"scaling: {world_size} gloo processes (one CPU thread each), meshes "
          f"{', '.join(f'u{u}r{r}' for u, r in meshes)}, seqlens {list(seqlens)}, {args.backend} {args.dtype}; "
          f"median of {args.repeats} after {args.warmup} warm-up")
    per_rank = launch_run(world_size, rank_main, (settings,), pg_timeout_s=min(args.timeout, 300.0),
                          timeout_s=args.timeout)
    return _report(settings, per_rank, torch.device("cpu"), world_size, "gloo", notes, args)


def _run_under_torchrun(settings: Settings, notes: list[str], args) -> int:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=min(args.timeout, 600.0)))
    try:
        rank = dist.get_rank()
        if rank == 0:
            for note in notes:
                print(f"note: {note}")
        mine = rank_main(settings)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        if rank == 0:
            return _report(settings, gathered, device, dist.get_world_size(), backend, notes, args)
        return 0
    finally:
        dist.destroy_process_group()


def _report(settings: Settings, per_rank, device: torch.device, world_size: int, backend: str, notes, args) -> int:
    records = combine(settings, per_rank, device_name(device), world_size)
    print(f"{'impl':<22}{'seqlen':>8} {'pass':<8}{'ms':>10}{'TF/s/rank':>11}{'MiB sent':>10}{'wait ms':>9}"
          f"{'overlap':>9}{'peak MiB':>10}")
    for r in records:
        overlaps = [loop["overlap"] for rank in r["ranks"] for loop in rank["ring"].values()
                    if loop["overlap"] is not None]
        overlap = f"{min(overlaps):9.2f}" if overlaps else f"{'-':>9}"
        print(f"{r['impl']:<22}{r['seqlen']:>8} {r['pass']:<8}{r['ms']:10.2f}{r['tflops']:11.4f}"
              f"{r['bytes_sent_per_rank'] / 2 ** 20:10.2f}{r['comm_wait_ms_max']:9.2f}{overlap}"
              f"{r['peak_memory_bytes_max'] / 2 ** 20:10.1f}")
    path = write_result("scaling", device, dict(
        flop_convention=FLOP_CONVENTION, timing_fields=list(TIMING_FIELDS),
        config=dict(asdict(settings), world_size=world_size, process_group=backend,
                    timing="median over repeats of the slowest rank's barrier-to-finish wall clock",
                    overlap="sum over ring steps of max(step compute, transfer timed alone) / measured ring loop time",
                    peak_memory=("GPU peak allocation per case" if device.type == "cuda" else
                                 "process peak resident set so far (a high-water mark, not per case)"),
                    notes=notes),
        records=records), args.out_dir)
    print(f"{len(records)} cases; wrote {path}")
    return 0
