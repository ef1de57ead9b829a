"""One function per figure: a result document (the JSON ``bench`` wrote) in, PNG files out.

These read only the JSON fields (``shared/DESIGN.md``'s timing record names and each
command's documented extras), never ``bench``'s code.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 2 ** 20


def machine_label(document: dict) -> str:
    machine = document.get("machine", {})
    where = machine.get("device", "unknown device")
    if machine.get("device_type") == "cpu":
        where += f", {machine.get('cpu_count', '?')} cores"
    return f"{where}; torch {machine.get('torch', '?')}, triton {machine.get('triton', '?')}"


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _seqlen_axis(axis) -> None:
    axis.set_xscale("log", base=2)
    axis.set_xlabel("sequence length (tokens)")
    axis.grid(True, which="both", alpha=0.3)


def kernel_figures(document: dict, out_dir: Path) -> list[Path]:
    """Per (dtype, head dim, causal): TF/s against sequence length, one panel per pass,
    one line per implementation (ours and each SDPA backend)."""
    groups = defaultdict(list)
    for r in document["records"]:
        groups[(r["dtype"], r["head_dim"], r["causal"])].append(r)
    paths = []
    for (dtype, head_dim, causal), records in sorted(groups.items()):
        passes = [p for p in ("fwd", "bwd", "fwd+bwd") if any(r["pass"] == p for r in records)]
        figure, axes = plt.subplots(1, len(passes), figsize=(5 * len(passes), 4), squeeze=False)
        for axis, pass_ in zip(axes[0], passes):
            lines = defaultdict(list)
            for r in records:
                if r["pass"] == pass_:
                    lines[r["impl"]].append((r["seqlen"], r["tflops"]))
            for impl, points in sorted(lines.items()):
                points.sort()
                style = "--" if impl.startswith("sdpa") else "-"
                axis.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=impl)
            _seqlen_axis(axis)
            axis.set_ylabel("TFLOP/s")
            axis.set_title(pass_)
            axis.legend(fontsize=8)
        first = records[0]
        figure.suptitle(f"Attention kernels: {dtype}, head dim {head_dim}, {'causal' if causal else 'full'}, "
                        f"batch {first['batch']}, {first['heads']}/{first['kv_heads']} heads\n"
                        f"{machine_label(document)}", fontsize=10)
        name = f"kernels-{dtype}-d{head_dim}-{'causal' if causal else 'full'}.png"
        paths.append(_save(figure, out_dir / name))
    return paths


def scaling_figures(document: dict, out_dir: Path) -> list[Path]:
    """Per pass: throughput (tokens/s) and TF/s per rank against global sequence length,
    one line per mesh."""
    config = document["config"]
    paths = []
    for pass_ in ("fwd", "fwd+bwd"):
        records = [r for r in document["records"] if r["pass"] == pass_]
        if not records:
            continue
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        lines = defaultdict(list)
        for r in records:
            lines[r["impl"]].append((r["seqlen"], r["tokens_per_s"], r["tflops"]))
        for impl, points in sorted(lines.items()):
            points.sort()
            left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
            right.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=impl)
        for axis, label in ((left, "throughput (tokens/s)"), (right, "TFLOP/s per rank")):
            _seqlen_axis(axis)
            axis.set_ylabel(label)
            axis.legend(fontsize=8)
        first = records[0]
        figure.suptitle(f"Sequence-parallel attention, {pass_}: {config['world_size']} ranks "
                        f"({config['process_group']}), {first['backend']} {first['dtype']}, "
                        f"{first['heads']}/{first['kv_heads']} heads d{first['head_dim']}, "
                        f"{'causal' if first['causal'] else 'full'}\n{machine_label(document)}", fontsize=10)
        paths.append(_save(figure, out_dir / f"scaling-{pass_.replace('+', '-')}.png"))
    return paths


def comm_volume_figure(document: dict, out_dir: Path) -> list[Path]:
    """Communication per device per block (fwd + bwd) against the degree, per method."""
    lines = defaultdict(list)
    for row in document["volumes"]:
        for name, volume in row["methods"].items():
            if volume is None:
                continue
            if name.startswith("USP-u"):
                name = f"USP u={name[5:].split('r')[0]}"
            lines[name].append((row["degree"], volume["bytes"] / MIB))
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, points in lines.items():
        points.sort()
        style = ":" if name.startswith(("DP", "ZeRO")) else "-"
        axis.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=name)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("degree N (devices)")
    axis.set_ylabel("MiB sent per device per block (fwd + bwd)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    config = document["config"]
    model = config["model"]
    axis.set_title(f"Cost model: {model['name']}, batch {config['batch']}, sequence {config['seqlen']} "
                   f"(bf16; dotted: parameter traffic)", fontsize=10)
    return [_save(figure, out_dir / "comm-volume.png")]


def _bars_from_scaling(document: dict) -> tuple[list[list[dict]], str] | None:
    """Per rank: compute, transfer (post to completion) and wait bars of the forward ring
    loop of one traced call: the longest sequence of the first mesh with a ring."""
    candidates = [r for r in document["records"] if r["ring_degree"] > 1 and r["pass"] == "fwd"]
    if not candidates:
        return None
    record = max(candidates, key=lambda r: (r["seqlen"], -r["ulysses_degree"]))
    ranks = []
    for rank in record["ranks"]:
        events = rank["timeline"]
        finished = {(e["label"], e["step"]): e["end_ms"] for e in events if e["kind"] == "wait"}
        bars = [dict(kind="compute", step=e["step"], start_ms=e["start_ms"], end_ms=e["end_ms"])
                for e in events if e["kind"] == "compute" and e["label"] == "forward"]
        bars += [dict(kind="transfer", step=e["step"], start_ms=e["start_ms"], end_ms=finished[(e["label"], e["step"])])
                 for e in events
                 if e["kind"] == "p2p" and e["label"] == "kv forward" and (e["label"], e["step"]) in finished]
        bars += [dict(kind="wait", step=e["step"], start_ms=e["start_ms"], end_ms=e["end_ms"])
                 for e in events if e["kind"] == "wait" and e["label"] == "kv forward"]
        ranks.append(bars)
    title = (f"Ring timeline (measured, forward): {record['impl']}, sequence {record['seqlen']}, "
             f"{record['backend']} {record['dtype']}")
    return ranks, title


def _bars_from_emulate(document: dict) -> tuple[list[list[dict]], str] | None:
    timelines = document.get("timelines") or {}
    if not timelines:
        return None
    layout = "zigzag" if "zigzag" in timelines else next(iter(timelines))
    events = timelines[layout]
    ranks = [[] for _ in range(1 + max(e["rank"] for e in events))]
    for e in events:
        ranks[e["rank"]].append(e)
    config = document["config"]
    title = (f"Ring timeline (emulated, forward, lock-step): {config['world_size']} virtual ranks, {layout}, "
             f"{config['seqlen']} tokens, link {config['timeline_bandwidth']} "
             f"{config['bandwidths_gbs'][config['timeline_bandwidth']]:g} GB/s")
    return ranks, title


def timeline_figure(document: dict, out_dir: Path) -> list[Path]:
    """Compute and transfer bars per ring step per rank, from a scaling or emulate run."""
    found = _bars_from_scaling(document) if document["kind"] == "scaling" else _bars_from_emulate(document)
    if found is None:
        return []
    ranks, title = found
    colors = dict(compute="tab:blue", transfer="tab:orange", wait="tab:red")
    offsets = dict(compute=0.0, transfer=0.3, wait=-0.3)
    figure, axis = plt.subplots(figsize=(10, 0.6 * len(ranks) + 1.8))
    labelled = set()
    for index, bars in enumerate(ranks):
        for bar in bars:
            kind = bar["kind"]
            height = 0.5 if kind == "compute" else 0.2
            axis.barh(index + offsets[kind], bar["end_ms"] - bar["start_ms"], left=bar["start_ms"], height=height,
                      color=colors[kind], edgecolor="black", linewidth=0.3,
                      label=None if kind in labelled else kind)
            labelled.add(kind)
            if kind == "compute":
                axis.text((bar["start_ms"] + bar["end_ms"]) / 2, index, str(bar["step"]), ha="center", va="center",
                          fontsize=7, color="white")
    axis.set_yticks(range(len(ranks)))
    axis.set_yticklabels([f"rank {i}" for i in range(len(ranks))])
    axis.invert_yaxis()
    axis.set_xlabel("time (ms); numbers: ring step")
    axis.legend(fontsize=8, loc="upper right")
    axis.set_title(f"{title}\n{machine_label(document)}", fontsize=9)
    return [_save(figure, out_dir / f"ring-timeline-{document['kind']}.png")]


FIGURES = {"kernels": [kernel_figures], "scaling": [scaling_figures, timeline_figure],
           "emulate": [timeline_figure], "model": [comm_volume_figure]}
