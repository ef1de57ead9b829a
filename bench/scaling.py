"""``usp-bench scaling``: ring, Ulysses and USP attention on N processes, for each world
size N and every mesh u x r = N, over global sequence lengths, forward and
forward+backward.

Without torchrun it launches, for each --world-size, N local processes on a gloo group
(one CPU thread each). Under torchrun (RANK and WORLD_SIZE set) every process is one
rank of an NCCL group on its GPU (gloo without CUDA), and rank 0 writes the result.
Several world sizes on the same global lengths give strong scaling (fixed length, more
ranks); lengths that grow with N give weak scaling (fixed tokens per rank).

Per case: ms, the median over repeats of the slowest rank's barrier-to-finish time
(the progress line and the table both show it); TFLOP/s per rank (the call's FLOPs /
N); and from one more, traced call per rank: its duration, the time it spent waiting on
communication (ring waits and all-to-alls, never more than the call), the compute time,
the bytes sent, the ring overlap (sum over steps of max(step compute, the same transfer
timed alone) / the measured ring loop; 1 = fully hidden, above 1 when the transfer timed
alone was slower than inside the loop, as happens at small, noisy sizes) and a timeline
of compute, transfers and waits per ring step. On a GPU also the peak memory of the case.
More processes than cores make the figures a test of the pipeline, not of performance:
the result says so (oversubscribed).

References (``--reference``, default: every one installed; ``bench/references.py``):
other projects' implementations of the same mesh, timed on the same inputs with their
repeats interleaved with ours, written as ``references`` beside the records: their time,
ours over theirs (on the same mesh, and for each of our meshes at the same N), the
largest difference from our output and gradients, and the largest error of theirs and
of ours against float64 attention of the whole case (``bench/oracle.py``, computed once
per length and shared out between the ranks), and ours estimated with compute alone
(``combine``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from usp.attention import shard_sequence, usp_attention
from usp.attention.allgather import SCHEDULES
from usp.attention.layout import LAYOUTS, check_global_seqlen
from usp.comm import PLACEMENTS, RingComm, init_mesh, mesh_shapes, record_traffic, traffic
from usp.comm.heads import heads_problem, kv_head_shares
from usp.comm.traffic import CudaClock, HostClock
from usp.kernels import BACKENDS
from usp.kernels.checks import resolve_window

from .balance import document_offsets, documents_type, rank_work
from .cli_args import (DTYPES, add_output_arguments, add_timing_arguments, bounded_int, mesh_type,
                       positive_float, world_size_type)
from .flops import FLOP_CONVENTION, attention_flops, masked_attention_flops
from .inputs import random_inputs
from .launch import cores_available, under_torchrun
from .launch import join_torchrun_group
from .launch import run as launch_run
from .oracle import global_oracle
from .references import REFERENCES
from .results import TIMING_FIELDS, device_name, sp_impl_name, sp_method, timing_record, write_result
from .timing import synchronize

SCALING_PASSES = ("fwd", "fwd+bwd")
PROBE = "transfer alone"  # the label of the hops timed without compute


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
    references: tuple = ()  # (u, r, name, passes) of each reference to time on that mesh
    schedule: str = "ring"
    docs: dict | None = None  # a document-length mix (usp.bench.balance.parse_documents), packed per case
    window: int | None = None  # a sliding window of this many keys back

    def flops(self, seqlen: int, world_size: int, pass_: str) -> float:
        """The FLOPs of a case: dense by the convention, or those of its visible pairs."""
        if self.docs is None and self.window is None:
            return attention_flops(self.batch, self.heads, seqlen, seqlen, self.head_dim, self.causal, pass_)
        masking = self.masking(seqlen, world_size)
        window = resolve_window(self.causal, masking["window_size"])
        (pairs,) = rank_work(seqlen, 1, "contiguous", masking["cu_seqlens"], window)
        return masked_attention_flops(self.batch, self.heads, self.head_dim, pairs, pass_)

    def masking(self, seqlen: int, world_size: int) -> dict:
        """The keywords of a case's ``usp_attention`` call beyond the tensors: the schedule,
        the window and the documents' offsets (every length a multiple of 2 x world size,
        so that every mesh's zigzag can cut them, drawn with the case's seed)."""
        window = (-1, -1) if self.window is None else (self.window, 0 if self.causal else -1)
        offsets = None if self.docs is None else document_offsets(self.docs, seqlen, 2 * world_size,
                                                                   self.seed + seqlen)
        return dict(schedule=self.schedule, window_size=window, cu_seqlens=offsets)


def mesh_options(world_size: int, heads: int, kv_heads: int, requested=None) -> tuple[list, list[str]]:
    """The ``(u, r)`` meshes of ``world_size`` ranks that these heads allow (all of them,
    or those ``requested``), and why others are left out."""
    meshes, notes = [], []
    for u, r in requested or mesh_shapes(world_size):
        if u * r != world_size:
            notes.append(f"u{u}r{r}: not a mesh of {world_size} ranks")
            continue
        problem = heads_problem(heads, kv_heads, u)
        if problem:
            notes.append(f"u{u}r{r}: {problem}")
        else:
            meshes.append((u, r))
    return meshes, notes


def _timed_ms(fn, device) -> float:
    """Barrier, then the wall-clock milliseconds until this rank's call has finished."""
    dist.barrier()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _transfer_alone_ms(tensors: list[torch.Tensor], ring: RingComm, device, repeats: int) -> float:
    """Milliseconds of one ring hop of ``tensors`` with no compute (the median of ``repeats``)."""
    def hop():
        ring.send_recv(tensors, PROBE, 0).wait()
    hop()
    return statistics.median(_timed_ms(hop, device) for _ in range(repeats))


