"""``usp-bench faults``: inject one fault into each of N runs of ring, Ulysses and USP
attention (forward + backward) on gloo processes, and check how every run ends.

Each run is a short training loop on ``--world-size`` local processes: a few steps of
attention, backward and the step's gradient all-reduce over the mesh. Step 0 is clean;
in a later step one rank suffers one fault, drawn from a seeded plan (reproducible):

- ``kill``: the rank kills itself with SIGKILL;
- ``raise``: the rank raises a RuntimeError (its process then leaves the group);
- ``stall``: the rank stops, alive and silent, past the timeout;
- ``shape``: the rank passes q with another sequence length;
- ``nan``: one element of the rank's q, k or v is NaN;
- ``skip_backward``: the rank skips backward and goes on to the gradient all-reduce.

``kill``, ``raise`` and ``stall`` strike at a random point of the step: before the
k-th event of the rank's attention calls (a posted transfer, a wait for one, a ring
step's compute, the agreement check), k drawn over the events of step 0.

A run passes when every rank but a killed or stalled one raises an error within the
process group's timeout (``--timeout``) plus ``--margin`` seconds of the start of the
faulty step (``shape``: every rank the same ValueError, at once), never hangs and never
finishes as if nothing happened. For ``nan`` the step runs through and must show the
documented behaviour (the rows that see the NaN are NaN, the other rows match float64
attention; a NaN in v may also reach rows that do not see it), and the same call with
``check_finite=True`` must raise on every rank, naming the rank and the tensor.

Also measured, on one launch: the cost of the rank-agreement check and of the
``check_finite`` guard on a larger USP call (``--guard-seqlen``; 0 skips it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import signal
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from usp.attention import gather_sequence, naive_attention, ring_attention, shard_sequence, ulysses_attention, \
    usp_attention
from usp.comm import init_mesh
from usp.comm.traffic import record_traffic

from .cli_args import add_output_arguments, bounded_int, positive_float
from .launch import spawn
from .results import write_result

FAULT_KINDS = ("kill", "raise", "stall", "shape", "nan", "skip_backward")
STRIKES_AT_AN_EVENT = ("kill", "raise", "stall")
METHODS = ("ring", "ulysses", "usp")
INPUTS = ("q", "k", "v")
VERDICTS = ("ok", "hang", "silent", "late", "unclear")  # see judge()


def mesh_degrees(method: str, world_size: int) -> tuple[int, int]:
    """``(ulysses_degree, ring_degree)`` of a method on ``world_size`` ranks."""
    return {"ring": (1, world_size), "ulysses": (world_size, 1), "usp": (2, world_size // 2)}[method]


@dataclass(frozen=True)
class Config:
    """What every run does: the problem, the loop, the timeout and the margin."""

    world_size: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    steps: int = 3
    timeout_s: float = 5.0  # the mesh groups' process-group timeout
    margin_s: float = 10.0

    @property
    def seqlen(self) -> int:
        """16 tokens per rank: every method's split works on any even world size."""
        return 16 * self.world_size

    @property
    def heads(self) -> int:
        """Query heads: at least one per rank of pure Ulysses."""
        return max(4, self.world_size)

    @property
    def bound_s(self) -> float:
        """The latest a rank may raise, in seconds after the faulty step started."""
        return self.timeout_s + self.margin_s


@dataclass(frozen=True)
class FaultPlan:
    """One run: which fault strikes which rank, in which step and where."""

    run: int
    method: str
    kind: str
    rank: int
    step: int  # 1 .. steps - 1 (step 0 is clean)
    at: float  # kill/raise/stall: where among the step's events, a fraction in [0, 1)
    tensor: str  # nan: which input
    element: int  # nan: flat index into that rank's local input (mod its size)


def make_plans(runs: int, seed: int, config: Config, kinds=FAULT_KINDS, methods=METHODS) -> list[FaultPlan]:
    """``runs`` plans cycling through ``kinds``; the method, and the input a NaN goes
    into, cycle too, shifted by one each round of kinds, so that every kind meets every
    method (and nan every input) whatever the lists; the rest drawn from
    ``random.Random(seed)``: the same arguments give the same plans."""
    rng = random.Random(seed)
    plans = []
    for run in range(runs):
        kind_index, rounds = run % len(kinds), run // len(kinds)
        plans.append(FaultPlan(run, methods[(kind_index + rounds) % len(methods)], kinds[kind_index],
                               rng.randrange(config.world_size), rng.randrange(1, config.steps), rng.random(),
                               INPUTS[rounds % len(INPUTS)], rng.randrange(1 << 30)))
    return plans


