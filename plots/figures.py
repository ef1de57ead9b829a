"""One function per figure: a result document (the JSON ``usp-bench`` wrote) in, PNG files out.

These read only the JSON fields (the timing record names of ARCHITECTURE.md and each
command's documented extras) and the event labels of ``usp.comm.traffic``, never
``usp.bench``'s code. Every figure names the machine its data came from.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from usp.comm import traffic  # noqa: E402

MIB = 2 ** 20


def machine_label(document: dict) -> str:
    machine = document.get("machine", {})
    where = machine.get("device", "unknown device")
    if machine.get("device_type") == "cpu":
        where += f", {machine.get('cpu_count', '?')} cores"
    return f"{where}; torch {machine.get('torch', '?')}, triton {machine.get('triton', '?')}"


def oversubscription_note(document: dict) -> str | None:
    """A warning for runs with more processes than cores, whose times show the pipeline only."""
    config = document.get("config", {})
    if not config.get("oversubscribed"):
        return None
    return (f"up to {max(config.get('world_sizes', [0]))} processes on {config.get('cores', '?')} cores: "
            "these figures show that the pipeline runs, not its performance")


def _save(figure, path: Path, note: str | None = None) -> Path:
    if note:
        figure.text(0.5, 0.01, note, ha="center", va="bottom", color="firebrick", fontsize=9, weight="bold")
    figure.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
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


def _family(record: dict) -> str:
    """The line a scaling record belongs to across world sizes."""
    u, r = record["ulysses_degree"], record["ring_degree"]
    return "ring (u = 1)" if u == 1 else "Ulysses (r = 1)" if r == 1 else f"USP u = {u}"


def scaling_figures(document: dict, out_dir: Path) -> list[Path]:
    """With several world sizes, per pass: strong scaling (time per call against N at the
    longest sequence measured at every N, ideal T1/N) and weak scaling (TF/s per rank
    against N at fixed tokens per rank, ideal flat). With one world size: time per call
    against the sequence length, one line per mesh."""
    paths = []
    for pass_ in ("fwd", "fwd+bwd"):
        records = [r for r in document["records"] if r["pass"] == pass_]
        if not records:
            continue
        first = records[0]
        title = (f"{first['backend']} {first['dtype']}, {first['heads']}/{first['kv_heads']} heads "
                 f"d{first['head_dim']}, {'causal' if first['causal'] else 'full'}, {pass_}")
        world_sizes = sorted({r["world_size"] for r in records})
        if len(world_sizes) > 1:
            paths.append(_strong_and_weak(document, records, world_sizes, title, pass_, out_dir))
        else:
            paths.append(_time_against_seqlen(document, records, world_sizes[0], title, pass_, out_dir))
    return paths


def _lines(records: list[dict], value) -> dict[str, list[tuple[int, float]]]:
    """Per family, ``(world size, value)`` sorted; the single-rank point starts every line."""
    single = [r for r in records if r["world_size"] == 1]
    lines = defaultdict(list)
    for r in records:
        if r["world_size"] > 1:
            lines[_family(r)].append((r["world_size"], value(r)))
    for points in lines.values():
        points += [(1, value(r)) for r in single]
        points.sort()
    return dict(sorted(lines.items()))


def _strong_and_weak(document, records, world_sizes, title, pass_, out_dir) -> Path:
    figure, (strong, weak) = plt.subplots(1, 2, figsize=(12, 4.5))
    everywhere = [s for s in sorted({r["seqlen"] for r in records})
                  if {r["world_size"] for r in records if r["seqlen"] == s} == set(world_sizes)]
    if everywhere:
        seqlen = everywhere[-1]
        chosen = [r for r in records if r["seqlen"] == seqlen]
        for name, points in _lines(chosen, lambda r: r["ms"]).items():
            strong.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        base = [r["ms"] for r in chosen if r["world_size"] == 1]
        if base:
            strong.plot(world_sizes, [base[0] / n for n in world_sizes], "k--", linewidth=1, label="ideal: T(1) / N")
        strong.set_title(f"strong scaling: {seqlen} tokens in all", fontsize=10)
    strong.set_ylabel("ms per call (slowest rank, median)")
    strong.set_yscale("log")
    by_tokens = defaultdict(set)
    for r in records:
        by_tokens[r["tokens_per_rank"]].add(r["world_size"])
    tokens = max(by_tokens, key=lambda t: (len(by_tokens[t]), t))
    chosen = [r for r in records if r["tokens_per_rank"] == tokens]
    for name, points in _lines(chosen, lambda r: r["tflops"]).items():
        weak.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    base = [r["tflops"] for r in chosen if r["world_size"] == 1]
    if base:
        weak.axhline(base[0], color="k", linestyle="--", linewidth=1, label="ideal: TF/s per rank of N = 1")
    weak.set_title(f"weak scaling: {tokens} tokens per rank", fontsize=10)
    weak.set_ylabel("TFLOP/s per rank")
    for axis in (strong, weak):
        axis.set_xscale("log", base=2)
        axis.set_xticks(world_sizes, [str(n) for n in world_sizes])
        axis.set_xlabel("world size N (ranks)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"Sequence-parallel attention over world sizes {world_sizes}: {title}\n"
                    f"{machine_label(document)}", fontsize=10)
    return _save(figure, out_dir / f"scaling-{pass_.replace('+', '-')}.png", oversubscription_note(document))


def _time_against_seqlen(document, records, world_size, title, pass_, out_dir) -> Path:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    lines = defaultdict(list)
    for r in records:
        lines[r["impl"]].append((r["seqlen"], r["ms"]))
    for impl, points in sorted(lines.items()):
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
    _seqlen_axis(axis)
    axis.set_yscale("log")
    axis.set_ylabel("ms per call (slowest rank, median)")
    axis.legend(fontsize=8)
    figure.suptitle(f"Sequence-parallel attention on {world_size} ranks against sequence length: {title}\n"
                    f"{machine_label(document)}", fontsize=10)
    return _save(figure, out_dir / f"sp-seqlen-n{world_size}-{pass_.replace('+', '-')}.png",
                 oversubscription_note(document))


def wrong_result(reference: dict) -> bool:
    """A reference whose error against float64 attention is far beyond ours (100 times,
    and at least 1e-3): its time is not that of a correct answer."""
    error = reference.get("max_abs_error")
    return error is not None and error > max(1e-3, 100 * reference["usp_max_abs_error"])


def our_compute_alone(references: list[dict]) -> dict[tuple, float]:
    """Per case ``(usp_impl, world_size, seqlen, pass)``: our compute alone over our time
    (``usp-bench scaling``'s estimate; cases of runs without it are left out)."""
    return {(r["usp_impl"], r["world_size"], r["seqlen"], r["pass"]):
            r["usp_kernels_over_reference"] / r["usp_over_reference"]
            for r in references if r.get("usp_kernels_over_reference") is not None}


def references_figure(document: dict, out_dir: Path) -> list[Path]:
    """Each reference's time per call relative to ours (1 = the same; above 1, ours is
    faster), per case of a scaling run that timed references; none without them. Cases
    where a reference's result was wrong (``wrong_result``) are drawn as crosses. Where
    the run estimated it (``usp_kernels_over_reference``), a bar marks our compute alone
    on the same scale: about how far below 1 ours could go were everything else free."""
    references = document.get("references") or []
    if not references:
        return []
    cases = list(dict.fromkeys((r["usp_impl"], r["world_size"], r["seqlen"], r["pass"]) for r in references))
    names = sorted({r["reference"] for r in references})
    figure, axis = plt.subplots(figsize=(max(7.0, 0.7 * len(cases) + 2), 4.5))
    for name in names:
        mine = {(r["usp_impl"], r["world_size"], r["seqlen"], r["pass"]): r for r in references
                if r["reference"] == name}
        ratio = lambda indices: [mine[cases[i]]["ms"] / mine[cases[i]]["usp_ms"] for i in indices]  # noqa: E731
        right = [i for i, case in enumerate(cases) if case in mine and not wrong_result(mine[case])]
        wrong = [i for i, case in enumerate(cases) if case in mine and wrong_result(mine[case])]
        (points,) = axis.plot(right, ratio(right), "o", markersize=8, label=name)
        if wrong:
            axis.plot(wrong, ratio(wrong), "x", markersize=9, color=points.get_color(), label=f"{name}: wrong result")
    axis.axhline(1.0, color="k", linewidth=1, label="ours")
    compute = our_compute_alone(references)
    if compute:
        shown = [i for i, case in enumerate(cases) if case in compute]
        axis.plot(shown, [compute[cases[i]] for i in shown], "_", markersize=16, markeredgewidth=2, color="k",
                  label="ours, compute alone")
    axis.grid(True, axis="y", alpha=0.3)
    axis.set_xticks(range(len(cases)), [f"{impl}\nN={n} s{seqlen} {pass_}" for impl, n, seqlen, pass_ in cases],
                    fontsize=7, rotation=30, ha="right")
    axis.set_ylabel("time per call / ours (slowest rank, median)")
    axis.legend(fontsize=8)
    first = references[0]
    mask = "causal" if first["causal"] else "full"
    axis.set_title(f"References against ours: {first['dtype']}, {first['heads']}/{first['kv_heads']} heads "
                   f"d{first['head_dim']}, {mask}\n{machine_label(document)}", fontsize=9)
    return [_save(figure, out_dir / f"scaling-references-{mask}.png", oversubscription_note(document))]


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
    figure, axis = plt.subplots(figsize=(8, 5))
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
    axis.set_title(f"Cost model (computed, not measured): {model['name']}, batch {config['batch']}, sequence "
                   f"{config['seqlen']}\nbf16; dotted: parameter traffic; computed on {machine_label(document)}",
                   fontsize=9)
    return [_save(figure, out_dir / "comm-volume.png")]


def _gaps(bars: list[dict]) -> list[dict]:
    """The stretches of a rank's ring loop that no compute or wait bar covers."""
    spans = sorted((b["start_ms"], b["end_ms"]) for b in bars if b["kind"] in ("compute", "wait"))
    gaps, reached = [], None
    for start, end in spans:
        if reached is not None and start > reached:
            gaps.append(dict(kind="gap", step=-1, start_ms=reached, end_ms=start))
        reached = end if reached is None else max(reached, end)
    return gaps


def _bars_from_scaling(document: dict) -> tuple[list[list[dict]], str, dict] | None:
    """Per rank, the forward ring loop of one traced call (the longest sequence of the
    largest world size, fewest Ulysses ranks): compute and wait bars as measured, each
    K/V transfer from its posting for as long as the same transfer took when timed
    alone (its completion inside the loop is not observable), and the gaps between."""
    candidates = [r for r in document["records"] if r["ring_degree"] > 1 and r["pass"] == "fwd"]
    if not candidates:
        return None
    record = max(candidates, key=lambda r: (r["world_size"], r["seqlen"], -r["ulysses_degree"]))
    ranks = []
    for rank in record["ranks"]:
        events, transfer_ms = rank["timeline"], rank["ring"]["forward"]["transfer_alone_ms_per_step"]
        forward_spans = {(traffic.COMPUTE, traffic.FORWARD): "compute", (traffic.WAIT, traffic.KV_FORWARD): "wait"}
        bars = [dict(kind=forward_spans[e["kind"], e["label"]], step=e["step"], start_ms=e["start_ms"],
                     end_ms=e["end_ms"]) for e in events if (e["kind"], e["label"]) in forward_spans]
        bars += [dict(kind="transfer", step=e["step"], start_ms=e["start_ms"], end_ms=e["start_ms"] + transfer_ms)
                 for e in events if e["kind"] == traffic.P2P and e["label"] == traffic.KV_FORWARD]
        ranks.append(bars + _gaps(bars))
    title = (f"Ring timeline (measured, forward): {record['impl']} on {record['world_size']} ranks, sequence "
             f"{record['seqlen']}, {record['backend']} {record['dtype']}")
    return ranks, title, {}


def _bars_from_emulate(document: dict) -> tuple[list[list[dict]], str, dict] | None:
    timelines = document.get("timelines") or {}
    if not timelines:
        return None
    layout = "zigzag" if "zigzag" in timelines else next(iter(timelines))
    events = timelines[layout]
    ranks = [[] for _ in range(1 + max(e["rank"] for e in events))]
    for e in events:
        ranks[e["rank"]].append(e)
    ranks = [bars + _gaps(bars) for bars in ranks]
    config = document["config"]
    title = (f"Ring timeline (emulated, forward, lock-step): {config['world_size']} virtual ranks, {layout}, "
             f"{config['seqlen']} tokens, link {config['timeline_bandwidth']} "
             f"{config['bandwidths_gbs'][config['timeline_bandwidth']]:g} GB/s")
    return ranks, title, EMULATED_LABELS


TIMELINE_STYLE = {  # kind: (colour, row offset, bar height, legend label)
    "compute": ("tab:blue", 0.0, 0.5, "compute (attention and merge of one step)"),
    "transfer": ("tab:orange", 0.32, 0.16, "K/V transfer, from its posting, as long as it takes alone"),
    "wait": ("tab:red", -0.32, 0.16, "waiting for the next K/V block"),
    "gap": ("lightgrey", 0.0, 0.5, "gap: idle, or host work outside the spans"),
}
EMULATED_LABELS = {"transfer": "K/V transfer at the link's bandwidth (predicted)",
                   "gap": "idle: waiting for the slowest rank or the transfer (lock-step)"}


def timeline_figure(document: dict, out_dir: Path) -> list[Path]:
    """Compute, transfer, wait and gap bars per ring step per rank, from a scaling or emulate run."""
    found = _bars_from_scaling(document) if document["kind"] == "scaling" else _bars_from_emulate(document)
    if found is None:
        return []
    ranks, title, labels = found
    figure, axis = plt.subplots(figsize=(10, 0.6 * len(ranks) + 2.6))
    labelled = set()
    for index, bars in enumerate(ranks):
        for bar in bars:
            kind = bar["kind"]
            color, offset, height, label = TIMELINE_STYLE[kind]
            axis.barh(index + offset, bar["end_ms"] - bar["start_ms"], left=bar["start_ms"], height=height,
                      color=color, edgecolor="black", linewidth=0.3,
                      label=None if kind in labelled else labels.get(kind, label))
            labelled.add(kind)
            if kind == "compute":
                axis.text((bar["start_ms"] + bar["end_ms"]) / 2, index, str(bar["step"]), ha="center", va="center",
                          fontsize=7, color="white")
    axis.set_yticks(range(len(ranks)))
    axis.set_yticklabels([f"rank {i}" for i in range(len(ranks))])
    axis.invert_yaxis()
    axis.set_xlabel("time (ms); numbers: ring step")
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, frameon=False)
    axis.set_title(f"{title}\n{machine_label(document)}", fontsize=9)
    return [_save(figure, out_dir / f"ring-timeline-{document['kind']}.png", oversubscription_note(document))]


