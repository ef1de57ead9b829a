"""``usp-bench balance``: which layout and schedule to pick, computed from the masks alone.

Work: the (query, key) pairs a ring rank's queries see, counted exactly from the layout's
positions (``usp.attention.layout.visible_key_span``: no attention is run), for dense
causal attention and for packed documents drawn from a length distribution (``--docs``,
for example ``fixed:4096`` or ``lognormal:mean=8192,sigma=1``; each length rounded up
to a multiple of ``2 r`` so that zigzag can cut it, the last one cut to fit). The
imbalance is the busiest rank's work over the mean: the factor by which it stretches a
ring's step time when compute dominates. With documents, zigzag cuts each document (as
the attention layers do); "zigzag (whole sequence)" shows what cutting the packed
sequence as one would cost.

Traffic: the bytes each rank sends per pass under each schedule, with ``B`` the bytes of
its K (or V) shard after the Ulysses all-to-all and ``A`` the same in float32 (the
accumulators): ring, ``2 (r - 1) B`` forward and ``2 (r - 1) B + 2 r A`` backward;
all-gather, ``2 (r - 1) B`` forward and ``2 (r - 1) (B + A)`` backward; and the time
that takes per link speed. The ring hides its transfers behind the steps' compute, the
all-gather does not.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics

import torch

from usp.attention.layout import LAYOUTS, ring_positions, visible_key_span

from .cli_args import DEFAULT_BANDWIDTHS, DTYPES, add_output_arguments, bounded_int, positive_float
from .results import write_result

SCHEDULE_NAMES = ("ring", "allgather")
WHOLE_ZIGZAG = "zigzag (whole sequence)"  # zigzag chunks of the packed sequence, not of each document


def parse_documents(spec: str) -> dict:
    """``fixed:N`` or ``lognormal:mean=M[,sigma=S]`` as a dict; ValueError otherwise."""
    fixed = re.fullmatch(r"fixed:(\d+)", spec)
    if fixed and int(fixed.group(1)) > 0:
        return dict(kind="fixed", length=int(fixed.group(1)))
    lognormal = re.fullmatch(r"lognormal:mean=(\d+(?:\.\d*)?)(?:,sigma=(\d+(?:\.\d*)?))?", spec)
    if lognormal and float(lognormal.group(1)) > 0:
        return dict(kind="lognormal", mean=float(lognormal.group(1)), sigma=float(lognormal.group(2) or 1.0))
    raise ValueError(f"documents must be fixed:N or lognormal:mean=M[,sigma=S] with positive numbers, got {spec!r}")


def document_offsets(mix: dict, seqlen: int, multiple: int, seed: int) -> tuple[int, ...]:
    """Offsets of documents drawn from ``mix`` filling ``seqlen`` tokens, every length a
    multiple of ``multiple`` (``seqlen`` must be one too); lognormal lengths have the
    given mean (``mu = ln(mean) - sigma^2 / 2``)."""
    if seqlen % multiple:
        raise ValueError(f"the sequence length {seqlen} must be a multiple of {multiple}")
    generator = torch.Generator().manual_seed(seed)
    offsets = [0]
    while offsets[-1] < seqlen:
        if mix["kind"] == "fixed":
            length = mix["length"]
        else:
            mu = math.log(mix["mean"]) - mix["sigma"] ** 2 / 2
            length = math.exp(mu + mix["sigma"] * torch.randn((), generator=generator).item())
        length = max(multiple, -(-int(length) // multiple) * multiple)
        offsets.append(min(seqlen, offsets[-1] + length))
    return tuple(offsets)


def rank_work(seqlen: int, ring: int, layout: str, documents: tuple[int, ...] | None = None,
              window: tuple[int | None, int | None] = (None, 0), cut_documents: bool = True) -> list[int]:
    """Visible (query, key) pairs of each ring rank's queries; ``window``: (left, right)
    bounds, None unbounded (causal: right 0). ``cut_documents=False`` lays the sequence
    out as if it were one document (zigzag over the whole sequence), masking it by document."""
    keys = torch.arange(seqlen)
    work = []
    for rank in range(ring):
        held = ring_positions(seqlen, ring, rank, layout, documents if cut_documents else None)
        first, last = visible_key_span(held, keys, seqlen, documents, *window)
        work.append(int((last - first).clamp(min=0).sum()))
    return work


def imbalance(work: list[int]) -> float:
    """The busiest rank's work over the mean (1: balanced)."""
    return max(work) / statistics.mean(work) if sum(work) else 1.0