class _Tripwire(list):
    """A traffic log's event list that calls ``fault`` as event number ``at`` (0-based) is
    appended, that is just before that transfer is posted or that span begins."""

    def __init__(self, at: int, fault):
        super().__init__()
        self.at, self.fault = at, fault

    def append(self, event) -> None:
        if len(self) == self.at:
            self.fault()
        super().append(event)


def _strike(kind: str, config: Config):
    def fault():
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "raise":
            raise RuntimeError("injected fault")
        time.sleep(config.bound_s + 1.0)  # stall: alive and silent until every other rank must have raised
        os._exit(0)
    return fault


def _describe(event) -> str:
    return " ".join(str(part) for part in (event.kind, event.label, f"ring step {event.step}" if event.step >= 0
                                           else "") if part)


def _nan_behaviour(out: torch.Tensor, inputs: list[torch.Tensor], mesh, plan: FaultPlan) -> str:
    """Compare the gathered output of a causal step with one NaN in an input with what the
    README documents: the rows that see the NaN (a NaN in q: its own row; in k or v:
    the later positions of the query heads that share that K/V head) are NaN; no other
    row is, except, for a NaN in v, rows that do not see it; every finite row matches
    float64 attention on the inputs with the NaN set to 0. "as documented", or what differs."""
    full = gather_sequence(out.detach(), mesh).double()
    q, k, v = (gather_sequence(x.detach(), mesh) for x in inputs)
    batch, position, head, _ = torch.nonzero(torch.isnan(dict(q=q, k=k, v=v)[plan.tensor]))[0].tolist()
    group = q.shape[2] // k.shape[2]
    sees = torch.zeros(full.shape[:3], dtype=torch.bool)  # per (batch, position, query head) row
    if plan.tensor == "q":
        sees[batch, position, head] = True
    else:
        sees[batch, position:, head * group:(head + 1) * group] = True
    ours = torch.isnan(full).any(-1)
    if (sees & ~ours).any():
        return f"{int((sees & ~ours).sum())} of {int(sees.sum())} rows that see the NaN are not NaN"
    if (ours & ~sees).any() and plan.tensor != "v":
        return f"{int((ours & ~sees).sum())} rows that do not see the NaN in {plan.tensor} are NaN"
    expected, _ = naive_attention(*(torch.nan_to_num(x, nan=0.0) for x in (q, k, v)), causal=True)
    error = (full[~ours] - expected[~ours]).abs().max().item() if (~ours).any() else 0.0
    return "as documented" if error <= 1e-4 else f"finite rows differ from float64 by {error:.1e}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def rank_main(plan: FaultPlan, config: Config) -> dict:
    """One rank of one run: the training loop with the plan's fault. Returns what it saw:
    ``status`` ("finished" or "error"), ``error``, ``seconds`` from the start of the faulty
    step, the ``point`` where the fault was planned (from this rank's own step-0 events)
    and, for ``nan``, the behaviour and the guard's message."""
    rank = dist.get_rank()
    striking_rank = rank == plan.rank
    u, r = mesh_degrees(plan.method, config.world_size)
    mesh = init_mesh(u, r, timeout=datetime.timedelta(seconds=config.timeout_s))
    attend = {"ring": lambda q, k, v, **kw: ring_attention(q, k, v, mesh.ring_group, causal=True, **kw),
              "ulysses": lambda q, k, v, **kw: ulysses_attention(q, k, v, mesh.ulysses_group, causal=True, **kw),
              "usp": lambda q, k, v, **kw: usp_attention(q, k, v, mesh, causal=True, **kw)}[plan.method]
    seen = dict(rank=rank, status="finished", error="", seconds=None, point="")
    started, step0_events = None, []
    try:
        for step in range(config.steps):
            striking = striking_rank and step == plan.step
            if step == plan.step:
                started = time.perf_counter()
            generator = torch.Generator().manual_seed(step)
            shapes = [(1, config.seqlen, h, config.head_dim) for h in (config.heads, config.kv_heads, config.kv_heads)]
            local = [shard_sequence(torch.randn(shape, generator=generator), mesh) for shape in shapes]
            if striking and plan.kind == "shape":
                local[0] = local[0][:, :-2].contiguous()
            if striking and plan.kind == "nan":
                target = local[INPUTS.index(plan.tensor)]
                target.view(-1)[plan.element % target.numel()] = float("nan")
            for x in local:
                x.requires_grad_()
            with record_traffic() as log:
                if striking and plan.kind in STRIKES_AT_AN_EVENT:
                    log.events = _Tripwire(int(plan.at * len(step0_events)), _strike(plan.kind, config))
                out = attend(*local)
                if not (striking and plan.kind == "skip_backward"):
                    out.square().mean().backward()
            if step == 0:
                step0_events = list(log.events)
                at = int(plan.at * len(step0_events))
                seen["point"] = f"event {at + 1} of {len(step0_events)}: {_describe(step0_events[at])}"
            squares = sum((x.grad.double().square().sum() for x in local if x.grad is not None), torch.zeros((),
                                                                                                   dtype=torch.float64))
            dist.all_reduce(squares, group=mesh.sp_group)  # the step's gradient collective
            if plan.kind == "nan" and step == plan.step:
                seen["nan_behaviour"] = _nan_behaviour(out, local, mesh, plan)
                try:
                    attend(*local, check_finite=True)
                    seen["guard"] = "no error"
                except ValueError as error:
                    seen["guard"] = str(error)
    except Exception as error:  # what a rank sees of the fault
        seen.update(status="error", error=_first_line(error))
    if started is not None:
        seen["seconds"] = time.perf_counter() - started
    return seen


