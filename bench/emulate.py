"""``usp-bench emulate``: the sequence-parallel schedule of N virtual ranks, run on
one device one rank after another, to predict a many-GPU run from one GPU.

Each virtual rank makes exactly the per-step kernel calls and LSE merges (and, for
forward+backward, the per-step backward calls and gradient accumulation) that ring
rank ``i`` of a ``u x r`` mesh makes after the Ulysses all-to-all: ``H/u`` query heads
over its ``S/r`` positions against every visiting K/V block, with the zigzag or
contiguous layout. All Ulysses ranks of a ring rank do the same work, so one of them is
timed. Reported per layout and pass:

- ``overhead``: the compute of the whole schedule (all N ranks) over one monolithic
  kernel call on the full sequence with all heads (1 = splitting costs nothing);
- ``imbalance``: the slowest rank's compute over the mean;
- per link bandwidth (``--bandwidth name=GB/s``; defaults: NVLink 4 and InfiniBand NDR
  nominal per-direction figures), the predicted time when each ring transfer overlaps
  the compute of the step before (lock-step: a step lasts as long as the slowest rank's
  compute or the transfer, whichever is longer) plus the Ulysses all-to-alls, not overlapped.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, dataclass

import torch

from usp.attention.layout import LAYOUTS, check_global_seqlen, ring_block, ring_positions
from usp.kernels import get_backend, merge_attention
from usp.kernels.layout import accum_dtype

from .cli_args import DTYPES, add_output_arguments, add_timing_arguments, bounded_int, default_device, device_type
from .dist_checks import sp_impl_name, sp_method
from .flops import FLOP_CONVENTION, attention_flops
from .inputs import random_inputs
from .results import TIMING_FIELDS, device_name, timing_record, write_result
from .timing import measure_ms

# Nominal per-direction bandwidths per GPU, GB/s (1e9 B/s): NVLink 4 on H100 SXM is 900 GB/s
# both directions together; InfiniBand NDR is 400 Gb/s per port (one port per GPU).
DEFAULT_BANDWIDTHS = {"nvlink4": 450.0, "ib-ndr": 50.0}
EMULATE_PASSES = ("fwd", "fwd+bwd")


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

    @property
    def ring_degree(self) -> int:
        return self.world_size // self.ulysses_degree

    @property
    def seqlen(self) -> int:
        return self.tokens_per_rank * self.world_size

    @property
    def local_heads(self) -> int:
        return self.heads // self.ulysses_degree

    @property
    def local_kv_heads(self) -> int:
        """K/V heads per Ulysses rank (one replicated head when there are fewer heads than ranks)."""
        return max(self.kv_heads // self.ulysses_degree, 1)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()


def check_problem(problem: Problem) -> None:
    u, n = problem.ulysses_degree, problem.world_size
    if n % u:
        raise ValueError(f"the Ulysses degree {u} must divide the world size {n}")
    if problem.heads % u:
        raise ValueError(f"{problem.heads} query heads cannot be split over {u} Ulysses ranks")
    if problem.heads % problem.kv_heads:
        raise ValueError(f"query heads ({problem.heads}) must be a multiple of K/V heads ({problem.kv_heads})")
    if problem.kv_heads % u and u % problem.kv_heads:
        raise ValueError(f"{problem.kv_heads} K/V heads are neither a multiple nor a divisor of u = {u}")


def transfer_bytes(problem: Problem) -> dict[str, int]:
    """Bytes one rank sends: one ring K/V hop, one dK/dV accumulator hop, and the
    all-to-alls of the forward (q, k, v in; out back) and of the backward (dout in; dq, dk, dv back)."""
    p, e = problem, problem.element_size
    acc = torch.empty((), dtype=accum_dtype(DTYPES[p.dtype])).element_size()
    ring_block_elems = p.batch * (p.seqlen // p.ring_degree) * p.local_kv_heads * p.head_dim
    shard_tokens = p.batch * p.seqlen // p.world_size
    kv_heads_sent = p.kv_heads if p.kv_heads % p.ulysses_degree == 0 else p.ulysses_degree
    share = (p.ulysses_degree - 1) / p.ulysses_degree
    q_bytes = shard_tokens * p.heads * p.head_dim * e * share
    kv_bytes = shard_tokens * kv_heads_sent * p.head_dim * e * share
    return dict(kv_hop=2 * ring_block_elems * e, accumulator_hop=2 * ring_block_elems * acc,
                all_to_all_fwd=int(2 * q_bytes + 2 * kv_bytes), all_to_all_bwd=int(2 * q_bytes + 2 * kv_bytes))


def step_times(problem: Problem, layout: str, backend_name: str, device, warmup: int, repeats: int,
               seed: int, with_backward: bool, progress=print) -> dict[str, list[list[float]]]:
    """``{"fwd": t, "bwd": t}`` with ``t[i][s]``: ms of ring rank ``i``'s step ``s`` (0 when skipped)."""
    backend = get_backend(backend_name)
    r = problem.ring_degree
    local = problem.seqlen // r
    # one Ulysses rank's heads over the whole sequence
    q, k, v, dout = random_inputs(problem.batch, problem.seqlen, problem.local_heads, problem.local_kv_heads,
                                  problem.head_dim, DTYPES[problem.dtype], device, seed)
    out = lse = None
    if with_backward:  # the global out and lse, which every ring step's backward uses (as the ring does)
        out, lse = backend.forward(q, k, v, causal=problem.causal, softmax_scale=None)
    acc = accum_dtype(q.dtype)
    positions = [ring_positions(problem.seqlen, r, i, layout).to(device) for i in range(r)]
    times = {"fwd": [[0.0] * r for _ in range(r)], "bwd": [[0.0] * r for _ in range(r)]}
    for i in range(r):
        mine = lambda x: x.index_select(1, positions[i])
        q_i, dout_i = mine(q), mine(dout)
        out_acc = torch.zeros(q_i.shape, dtype=acc, device=device)
        lse_acc = torch.full((problem.batch, problem.local_heads, local), float("-inf"), dtype=acc, device=device)
        dq_acc = torch.zeros(q_i.shape, dtype=acc, device=device)
        if with_backward:
            out_i, lse_i = mine(out), lse.index_select(2, positions[i])
        for s in range(r):
            source = (i - s) % r
            block = ring_block(i, source, local, layout, problem.causal)
            if block is None:
                continue
            k_s, v_s = k.index_select(1, positions[source]), v.index_select(1, positions[source])
            rows, keys = block.q_rows, block.k_rows
            dk_acc = torch.zeros(k_s.shape, dtype=acc, device=device)
            dv_acc = torch.zeros(k_s.shape, dtype=acc, device=device)

            def forward_step():
                block_out, block_lse = backend.forward(q_i[:, rows], k_s[:, keys], v_s[:, keys],
                                                       causal=block.causal, softmax_scale=None)
                out_acc[:, rows], lse_acc[:, :, rows] = merge_attention(out_acc[:, rows], lse_acc[:, :, rows],
                                                                        block_out, block_lse)
            times["fwd"][i][s] = measure_ms(forward_step, device, warmup, repeats)["ms"]
            if with_backward:
                def backward_step():
                    dq, dk, dv = backend.backward(dout_i[:, rows], q_i[:, rows], k_s[:, keys], v_s[:, keys],
                                                  out_i[:, rows], lse_i[:, :, rows], causal=block.causal,
                                                  softmax_scale=None)
                    dq_acc[:, rows] += dq
                    dk_acc[:, keys] += dk
                    dv_acc[:, keys] += dv
                times["bwd"][i][s] = measure_ms(backward_step, device, warmup, repeats)["ms"]
        progress(f"        ring rank {i}: forward steps {_fmt(times['fwd'][i])} ms"
                 + (f"; backward {_fmt(times['bwd'][i])} ms" if with_backward else ""))
    return times


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def monolithic_ms(problem: Problem, backend_name: str, device, warmup: int, repeats: int, seed: int,
                  with_backward: bool) -> dict[str, float]:
    """One kernel call on the whole sequence with all heads: forward, and backward."""
    backend = get_backend(backend_name)
    q, k, v, dout = random_inputs(problem.batch, problem.seqlen, problem.heads, problem.kv_heads, problem.head_dim,
                                  DTYPES[problem.dtype], device, seed)
    result = dict(fwd=measure_ms(lambda: backend.forward(q, k, v, causal=problem.causal, softmax_scale=None),
                                 device, warmup, repeats)["ms"])
    if with_backward:
        out, lse = backend.forward(q, k, v, causal=problem.causal, softmax_scale=None)
        result["bwd"] = measure_ms(lambda: backend.backward(dout, q, k, v, out, lse, causal=problem.causal,
                                                            softmax_scale=None), device, warmup, repeats)["ms"]
    return result


