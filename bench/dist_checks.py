"""Distributed numerics: ring, Ulysses and USP attention on gloo processes against
float64 naive attention on the whole sequence, with the traffic each rank generated.

Every rank builds the same global inputs (one seed per data-parallel replica), runs
the method on its shards, gathers out and the gradients back, and compares them with
the oracle using the tolerance rule of ``bench.numerics`` (baseline: the naive backend
in the input dtype on the whole sequence). It also records, per pass, the point-to-point
and all-to-all transfers it posted and whether every ring step's next K/V transfer was
posted before that step's compute started.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from usp.attention import gather_sequence, ring_attention, shard_sequence, ulysses_attention, usp_attention
from usp.comm import init_mesh, record_traffic, traffic
from usp.kernels import AttentionShape

from .launch import run
from .results import sp_impl_name
from .numerics import (DTYPE_NAMES, Case, Verdict, compare, poisoned_allocations, reference, run_backend,
                       worst_ratio)

QUANTITIES = ("out", "dq", "dk", "dv")
METHODS = ("ring", "ulysses", "usp")


@dataclass(frozen=True)
class DistCase:
    """One distributed check: a method on a ``ulysses x ring`` mesh of ``world_size`` ranks."""

    method: str
    ulysses_degree: int
    ring_degree: int
    world_size: int
    placement: str = "ulysses_inner"
    layout: str = "zigzag"
    causal: bool = True
    backend: str = "naive"
    dtype: torch.dtype = torch.float64
    batch: int = 2
    seqlen: int = 48
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 16

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "ring" and self.ulysses_degree != 1 or self.method == "ulysses" and self.ring_degree != 1:
            raise ValueError(f"{self.method} attention runs on a mesh with degree 1 on the other axis")
        if self.world_size % (self.ulysses_degree * self.ring_degree):
            raise ValueError("ulysses_degree x ring_degree must divide world_size")

    @property
    def impl(self) -> str:
        return sp_impl_name(self.ulysses_degree, self.ring_degree, self.layout, self.method)

    @property
    def shape(self) -> AttentionShape:
        return AttentionShape(self.batch, self.seqlen, self.seqlen, self.heads, self.kv_heads, self.head_dim)

    @property
    def label(self) -> str:
        dp = self.world_size // (self.ulysses_degree * self.ring_degree)
        return (f"{self.impl} dp{dp} {self.placement} {'causal' if self.causal else 'full'} "
                f"h{self.heads}/{self.kv_heads} {self.backend} {DTYPE_NAMES[self.dtype]}")

    def record(self) -> dict:
        return dict(impl=self.impl, method=self.method, ulysses_degree=self.ulysses_degree,
                    ring_degree=self.ring_degree, world_size=self.world_size, placement=self.placement,
                    layout=self.layout, causal=self.causal, backend=self.backend, dtype=DTYPE_NAMES[self.dtype],
                    batch=self.batch, seqlen=self.seqlen, heads=self.heads, kv_heads=self.kv_heads,
                    head_dim=self.head_dim)


def _attend(case: DistCase, mesh, q, k, v):
    if case.method == "ring":
        return ring_attention(q, k, v, mesh.ring_group, case.causal, None, case.layout, case.backend)
    if case.method == "ulysses":
        return ulysses_attention(q, k, v, mesh.ulysses_group, case.causal, None, case.backend)
    return usp_attention(q, k, v, mesh, case.causal, None, case.layout, case.backend)


def _traffic(log) -> dict:
    """What one pass sent: point-to-point sends and bytes, all-to-alls and bytes."""
    return dict(p2p_sends=log.sends(traffic.P2P), p2p_bytes=log.bytes_sent(traffic.P2P),
                all_to_alls=len(log.of_kind(traffic.ALL_TO_ALL)), all_to_all_bytes=log.bytes_sent(traffic.ALL_TO_ALL))


def transfers_lead_compute(log, ring_size: int) -> bool:
    """True when each ring step's compute started after the next step's K/V was posted."""
    posted = set()
    for event in log.events:
        if event.kind == traffic.P2P and event.label in traffic.KV_LABELS:
            posted.add(event.step)
        elif event.kind == traffic.COMPUTE and event.step + 1 < ring_size and event.step + 1 not in posted:
            return False
    return True


def _inputs(case: DistCase, seed: int, device):
    generator = torch.Generator().manual_seed(seed)
    s = case.shape

    def randn(heads):
        return torch.randn(s.batch, s.seqlen_q, heads, s.head_dim, generator=generator).to(device, case.dtype)
    return randn(s.heads), randn(s.kv_heads), randn(s.kv_heads), randn(s.heads)


def check_cases(cases: list[DistCase], seed: int = 0, device: str = "cpu") -> list[dict]:
    """Run on every rank of a process group (see ``bench.launch``); one result per case.
    ``device``: where the tensors live ("cuda" for an NCCL group)."""
    meshes = {}
    results = []
    for index, case in enumerate(cases):
        start = time.perf_counter()
        key = (case.ulysses_degree, case.ring_degree, case.placement)
        if key not in meshes:  # the same order on every rank, as group creation requires
            meshes[key] = init_mesh(*key)
        mesh = meshes[key]
        q, k, v, dout = _inputs(case, seed + 1000 * index + mesh.dp_rank, device)
        ref = reference(q, k, v, dout, case.causal)
        has_baseline = case.backend != "naive" and case.dtype != torch.float64
        baseline = run_backend("naive", q, k, v, dout, case.causal) if has_baseline else None
        q_local, k_local, v_local, dout_local = (shard_sequence(x, mesh, layout=case.layout) for x in (q, k, v, dout))
        for x in (q_local, k_local, v_local):
            x.requires_grad_()
        with poisoned_allocations():
            with record_traffic() as forward:
                out_local = _attend(case, mesh, q_local, k_local, v_local)
            with record_traffic() as backward:
                out_local.backward(dout_local)
        gathered = {name: gather_sequence(x, mesh, layout=case.layout)
                    for name, x in zip(QUANTITIES, (out_local, q_local.grad, k_local.grad, v_local.grad))}
        errors, tolerances, failures = compare(Case(case.backend, case.dtype, case.shape, case.causal), gathered,
                                               ref, baseline, QUANTITIES)
        results.append(dict(errors=errors, tolerances=tolerances, failures=failures, ulysses_rank=mesh.ulysses_rank,
                            forward=_traffic(forward), backward=_traffic(backward),
                            overlapped=transfers_lead_compute(forward, case.ring_degree)
                            and transfers_lead_compute(backward, case.ring_degree),
                            seconds=time.perf_counter() - start))
    return results


@dataclass
class DistResult(Verdict):
    """A case's outcome over all ranks: the worst rank's errors, every rank's failures."""

    case: DistCase
    errors: dict[str, float]
    tolerances: dict[str, float]
    failures: list[str]
    forward: dict
    backward: dict
    overlapped: bool
    seconds: float

    def record(self) -> dict:
        return dict(**self.case.record(), errors=self.errors, tolerances=self.tolerances, failures=self.failures,
                    worst_ratio=self.worst_ratio, passed=self.passed, traffic_per_rank=dict(
                        forward=self.forward, backward=self.backward), transfers_overlap_compute=self.overlapped,
                    seconds=round(self.seconds, 3))