def judge(plan: FaultPlan, outcomes: list, config: Config) -> tuple[str, list[str]]:
    """The run's verdict and its reasons. ``outcomes``: the launcher's, one per rank.

    - ``hang``: a rank had no result when the launcher stopped waiting (or died), other
      than a killed or stalled faulty rank;
    - ``silent``: a rank finished although the run could not be right (every kind but nan);
    - ``late``: a rank raised, but after the timeout plus the margin;
    - ``unclear``: a rank raised before the fault; shape without the same disagreement
      error on every rank; nan without the documented behaviour, or a guard that did not
      name the rank and the tensor.
    """
    reasons = []
    first_error = next((o.value["error"] for o in outcomes if o.ok), None)
    for outcome in outcomes:
        if not outcome.ok:
            if not (outcome.rank == plan.rank and plan.kind in ("kill", "stall")):
                reasons.append(("hang", f"rank {outcome.rank}: {outcome.value.strip().splitlines()[-1]}"))
            continue
        seen = outcome.value
        who = f"rank {outcome.rank}"
        if plan.kind == "nan":
            expected = f"rank {plan.rank}: {plan.tensor} (1 NaN)"
            if seen["status"] != "finished":
                reasons.append(("unclear", f"{who} raised without the guard: {seen['error']}"))
            elif seen.get("nan_behaviour") != "as documented":
                reasons.append(("unclear", f"{who}: {seen.get('nan_behaviour')}"))
            elif not seen.get("guard", "").endswith(expected):
                reasons.append(("unclear", f"{who}: the guard said {seen.get('guard')!r}"))
        elif seen["status"] == "finished":
            reasons.append(("silent", f"{who} finished every step"))
        elif seen["seconds"] is None:
            reasons.append(("unclear", f"{who} raised before the fault: {seen['error']}"))
        elif seen["seconds"] > config.bound_s:
            reasons.append(("late", f"{who} raised after {seen['seconds']:.2f} s: {seen['error']}"))
        elif plan.kind == "shape" and ("the ranks of the group disagree" not in seen["error"]
                                       or seen["error"] != first_error):
            reasons.append(("unclear", f"{who}: {seen['error']}"))
    if not reasons:
        return "ok", []
    worst = min(VERDICTS.index(verdict) for verdict, _ in reasons)
    return VERDICTS[worst], [text for _, text in reasons]