def predict(problem: Problem, times: dict, pass_: str, bandwidth_gbs: float, latency_us: float) -> dict:
    """Lock-step prediction of one pass: per ring step the slowest rank's compute or the
    transfer in flight, whichever is longer; the Ulysses all-to-alls before and after."""
    sizes = transfer_bytes(problem)
    r, u = problem.ring_degree, problem.ulysses_degree
    seconds = lambda nbytes: latency_us * 1e-6 + nbytes / (bandwidth_gbs * 1e9)
    kv_ms, acc_ms = seconds(sizes["kv_hop"]) * 1e3, seconds(sizes["accumulator_hop"]) * 1e3
    slowest = lambda which: [max(times[which][i][s] for i in range(r)) for s in range(r)]
    ring_fwd = sum(max(c, kv_ms if s < r - 1 else 0.0) for s, c in enumerate(slowest("fwd"))) if r > 1 \
        else slowest("fwd")[0]
    # four all-to-alls a pass (forward: q, k, v in, out back; backward: dout in, dq, dk, dv back)
    all_to_all = lambda nbytes: (4 * latency_us * 1e-6 + nbytes / (bandwidth_gbs * 1e9)) * 1e3 if u > 1 else 0.0
    a2a_fwd = all_to_all(sizes["all_to_all_fwd"])
    total, ring_ms, a2a_ms = ring_fwd + a2a_fwd, ring_fwd, a2a_fwd
    if pass_ == "fwd+bwd":
        compute = slowest("bwd")
        if r > 1:
            ring_bwd = sum(max(c, (kv_ms if s < r - 1 else 0.0) + (acc_ms if s > 0 else 0.0))
                           for s, c in enumerate(compute)) + acc_ms
        else:
            ring_bwd = compute[0]
        a2a_bwd = all_to_all(sizes["all_to_all_bwd"])
        total, ring_ms, a2a_ms = total + ring_bwd + a2a_bwd, ring_ms + ring_bwd, a2a_ms + a2a_bwd
    compute_only = sum(slowest("fwd")) + (sum(slowest("bwd")) if pass_ == "fwd+bwd" else 0.0)
    return dict(bandwidth_gbs=bandwidth_gbs, latency_us=latency_us, predicted_ms=total, ring_ms=ring_ms,
                all_to_all_ms=a2a_ms, exposed_comm_ms=total - compute_only, kv_hop_ms=kv_ms,
                accumulator_hop_ms=acc_ms)