def merge_ranks(case: DistCase, per_rank: list[dict]) -> DistResult:
    """One result from every rank's: the rank with the worst error/tolerance ratio, all
    ranks' failures, rank 0's traffic (every rank sends the same amounts)."""
    worst = max(per_rank, key=lambda r: worst_ratio(r["errors"], r["tolerances"]))
    failures = [f"rank {rank}: {f}" for rank, r in enumerate(per_rank) for f in r["failures"]]
    if not all(r["overlapped"] for r in per_rank):
        failures.append("a ring step computed before the next K/V transfer was posted")
    return DistResult(case, worst["errors"], worst["tolerances"], failures, per_rank[0]["forward"],
                      per_rank[0]["backward"], all(r["overlapped"] for r in per_rank),
                      max(r["seconds"] for r in per_rank))


def run_checks(cases: list[DistCase], seed: int = 0, on_world=None) -> list[DistResult]:
    """Launch one gloo group per world size and run its cases; ``on_world(world, results)``
    is called as each world finishes (for progress output)."""
    results = []
    for world in sorted({c.world_size for c in cases}):
        mine = [c for c in cases if c.world_size == world]
        per_rank = run(world, check_cases, (mine, seed), pg_timeout_s=120, timeout_s=900)
        done = [merge_ranks(case, [rank_results[i] for rank_results in per_rank]) for i, case in enumerate(mine)]
        if on_world is not None:
            on_world(world, done)
        results += done
    return results