def _error_seconds(plan: FaultPlan, outcomes: list) -> list[float]:
    """How long after the faulty step began each rank that raised did so."""
    return [o.value["seconds"] for o in outcomes
            if o.ok and o.value["status"] == "error" and o.value["seconds"] is not None
            and not (plan.kind == "raise" and o.rank == plan.rank)]


def run_one(plan: FaultPlan, config: Config) -> dict:
    """Launch one run and judge it: the plan, the verdict, each rank's outcome."""
    run_budget = config.steps * 60.0 + config.bound_s  # the launcher's stop: far beyond any expected end
    outcomes = spawn(config.world_size, rank_main, (plan, config), pg_timeout_s=120.0, timeout_s=run_budget)
    verdict, reasons = judge(plan, outcomes, config)
    seconds = _error_seconds(plan, outcomes)
    point = next((o.value["point"] for o in outcomes if o.ok and o.value["point"]), "")
    return dict(plan=asdict(plan), verdict=verdict, reasons=reasons, point=point if plan.kind in
                STRIKES_AT_AN_EVENT else "", worst_error_s=max(seconds) if seconds else None,
                errors=sorted({o.value["error"] for o in outcomes if o.ok and o.value["error"]}),
                ranks=[dict(o.value, ok=True) if o.ok else dict(rank=o.rank, ok=False, lost=o.value.strip())
                       for o in outcomes])


def summarize(results: list[dict]) -> list[dict]:
    """Per fault kind: runs, the count of each verdict, the worst time to error."""
    rows = []
    for kind in dict.fromkeys(r["plan"]["kind"] for r in results):
        mine = [r for r in results if r["plan"]["kind"] == kind]
        seconds = [r["worst_error_s"] for r in mine if r["worst_error_s"] is not None]
        rows.append(dict(kind=kind, runs=len(mine), **{v: sum(r["verdict"] == v for r in mine) for v in VERDICTS},
                         worst_error_s=max(seconds) if seconds else None))
    return rows


def _table(rows: list[dict]) -> str:
    header = f"{'fault':<14}{'runs':>5}" + "".join(f"{v:>8}" for v in VERDICTS) + f"{'worst s to error':>18}"
    lines = [header]
    for row in rows + [dict(kind="all", runs=sum(r["runs"] for r in rows),
                            **{v: sum(r[v] for r in rows) for v in VERDICTS},
                            worst_error_s=max((r["worst_error_s"] for r in rows if r["worst_error_s"] is not None),
                                              default=None))]:
        worst = "-" if row["worst_error_s"] is None else f"{row['worst_error_s']:.2f}"
        lines.append(f"{row['kind']:<14}{row['runs']:>5}" + "".join(f"{row[v]:>8}" for v in VERDICTS)
                     + f"{worst:>18}")
    return "\n".join(lines)


