"""A cluster as the cost model sees it: where the GPUs sit, how fast their links are for
each kind of transfer and group, and how fast the attention kernel runs on them.

Topology in three levels. A *domain* is the set of GPUs that share the fastest links
(an NVLink/NVSwitch node; on a PCIe box without NVLink, the GPUs under one CPU socket),
a *node* one machine, the *network* what joins the nodes. Global ranks fill a domain,
then a node, in order. A group of ranks sits at the widest level it spans::

    8 x L20, two sockets:  [0 1 2 3 | 4 5 6 7]   {0,1,2,3}: domain  {0,2,4,6}: node
    2 x 8 x A100:          [0 .. 7] [8 .. 15]      {0..7}: domain     {0,8}: network

Link figures are per GPU and per direction, in GB/s (1e9 B/s):

- ``all_to_all_gbs[level][n]``: bytes one GPU sends in an all-to-all over ``n`` GPUs at
  that level, divided by the time it takes (nccl-tests' bus bandwidth). It depends on
  ``n``: on a PCIe box the GPUs' transfers pile up on the host bridge, so a wider group
  is slower per byte. Between measured sizes it is interpolated in ``log n``.
- ``p2p_gbs[level]``: one hop of a ring whose every member sends to the next at once
  (as the ring attention does), for a ring whose widest hop is at that level.
- ``latency_us[level]``: the fixed cost of one message (one collective, one hop).

``usp-bench comm`` measures these on the machine it runs on and writes them as a
cluster file (``to_json``); ``usp-bench model --cluster-file`` reads it.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .kernel_curve import KernelCurve

LEVELS = ("domain", "node", "network")


@dataclass(frozen=True)
class Cluster:
    name: str
    gpus_per_domain: int
    gpus_per_node: int
    nodes: int
    peak_tflops: float  # dense bf16 tensor-core peak per GPU
    memory_gbs: float  # HBM/GDDR bandwidth per GPU
    all_to_all_gbs: dict[str, dict[int, float]]
    p2p_gbs: dict[str, float]
    latency_us: dict[str, float]
    kernel: KernelCurve
    launch_us: float = 5.0  # one kernel launch as the host issues it
    gemm_efficiency: float = 0.7  # achieved / peak of the block's large matmuls
    memory_gib: float = 80.0
    sm_count: int | None = None  # streaming multiprocessors per GPU (the kernel's waves of tiles)
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.gpus_per_node % self.gpus_per_domain:
            raise ValueError(f"cluster {self.name}: {self.gpus_per_node} GPUs per node do not split into domains "
                             f"of {self.gpus_per_domain}")
        used = [level for level in LEVELS if self.level_needed(level)]
        for level in used:
            if not self.all_to_all_gbs.get(level) or level not in self.p2p_gbs or level not in self.latency_us:
                raise ValueError(f"cluster {self.name}: no {level} link figures (all_to_all_gbs, p2p_gbs, "
                                 f"latency_us), but its topology has groups at that level")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def level_needed(self, level: str) -> bool:
        return {"domain": True, "node": self.gpus_per_node > self.gpus_per_domain, "network": self.nodes > 1}[level]

    def level(self, ranks) -> str:
        """The widest level a group of global ranks spans."""
        return group_level(ranks, self.gpus_per_domain, self.gpus_per_node)

    def ring_level(self, ranks) -> str:
        """The widest level among a ring's hops (each member to the next, the last to the first)."""
        return ring_level(ranks, self.gpus_per_domain, self.gpus_per_node)

    def all_to_all_ms(self, bytes_sent: float, ranks, messages: int = 1) -> float:
        """``messages`` all-to-alls in which each GPU of the group sends ``bytes_sent`` bytes in all."""
        ranks = list(ranks)
        level = self.level(ranks)
        bandwidth = _by_size(self.all_to_all_gbs[level], len(ranks))
        return messages * self.latency_us[level] * 1e-3 + bytes_sent / (bandwidth * 1e9) * 1e3

    def hop_ms(self, nbytes: float, ranks) -> float:
        """One ring hop of ``nbytes`` while every member of the ring sends at once."""
        level = self.ring_level(ranks)
        return self.latency_us[level] * 1e-3 + nbytes / (self.p2p_gbs[level] * 1e9) * 1e3

    def collective_ms(self, bytes_sent: float, ranks) -> float:
        """A ring all-gather or reduce-scatter in which each GPU sends ``bytes_sent`` bytes
        in ``n - 1`` hops of the group's ring."""
        ranks = list(ranks)
        if len(ranks) < 2:
            return 0.0
        level = self.ring_level(ranks)
        return (len(ranks) - 1) * self.latency_us[level] * 1e-3 + bytes_sent / (self.p2p_gbs[level] * 1e9) * 1e3

    def to_json(self) -> dict:
        return dict(name=self.name, gpus_per_domain=self.gpus_per_domain, gpus_per_node=self.gpus_per_node,
                    nodes=self.nodes, peak_tflops=self.peak_tflops, memory_gbs=self.memory_gbs,
                    all_to_all_gbs={level: {str(n): bw for n, bw in table.items()}
                                    for level, table in self.all_to_all_gbs.items()},
                    p2p_gbs=dict(self.p2p_gbs), latency_us=dict(self.latency_us), kernel=self.kernel.to_json(),
                    launch_us=self.launch_us, gemm_efficiency=self.gemm_efficiency, memory_gib=self.memory_gib,
                    sm_count=self.sm_count, sources=dict(self.sources))

    @classmethod
    def from_json(cls, data: dict) -> Cluster:
        unknown = set(data) - set(cls.__dataclass_fields__) - {"kind", "measured"}
        if unknown:
            raise ValueError(f"unknown cluster fields: {', '.join(sorted(unknown))}")
        missing = [k for k in ("name", "gpus_per_domain", "gpus_per_node", "nodes", "peak_tflops", "memory_gbs",
                               "all_to_all_gbs", "p2p_gbs", "latency_us", "kernel") if k not in data]
        if missing:
            raise ValueError(f"cluster file lacks {', '.join(missing)}")
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["all_to_all_gbs"] = {level: {int(n): float(bw) for n, bw in table.items()}
                                    for level, table in data["all_to_all_gbs"].items()}
        fields["kernel"] = KernelCurve.from_json(data["kernel"])
        return cls(**fields)


