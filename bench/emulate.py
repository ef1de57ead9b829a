"""``usp-bench emulate``: the sequence-parallel schedule of N virtual ranks, run on
one device one rank after another, to predict a many-GPU run from one GPU.

Each virtual rank runs the ring loops of ``usp.attention.ring`` themselves
(``ring_forward``, and ``ring_backward`` for forward+backward) over a transport that
replays the transfers: a K/V block arrives the moment it is asked for. So the kernel
calls, LSE merges and gradient accumulations are exactly those of ring rank ``i`` of a
``u x r`` mesh after the Ulysses all-to-all (``H/u`` query heads over its ``S/r``
positions, zigzag or contiguous), and a change to the ring changes the emulation. All
Ulysses ranks of a ring rank do the same work, so one of them is timed. On a GPU each
run of a rank's schedule (and each monolithic call) is queued behind a short GPU sleep
(``usp.bench.timing.hide_host_work``), so that the first step, like the later ones,
times the GPU's work and not the host's launch of it. Reported per layout and pass:

- overhead: the compute of the whole schedule (all N ranks) over one monolithic
  kernel call on the full sequence with all heads (1 = splitting costs nothing);
- imbalance: the slowest rank's compute over the mean;
- per link bandwidth (--bandwidth name=GB/s; defaults: NVLink 4 and InfiniBand NDR
  nominal per-direction figures), the predicted time when each ring transfer overlaps
  the compute of the step before (lock-step: a step lasts as long as the slowest rank's
  compute or the transfer, whichever is longer) plus the Ulysses all-to-alls, not overlapped.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from dataclasses import asdict, dataclass

import torch

from usp.attention.allgather import SCHEDULES, allgather_backward, allgather_forward
from usp.attention.layout import LAYOUTS, check_global_seqlen, ring_positions
from usp.attention.ring import ring_backward, ring_forward
from usp.attention.volume import CallVolume, attention_volume
from usp.comm import traffic
from usp.comm.heads import heads_per_rank, heads_problem, kv_heads_per_rank
from usp.comm.ring import Delivered
from usp.comm.traffic import CudaClock, HostClock, record_traffic
from usp.kernels import BACKENDS, get_backend, varlen_backward, varlen_forward
from usp.kernels.backends import window_kwargs
from usp.kernels.checks import resolve_softmax_scale, resolve_window
from usp.kernels.varlen import self_attention_offsets

from .balance import document_offsets, documents_type, imbalance, rank_work
from .cli_args import (DEFAULT_BANDWIDTHS, DTYPES, add_device_argument, add_output_arguments, add_timing_arguments,
                       bounded_int, default_device, positive_float)
from .flops import FLOP_CONVENTION, attention_flops, masked_attention_flops
from .inputs import random_inputs
from .results import TIMING_FIELDS, device_name, sp_impl_name, timing_record, write_result
from .timing import hide_host_work, measure_ms, synchronize

EMULATE_PASSES = ("fwd", "fwd+bwd")
MERGES = ("kernel", "separate")


@dataclass(frozen=True)
class Problem:
    world_size: int
    ulysses_degree: int
    tokens_per_rank: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    causal: bool
    window: int | None = None  # a causal sliding window: keys this far back at most
    documents: tuple[int, ...] | None = None  # packed documents' offsets over the whole sequence

    @property
    def window_size(self) -> tuple[int, int]:
        return (-1, -1) if self.window is None else (self.window, 0 if self.causal else -1)

    @property
    def ring_degree(self) -> int:
        return self.world_size // self.ulysses_degree

    @property
    def seqlen(self) -> int:
        return self.tokens_per_rank * self.world_size

    @property
    def local_heads(self) -> int:
        return heads_per_rank(self.heads, self.ulysses_degree)

    @property
    def local_kv_heads(self) -> int:
        return kv_heads_per_rank(self.heads, self.kv_heads, self.ulysses_degree)

    def volume(self) -> CallVolume:
        """What one rank sends (``usp.attention.volume``)."""
        element_size = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return attention_volume(self.batch, self.seqlen, self.heads, self.kv_heads, self.head_dim,
                                self.ulysses_degree, self.ring_degree, element_size)


def check_problem(problem: Problem) -> None:
    u, n = problem.ulysses_degree, problem.world_size
    if n % u:
        raise ValueError(f"the Ulysses degree {u} must divide the world size {n}")
    if problem.heads % problem.kv_heads:
        raise ValueError(f"query heads ({problem.heads}) must be a multiple of K/V heads ({problem.kv_heads})")
    problem_text = heads_problem(problem.heads, problem.kv_heads, u)
    if problem_text:
        raise ValueError(problem_text)


class ReplayRing:
    """The ring transport of ring rank ``rank`` of ``size`` run alone: a K/V transfer
    posted for ``step`` delivers, at once, the block ring rank ``rank - step`` started
    with; a dK/dV transfer hands back the tensors sent (their values do not change the
    work to time). Only the transfers differ from a real run."""

    def __init__(self, rank: int, size: int, kv_blocks: list[list[torch.Tensor]]):
        self.rank, self.size, self.kv_blocks = rank, size, kv_blocks

    def send_recv(self, tensors, label: str, step: int) -> Delivered:
        if label in traffic.KV_LABELS:
            return Delivered(self.kv_blocks[(self.rank - step) % self.size])
        return Delivered(tensors)


class ReplayGather:
    """The all-gather schedule's transfers of ring rank ``rank`` run alone: a gather gives
    every ring rank's K/V blocks in rank order at once, a reduce-scatter this rank's rows
    of what it was given (its values do not change the work to time)."""

    def __init__(self, rank: int, size: int, kv_blocks: list[list[torch.Tensor]]):
        self.rank, self.size, self.kv_blocks = rank, size, kv_blocks

    def gather(self, tensors, label: str) -> list[torch.Tensor]:
        return [torch.cat([block[j] for block in self.kv_blocks], dim=1) for j in range(len(tensors))]

    def reduce_scatter(self, tensors, label: str) -> list[torch.Tensor]:
        return [x.chunk(self.size, dim=1)[self.rank] for x in tensors]


def _step_ms(events, labels: tuple[str, ...], steps: int) -> list[float]:
    """Milliseconds of the compute spans with these labels, per ring step (0 for a step that computes nothing)."""
    times = [0.0] * steps
    for e in events:
        if e.kind == traffic.COMPUTE and e.label in labels:
            times[e.step] += (e.end - e.start) * 1e3
    return times


def step_times(problem: Problem, layout: str, backend_name: str, device, warmup: int, repeats: int,
               seed: int, with_backward: bool, schedule: str = "ring", progress=print,
               merge: str = "kernel") -> dict[str, list[list[float]]]:
    """``{"fwd": t, "bwd": t}`` with ``t[i][s]``: ms of ring rank ``i``'s step ``s`` (0 when
    skipped; the all-gather schedule has one step), each the median over ``repeats`` runs
    of the rank's schedule. ``merge="separate"``: the ring steps write their block's output
    (and gradients) and merge (add) them outside the kernel even where the backend could
    do it inside."""
    backend = get_backend(backend_name)
    if merge == "separate":
        backend = dataclasses.replace(backend, forward_into=None, backward_into=None)
    r = problem.ring_degree
    scale = resolve_softmax_scale(None, problem.head_dim)
    # one Ulysses rank's heads over the whole sequence, then each ring rank's positions
    q, k, v, dout = random_inputs(problem.batch, problem.seqlen, problem.local_heads, problem.local_kv_heads,
                                  problem.head_dim, DTYPES[problem.dtype], device, seed)
    positions = [ring_positions(problem.seqlen, r, i, layout, problem.documents).to(device) for i in range(r)]
    shard = lambda x, i: x.index_select(1, positions[i])  # noqa: E731
    kv_blocks = [[shard(k, i), shard(v, i)] for i in range(r)]
    clock = CudaClock() if torch.device(device).type == "cuda" else HostClock()
    mask = (problem.causal, scale, layout, backend, problem.documents, problem.window_size)
    steps = r if schedule == "ring" else 1
    times = {"fwd": [], "bwd": []}
    for i in range(r):
        if schedule == "ring":
            comm, forward, backward = ReplayRing(i, r, kv_blocks), ring_forward, ring_backward
        else:
            comm, forward, backward = ReplayGather(i, r, kv_blocks), allgather_forward, allgather_backward
        q_i, dout_i = shard(q, i), shard(dout, i)
        runs = {"fwd": [], "bwd": []}
        for repeat in range(warmup + repeats):
            hide_host_work(device)
            with record_traffic(clock) as log:
                out_i, lse_i = forward(q_i, *kv_blocks[i], comm, *mask)
                if with_backward:
                    backward(dout_i, q_i, *kv_blocks[i], out_i, lse_i, comm, *mask)
            synchronize(device)
            if repeat >= warmup:
                events = log.timeline()
                runs["fwd"].append(_step_ms(events, (traffic.FORWARD,), steps))
                runs["bwd"].append(_step_ms(events, (traffic.BACKWARD, traffic.ACCUMULATE), steps))
        for pass_ in times:
            times[pass_].append([statistics.median(run[s] for run in runs[pass_]) for s in range(steps)])
        progress(f"        ring rank {i}: forward steps {_fmt(times['fwd'][i])} ms"
                 + (f"; backward {_fmt(times['bwd'][i])} ms" if with_backward else ""))
    return times


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def monolithic_ms(problem: Problem, backend_name: str, device, warmup: int, repeats: int, seed: int,
                  with_backward: bool) -> dict[str, float]:
    """One kernel call on the whole sequence with all heads (one varlen call with
    documents): forward, and backward."""
    backend = get_backend(backend_name)
    q, k, v, dout = random_inputs(problem.batch, problem.seqlen, problem.heads, problem.kv_heads, problem.head_dim,
                                  DTYPES[problem.dtype], device, seed)
    options = dict(causal=problem.causal, softmax_scale=None)
    if problem.documents is None:
        options.update(window_kwargs(problem.window_size))
        forward = lambda: backend.forward(q, k, v, **options)  # noqa: E731
        backward = lambda out, lse: backend.backward(dout, q, k, v, out, lse, **options)  # noqa: E731
    else:  # batch 1, packed
        packed = self_attention_offsets(problem.documents, device)
        options["window_size"] = problem.window_size
        forward = lambda: varlen_forward(backend, q[0], k[0], v[0], *packed, **options)  # noqa: E731
        backward = lambda out, lse: varlen_backward(backend, dout[0], q[0], k[0], v[0], out, lse,  # noqa: E731
                                                    *packed, **options)
    result = dict(fwd=measure_ms(forward, device, warmup, repeats)["ms"])
    if with_backward:
        out, lse = forward()
        result["bwd"] = measure_ms(lambda: backward(out, lse), device, warmup, repeats)["ms"]
    return result


def predict(problem: Problem, times: dict, pass_: str, bandwidth_gbs: float, latency_us: float,
            schedule: str = "ring") -> dict:
    """Lock-step prediction of one pass: per ring step the slowest rank's compute or the
    transfer in flight, whichever is longer (the all-gather schedule: its gathers and
    reduce-scatters, not overlapped, then the slowest rank's one call); the Ulysses
    all-to-alls before and after."""
    volume = problem.volume()
    r, u = problem.ring_degree, problem.ulysses_degree
    seconds = lambda nbytes: latency_us * 1e-6 + nbytes / (bandwidth_gbs * 1e9)  # noqa: E731
    kv_ms, acc_ms = seconds(volume.kv_hop_bytes) * 1e3, seconds(volume.accumulator_hop_bytes) * 1e3
    steps = len(times["fwd"][0])
    slowest = lambda which: [max(times[which][i][s] for i in range(r)) for s in range(steps)]  # noqa: E731
    if schedule == "allgather":  # gather the other r - 1 shards, then compute; backward: again, then reduce-scatter
        gather_ms = seconds((r - 1) * volume.kv_hop_bytes) * 1e3 if r > 1 else 0.0
        scatter_ms = seconds((r - 1) * volume.accumulator_hop_bytes) * 1e3 if r > 1 else 0.0
        ring_fwd = gather_ms + slowest("fwd")[0]
        ring_bwd = gather_ms + slowest("bwd")[0] + scatter_ms
    else:
        ring_fwd = sum(max(c, kv_ms if s < r - 1 else 0.0) for s, c in enumerate(slowest("fwd"))) if r > 1 \
            else slowest("fwd")[0]
        compute = slowest("bwd")
        ring_bwd = (sum(max(c, (kv_ms if s < r - 1 else 0.0) + (acc_ms if s > 0 else 0.0))
                        for s, c in enumerate(compute)) + acc_ms) if r > 1 else compute[0]
    # four all-to-alls a pass (forward: q, k, v in, out back; backward: dout in, dq, dk, dv back), as many bytes each
    a2a_ms = (4 * latency_us * 1e-6 + volume.forward.all_to_all_bytes / (bandwidth_gbs * 1e9)) * 1e3 if u > 1 else 0.0
    total, ring_ms, all_to_all_ms = ring_fwd + a2a_ms, ring_fwd, a2a_ms
    if pass_ == "fwd+bwd":
        total, ring_ms, all_to_all_ms = total + ring_bwd + a2a_ms, ring_ms + ring_bwd, all_to_all_ms + a2a_ms
    compute_only = sum(slowest("fwd")) + (sum(slowest("bwd")) if pass_ == "fwd+bwd" else 0.0)
    return dict(bandwidth_gbs=bandwidth_gbs, latency_us=latency_us, predicted_ms=total, ring_ms=ring_ms,
                all_to_all_ms=all_to_all_ms, exposed_comm_ms=total - compute_only, kv_hop_ms=kv_ms,
                accumulator_hop_ms=acc_ms)


def predicted_timeline(problem: Problem, times: dict, bandwidth_gbs: float, latency_us: float) -> list[dict]:
    """Forward ring steps of every virtual rank laid out lock-step: compute bars and the
    transfer of the next K/V block, for the timeline plot."""
    r = problem.ring_degree
    kv_ms = (latency_us * 1e-6 + problem.volume().kv_hop_bytes / (bandwidth_gbs * 1e9)) * 1e3
    events, start = [], 0.0
    for s in range(r):
        compute = [times["fwd"][i][s] for i in range(r)]
        transfer = kv_ms if s < r - 1 else 0.0
        for i in range(r):
            events.append(dict(rank=i, kind=traffic.COMPUTE, step=s, start_ms=start, end_ms=start + compute[i]))
            if transfer:
                events.append(dict(rank=i, kind="transfer", step=s + 1, start_ms=start, end_ms=start + transfer))
        start += max(max(compute), transfer)
    return events


def _bandwidth(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        gbs = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=GB/s such as nvlink=450, got {text!r}") from None
    if not name or gbs <= 0:
        raise argparse.ArgumentTypeError(f"expected NAME=GB/s with a positive figure, got {text!r}")
    return name, gbs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--world-size", type=bounded_int(1, 1024), default=8 if gpu else 4, help="virtual ranks")
    parser.add_argument("--ulysses-degree", type=bounded_int(1), default=1,
                        help="Ulysses degree u; the ring degree is world size / u (1: pure ring)")
    parser.add_argument("--tokens-per-rank", type=bounded_int(2), default=8192 if gpu else 256,
                        help="sequence tokens per rank")
    parser.add_argument("--batch", type=bounded_int(1), default=1, help="batch size")
    parser.add_argument("--heads", type=bounded_int(1), default=32 if gpu else 8, help="query heads")
    parser.add_argument("--kv-heads", type=bounded_int(1), default=8 if gpu else 2, help="K/V heads")
    parser.add_argument("--head-dim", type=bounded_int(1, 256), default=128 if gpu else 64, help="head dim")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if gpu else "fp32", help="dtype")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="triton" if gpu else "torch",
                        help="local attention backend")
    parser.add_argument("--layout", choices=LAYOUTS, nargs="+", default=list(LAYOUTS), help="ring layouts")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal attention")
    parser.add_argument("--schedule", choices=SCHEDULES, nargs="+", default=["ring"],
                        help="how K/V reach the ring's ranks: ring (overlapped hops) or allgather (gathered first)")
    parser.add_argument("--docs", type=documents_type, default=None, metavar="SPEC",
                        help="pack documents of these lengths: fixed:N or lognormal:mean=M[,sigma=S] (drawn with "
                             "--seed, each a multiple of 2 x ring degree; default: one dense sequence)")
    parser.add_argument("--window", type=bounded_int(0), default=None,
                        help="a sliding window of this many keys before each query (default: none)")
    parser.add_argument("--pass", dest="passes", action="append", choices=EMULATE_PASSES,
                        help="pass, repeatable (default: both)")
    parser.add_argument("--bandwidth", type=_bandwidth, action="append",
                        help="link NAME=GB/s per direction, repeatable (default: "
                             + " ".join(f"{k}={v:g}" for k, v in DEFAULT_BANDWIDTHS.items()) + ")")
    parser.add_argument("--latency-us", type=positive_float, default=10.0, help="per-transfer latency in microseconds")
    add_device_argument(parser)
    parser.add_argument("--merge", choices=MERGES, default="kernel",
                        help="where a ring step merges its block into the running result, and adds its dQ: "
                             "inside the kernel, where the backend can (triton's forward_into, backward_into), or "
                             "separately after it (to compare)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    add_timing_arguments(parser, warmup=1, repeats=3)
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    device = default_device(args.device)
    problem = Problem(args.world_size, args.ulysses_degree, args.tokens_per_rank, args.batch, args.heads,
                      args.kv_heads, args.head_dim, args.dtype, args.causal, args.window)
    try:
        check_problem(problem)
        if args.docs is not None:
            if args.batch != 1:
                raise ValueError(f"packed documents need batch 1, got {args.batch}")
            documents = document_offsets(args.docs, problem.seqlen, 2 * problem.ring_degree, args.seed)
            problem = dataclasses.replace(problem, documents=documents)
        for layout in args.layout:
            check_global_seqlen(problem.seqlen, problem.ulysses_degree, problem.ring_degree, layout,
                                problem.documents)
    except ValueError as error:
        raise SystemExit(f"emulate: {error}") from None
    passes = args.passes or list(EMULATE_PASSES)
    bandwidths = dict(args.bandwidth) if args.bandwidth else dict(DEFAULT_BANDWIDTHS)
    with_backward = "fwd+bwd" in passes
    where = device_name(device)
    u, r = problem.ulysses_degree, problem.ring_degree
    merge = args.merge if get_backend(args.backend).forward_into is not None else "separate"
    print(f"emulate: {problem.world_size} virtual ranks (u{u} x r{r}) on {where}, {problem.seqlen} tokens "
          f"({problem.tokens_per_rank}/rank), {problem.heads}/{problem.kv_heads} heads d{problem.head_dim} "
          f"{problem.dtype} {'causal' if problem.causal else 'full'}, {args.backend}, merge {merge}"
          + ("" if problem.documents is None else f", {len(problem.documents) - 1} documents")
          + ("" if problem.window is None else f", window {problem.window}"))
    print("monolithic kernel on the whole sequence ...", flush=True)
    whole = monolithic_ms(problem, args.backend, device, args.warmup, args.repeats, args.seed, with_backward)
    print(f"        forward {whole['fwd']:.3f} ms" + (f", backward {whole['bwd']:.3f} ms" if with_backward else ""))
    records, timelines = [], {}
    for layout in args.layout:
        for schedule in args.schedule:
            steps = f"{r} steps" if schedule == "ring" else "one call after the all-gather"
            print(f"layout {layout}, schedule {schedule}: {r} ring ranks x {steps}", flush=True)
            times = step_times(problem, layout, args.backend, device, args.warmup, args.repeats, args.seed,
                               with_backward, schedule, merge=merge)
            if schedule == "ring":
                timelines[layout] = predicted_timeline(problem, times, next(iter(bandwidths.values())),
                                                       args.latency_us)
            for pass_ in passes:
                records.append(_record(problem, layout, schedule, pass_, times, whole, bandwidths, args, where))
                _print_record(records[-1])
    path = write_result("emulate", device, dict(
        flop_convention=FLOP_CONVENTION, timing_fields=list(TIMING_FIELDS),
        config=dict(asdict(problem), ring_degree=r, seqlen=problem.seqlen, backend=args.backend,
                    layouts=args.layout, schedules=args.schedule, docs=args.docs, passes=passes, merge=merge,
                    bandwidths_gbs=bandwidths, latency_us=args.latency_us,
                    warmup=args.warmup, repeats=args.repeats, transfer_bytes=asdict(problem.volume()),
                    timeline_bandwidth=next(iter(bandwidths)),
                    model=("lock-step ring: each step lasts max(slowest rank's compute, transfer in flight); "
                           "all-gather: its transfers not overlapped; Ulysses all-to-alls not overlapped; one "
                           "Ulysses rank per ring rank timed")),
        monolithic_ms=whole, records=records, timelines=timelines), args.out_dir)
    print(f"wrote {path}")
    return 0


def _record(problem: Problem, layout: str, schedule: str, pass_: str, times: dict, whole: dict, bandwidths: dict,
            args, where: str) -> dict:
    r, u = problem.ring_degree, problem.ulysses_degree
    per_rank = [sum(times["fwd"][i]) + (sum(times["bwd"][i]) if pass_ == "fwd+bwd" else 0.0) for i in range(r)]
    monolithic = whole["fwd"] + (whole["bwd"] if pass_ == "fwd+bwd" else 0.0)
    left, right = resolve_window(problem.causal, problem.window_size)
    work = rank_work(problem.seqlen, r, layout, problem.documents, (left, right))
    if problem.documents is None and problem.window is None:
        flops = attention_flops(problem.batch, problem.heads, problem.seqlen, problem.seqlen, problem.head_dim,
                                problem.causal, pass_)
    else:  # the visible pairs only
        flops = masked_attention_flops(problem.batch, problem.heads, problem.head_dim, sum(work), pass_)
    slowest = max(per_rank)
    predictions = {}
    for name, gbs in bandwidths.items():
        prediction = predict(problem, times, pass_, gbs, args.latency_us, schedule)
        prediction["tflops_per_rank"] = flops / problem.world_size / (prediction["predicted_ms"] * 1e-3) / 1e12
        prediction["scaling_efficiency"] = monolithic / problem.world_size / prediction["predicted_ms"]
        predictions[name] = prediction
    return timing_record(
        where, sp_impl_name(u, r, layout) + ("" if schedule == "ring" else f"-{schedule}"),
        pass_, problem.dtype, problem.causal, problem.batch,
        problem.seqlen, problem.heads, problem.kv_heads, problem.head_dim, slowest, flops / problem.world_size,
        emulated=True, backend=args.backend, world_size=problem.world_size, ulysses_degree=u, ring_degree=r,
        layout=layout, schedule=schedule, work_imbalance=imbalance(work), per_rank_work=work,
        documents=None if problem.documents is None else len(problem.documents) - 1, window=problem.window,
        tflops_convention="per rank: the call's FLOPs / world size / slowest rank's compute",
        monolithic_ms=monolithic, schedule_compute_ms=u * sum(per_rank),
        overhead=u * sum(per_rank) / monolithic, imbalance=slowest / statistics.mean(per_rank),
        per_rank_compute_ms=per_rank, step_ms=dict(fwd=times["fwd"], bwd=times["bwd"] if pass_ == "fwd+bwd" else None),
        predictions=predictions)


def _print_record(record: dict) -> None:
    predictions = ", ".join(f"{name} {p['predicted_ms']:.2f} ms ({p['scaling_efficiency']:.2f} of ideal)"
                            for name, p in record["predictions"].items())
    print(f"  {record['impl']:<22} {record['pass']:<8} slowest rank {record['ms']:.3f} ms, overhead "
          f"{record['overhead']:.2f}x, imbalance {record['imbalance']:.2f} (work {record['work_imbalance']:.2f}); "
          f"predicted: {predictions}", flush=True)