def predicted_timeline(problem: Problem, times: dict, bandwidth_gbs: float, latency_us: float) -> list[dict]:
    """Forward ring steps of every virtual rank laid out lock-step: compute bars and the
    transfer of the next K/V block, for the timeline plot."""
    r = problem.ring_degree
    kv_ms = (latency_us * 1e-6 + transfer_bytes(problem)["kv_hop"] / (bandwidth_gbs * 1e9)) * 1e3
    events, start = [], 0.0
    for s in range(r):
        compute = [times["fwd"][i][s] for i in range(r)]
        transfer = kv_ms if s < r - 1 else 0.0
        for i in range(r):
            events.append(dict(rank=i, kind="compute", step=s, start_ms=start, end_ms=start + compute[i]))
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
                        help="Ulysses degree u (the ring degree is world size / u; default 1: pure ring)")
    parser.add_argument("--tokens-per-rank", type=bounded_int(2), default=8192 if gpu else 256,
                        help="sequence tokens per rank (default 8192 on GPU, 256 on CPU)")
    parser.add_argument("--batch", type=bounded_int(1), default=1)
    parser.add_argument("--heads", type=bounded_int(1), default=32 if gpu else 8, help="query heads")
    parser.add_argument("--kv-heads", type=bounded_int(1), default=8 if gpu else 2, help="K/V heads")
    parser.add_argument("--head-dim", type=bounded_int(1, 256), default=128 if gpu else 64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if gpu else "fp32")
    parser.add_argument("--backend", choices=["triton", "torch", "naive"], default="triton" if gpu else "torch")
    parser.add_argument("--layout", choices=LAYOUTS, nargs="+", default=list(LAYOUTS), help="layouts (default both)")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal (default)")
    parser.add_argument("--pass", dest="passes", action="append", choices=EMULATE_PASSES,
                        help="pass (repeatable; default both)")
    parser.add_argument("--bandwidth", type=_bandwidth, action="append",
                        help="link NAME=GB/s per direction (repeatable; default "
                             + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_BANDWIDTHS.items()) + ")")
    parser.add_argument("--latency-us", type=float, default=10.0, help="per-transfer latency in us (default 10)")
    parser.add_argument("--device", type=device_type, default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    add_timing_arguments(parser, warmup=1, repeats=3)
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    device = default_device(args.device)
    problem = Problem(args.world_size, args.ulysses_degree, args.tokens_per_rank, args.batch, args.heads,
                      args.kv_heads, args.head_dim, args.dtype, args.causal)
    try:
        check_problem(problem)
        for layout in args.layout:
            check_global_seqlen(problem.seqlen, problem.ulysses_degree, problem.ring_degree, layout)
    except ValueError as error:
        raise SystemExit(f"emulate: {error}") from None
    passes = args.passes or list(EMULATE_PASSES)
    bandwidths = dict(args.bandwidth) if args.bandwidth else dict(DEFAULT_BANDWIDTHS)
    with_backward = "fwd+bwd" in passes
    where = device_name(device)
    u, r = problem.ulysses_degree, problem.ring_degree
    print(f"emulate: {problem.world_size} virtual ranks (u{u} x r{r}) on {where}, {problem.seqlen} tokens "
          f"({problem.tokens_per_rank}/rank), {problem.heads}/{problem.kv_heads} heads d{problem.head_dim} "
          f"{problem.dtype} {'causal' if problem.causal else 'full'}, {args.backend}")
    print("monolithic kernel on the whole sequence ...", flush=True)
    whole = monolithic_ms(problem, args.backend, device, args.warmup, args.repeats, args.seed, with_backward)
    print(f"        forward {whole['fwd']:.3f} ms" + (f", backward {whole['bwd']:.3f} ms" if with_backward else ""))
    records, timelines = [], {}
    for layout in args.layout:
        print(f"layout {layout}: {r} ring ranks x {r} steps", flush=True)
        times = step_times(problem, layout, args.backend, device, args.warmup, args.repeats, args.seed,
                           with_backward)
        timelines[layout] = predicted_timeline(problem, times, next(iter(bandwidths.values())), args.latency_us)
        for pass_ in passes:
            records.append(_record(problem, layout, pass_, times, whole, bandwidths, args, where))
            _print_record(records[-1])
    path = write_result("emulate", device, dict(
        flop_convention=FLOP_CONVENTION, timing_fields=list(TIMING_FIELDS),
        config=dict(asdict(problem), ring_degree=r, seqlen=problem.seqlen, backend=args.backend,
                    layouts=args.layout, passes=passes, bandwidths_gbs=bandwidths, latency_us=args.latency_us,
                    warmup=args.warmup, repeats=args.repeats, transfer_bytes=transfer_bytes(problem),
                    timeline_bandwidth=next(iter(bandwidths)),
                    model=("lock-step ring: each step lasts max(slowest rank's compute, transfer in flight); "
                           "Ulysses all-to-alls not overlapped; one Ulysses rank per ring rank timed")),
        monolithic_ms=whole, records=records, timelines=timelines), args.out_dir)
    print(f"wrote {path}")
    return 0


def _record(problem: Problem, layout: str, pass_: str, times: dict, whole: dict, bandwidths: dict, args,
            where: str) -> dict:
    r, u = problem.ring_degree, problem.ulysses_degree
    per_rank = [sum(times["fwd"][i]) + (sum(times["bwd"][i]) if pass_ == "fwd+bwd" else 0.0) for i in range(r)]
    monolithic = whole["fwd"] + (whole["bwd"] if pass_ == "fwd+bwd" else 0.0)
    flops = attention_flops(problem.batch, problem.heads, problem.seqlen, problem.seqlen, problem.head_dim,
                            problem.causal, pass_)
    slowest = max(per_rank)
    predictions = {}
    for name, gbs in bandwidths.items():
        prediction = predict(problem, times, pass_, gbs, args.latency_us)
        prediction["tflops_per_rank"] = flops / problem.world_size / (prediction["predicted_ms"] * 1e-3) / 1e12
        prediction["scaling_efficiency"] = monolithic / problem.world_size / prediction["predicted_ms"]
        predictions[name] = prediction
    return timing_record(
        where, sp_impl_name(sp_method(u, r), u, r, layout), pass_, problem.dtype, problem.causal, problem.batch,
        problem.seqlen, problem.heads, problem.kv_heads, problem.head_dim, slowest, flops / problem.world_size,
        emulated=True, backend=args.backend, world_size=problem.world_size, ulysses_degree=u, ring_degree=r,
        layout=layout, tflops_convention="per rank: the call's FLOPs / world size / slowest rank's compute",
        monolithic_ms=monolithic, schedule_compute_ms=u * sum(per_rank),
        overhead=u * sum(per_rank) / monolithic, imbalance=slowest / statistics.mean(per_rank),
        per_rank_compute_ms=per_rank, step_ms=dict(fwd=times["fwd"], bwd=times["bwd"] if pass_ == "fwd+bwd" else None),
        predictions=predictions)


def _print_record(record: dict) -> None:
    predictions = ", ".join(f"{name} {p['predicted_ms']:.2f} ms ({p['scaling_efficiency']:.2f} of ideal)"
                            for name, p in record["predictions"].items())
    print(f"  {record['impl']:<22} {record['pass']:<8} slowest rank {record['ms']:.3f} ms, overhead "
          f"{record['overhead']:.2f}x, imbalance {record['imbalance']:.2f}; predicted: {predictions}", flush=True)