def group_level(ranks, gpus_per_domain: int, gpus_per_node: int) -> str:
    ranks = list(ranks)
    if len({rank // gpus_per_domain for rank in ranks}) == 1:
        return "domain"
    return "node" if len({rank // gpus_per_node for rank in ranks}) == 1 else "network"


def ring_level(ranks, gpus_per_domain: int, gpus_per_node: int) -> str:
    ranks = list(ranks)
    hops = [group_level((a, b), gpus_per_domain, gpus_per_node) for a, b in zip(ranks, ranks[1:] + ranks[:1])]
    return max(hops, key=LEVELS.index) if len(ranks) > 1 else "domain"


def _by_size(table: dict[int, float], n: int) -> float:
    """The figure for group size ``n``: interpolated in ``log n``, flat beyond the measured sizes."""
    sizes = sorted(table)
    if n <= sizes[0]:
        return table[sizes[0]]
    if n >= sizes[-1]:
        return table[sizes[-1]]
    i = bisect.bisect_right(sizes, n)
    a, b = sizes[i - 1], sizes[i]
    return table[a] + (table[b] - table[a]) * (math.log(n) - math.log(a)) / (math.log(b) - math.log(a))


def load_cluster(path: str | Path) -> Cluster:
    try:
        return Cluster.from_json(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"cannot read the cluster file {path}: {error}") from None


def with_kernel(cluster: Cluster, kernel: KernelCurve) -> Cluster:
    return replace(cluster, kernel=kernel, sources={**cluster.sources, "kernel": kernel.source})
