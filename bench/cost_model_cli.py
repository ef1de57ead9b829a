"""``usp-bench model``: which Ulysses x ring mesh to run on a cluster, predicted from the
cluster's links and kernel curve (``usp.bench.predict``), and the paper's per-block
communication and memory table (USP, arXiv 2405.07719, Table 2).

For the attention alone (``--scope attention``) or a whole transformer block with
Megatron tensor parallelism (``--scope block --tp T``): every mesh and placement with its
predicted time per call, TFLOP/s per GPU, bytes sent and memory per rank, ranked; meshes
within the model's uncertainty of the fastest are reported as tied. Then the model
against the paper's measured Tables 3 and 4 (the measured best mesh and Kendall's tau per
row). Presets or measured inputs: ``--cluster-file`` from ``usp-bench comm``,
``--kernels-file`` from ``usp-bench kernels``. With ``--docs`` (packed documents drawn
from a length distribution, as ``usp-bench balance`` draws them) and ``--window``, each
mesh's ring steps come from the masks of its layout, and each mesh's ``work_imbalance``
(the busiest ring rank's visible pairs over the mean) is printed. No process is
launched: this runs in a second.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path

import torch

from usp.comm.mesh import PLACEMENTS

from . import cost_model as cm
from . import paper_tables as pt
from .balance import document_offsets, documents_type
from .cli_args import add_output_arguments, bounded_int, world_size_type
from .clusters import CLUSTERS
from .flops import FLOP_CONVENTION
from .hardware import Cluster, load_cluster, with_kernel
from .kernel_curve import from_kernel_results
from .predict import LAYOUTS, PASSES, UNCERTAINTY, Attention, predict_attention, predict_block
from .results import write_result

SHAPE_OPTIONS = ("hidden", "heads", "kv_heads", "head_dim", "layers", "ffn_hidden")


def paper_agreement(seqlen_per_rank: bool = False) -> list[dict]:
    """The model on every row of the paper's Tables 3 and 4 (presets, the paper's placement:
    Ulysses groups of neighbouring GPUs)."""
    rows = []
    for row in pt.ROWS:
        predictions = [predict_attention(row.call(seqlen_per_rank), CLUSTERS[row.cluster], u, r) for u, r in pt.MESHES]
        result = pt.agreement(row, [p["total_ms"] for p in predictions], UNCERTAINTY)
        rows.append(dict(result, cluster=row.cluster, seqlen=row.seqlen, layout=row.layout,
                         measured_iterations_per_s=list(row.iterations_per_s),
                         predicted_ms=[p["total_ms"] for p in predictions], implied_tflops=pt.implied_tflops(row)))
    return rows


def _model(args) -> cm.ModelShape:
    given = {k: getattr(args, k) for k in SHAPE_OPTIONS if getattr(args, k) is not None}
    given["head_size"] = given.pop("head_dim", None)
    if args.model != "custom":
        return replace(cm.MODELS[args.model], **{k: v for k, v in given.items() if v is not None})
    missing = [f"--{k.replace('_', '-')}" for k in SHAPE_OPTIONS if k != "head_dim" and getattr(args, k) is None]
    if missing:
        raise SystemExit(f"model custom needs {', '.join(missing)}")
    shape = cm.ModelShape("custom", **given)
    if shape.heads % shape.kv_heads or (shape.head_size is None and shape.hidden % shape.heads):
        raise SystemExit("the heads must be a multiple of the K/V heads, and the hidden size of the heads "
                         "(or give --head-dim)")
    return shape


def _cluster(args) -> Cluster:
    try:
        cluster = load_cluster(args.cluster_file) if args.cluster_file else CLUSTERS[args.cluster]
        if args.kernels_file:
            cluster = with_kernel(cluster, from_kernel_results(args.kernels_file))
    except (OSError, ValueError) as error:
        raise SystemExit(str(error)) from None
    return cluster


def _candidates(args, shape: cm.ModelShape, world: int) -> list[tuple[int, int, str]]:
    heads, kv_heads = shape.heads // args.tp, max(1, shape.kv_heads // args.tp)
    return [(u, r, placement) for u, r in cm.mesh_shapes(world // args.tp, heads, kv_heads)
            for placement in (PLACEMENTS if u > 1 and r > 1 else PLACEMENTS[:1])]


def rank_meshes(args, shape: cm.ModelShape, cluster: Cluster, seqlen: int, world: int,
                documents: tuple[int, ...] | None = None) -> list[dict]:
    """Every candidate's prediction, fastest first, with its place and whether it ties the fastest."""
    results = []
    for u, r, placement in _candidates(args, shape, world):
        if args.scope == "block":
            p = predict_block(shape, cluster, args.batch, seqlen, args.tp, u, r, placement, args.pass_, args.causal,
                              args.layout, documents=documents, window=args.window)
        else:
            call = Attention(shape.heads, shape.kv_heads, shape.head_dim, args.batch, seqlen, args.pass_, args.causal,
                             args.layout, documents=documents, window=args.window)
            p = dict(predict_attention(call, cluster, u, r, placement), tensor_parallel=1)
        results.append(p)
    results.sort(key=lambda p: p["total_ms"])
    fastest = results[0]["total_ms"]
    for place, p in enumerate(results, 1):
        p.update(rank=place, tied_with_fastest=p["total_ms"] <= fastest * (1 + UNCERTAINTY))
    return results