def _guard_timing(seqlen: int, heads: int, head_dim: int, warmup: int, repeats: int) -> dict:
    """On every rank of a 2 x (N/2) mesh: seconds per USP forward + backward without any
    check, with the rank-agreement check, and with it and ``check_finite``, interleaved."""
    mesh = init_mesh(2, dist.get_world_size() // 2)
    generator = torch.Generator().manual_seed(0)
    local = [shard_sequence(torch.randn(1, seqlen, heads, head_dim, generator=generator), mesh).requires_grad_()
             for _ in range(3)]
    variants = {"no checks": dict(check_ranks=False), "rank check": {},
                "rank check + check_finite": dict(check_finite=True)}
    times = {name: [] for name in variants}
    for repeat in range(warmup + repeats):
        for name, options in variants.items():
            dist.barrier()
            start = time.perf_counter()
            usp_attention(*local, mesh, causal=True, **options).sum().backward()
            if repeat >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def guard_cost(world_size: int, seqlen: int, heads: int, head_dim: int, warmup: int, repeats: int) -> dict:
    """Median ms per call of each variant (slowest rank per repeat) and ratios to no checks."""
    outcomes = spawn(world_size, _guard_timing, (seqlen, heads, head_dim, warmup, repeats), pg_timeout_s=600.0)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError(f"the checks' timing failed on rank {failed[0].rank}: {failed[0].value}")
    per_rank = [o.value for o in outcomes]
    ms = {name: 1e3 * statistics.median(max(rank[name][i] for rank in per_rank) for i in range(repeats))
          for name in per_rank[0]}
    base = ms["no checks"]
    return dict(method="usp", ulysses_degree=2, ring_degree=world_size // 2, **{"pass": "fwd+bwd"}, seqlen=seqlen,
                heads=heads, head_dim=head_dim, dtype="fp32", causal=True, repeats=repeats, ms=ms,
                ratio={name: value / base for name, value in ms.items()})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=bounded_int(1), default=50, help="runs, one fault each")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault plans")
    parser.add_argument("--kind", dest="kinds", action="append", choices=FAULT_KINDS,
                        help="fault kind, repeatable (default: all, in turn)")
    parser.add_argument("--method", dest="methods", action="append", choices=METHODS,
                        help="method, repeatable (default: all, in turn)")
    parser.add_argument("--world-size", type=bounded_int(4, 64), default=4, help="processes per run (even)")
    parser.add_argument("--steps", type=bounded_int(2), default=3, help="training steps per run (step 0 is clean)")
    parser.add_argument("--timeout", type=positive_float, default=5.0,
                        help="process-group timeout of the attention's groups, seconds")
    parser.add_argument("--margin", type=positive_float, default=10.0,
                        help="seconds beyond the timeout a rank may take to raise")
    parser.add_argument("--guard-seqlen", type=bounded_int(0), default=2048,
                        help="sequence length at which the checks' cost is timed (0: not timed)")
    parser.add_argument("--guard-repeats", type=bounded_int(1), default=15, help="timed calls per variant")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.world_size % 2:
        raise SystemExit(f"faults: --world-size must be even (USP runs on 2 x N/2), got {args.world_size}")
    config = Config(world_size=args.world_size, steps=args.steps, timeout_s=args.timeout, margin_s=args.margin)
    plans = make_plans(args.runs, args.seed, config, tuple(args.kinds or FAULT_KINDS),
                       tuple(args.methods or METHODS))
    print(f"faults: {args.runs} runs of {config.steps} training steps on {config.world_size} gloo processes, "
          f"one fault each; a rank must raise within {config.timeout_s:g} s (timeout) + {config.margin_s:g} s",
          flush=True)
    results, began = [], time.monotonic()
    for plan in plans:
        result = run_one(plan, config)
        results.append(result)
        worst = "" if result["worst_error_s"] is None else f", raised within {result['worst_error_s']:.2f} s"
        where = f" at {result['point']}" if result["point"] else f" in {plan.tensor}" if plan.kind == "nan" else ""
        print(f"run {plan.run + 1}/{len(plans)}: {plan.method} {plan.kind} on rank {plan.rank} in step {plan.step}"
              f"{where}: {result['verdict']}{worst}" + "".join(f"\n    {reason}" for reason in result["reasons"]),
              flush=True)
    rows = summarize(results)
    elapsed = time.monotonic() - began
    print(f"{len(results)} runs in {elapsed:.0f} s\n{_table(rows)}")
    guard = None
    if args.guard_seqlen:
        print(f"timing the checks: usp u2 x r{config.world_size // 2} fwd+bwd, {args.guard_seqlen} tokens, 8 heads "
              f"d64 fp32, median of {args.guard_repeats} (slowest rank) ...",
              flush=True)
        guard = guard_cost(config.world_size, args.guard_seqlen, 8, 64, 1, args.guard_repeats)
        print("  " + ", ".join(f"{name} {ms:.1f} ms ({guard['ratio'][name]:.3f}x)" for name, ms in guard["ms"].items()))
    path = write_result("faults", torch.device("cpu"), dict(config=dict(asdict(config), runs=args.runs, seed=args.seed,
                                                                         bound_s=config.bound_s, seqlen=config.seqlen,
                                                                         heads=config.heads, seconds=elapsed),
                                                             summary=rows, guard_cost=guard, runs=results),
                        args.out_dir)
    print(f"wrote {path}")
    return 0 if all(r["verdict"] == "ok" for r in results) else 1