def ring_overlap(events: list, ring_size: int, transfer_ms: dict[str, float]) -> dict:
    """Per ring loop (forward, backward) of one traced call: the measured loop time, the
    compute, the waits, and ``overlap`` = sum_s max(compute_s, transfer alone) / measured."""
    result = {}
    for loop, (compute_labels, wait_labels) in traffic.RING_LOOPS.items():
        mine = [e for e in events if (e.kind == traffic.COMPUTE and e.label in compute_labels)
                or (e.kind == traffic.WAIT and e.label in wait_labels)]
        if not mine or ring_size == 1 or loop not in transfer_ms:
            continue
        measured = (max(e.end for e in mine) - min(e.start for e in mine)) * 1e3
        compute = [0.0] * ring_size
        for e in mine:
            if e.kind == traffic.COMPUTE:
                compute[e.step] += (e.end - e.start) * 1e3
        transfer = transfer_ms[loop]
        # forward: the last step receives nothing; backward: every step also passes an accumulator on
        ideal = sum(max(c, transfer if (s < ring_size - 1 or loop == "backward") else 0.0)
                    for s, c in enumerate(compute))
        waits = sum((e.end - e.start) * 1e3 for e in mine if e.kind == traffic.WAIT)
        result[loop] = dict(measured_ms=measured, compute_ms=sum(compute), wait_ms=waits,
                            transfer_alone_ms_per_step=transfer, ideal_ms=ideal,
                            overlap=ideal / measured if measured > 0 else None)
    return result


def _timeline(events: list) -> list[dict]:
    return [dict(kind=e.kind, label=e.label, step=e.step, bytes=e.bytes_sent, start_ms=e.start * 1e3,
                 end_ms=None if e.end is None else e.end * 1e3) for e in events]


def _runner(call, pass_: str, q, k, v, dout):
    """A function running one timed call: forward without autograd, or forward and backward."""
    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                return call(q, k, v)
        return fn
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]

    def fn():
        out = call(*leaves)
        return (out.detach(), *torch.autograd.grad(out, leaves, dout))
    return fn


def _max_difference(ours, theirs) -> float:
    """The largest absolute difference between two results (out, or out and gradients)."""
    pairs = zip(ours, theirs) if isinstance(ours, tuple) else [(ours, theirs)]
    return max((a.double() - b.double()).abs().max().item() for a, b in pairs)