def train_figure(document: dict, out_dir: Path) -> list[Path]:
    """Loss per step of the one-process reference and of each sequence-parallel
    configuration (left axis), and each one's relative difference from the reference
    (right axis, log scale; zero drawn at the axis' floor)."""
    records, config = document["records"], document["config"]
    figure, loss_axis = plt.subplots(figsize=(10, 4.8))
    difference_axis = loss_axis.twinx()
    steps = range(1, len(records[0]["reference_losses"]) + 1)
    loss_axis.plot(steps, records[0]["reference_losses"], color="0.6", linewidth=5, label="one process")
    floor = 1e-18
    for record in records:
        (line,) = loss_axis.plot(steps, record["losses"], linewidth=1.2, label=record["name"])
        difference_axis.plot(steps, [max(d, floor) for d in record["relative_difference"]], ".", markersize=5,
                             color=line.get_color())
    bar = records[0].get("parity_bar")
    if bar:
        difference_axis.axhline(bar, color="firebrick", linestyle="--", linewidth=1)
        difference_axis.annotate(f"parity bar {bar:g}", (steps[0], bar), color="firebrick", fontsize=8,
                                 ha="left", va="bottom")
    difference_axis.set_yscale("log")
    difference_axis.set_ylim(floor, max(1.0, 10 * (bar or 0)))
    difference_axis.set_ylabel(f"|loss - one process| / one process (dots; 0 drawn at {floor:g})")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss (lines)")
    loss_axis.grid(True, alpha=0.3)
    loss_axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.13, 1.0))
    loss_axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    loss_axis.set_title(f"USP training against one process: {config['family']}, {config['layers']} layers, "
                        f"{config['heads']}/{config['kv_heads']} heads, {config['dtype']}, "
                        f"{config['batch']} x {config['seqlen']} tokens, {config['world_size']} processes\n"
                        f"{machine_label(document)}", fontsize=9)
    return [_save(figure, out_dir / f"train-{config['dtype']}.png")]


