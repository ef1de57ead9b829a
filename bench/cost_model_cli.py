"""``usp-bench model``: the paper's communication and memory cost model (USP,
arXiv 2405.07719, Table 2) for a model shape, a sequence length and a cluster.

Prints and writes, per transformer block and device: the communication volume of
SP-Ulysses, SP-Ring, every USP ``u x r``, Megatron TP-SP and DP / ZeRO over a range of
degrees; the memory of each; the predicted attention time of every mesh and placement
on the cluster (compute at the given efficiency, Ulysses all-to-alls, and ring
transfers that outlast a step's compute), ranked, with the recommended one; and where
the model agrees with the paper's published findings and where it does not. No
process is launched: this runs in a second.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace

import torch

from . import cost_model as cm
from .cli_args import add_output_arguments, bounded_int, positive_float
from .flops import FLOP_CONVENTION
from .results import write_result

RING_UNITS_NOTE = ("the paper counts SP-Ring at 4 units per block (2 forward, 2 backward); counted as sent it is 6 "
                   "(for MHA, N large): backward sends K and V around again besides the dK/dV accumulators")
# The best mesh the paper measured for attention alone (LLaMA3-8B shape, forward, bf16, zigzag
# ring, 8 GPUs): Ulysses degree per sequence length, from its Tables 3 (8 x L20, PCIe, two CPU
# sockets) and 4 (8 x A100, NVLink). The tables' length may be per GPU rather than global; the
# model is evaluated at the global length.
PAPER_BEST_ULYSSES_DEGREE = {
    "8xL20-PCIe": ("paper, Table 3 (8 x L20, PCIe)", {8192: 2, 32768: 2, 131072: 2}),
    "8xA100-NVLink": ("paper, Table 4 (8 x A100, NVLink)", {32768: 8, 131072: 1}),
}


def paper_checks() -> list[dict]:
    """The model against the paper's findings, each verdict computed from the model."""
    llama2, llama3 = cm.MODELS["llama2-7b"], cm.MODELS["llama3-8b"]
    checks = []

    ratio = {n: cm.communication(llama2, 1, 65536, n, 1)["units"] / cm.megatron_tp_sp(1, 65536, llama2.hidden,
                                                                                      n)["units"] for n in (8, 16)}
    checks.append(dict(
        claim="SP-Ulysses sends less than Megatron TP-SP, by a factor that grows with N",
        source="paper, Table 2", model=f"ratio {ratio[8]:.4f} at N = 8, {ratio[16]:.4f} at N = 16 (LLaMA2-7B, MHA)",
        agrees=ratio[8] < 1 and abs(ratio[16] - ratio[8] / 2) < 1e-9))

    ring = cm.communication(llama2, 1, 65536, 1, 1024)
    checks.append(dict(
        claim="SP-Ring sends 4 units per block", source="paper, Table 2",
        model=f"counted the paper's way {ring['paper_units']:.2f}, as sent {ring['units']:.2f} units at N = 1024",
        agrees=abs(ring["paper_units"] - 4) < 0.01, note=RING_UNITS_NOTE))

    worse = [f"{shape.name} u{u}r{r}" for shape in (llama2, llama3) for world in (8, 16)
             for u, r in cm.meshes(world, shape)
             if cm.communication(shape, 1, 65536, u, r)["units"] >= cm.megatron_tp_sp(1, 65536, shape.hidden,
                                                                                     world)["units"]]
    checks.append(dict(
        claim="USP sends less than Megatron TP-SP", source="paper, Table 2",
        model="every USP mesh of 8 and 16 devices sends fewer activation units than TP-SP" if not worse
        else f"not less for: {', '.join(worse)}", agrees=not worse,
        note="activation traffic only; SP also all-reduces gradients, which TP-SP does not"))

    for cluster, (source, measured) in PAPER_BEST_ULYSSES_DEGREE.items():
        best = {s: cm.best_ulysses_degree(llama3, cm.CLUSTERS[cluster], 1, s) for s in measured}
        checks.append(dict(
            claim=f"{cluster}: the fastest mesh for attention is u = "
                  + ", ".join(f"{u} at {s // 1024}K" for s, u in measured.items()),
            source=source,
            model="fastest u " + ", ".join(f"{u} at {s // 1024}K" for s, u in best.items())
                  + f" (LLaMA3-8B attention, batch 1, {cluster} preset)",
            agrees=best == measured))
    return checks


def _model(args) -> cm.ModelShape:
    if args.model != "custom":
        shape = cm.MODELS[args.model]
        overrides = {k: getattr(args, k) for k in ("hidden", "heads", "kv_heads", "layers", "ffn_hidden")
                     if getattr(args, k) is not None}
        return replace(shape, **overrides) if overrides else shape
    missing = [f"--{k.replace('_', '-')}" for k in ("hidden", "heads", "kv_heads", "layers", "ffn_hidden")
               if getattr(args, k) is None]
    if missing:
        raise SystemExit(f"model custom needs {', '.join(missing)}")
    shape = cm.ModelShape("custom", args.hidden, args.heads, args.kv_heads, args.layers, args.ffn_hidden)
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise SystemExit("the hidden size must be a multiple of the heads, and the heads of the K/V heads")
    return shape