def _inputs(settings: Settings, seqlen: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The global ``q, k, v, dout`` of a case, the same on every rank."""
    return random_inputs(settings.batch, seqlen, settings.heads, settings.kv_heads, settings.head_dim,
                         DTYPES[settings.dtype], device, settings.seed + seqlen)


def _max_error(result, oracle_shards) -> float:
    """The largest absolute difference from the float64 oracle (out, or out and gradients)."""
    return _max_difference(result, oracle_shards if isinstance(result, tuple) else oracle_shards[0])


def _measure(settings: Settings, mesh, seqlen: int, pass_: str, device: torch.device, references=(),
             oracle=None) -> dict:
    """This rank's figures for one case (and for each reference on it, timed interleaved,
    with its error and ours against the global float64 ``oracle``)."""
    masking = settings.masking(seqlen, dist.get_world_size())
    documents = masking["cu_seqlens"]
    q, k, v, dout = (shard_sequence(x, mesh, layout=settings.layout, cu_seqlens=documents)
                     for x in _inputs(settings, seqlen, device))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    call = lambda q_, k_, v_: usp_attention(q_, k_, v_, mesh, settings.causal, None, settings.layout,  # noqa: E731
                                            settings.backend, **masking)
    fn = _runner(call, pass_, q, k, v, dout)
    others = {name: _runner(REFERENCES[name].build(mesh, settings), pass_, q, k, v, dout) for name in references}
    for _ in range(settings.warmup):
        for runner in (fn, *others.values()):
            _timed_ms(runner, device)
    times, their_times = [], {name: [] for name in others}
    for repeat in range(settings.repeats):  # ours first on even repeats, last on odd ones
        if repeat % 2 == 0:
            times.append(_timed_ms(fn, device))
        for name, runner in others.items():
            their_times[name].append(_timed_ms(runner, device))
        if repeat % 2 == 1:
            times.append(_timed_ms(fn, device))
    compared = {}
    if others:  # one more call of each, only to compare the results
        truth = [shard_sequence(x, mesh, layout=settings.layout).to(device) for x in oracle]  # kept on the host
        ours = fn()
        our_error = _max_error(ours, truth)
        for name, runner in others.items():
            theirs = runner()
            compared[name] = dict(times_ms=their_times[name], max_abs_diff=_max_difference(ours, theirs),
                                  max_abs_error=_max_error(theirs, truth), usp_max_abs_error=our_error)
    dist.barrier()
    with record_traffic(CudaClock() if device.type == "cuda" else HostClock()) as log:
        fn()
        traced_ms = log.elapsed() * 1e3
    events = log.timeline()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    transfer = {}
    if mesh.ring_degree > 1 and settings.schedule == "ring":
        ring = RingComm(mesh.ring_group)
        kv_heads = kv_head_shares(settings.heads, settings.kv_heads, mesh.ulysses_degree)[mesh.ulysses_rank]
        block = torch.empty(settings.batch, seqlen // mesh.ring_degree, kv_heads, settings.head_dim, device=device,
                            dtype=DTYPES[settings.dtype])
        transfer["forward"] = _transfer_alone_ms([block, block], ring, device, settings.repeats)
        if pass_ == "fwd+bwd":
            accumulator = block.float() if block.element_size() < 4 else block
            transfer["backward"] = _transfer_alone_ms([block, block, accumulator, accumulator], ring, device,
                                                      settings.repeats)
    span_ms = lambda kinds: sum((e.end - e.start) * 1e3 for e in events  # noqa: E731
                                if e.kind in kinds and e.end is not None)
    return dict(times_ms=times, traced_ms=traced_ms, bytes_sent=log.bytes_sent(), p2p_bytes=log.bytes_sent(traffic.P2P),
                all_to_all_bytes=log.bytes_sent(traffic.ALL_TO_ALL), compute_ms=span_ms({traffic.COMPUTE}),
                comm_wait_ms=span_ms({traffic.WAIT, traffic.ALL_TO_ALL, traffic.ALL_GATHER, traffic.REDUCE_SCATTER}),
                ring=ring_overlap(events, mesh.ring_degree, transfer), peak_memory_bytes=peak,
                timeline=_timeline(events), references=compared)


def settings_impl(settings: Settings, u: int, r: int) -> str:
    """The implementation name of a mesh: its method and layout, and the schedule when not the ring."""
    return sp_impl_name(u, r, settings.layout) + ("" if settings.schedule == "ring" or r == 1 else
                                                  f"-{settings.schedule}")


def slowest_rank_ms(times_per_rank: list[list[float]]) -> float:
    """The median over repeats of the slowest rank's time: what the progress and the table show."""
    return statistics.median(max(times) for times in zip(*times_per_rank))