def balance_figure(document: dict, out_dir: Path) -> list[Path]:
    """Work imbalance (busiest ring rank over the mean) per layout against the ring
    degree, dense causal and with packed documents; and the transfer time per rank of
    one forward + backward under each schedule at each link speed."""
    config = document["config"]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for axis, mix, title in ((axes[0], "dense", "dense causal"), (axes[1], "documents", "packed documents")):
        lines = defaultdict(list)
        for record in document["records"]:
            if record["mix"] == mix:
                lines[record["layout"]].append((record["ring_degree"], record["imbalance"]))
        for index, (layout, points) in enumerate(lines.items()):  # markers shrink: equal lines stay visible
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], "--" if "whole" in layout else "-",
                      marker="osD^"[index % 4], markersize=9 - 2 * index, label=layout)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("ring degree r")
        axis.set_ylabel("work imbalance (busiest rank / mean)")
        axis.set_title(title, fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    axis = axes[2]
    for index, gbs in enumerate(config["bandwidths_gbs"]):
        for schedule, style in (("ring", "-"), ("allgather", "--")):
            points = sorted((t["ring_degree"], sum(t["transfer_ms"][f"{gbs:g}"].values()))
                            for t in document["traffic"] if t["schedule"] == schedule)
            axis.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", color=f"C{index}",
                      label=f"{schedule} at {gbs:g} GB/s" + (" (overlapped)" if schedule == "ring" else " (exposed)"))
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("ring degree r")
    axis.set_ylabel("transfer ms per rank, forward + backward")
    axis.set_title(f"K/V traffic: {config['kv_heads']} K/V heads d{config['head_dim']} {config['dtype']}, pure ring",
                   fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    docs = config["docs"]
    mix = (f"fixed {docs['length']}" if docs["kind"] == "fixed" else
           f"lognormal mean {docs['mean']:g}, sigma {docs['sigma']:g}")
    figure.suptitle(f"Layouts and schedules (computed from the masks, not measured): {config['seqlen']} tokens, "
                    f"documents {mix}" + (f", window {config['window']}" if config.get("window") is not None else "")
                    + f"; computed on {machine_label(document)}", fontsize=9)
    return [_save(figure, out_dir / "balance.png")]


def paper_agreement_figure(document: dict, out_dir: Path) -> list[Path]:
    """Per row of the paper's Tables 3 and 4: each mesh's speed relative to the row's
    fastest, measured (bars) and predicted by the cost model (markers)."""
    rows = document.get("paper_agreement") or []
    if not rows:
        return []
    columns, lines = 4, (len(rows) + 3) // 4
    figure, axes = plt.subplots(lines, columns, figsize=(13, 2.6 * lines), sharey=True, squeeze=False)
    meshes = ["u8r1", "u4r2", "u2r4", "u1r8"]
    for axis, row in zip(axes.flat, rows):
        x = range(len(meshes))
        axis.bar(x, row["measured_relative"], color="0.75", label="measured (paper)")
        axis.plot(x, row["predicted_relative"], "o-", color="tab:blue", label="predicted")
        axis.set_xticks(list(x), meshes, fontsize=8)
        axis.set_ylim(0, 1.1)
        verdict = "ok" if row["best_ok"] and row["tau_ok"] else "misses the bar"
        axis.set_title(f"{row['row'].split(' ', 2)[2]}\ntau {row['kendall_tau']:+.2f}, {verdict}", fontsize=8)
        axis.grid(True, axis="y", alpha=0.3)
    for axis in list(axes.flat)[len(rows):]:
        axis.set_visible(False)
    axes[0][0].set_ylabel("speed / row's fastest")
    axes[0][0].legend(fontsize=7, loc="lower left")
    figure.suptitle("Cost model against the USP paper's Tables 3 (8 x L20, PCIe) and 4 (8 x A100, NVLink): LLaMA3-8B "
                    f"attention, forward, global length; computed on {machine_label(document)}", fontsize=9)
    return [_save(figure, out_dir / "model-vs-paper.png")]


FIGURES = {"kernels": [kernel_figures], "scaling": [scaling_figures, timeline_figure, references_figure],
           "emulate": [timeline_figure], "model": [comm_volume_figure, paper_agreement_figure], "train": [train_figure],
           "balance": [balance_figure]}