def schedule_bytes(schedule: str, ring: int, kv_shard_bytes: int, accumulator_bytes: int) -> dict[str, int]:
    """Bytes one rank sends per pass: ``{"fwd": ..., "bwd": ...}`` (see the module doc)."""
    kv = 2 * kv_shard_bytes
    if schedule == "ring":
        return dict(fwd=(ring - 1) * kv, bwd=(ring - 1) * kv + ring * 2 * accumulator_bytes)
    return dict(fwd=(ring - 1) * kv, bwd=(ring - 1) * (kv + 2 * accumulator_bytes))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seqlen", type=bounded_int(2), default=131072, help="global sequence length in tokens")
    parser.add_argument("--ring-degree", type=bounded_int(1, 1024), nargs="+", default=[2, 4, 8, 16, 32],
                        help="ring degrees to compare")
    parser.add_argument("--docs", type=documents_type, default=parse_documents("lognormal:mean=8192,sigma=1"),
                        metavar="SPEC", help="document lengths: fixed:N or lognormal:mean=M[,sigma=S]")
    parser.add_argument("--window", type=bounded_int(0), default=None,
                        help="a causal sliding window of this many keys before each query (default: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document lengths")
    parser.add_argument("--heads", type=bounded_int(1), default=32, help="query heads (for the traffic)")
    parser.add_argument("--kv-heads", type=bounded_int(1), default=8, help="K/V heads (for the traffic)")
    parser.add_argument("--head-dim", type=bounded_int(1), default=128, help="head dim (for the traffic)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="K/V dtype (for the traffic)")
    parser.add_argument("--bandwidth", type=positive_float, nargs="+", default=sorted(DEFAULT_BANDWIDTHS.values()),
                        help="link speeds to price the traffic at, GB/s per direction")
    add_output_arguments(parser)


def documents_type(text: str) -> dict:
    """``parse_documents`` as an argparse type."""
    try:
        return parse_documents(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    window = (args.window, 0)
    for r in args.ring_degree:
        if args.seqlen % (2 * r):
            raise SystemExit(f"balance: the sequence length {args.seqlen} must divide by 2 x ring degree = {2 * r}")
    element = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    print(f"balance: {args.seqlen} tokens, causal" + (f", window {args.window}" if args.window is not None else "")
          + f"; documents {args.docs}", flush=True)
    records = []
    for r in args.ring_degree:
        documents = document_offsets(args.docs, args.seqlen, 2 * r, args.seed)
        for mix, docs in (("dense", None), ("documents", documents)):
            for layout, cut in [(name, True) for name in LAYOUTS] + [(WHOLE_ZIGZAG, False)] * (docs is not None):
                work = rank_work(args.seqlen, r, layout.split()[0], docs, window, cut)
                records.append(dict(ring_degree=r, mix=mix, layout=layout, documents=None if docs is None else
                                    len(docs) - 1, work=work, imbalance=imbalance(work)))
        line = "; ".join(f"{rec['mix']} {rec['layout']} {rec['imbalance']:.3f}" for rec in records[-7:])
        print(f"  ring {r:>3}: imbalance {line}", flush=True)
    traffic = []
    for r in args.ring_degree:  # per rank of a pure ring (a Ulysses degree u divides these by u)
        kv_shard = args.seqlen // r * args.kv_heads * args.head_dim * element
        accumulator = args.seqlen // r * args.kv_heads * args.head_dim * 4
        for schedule in SCHEDULE_NAMES:
            sent = schedule_bytes(schedule, r, kv_shard, accumulator)
            traffic.append(dict(ring_degree=r, schedule=schedule, bytes_sent=sent, transfer_ms={
                f"{gbs:g}": {p: b / (gbs * 1e9) * 1e3 for p, b in sent.items()} for gbs in args.bandwidth},
                overlapped=schedule == "ring"))
    path = write_result("balance", torch.device("cpu"), dict(
        config=dict(seqlen=args.seqlen, ring_degrees=args.ring_degree, docs=args.docs, window=args.window,
                    seed=args.seed, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                    dtype=args.dtype, bandwidths_gbs=args.bandwidth,
                    work="visible (query, key) pairs of each ring rank's queries, causal",
                    traffic="bytes one rank sends per pass; ring transfers overlap compute, all-gather ones do not"),
        records=records, traffic=traffic), args.out_dir)
    print(f"wrote {path}")
    return 0