def _oracle(settings: Settings, seqlen: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The case's float64 out (and gradients, when a pass needs them), shared out between
    the ranks, with a progress line: it takes a while at long lengths. Kept in host
    memory, so that GPU peak memory stays the cases' own."""
    start = time.perf_counter()
    *inputs, dout = _inputs(settings, seqlen, device)
    oracle = [x.cpu() for x in global_oracle(*inputs, dout, settings.causal, grads="fwd+bwd" in settings.passes)]
    if dist.get_rank() == 0:
        print(f"      float64 oracle for s{seqlen} (to check each reference and ours): "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    return oracle


def rank_main(settings: Settings) -> list[dict]:
    """Run every case on this rank (all ranks create the meshes in the same order)."""
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = []
    total = len(settings.meshes) * len(settings.seqlens) * len(settings.passes)
    oracles = {}  # global float64 answers by seqlen, made once where a reference needs them
    for u, r in settings.meshes:
        mesh = init_mesh(u, r, settings.placement)
        on_mesh = [(name, passes) for mesh_u, mesh_r, name, passes in settings.references if (mesh_u, mesh_r) == (u, r)]
        for seqlen in settings.seqlens:
            if on_mesh and seqlen not in oracles:
                oracles[seqlen] = _oracle(settings, seqlen, device)
            for pass_ in settings.passes:
                references = [name for name, passes in on_mesh if pass_ in passes]
                figures = _measure(settings, mesh, seqlen, pass_, device, references, oracles.get(seqlen))
                results.append(dict(ulysses_degree=u, ring_degree=r, seqlen=seqlen, pass_=pass_, **figures))
                everyone = [None] * world_size
                dist.all_gather_object(everyone, (figures["times_ms"], figures["traced_ms"], figures["comm_wait_ms"]))
                if rank == 0:
                    impl = settings_impl(settings, u, r)
                    slowest = max(everyone, key=lambda e: e[1])
                    print(f"[{len(results):>3}/{total}] N={world_size} {impl:<22} s{seqlen:<7} {pass_:<8}"
                          f"{slowest_rank_ms([e[0] for e in everyone]):9.2f} ms; traced call {slowest[1]:8.2f} ms, "
                          f"{slowest[2]:7.2f} ms of it waiting; sent {figures['bytes_sent'] / 2 ** 20:7.2f} MiB "
                          "per rank", flush=True)
                for name in references:
                    theirs = [None] * world_size
                    dist.all_gather_object(theirs, figures["references"][name]["times_ms"])
                    if rank == 0:
                        ours_ms, their_ms = slowest_rank_ms([e[0] for e in everyone]), slowest_rank_ms(theirs)
                        print(f"      reference {name:<22} {their_ms:9.2f} ms; ours / reference "
                              f"{ours_ms / their_ms:.3f}", flush=True)
    return results


def combine(settings: Settings, per_rank: list[list[dict]], device: str, world_size: int,
            oversubscribed: bool) -> tuple[list[dict], list[dict]]:
    """One timing record per case from every rank's figures (``ranks`` holds each rank's
    own), and one per reference and case. A reference's ``usp_kernels_over_reference``
    estimates the ratio ours would reach were checks, transfers, waits and copies free,
    leaving only compute (kernels, merges, accumulations): each rank's median time times
    the share of its traced call spent computing, the largest over ranks, over the
    reference's time. An estimate: the compute spans are wall clock, so they hold what
    other threads (gloo's copies, other ranks on shared cores) took from the kernels, and
    they come from one traced call."""
    records, references = [], []
    for cases in zip(*per_rank):
        first = cases[0]
        u, r, seqlen, pass_ = first["ulysses_degree"], first["ring_degree"], first["seqlen"], first["pass_"]
        ms = slowest_rank_ms([c["times_ms"] for c in cases])
        flops = settings.flops(seqlen, world_size, pass_)
        ranks = [{key: value for key, value in c.items() if key not in ("ulysses_degree", "ring_degree", "seqlen",
                                                                         "pass_", "references")} for c in cases]
        for rank_figures in ranks:
            rank_figures["ms"] = statistics.median(rank_figures["times_ms"])
            rank_figures["tflops"] = flops / world_size / (rank_figures["ms"] * 1e-3) / 1e12
        peaks = [c["peak_memory_bytes"] for c in ranks if c["peak_memory_bytes"] is not None]
        records.append(timing_record(
            device, settings_impl(settings, u, r), pass_, settings.dtype, settings.causal,
            settings.batch, seqlen, settings.heads, settings.kv_heads, settings.head_dim, ms, flops / world_size,
            total_flops=flops, tflops_convention="per rank: the call's FLOPs / world size / ms",
            world_size=world_size, tokens_per_rank=seqlen // world_size, ulysses_degree=u, ring_degree=r,
            placement=settings.placement, layout=settings.layout, backend=settings.backend,
            schedule=settings.schedule, docs=settings.docs, window=settings.window,
            tokens_per_s=settings.batch * seqlen / (ms * 1e-3), oversubscribed=oversubscribed,
            bytes_sent_per_rank=max(c["bytes_sent"] for c in ranks),
            traced_ms_max=max(c["traced_ms"] for c in ranks), comm_wait_ms_max=max(c["comm_wait_ms"] for c in ranks),
            peak_memory_bytes_max=max(peaks) if peaks else None, ranks=ranks))
        kernels_ms = max(c["ms"] * c["compute_ms"] / c["traced_ms"] for c in ranks)
        for name in first["references"]:
            their_ms = slowest_rank_ms([c["references"][name]["times_ms"] for c in cases])
            references.append(timing_record(
                device, f"{name}-u{u}r{r}", pass_, settings.dtype, settings.causal, settings.batch, seqlen,
                settings.heads, settings.kv_heads, settings.head_dim, their_ms, flops / world_size,
                reference=name, usp_impl=records[-1]["impl"], usp_ms=ms, usp_over_reference=ms / their_ms,
                usp_kernels_over_reference=kernels_ms / their_ms,
                max_abs_diff_vs_usp=max(c["references"][name]["max_abs_diff"] for c in cases),
                max_abs_error=max(c["references"][name]["max_abs_error"] for c in cases),
                usp_max_abs_error=max(c["references"][name]["usp_max_abs_error"] for c in cases),
                world_size=world_size, ulysses_degree=u, ring_degree=r, backend=settings.backend,
                oversubscribed=oversubscribed))
    for reference in references:  # every mesh of ours against it, at the same world size
        reference["usp_over_reference_by_impl"] = {
            r["impl"]: r["ms"] / reference["ms"] for r in records
            if (r["seqlen"], r["pass"]) == (reference["seqlen"], reference["pass"])}
    return records, references


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=world_size_type, nargs="+", default=[1, 2, 4],
                        help="numbers of processes to launch, one run each (under torchrun: its WORLD_SIZE)")
    parser.add_argument("--mesh", type=mesh_type, nargs="+",
                        help="only these meshes, e.g. 1x4 2x2 (default: every mesh of each world size)")
    parser.add_argument("--seqlen", type=bounded_int(2), nargs="+",
                        help="global sequence lengths (default: 512 1024 2048 4096 on CPU, 16384 32768 65536 "
                             "under torchrun with GPUs)")
    parser.add_argument("--pass", dest="passes", action="append", choices=SCALING_PASSES,
                        help="pass, repeatable (default: both)")
    parser.add_argument("--batch", type=bounded_int(1), default=1, help="batch size")
    on_gpus = "under torchrun with GPUs"
    parser.add_argument("--heads", type=bounded_int(1), help=f"query heads (default: 32 {on_gpus}, else 8)")
    parser.add_argument("--kv-heads", type=bounded_int(1), default=8, help="K/V heads")
    parser.add_argument("--head-dim", type=bounded_int(1, 256), help=f"head dim (default: 128 {on_gpus}, else 64)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=f"dtype (default: bf16 {on_gpus}, else fp32)")
    parser.add_argument("--backend", choices=sorted(BACKENDS),
                        help=f"local attention backend (default: triton {on_gpus}, else torch)")
    parser.add_argument("--layout", choices=LAYOUTS, default="zigzag", help="ring layout")
    parser.add_argument("--schedule", choices=SCHEDULES, default="ring",
                        help="how K/V reach the ring's ranks: ring (overlapped hops) or allgather (gathered first)")
    parser.add_argument("--docs", type=documents_type, default=None, metavar="SPEC",
                        help="pack documents of these lengths: fixed:N or lognormal:mean=M[,sigma=S] (each a multiple "
                             "of 2 x world size; batch 1; references left out; default: one dense sequence)")
    parser.add_argument("--window", type=bounded_int(0), default=None,
                        help="a sliding window of this many keys before each query (references left out; default: "
                             "none)")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal attention")
    parser.add_argument("--placement", choices=PLACEMENTS, default="ulysses_inner",
                        help="which axis gets consecutive ranks")
    parser.add_argument("--reference", dest="references", action="append", choices=sorted(REFERENCES),
                        help="another implementation to time beside ours, repeatable (default: every one installed "
                             "that can run the case, but usp-unchecked)")
    parser.add_argument("--no-references", action="store_true", help="time only ours")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--timeout", type=positive_float, default=1800.0,
                        help="seconds before a launched run is killed")
    add_timing_arguments(parser, warmup=1, repeats=3)
    add_output_arguments(parser)


def _settings(args, world_size: int, gpu: bool) -> tuple[Settings, list[str]]:
    """What the ranks run: the options, with the defaults for GPUs (NCCL) or CPUs (gloo)."""
    heads = args.heads or (32 if gpu else 8)
    meshes, notes = mesh_options(world_size, heads, args.kv_heads, args.mesh)
    seqlens = args.seqlen or ([16384, 32768, 65536] if gpu else [512, 1024, 2048, 4096])
    if args.docs is not None and args.batch != 1:
        raise SystemExit(f"--docs: packed documents need --batch 1, got {args.batch}")
    for seqlen in seqlens:
        for u, r in meshes:
            try:
                check_global_seqlen(seqlen, u, r, args.layout)
                if args.docs is not None:
                    document_offsets(args.docs, seqlen, 2 * world_size, 0)
            except ValueError as error:
                raise SystemExit(f"--seqlen {seqlen}: {error}") from None
    masked = args.docs is not None or args.window is not None
    references, reference_notes = ((), ["references left out: they take no documents or windows"]) if masked else \
        _references(args, meshes, heads, args.passes or SCALING_PASSES, gpu)
    settings = Settings(tuple(meshes), tuple(seqlens), tuple(args.passes or SCALING_PASSES), args.batch, heads,
                        args.kv_heads, args.head_dim or (128 if gpu else 64), args.dtype or ("bf16" if gpu else "fp32"),
                        args.backend or ("triton" if gpu else "torch"), args.layout, args.causal, args.placement,
                        args.warmup, args.repeats, args.seed, references, args.schedule, args.docs, args.window)
    return settings, notes + reference_notes


def _references(args, meshes, heads: int, passes=SCALING_PASSES, gpu: bool = False) -> tuple[tuple, list[str]]:
    """``(u, r, name, passes)`` for each reference to time on each mesh, and why others
    (or some passes) are left out."""
    if args.no_references:
        return (), []
    chosen, notes = [], []
    for name in args.references or sorted(name for name, reference in REFERENCES.items() if reference.by_default):
        reference = REFERENCES[name]
        missing = reference.missing()
        can_run = tuple(p for p in passes if gpu or p in reference.cpu_passes)
        if not can_run:
            missing = missing or f"runs only {', '.join(reference.cpu_passes)} on a CPU"
        if missing:
            notes.append(f"reference {name} left out: {missing}")
            continue
        if can_run != tuple(passes):
            notes.append(f"reference {name}: {', '.join(can_run)} only on a CPU")
        for u, r in meshes:
            if reference.method not in ("any", sp_method(u, r)):
                continue
            why_not = reference.why_not(u, r, heads, args.kv_heads) or (
                f"it shards no {args.layout} layout" if r > 1 and args.layout not in reference.ring_layouts else None)
            if why_not:
                notes.append(f"reference {name} left out on u{u}r{r}: {why_not}")
            else:
                chosen.append((u, r, name, can_run))
    return tuple(chosen), notes


def run(args: argparse.Namespace) -> int:
    if under_torchrun():
        return _run_under_torchrun(args)
    cores = cores_available()
    records, references, all_notes, runs = [], [], [], []
    for world_size in dict.fromkeys(args.world_size):
        settings, notes = _settings(args, world_size, gpu=False)
        all_notes += [f"N={world_size} {note}" for note in notes]
        for note in notes:
            print(f"note: N={world_size} {note}")
        if not settings.meshes:
            continue
        oversubscribed = world_size > cores
        print(f"scaling: {world_size} gloo processes on {cores} cores (one CPU thread each"
              + ("; more processes than cores: these figures test the pipeline, not performance" if oversubscribed
                 else "") + f"), meshes {', '.join(f'u{u}r{r}' for u, r in settings.meshes)}, seqlens "
              f"{list(settings.seqlens)}, {settings.backend} {settings.dtype}; ms = median of {args.repeats} after "
              f"{args.warmup} warm-up, slowest rank", flush=True)
        per_rank = launch_run(world_size, rank_main, (settings,), pg_timeout_s=min(args.timeout, 300.0),
                              timeout_s=args.timeout)
        mine, theirs = combine(settings, per_rank, device_name(torch.device("cpu")), world_size, oversubscribed)
        records += mine
        references += theirs
        runs.append(dict(world_size=world_size, process_group="gloo", oversubscribed=oversubscribed,
                         settings=asdict(settings)))
    if not records:
        print("no mesh to run", file=sys.stderr)
        return 2
    return _report(records, references, runs, torch.device("cpu"), cores, all_notes, args)


def _run_under_torchrun(args) -> int:
    device = join_torchrun_group(min(args.timeout, 600.0))
    backend = dist.get_backend()
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        settings, notes = _settings(args, world_size, gpu=backend == "nccl")
        if rank == 0:
            for note in notes:
                print(f"note: {note}")
        mine = rank_main(settings)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, mine)
        if rank != 0:
            return 0
        cores = cores_available()
        oversubscribed = backend == "gloo" and int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) > cores
        records, references = combine(settings, gathered, device_name(device), world_size, oversubscribed)
        runs = [dict(world_size=world_size, process_group=backend, oversubscribed=oversubscribed,
                     settings=asdict(settings))]
        return _report(records, references, runs, device, cores, notes, args)
    finally:
        dist.destroy_process_group()