def _mesh(p: dict) -> str:
    tp = f"tp{p['tensor_parallel']} x " if p["tensor_parallel"] > 1 else ""
    return f"{tp}u{p['ulysses_degree']} x r{p['ring_degree']}"


def _imbalance(p: dict) -> float | None:
    return (p["attention"] if "attention" in p else p)["work_imbalance"]


def _print_ranking(ranking: list[dict]) -> None:
    masked = _imbalance(ranking[0]) is not None
    print(f"  {'rank':>4}  {'mesh':<16}{'placement':<15}{'ms/call':>10}{'TFLOP/s/GPU':>13}{'MiB sent/rank':>15}"
          f"{'GiB/rank':>10}" + (f"{'imbalance':>11}" if masked else ""))
    for p in ranking:
        print(f"  {p['rank']:>4}  {_mesh(p):<16}{p['placement']:<15}{p['total_ms']:>10.3f}{p['tflops_per_gpu']:>13.1f}"
              f"{p['comm_bytes'] / 2 ** 20:>15.1f}{p['memory_bytes'] / 2 ** 30:>10.2f}"
              + (f"{_imbalance(p):>11.3f}" if masked else ""))
    tied = [p for p in ranking if p["tied_with_fastest"]]
    if len({(p["tensor_parallel"], p["ulysses_degree"], p["ring_degree"]) for p in tied}) > 1:
        names = ", ".join(f"{_mesh(p)} ({p['placement']})" for p in tied)
        print(f"  tie: {names} are within the model's "
              f"{UNCERTAINTY:.0%} uncertainty of the fastest; measure them (usp-bench scaling) to choose")
    else:
        clear = len(ranking) > 1 and not ranking[1]["tied_with_fastest"]
        print(f"  best: {_mesh(ranking[0])}, placement {ranking[0]['placement']}"
              + (f" (the next is more than {UNCERTAINTY:.0%} slower)" if clear else ""))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cluster", choices=list(CLUSTERS), default="8xA100-NVLink", help="cluster preset")
    where.add_argument("--cluster-file", type=Path, help="a cluster profile written by usp-bench comm (default: the "
                                                         "--cluster preset)")
    parser.add_argument("--kernels-file", type=Path,
                        help="usp-bench kernels results to read the kernel curve from (default: the cluster's curve)")
    parser.add_argument("--model", choices=[*cm.MODELS, "custom"], default="llama3-8b",
                        help="model shape preset; custom needs --hidden --heads --kv-heads --layers --ffn-hidden")
    for name, help_ in (("hidden", "hidden size"), ("heads", "query heads"), ("kv-heads", "K/V heads"),
                        ("head-dim", "head size (default: hidden / heads)"), ("layers", "transformer blocks"),
                        ("ffn-hidden", "MLP hidden size")):
        parser.add_argument(f"--{name}", type=bounded_int(1),
                            help=help_ if "default" in help_ else f"{help_} (default: the preset's)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--seqlen", type=bounded_int(1), help="global sequence length (default: 32768)")
    length.add_argument("--seqlen-per-rank", type=bounded_int(1),
                        help="sequence length per GPU; the global one is this x --world-size (default: use --seqlen)")
    parser.add_argument("--batch", type=bounded_int(1), default=1, help="batch size")
    parser.add_argument("--world-size", type=world_size_type,
                        help="GPUs to split the sequence over (default: all of the cluster's)")
    parser.add_argument("--pass", dest="pass_", choices=PASSES, default="fwd+bwd", help="what one call does")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal attention")
    parser.add_argument("--layout", choices=LAYOUTS, default="zigzag", help="how the ring splits the sequence")
    parser.add_argument("--docs", type=documents_type, default=None, metavar="SPEC",
                        help="documents packed in each sequence, their lengths fixed:N or lognormal:mean=M[,sigma=S] "
                             "(rounded up to multiples of 2 x the sequence-parallel ranks; default: one dense "
                             "sequence)")
    parser.add_argument("--window", type=bounded_int(0), default=None,
                        help="a sliding window of this many keys before each query (with --no-causal, no bound "
                             "after it; default: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document lengths")
    parser.add_argument("--scope", choices=("attention", "block"), default="attention",
                        help="the attention alone, or a whole transformer block with tensor parallelism")
    parser.add_argument("--tp", type=bounded_int(1), default=1, help="tensor-parallel degree (block scope)")
    parser.add_argument("--degrees", type=bounded_int(1), nargs="+", default=[2, 4, 8, 16, 32],
                        help="degrees N of the per-block volume table")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the result to this file (default: only the run folder's file)")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    shape, cluster = _model(args), _cluster(args)
    world = args.world_size or cluster.world_size
    if world > cluster.world_size:
        raise SystemExit(f"--world-size {world} exceeds the cluster's {cluster.world_size} GPUs")
    if args.tp > 1 and args.scope != "block":
        raise SystemExit("--tp needs --scope block")
    if world % args.tp or shape.heads % args.tp:
        raise SystemExit(f"--tp {args.tp} must divide the world size {world} and the {shape.heads} heads")
    seqlen = args.seqlen_per_rank * world if args.seqlen_per_rank else (args.seqlen or 32768)
    sp = world // args.tp
    if seqlen % (2 * sp):
        raise SystemExit(f"the global sequence length {seqlen} must be divisible by 2 x {sp} (the zigzag chunks of "
                         f"{sp} sequence-parallel ranks)")
    if args.docs is not None and args.batch != 1:
        raise SystemExit("--docs needs --batch 1: documents are packed into one sequence")
    documents = None if args.docs is None else document_offsets(args.docs, seqlen, 2 * sp, args.seed)
    print(f"model: {shape.name} ({shape.heads}/{shape.kv_heads} heads of {shape.head_dim}, d {shape.hidden}), batch "
          f"{args.batch}, sequence {seqlen} global ({seqlen // world} per GPU), {args.pass_}, "
          f"{'causal' if args.causal else 'full'}, {args.layout}, scope {args.scope}"
          + (f", tensor parallel {args.tp}" if args.tp > 1 else ""))
    if documents is not None or args.window is not None:
        lengths = [b - a for a, b in zip(documents, documents[1:])] if documents else [seqlen]
        print(f"masks: {len(lengths)} document(s) per sequence"
              + (f" ({args.docs['kind']}, seed {args.seed}), {min(lengths)} to {max(lengths)} tokens" if documents
                 else "") + (f"; window {args.window}" if args.window is not None else "")
              + "; ring steps from each layout's masks, imbalance = busiest ring rank's visible pairs / mean")
    print(f"cluster: {cluster.name}, {world} of {cluster.world_size} GPUs ({cluster.gpus_per_domain} per domain, "
          f"{cluster.gpus_per_node} per node), {cluster.peak_tflops:g} TFLOP/s peak; kernel: {cluster.kernel.name}")
    ranking = rank_meshes(args, shape, cluster, seqlen, world, documents)
    _print_ranking(ranking)
    agreement = paper_agreement()
    passed = sum(a["best_ok"] and a["tau_ok"] for a in agreement)
    print(f"against the paper's Tables 3 and 4 (global length; presets): best mesh predicted or tied in "
          f"{sum(a['best_ok'] for a in agreement)} of {len(agreement)} rows, Kendall tau >= 2/3 in "
          f"{sum(a['tau_ok'] for a in agreement)}, both in {passed}")
    for a in agreement:
        print(f"  {a['row']:<38} measured best u{a['measured_best'][0]} | predicted " + (
            f"u{a['predicted_best'][0]}" if len(a["predicted_tied"]) == 1 else
            "tie " + "/".join(f"u{m[0]}" for m in a["predicted_tied"])) + f" | tau {a['kendall_tau']:+.2f}"
              + ("" if a["best_ok"] and a["tau_ok"] else "  (misses the bar)"))
    volumes = cm.volume_table(shape, args.batch, seqlen, args.degrees)
    document = dict(
        flop_convention=FLOP_CONVENTION,
        config=dict(model=asdict(shape), block_params=shape.block_params, cluster=cluster.to_json(), batch=args.batch,
                    seqlen=seqlen, seqlen_per_rank=seqlen // world, world_size=world, pass_=args.pass_,
                    causal=args.causal, layout=args.layout, docs=args.docs, documents=documents, window=args.window,
                    seed=args.seed, scope=args.scope, tensor_parallel=args.tp,
                    uncertainty=UNCERTAINTY, degrees=args.degrees,
                    units="1 unit = batch x seqlen x hidden elements", conventions=cm.__doc__),
        ranking=ranking, tied=[_mesh(p) + f" {p['placement']}" for p in ranking if p["tied_with_fastest"]],
        volumes=volumes, paper_agreement=agreement)
    path = write_result("model", torch.device("cpu"), document, args.out_dir)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(path.read_text())
        print(f"wrote {args.json}")
    print(f"wrote {path}")
    return 0