def _cluster(args) -> cm.Cluster:
    cluster = cm.CLUSTERS[args.cluster]
    overrides = {k: getattr(args, k) for k in ("gpus_per_node", "nodes", "intra_gbs", "inter_gbs", "peak_tflops",
                                               "kernel_efficiency", "ring_efficiency", "latency_us")
                 if getattr(args, k) is not None}
    return replace(cluster, **overrides) if overrides else cluster


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=[*cm.MODELS, "custom"], default="llama3-8b",
                        help="model shape preset; custom needs the five shape options")
    for name, help_ in (("hidden", "hidden size"), ("heads", "query heads"), ("kv-heads", "K/V heads"),
                        ("layers", "transformer blocks"), ("ffn-hidden", "MLP hidden size")):
        parser.add_argument(f"--{name}", type=bounded_int(1), help=f"{help_} (default: the preset's)")
    parser.add_argument("--seqlen", type=bounded_int(1), default=65536,
                        help="global sequence length, divisible by every degree")
    parser.add_argument("--batch", type=bounded_int(1), default=1, help="batch size")
    parser.add_argument("--degrees", type=bounded_int(1), nargs="+", default=[2, 4, 8, 16, 32],
                        help="degrees N of the volume table")
    parser.add_argument("--cluster", choices=list(cm.CLUSTERS), default="2x8xA800",
                        help="cluster preset for the ranking")
    for option, help_ in (("--gpus-per-node", "GPUs per node"), ("--nodes", "nodes")):
        parser.add_argument(option, type=bounded_int(1), help=f"{help_} (default: the preset's)")
    for option, help_ in (("--intra-gbs", "intra-node GB/s per direction per GPU"),
                          ("--inter-gbs", "inter-node GB/s per direction per GPU"),
                          ("--peak-tflops", "dense bf16 peak TFLOP/s per GPU"),
                          ("--kernel-efficiency", "achieved / peak of the attention kernel (usp-bench kernels "
                                                  "measures it)"),
                          ("--ring-efficiency", "ring step kernels against one whole call (1 / the overhead "
                                                "usp-bench emulate measures)"),
                          ("--latency-us", "per-transfer latency in microseconds")):
        parser.add_argument(option, type=positive_float, help=f"{help_} (default: the preset's)")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    shape, cluster = _model(args), _cluster(args)
    b, s = args.batch, args.seqlen
    if any(s % n for n in (*args.degrees, cluster.world_size)):
        raise SystemExit(f"--seqlen {s} must be divisible by every degree ({' '.join(map(str, args.degrees))}) "
                         f"and by the cluster's {cluster.world_size} GPUs")
    mib = 2 ** 20
    print(f"model: {shape.name} (d {shape.hidden}, {shape.heads}/{shape.kv_heads} heads, {shape.layers} layers, "
          f"{shape.block_params / 1e6:.1f} M params per block), batch {b}, sequence {s}")
    print("communication per device per block, forward + backward, MiB (bf16; ring accumulators in fp32)")
    volumes = cm.volume_table(shape, b, s, args.degrees)
    for row in volumes:
        cells = [f"{name} " + ("-" if v is None else f"{v['bytes'] / mib:.1f}") for name, v in row["methods"].items()]
        print(f"  N={row['degree']:<3} " + ", ".join(cells))
    n = cluster.world_size
    memory = {method: cm.memory(shape, b, s, n, method)
              for method in ("dp", "sp", "zero1", "zero2", "zero3", "sp+zero3", "tp-sp")}
    print(f"memory per device per block at N={n}, MiB (params+grads+Adam | activations): "
          + ", ".join(f"{m} {v['params'] / mib:.0f} | {v['activations'] / mib:.0f}" for m, v in memory.items()))
    ranking = cm.rank_meshes(shape, cluster, b, s)
    print(f"predicted attention time per block (fwd+bwd, causal) on {cluster.name}: {n} GPUs, "
          f"{cluster.intra_gbs:g}/{cluster.inter_gbs:g} GB/s intra/inter, {cluster.peak_tflops:g} TFLOP/s x "
          f"{cluster.kernel_efficiency:g} (ring steps x {cluster.ring_efficiency:g})")
    for place, p in enumerate(ranking, 1):
        print(f"  {place:>2}. u{p['ulysses_degree']}r{p['ring_degree']} {p['placement']:<14} {p['total_ms']:8.3f} ms "
              f"(compute {p['compute_ms']:.3f}, all-to-all {p['all_to_all_ms']:.3f}, "
              f"exposed ring {p['exposed_ring_ms']:.3f})")
    best = ranking[0]
    recommendation = dict(ulysses_degree=best["ulysses_degree"], ring_degree=best["ring_degree"],
                          placement=best["placement"], predicted_ms=best["total_ms"])
    print(f"recommended: u{best['ulysses_degree']} x r{best['ring_degree']}, placement {best['placement']}")
    checks = paper_checks()
    print("against the paper:")
    for check in checks:
        verdict = "agrees" if check["agrees"] else "differs"
        print(f"  [{verdict}] {check['claim']}: {check['model']}")
    path = write_result("model", torch.device("cpu"), dict(
        flop_convention=FLOP_CONVENTION,
        config=dict(model=asdict(shape), block_params=shape.block_params, cluster=asdict(cluster), batch=b,
                    seqlen=s, degrees=args.degrees, units="1 unit = batch x seqlen x hidden elements",
                    conventions=cm.__doc__, ring_units_note=RING_UNITS_NOTE),
        volumes=volumes, memory=memory, ranking=ranking, recommendation=recommendation, paper_checks=checks),
        args.out_dir)
    print(f"wrote {path}")
    return 0