def reference_medians(references: list[dict]) -> dict[str, dict]:
    """Per reference name: how many cases it ran, and the medians of ours over it and of
    our kernels alone over it."""
    medians = {}
    for name in dict.fromkeys(r["reference"] for r in references):
        mine = [r for r in references if r["reference"] == name]
        medians[name] = dict(cases=len(mine), **{key: statistics.median(r[key] for r in mine)
                                                 for key in ("usp_over_reference", "usp_kernels_over_reference")})
    return medians


def _report(records: list[dict], references: list[dict], runs: list[dict], device: torch.device, cores: int, notes,
            args) -> int:
    print(f"{'impl':<22}{'N':>3}{'seqlen':>8} {'pass':<8}{'ms':>10}{'TF/s/rank':>11}{'MiB sent':>10}"
          f"{'traced ms':>11}{'wait ms':>9}{'overlap':>9}{'peak MiB':>10}")
    for r in records:
        overlaps = [loop["overlap"] for rank in r["ranks"] for loop in rank["ring"].values()
                    if loop["overlap"] is not None]
        overlap = f"{min(overlaps):9.2f}" if overlaps else f"{'-':>9}"
        peak = f"{r['peak_memory_bytes_max'] / 2 ** 20:10.1f}" if r["peak_memory_bytes_max"] is not None \
            else f"{'-':>10}"
        print(f"{r['impl']:<22}{r['world_size']:>3}{r['seqlen']:>8} {r['pass']:<8}{r['ms']:10.2f}{r['tflops']:11.4f}"
              f"{r['bytes_sent_per_rank'] / 2 ** 20:10.2f}{r['traced_ms_max']:11.2f}{r['comm_wait_ms_max']:9.2f}"
              f"{overlap}{peak}")
    print("ms: median over repeats of the slowest rank; traced ms and wait ms: one more call, traced, its "
          "slowest rank and the longest wait of any rank inside it")
    medians = reference_medians(references)
    if references:
        print(f"{'reference':<28}{'N':>3}{'seqlen':>8} {'pass':<8}{'ms':>10}{'ours ms':>10}{'ours/ref':>10}"
              f"{'kern/ref':>10}{'best/ref':>10} {'best of ours':<22}{'|ref-ours|':>11}{'ref err':>10}{'our err':>10}")
        for r in references:
            best = min(r["usp_over_reference_by_impl"], key=r["usp_over_reference_by_impl"].get)
            print(f"{r['impl']:<28}{r['world_size']:>3}{r['seqlen']:>8} {r['pass']:<8}{r['ms']:10.2f}"
                  f"{r['usp_ms']:10.2f}{r['usp_over_reference']:10.3f}{r['usp_kernels_over_reference']:10.3f}"
                  f"{r['usp_over_reference_by_impl'][best]:10.3f} {best:<22}{r['max_abs_diff_vs_usp']:11.1e}"
                  f"{r['max_abs_error']:10.1e}{r['usp_max_abs_error']:10.1e}")
        print("ours/ref: ours on the same mesh over the reference; kern/ref: our compute alone (a rank's time x "
              "its traced call's compute share, largest rank) over the reference, ours were all else free; "
              "best/ref: the fastest of our meshes at the same N; err: largest |difference| from float64 attention "
              "(out, and dq, dk, dv with fwd+bwd)")
        for name, median in medians.items():
            print(f"median over {median['cases']} cases, {name}: ours/ref {median['usp_over_reference']:.3f}, "
                  f"kern/ref {median['usp_kernels_over_reference']:.3f}")
    path = write_result("scaling", device, dict(
        flop_convention=FLOP_CONVENTION, timing_fields=list(TIMING_FIELDS),
        config=dict(runs=runs, world_sizes=[run["world_size"] for run in runs], cores=cores,
                    oversubscribed=any(run["oversubscribed"] for run in runs),
                    timing="median over repeats of the slowest rank's barrier-to-finish wall clock",
                    overlap="sum over ring steps of max(step compute, transfer timed alone) / measured ring loop time",
                    peak_memory="GPU peak allocation per case; not measured on a CPU", notes=notes),
        records=records, references=references, reference_medians=medians), args.out_dir)
    print(f"{len(records)} cases; wrote {path}")
    return 0
