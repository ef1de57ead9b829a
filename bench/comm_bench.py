"""``usp-bench comm``: measure the links the cost model needs on this machine and write
them as a cluster file for ``usp-bench model --cluster-file``.

All-to-all: over every group of ``n`` neighbouring ranks at once (``n`` = 2, 4, .. up to
the world size), for each message size; the figure is the bytes one rank sends divided
by the slowest rank's median time (nccl-tests' bus bandwidth). P2P: every rank sends to
the next rank of its ring and receives from the one behind at once, as a ring attention
step does, for rings inside each domain, through each node and across the nodes, where
the world reaches that far. Latency: the time of the smallest message. Each group sits at the widest
level it spans (``hardware.py``): tell the command how many GPUs share the fastest links
with ``--gpus-per-domain`` (one CPU socket's on a PCIe box).

Locally the ranks are gloo processes (CPU tensors); under torchrun with CUDA, NCCL on
GPUs, which is what a GPU cluster's file should come from. The figures that are not
links (peak, memory bandwidth, kernel curve) come from ``--base`` (a preset) or
``--kernels-file``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from .cli_args import add_output_arguments, add_timing_arguments, bounded_int, world_size_type
from .clusters import CLUSTERS
from .hardware import LEVELS, Cluster, group_level, with_kernel
from .kernel_curve import from_kernel_results
from .launch import cores_available, join_torchrun_group, under_torchrun
from .launch import run as launch_run
from .results import device_name, new_run_dir, write_result
from .timing import measure_ms


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]  # bytes per rank per message
    gpus_per_domain: int
    gpus_per_node: int
    warmup: int
    repeats: int


def group_sizes(world: int) -> list[int]:
    return [n for n in (2 ** i for i in range(1, 7)) if n <= world and world % n == 0]


def p2p_rings(world: int, gpus_per_domain: int, gpus_per_node: int) -> list[str]:
    """The levels a P2P ring can be measured at here: a ring inside each domain, one
    through each node, one across the nodes."""
    wanted = {"domain": gpus_per_domain >= 2, "node": gpus_per_node > gpus_per_domain, "network": world > gpus_per_node}
    return [level for level in LEVELS if wanted[level]]


def ring_neighbours(rank: int, world: int, level: str, gpus_per_domain: int, gpus_per_node: int) -> tuple[int, int]:
    """(next, previous) of ``rank`` in the rings of ``level``."""
    if level == "network":
        return (rank + gpus_per_node) % world, (rank - gpus_per_node) % world
    size = gpus_per_domain if level == "domain" else gpus_per_node
    base = rank // size * size
    return base + (rank - base + 1) % size, base + (rank - base - 1) % size


def rank_main(settings: Settings) -> dict:
    """This rank's median milliseconds per (kind, group size or stride, message size)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    times = {"all_to_all": {}, "p2p": {}}
    for n in group_sizes(world):
        groups = [dist.new_group(list(range(start, start + n))) for start in range(0, world, n)]
        mine = groups[rank // n]
        for size in settings.sizes:
            data = torch.ones(max(n, size // 4 // n * n), dtype=torch.float32, device=device)
            out = torch.empty_like(data)
            dist.barrier()
            timing = measure_ms(lambda: dist.all_to_all_single(out, data, group=mine), device, settings.warmup,
                                settings.repeats, hide_host=False)
            times["all_to_all"][f"{n}/{data.numel() * 4}"] = timing["ms"]
    for level in p2p_rings(world, settings.gpus_per_domain, settings.gpus_per_node):
        following, previous = ring_neighbours(rank, world, level, settings.gpus_per_domain, settings.gpus_per_node)
        for size in settings.sizes:
            data = torch.ones(max(1, size // 4), dtype=torch.float32, device=device)
            out = torch.empty_like(data)

            def exchange():
                ops = [dist.P2POp(dist.isend, data, following), dist.P2POp(dist.irecv, out, previous)]
                for request in dist.batch_isend_irecv(ops):
                    request.wait()
            dist.barrier()
            times["p2p"][f"{level}/{data.numel() * 4}"] = measure_ms(exchange, device, settings.warmup,
                                                                      settings.repeats, hide_host=False)["ms"]
    return times


def profile(per_rank: list[dict], settings: Settings, world: int, base: Cluster, name: str) -> tuple[Cluster, dict]:
    """The cluster file's link figures from every rank's timings (the slowest rank counts)."""
    slowest = {kind: {key: max(rank[kind][key] for rank in per_rank) for key in per_rank[0][kind]}
               for kind in ("all_to_all", "p2p")}
    all_to_all, p2p, latency, points = {}, {}, {}, []
    for key, ms in slowest["all_to_all"].items():
        n, nbytes = map(int, key.split("/"))
        level = group_level(range(n), settings.gpus_per_domain, settings.gpus_per_node)
        points.append(dict(kind="all_to_all", group_size=n, level=level, bytes=nbytes, ms=ms,
                           gbs=nbytes * (n - 1) / n / (ms * 1e6)))
    for key, ms in slowest["p2p"].items():
        level, nbytes = key.split("/")
        nbytes = int(nbytes)
        points.append(dict(kind="p2p", level=level, bytes=nbytes, ms=ms, gbs=nbytes / (ms * 1e6)))
    largest = {kind: max(p["bytes"] for p in points if p["kind"] == kind) for kind in ("all_to_all", "p2p")}
    smallest = min(p["bytes"] for p in points if p["kind"] == "p2p")
    for p in points:
        if p["bytes"] == largest[p["kind"]] and p["kind"] == "all_to_all":
            all_to_all.setdefault(p["level"], {})[p["group_size"]] = p["gbs"]
        elif p["bytes"] == largest[p["kind"]]:
            p2p[p["level"]] = p["gbs"]
        if p["bytes"] == smallest and p["kind"] == "p2p":
            latency[p["level"]] = p["ms"] * 1e3
    for level in LEVELS:  # a level without a P2P figure of its own borrows the all-to-all's
        if level in all_to_all and level not in p2p:
            p2p[level] = max(all_to_all[level].values())
        if level in p2p and level not in latency:
            latency[level] = max(latency.values())
    nodes = max(1, world // settings.gpus_per_node)
    source = f"measured by usp-bench comm on {world} ranks"
    cluster = replace(base, name=name, gpus_per_domain=settings.gpus_per_domain, gpus_per_node=settings.gpus_per_node,
                      nodes=nodes, all_to_all_gbs=all_to_all, p2p_gbs=p2p, latency_us=latency,
                      sources={**base.sources, "links": source, "domain": source, "node": source, "network": source,
                               "latency": source,
                               "base": f"peak, memory, SM count, kernel and launch figures of {base.name}"})
    return cluster, dict(points=points, largest_bytes=largest, smallest_bytes=smallest)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=world_size_type, default=None,
                        help="gloo processes to start (default: the cores here, at least 2; under torchrun its world)")
    parser.add_argument("--sizes", type=bounded_int(64), nargs="+", default=None,
                        help="bytes per rank per message (default: 4 KiB to 1 MiB on a CPU, 64 KiB to 256 MiB on GPUs)")
    parser.add_argument("--gpus-per-domain", type=bounded_int(1), default=None,
                        help="ranks that share the fastest links (default: a whole node)")
    parser.add_argument("--base", choices=list(CLUSTERS), default="8xA100-NVLink",
                        help="preset whose peak, memory bandwidth and kernel curve the file keeps")
    parser.add_argument("--kernels-file", type=Path,
                        help="usp-bench kernels results for the kernel curve (default: the base preset's)")
    parser.add_argument("--name", default=None, help="the cluster's name (default: this machine's device and size)")
    parser.add_argument("--cluster-file", type=Path, default=None,
                        help="where to write the cluster file (default: cluster.json in the run folder)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck run is stopped")
    add_timing_arguments(parser, warmup=2, repeats=5)
    add_output_arguments(parser)


def _settings(args, world: int, gpus_per_node: int, gpu: bool) -> Settings:
    sizes = tuple(args.sizes or ([2 ** k for k in range(16, 29, 2)] if gpu else [2 ** k for k in range(12, 21, 2)]))
    domain = args.gpus_per_domain or gpus_per_node
    if gpus_per_node % domain:
        raise SystemExit(f"--gpus-per-domain {domain} must divide the {gpus_per_node} ranks per node")
    return Settings(sizes, domain, gpus_per_node, args.warmup, args.repeats)


def run(args: argparse.Namespace) -> int:
    if under_torchrun():
        return _run_under_torchrun(args)
    world = args.world_size or max(2, cores_available())
    settings = _settings(args, world, world, gpu=False)
    print(f"comm: {world} gloo processes, all-to-all over groups of {group_sizes(world)}, P2P rings at levels "
          f"{p2p_rings(world, settings.gpus_per_domain, settings.gpus_per_node)}, messages "
          f"{settings.sizes[0]} to {settings.sizes[-1]} bytes per rank", flush=True)
    per_rank = launch_run(world, rank_main, (settings,), pg_timeout_s=min(args.timeout, 300.0),
                          timeout_s=args.timeout)
    return _report(per_rank, settings, world, torch.device("cpu"), "gloo", args)


def _run_under_torchrun(args) -> int:
    device = join_torchrun_group(args.timeout)
    try:
        world = dist.get_world_size()
        settings = _settings(args, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)), gpu=device.type == "cuda")
        gathered = [None] * world
        dist.all_gather_object(gathered, rank_main(settings))
        if dist.get_rank() != 0:
            return 0
        return _report(gathered, settings, world, device, dist.get_backend(), args)
    finally:
        dist.destroy_process_group()


def _report(per_rank, settings: Settings, world: int, device: torch.device, backend: str, args) -> int:
    base = CLUSTERS[args.base]
    if args.kernels_file:
        base = with_kernel(base, from_kernel_results(args.kernels_file))
    name = args.name or f"{world}x{device_name(device)} ({backend})"
    cluster, measured = profile(per_rank, settings, world, base, name)
    print(f"{'kind':<11}{'group':>13}{'level':>9}{'bytes':>12}{'ms':>10}{'GB/s':>9}")
    for p in measured["points"]:
        print(f"{p['kind']:<11}{p.get('group_size', 'ring'):>13}{p['level']:>9}{p['bytes']:>12}"
              f"{p['ms']:>10.3f}{p['gbs']:>9.3f}")
    print("GB/s: bytes one rank sends over the slowest rank's median time (all-to-all: (n-1)/n of the message)")
    out_dir = Path(args.out_dir) if args.out_dir else new_run_dir("comm")
    out_dir.mkdir(parents=True, exist_ok=True)
    cluster_path = args.cluster_file or out_dir / "cluster.json"
    cluster_path.parent.mkdir(parents=True, exist_ok=True)
    cluster_path.write_text(json.dumps(dict(cluster.to_json(), kind="cluster", measured=measured), indent=1))
    path = write_result("comm", device, dict(config=dict(asdict(settings), world_size=world, backend=backend,
                                                         base=args.base), cluster=cluster.to_json(), **measured),
                        out_dir)
    print(f"wrote {cluster_path} (usp-bench model --cluster-file {cluster_path}) and {path}")
    return 0
