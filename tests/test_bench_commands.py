"""``usp-bench kernels | scaling | emulate | model | plot | all`` end to end at toy sizes:
exit status, progress output, the JSON schema, the figures, and the help of every option."""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import statistics
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from usp.bench import main_job, scaling
from usp.bench.__main__ import COMMANDS, build_parser, main
from usp.bench.cli_args import HelpFormatter
from usp.bench.flops import FLOP_CONVENTION, PASSES
from usp.bench.launch import free_port
from usp.bench.references import Reference
from usp.bench.results import new_run_dir
from usp.plots.cli import newest_results
from usp.plots.cli import build_parser as build_plots_parser
from usp.plots.cli import main as plots_main

ROOT = Path(__file__).resolve().parents[1]
MACHINE_FIELDS = {"device", "device_type", "host", "cpu", "torch", "triton", "python", "platform"}
# The fields every timing record starts with, in this order (ARCHITECTURE.md); scripts and plots rely on them.
TIMING_FIELDS = ["device", "impl", "pass", "dtype", "causal", "batch", "seqlen", "heads", "kv_heads", "head_dim", "ms",
                 "tflops"]


def _document(directory: Path, kind: str) -> dict:
    (path,) = directory.glob(f"{kind}-*.json")
    document = json.loads(path.read_text())
    assert document["kind"] == kind and MACHINE_FIELDS <= set(document["machine"]) and document["created"]
    return document


def _timed_document(directory: Path, kind: str) -> dict:
    """A benchmark result whose records all carry the timing fields, first."""
    document = _document(directory, kind)
    records = document["records"]
    assert records and document["timing_fields"] == TIMING_FIELDS
    for record in records:
        assert list(record)[:len(TIMING_FIELDS)] == TIMING_FIELDS
        assert record["ms"] > 0 and record["tflops"] > 0
        assert record["pass"] in ("fwd", "bwd", "fwd+bwd") and isinstance(record["causal"], bool)
    return document


TOY_RUNS = {
    "kernels": ["--impl", "triton", "--impl", "torch", "--impl", "naive", "--impl", "sdpa-math", "--impl", "sdpa-flash",
                "--seqlen", "32", "64", "--head-dim", "16", "--heads", "2", "--dtype", "fp32", "--warmup", "0",
                "--repeats", "1", "--tile-order", "rule", "by-head"],
    "scaling": ["--world-size", "1", "2", "--seqlen", "32", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                "--warmup", "0", "--repeats", "1", "--reference", "usp-unchecked", "--reference", "torch-cp-alltoall"],
    "emulate": ["--world-size", "4", "--ulysses-degree", "2", "--tokens-per-rank", "8", "--heads", "4", "--kv-heads",
                "2", "--head-dim", "16", "--warmup", "0", "--repeats", "1", "--bandwidth", "slow=0.001",
                "--bandwidth", "fast=100"],
    "model": ["--seqlen", "32768", "--degrees", "2", "8"],
    "balance": ["--seqlen", "256", "--ring-degree", "2", "4", "--docs", "lognormal:mean=32", "--window", "40"],
    "train": ["--world-size", "2", "--mesh", "1x2", "--layout", "zigzag", "--steps", "2", "--seqlen", "16",
              "--layers", "1", "--hidden", "16", "--ffn-hidden", "32", "--vocab", "32"],
}


@pytest.fixture(scope="module")
def toy_results(tmp_path_factory):
    """Every command once, at toy sizes, into one folder (the plot test reads it). The
    kernels command runs in a fresh process, where it must pick Triton's interpreter by
    itself to time triton without a GPU, and scaling, whose ranks print the progress;
    the others in this one."""
    out = tmp_path_factory.mktemp("results")
    outputs = {}
    for kind, options in TOY_RUNS.items():
        argv = [kind, *options, "--out-dir", str(out)]
        if kind in ("kernels", "scaling"):
            proc = subprocess.run([sys.executable, "-m", "usp.bench", *argv], cwd=ROOT, capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            outputs[kind] = proc.stdout
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(argv) == 0
        outputs[kind] = printed.getvalue()
    return out, outputs


def test_every_option_shows_its_default_and_no_markup():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(COMMANDS)
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        assert "``" not in text, name
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert "default" in HelpFormatter(name)._get_help_string(action), f"{name} {action.option_strings}"
    assert "``" not in parser.format_help()


def test_plots_help_shows_defaults():
    parser = build_plots_parser()
    assert "``" not in parser.format_help()
    for action in parser._actions:
        if action.dest != "help":
            assert "default" in action.help, action.dest


def test_kernels_command(toy_results):
    out, outputs = toy_results
    document = _timed_document(out, "kernels")
    assert document["flop_convention"] == FLOP_CONVENTION
    records = document["records"]
    # 2 seqlens x 2 causal x 3 passes for each of the 6 implementations (triton in two tile orders)
    assert {r["impl"] for r in records} == {"triton", "triton:by-head", "torch", "naive", "sdpa-math", "sdpa-flash"}
    assert len(records) == 2 * 2 * 3 * 6
    for r in records:
        expected = 4 * r["batch"] * r["heads"] * r["seqlen"] ** 2 * r["head_dim"] * (0.5 if r["causal"] else 1.0)
        expected *= {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[r["pass"]]
        assert r["flops"] == expected and r["tflops"] == pytest.approx(expected / (r["ms"] * 1e-3) / 1e12)
        sdpa = {s["impl"]: s["ms"] for s in records if s["impl"].startswith("sdpa") and
                (s["seqlen"], s["causal"], s["pass"]) == (r["seqlen"], r["causal"], r["pass"])}
        assert r["speedup_vs_sdpa"] == pytest.approx(min(sdpa.values()) / r["ms"])
    assert set(document["summary"]["speedup_vs_fastest_sdpa"]["torch"]) == {"fwd", "bwd", "fwd+bwd"}
    # each record as a fraction of the matmul rate measured in the same run; the triton kernels compiled first
    rate = document["summary"]["matmul_tflops"]["fp32"]
    assert rate > 0 and all(r["of_matmul"] == pytest.approx(r["tflops"] / rate) for r in records)
    assert document["summary"]["of_matmul"]["torch"]["fwd"] == pytest.approx(
        statistics.median(r["of_matmul"] for r in records if (r["impl"], r["pass"]) == ("torch", "fwd")))
    # on a CPU the host's time is the time: no separate host summary, none printed
    assert document["summary"]["host_ms"] is None and all(r["host_ms"] == r["ms"] for r in records)
    assert "host time per call" not in outputs["kernels"]
    compiled = document["summary"]["compile"]
    assert [(g["impl"], g["head_dim"], g["causal"]) for g in compiled["groups"]] == [
        ("triton", 16, False), ("triton", 16, True), ("triton:by-head", 16, False), ("triton:by-head", 16, True)]
    assert compiled["seconds"] >= sum(g["seconds"] for g in compiled["groups"]) > 0
    assert ("compiled the triton kernels of 4 (tile order, dtype, head dim, causal, heads) configurations in"
            in outputs["kernels"])
    assert "matmul rate: fp32 " in outputs["kernels"] and "of the matmul rate, torch: fwd " in outputs["kernels"]
    assert "[  1/4] fp32 b1 s32 h2/2 d16 full" in outputs["kernels"]  # progress
    assert "headline torch:" in outputs["kernels"]
    # triton once per tile order asked for; each later order's time over the first's, per pass
    assert document["config"]["tile_orders"] == ["rule", "by-head"]
    assert document["config"]["impls"][:2] == ["triton", "triton:by-head"]
    ratios = {}
    for r in records:
        if r["impl"] == "triton:by-head":
            (rule,) = (s["ms"] for s in records if s["impl"] == "triton" and
                       (s["seqlen"], s["causal"], s["pass"]) == (r["seqlen"], r["causal"], r["pass"]))
            ratios.setdefault(r["pass"], []).append(r["ms"] / rule)
    over_first = document["summary"]["tile_order_over_first"]
    assert set(over_first) == {"triton:by-head"} and set(over_first["triton:by-head"]) == set(ratios) == set(PASSES)
    for pass_, values in ratios.items():
        assert len(values) == 4
        assert over_first["triton:by-head"][pass_] == pytest.approx(dict(
            geomean=statistics.geometric_mean(values), min=min(values), max=max(values)))
    assert "tile order, triton:by-head over triton: fwd " in outputs["kernels"]


def test_scaling_command(toy_results):
    out, outputs = toy_results
    document = _timed_document(out, "scaling")
    records = document["records"]
    assert document["config"]["world_sizes"] == [1, 2]
    assert [run["process_group"] for run in document["config"]["runs"]] == ["gloo", "gloo"]
    # N = 1: one mesh; N = 2: ring and Ulysses; 2 seqlens, 2 passes each
    assert {(r["impl"], r["world_size"]) for r in records} == {("ring-u1r1-zigzag", 1), ("ring-u1r2-zigzag", 2),
                                                               ("ulysses-u2r1", 2)}
    assert len(records) == 3 * 2 * 2
    for r in records:
        assert len(r["ranks"]) == r["world_size"] and r["tokens_per_s"] > 0
        assert r["tokens_per_rank"] * r["world_size"] == r["seqlen"]
        assert r["peak_memory_bytes_max"] is None  # not measured on a CPU
        for rank in r["ranks"]:
            assert len(rank["times_ms"]) == 1
            assert 0 <= rank["comm_wait_ms"] <= rank["traced_ms"]  # a wait lies inside its call
            assert rank["tflops"] == pytest.approx(r["flops"] / (rank["ms"] * 1e-3) / 1e12)
            assert rank["timeline"] and all(e["start_ms"] >= 0 for e in rank["timeline"])
        if r["impl"].startswith("ring-u1r2"):
            # one K/V hop forward: K and V of [1, s/2, 2, 16] fp32; backward adds a hop and 2 accumulator hops
            kv_hop = 2 * r["seqlen"] // 2 * 2 * 16 * 4
            expected = kv_hop if r["pass"] == "fwd" else 2 * kv_hop + 2 * kv_hop
            assert r["ranks"][0]["p2p_bytes"] == expected
            loops = r["ranks"][0]["ring"]
            assert set(loops) == ({"forward"} if r["pass"] == "fwd" else {"forward", "backward"})
            assert all(loop["overlap"] > 0 for loop in loops.values())
        elif r["world_size"] == 2:
            assert r["ranks"][0]["p2p_bytes"] == 0 and r["ranks"][0]["all_to_all_bytes"] > 0
        else:
            assert r["bytes_sent_per_rank"] == 0
    # ours without the rank check beside every case: the same numbers exactly; torch's
    # context parallel beside the ring of 2 (one rank has nothing to parallelise)
    references = document["references"]
    unchecked = [r for r in references if r["reference"] == "usp-unchecked"]
    assert [(r["usp_impl"], r["seqlen"], r["pass"]) for r in unchecked] == [
        (r["impl"], r["seqlen"], r["pass"]) for r in records]
    torch_cp = [r for r in references if r["reference"] == "torch-cp-alltoall"]
    assert [(r["usp_impl"], r["seqlen"], r["pass"]) for r in torch_cp] == [
        (r["impl"], r["seqlen"], r["pass"]) for r in records if r["impl"] == "ring-u1r2-zigzag"]
    assert len(references) == len(unchecked) + len(torch_cp)
    assert "N=1 reference torch-cp-alltoall left out on u1r1: one rank: nothing to parallelise" in \
        document["config"]["notes"]
    for reference in references:
        assert list(reference)[:len(TIMING_FIELDS)] == TIMING_FIELDS
        u, r = reference["ulysses_degree"], reference["ring_degree"]
        assert reference["impl"] == f"{reference['reference']}-u{u}r{r}"
        assert reference["usp_over_reference"] == pytest.approx(reference["usp_ms"] / reference["ms"])
        ours = next(x for x in records if (x["impl"], x["seqlen"], x["pass"]) ==
                    (reference["usp_impl"], reference["seqlen"], reference["pass"]))
        # each rank's median time x the compute share of its traced call, the largest rank's
        kernels_ms = max(rank["ms"] * rank["compute_ms"] / rank["traced_ms"] for rank in ours["ranks"])
        assert 0 < kernels_ms <= ours["ms"]
        assert reference["usp_kernels_over_reference"] == pytest.approx(kernels_ms / reference["ms"])
        # against every mesh of ours at the same N, ours on the same mesh included
        same_n = {x["impl"]: x["ms"] for x in records if x["world_size"] == reference["world_size"]
                  and (x["seqlen"], x["pass"]) == (reference["seqlen"], reference["pass"])}
        assert reference["usp_over_reference_by_impl"] == pytest.approx(
            {impl: ms / reference["ms"] for impl, ms in same_n.items()})
        # fp32 against the float64 oracle of the whole case (out, and gradients with fwd+bwd)
        assert 0 < reference["max_abs_error"] < 1e-5 and 0 < reference["usp_max_abs_error"] < 1e-5
        if reference["reference"] == "usp-unchecked":
            assert reference["max_abs_diff_vs_usp"] == 0.0
            assert reference["max_abs_error"] == reference["usp_max_abs_error"]
        else:
            assert 0 < reference["max_abs_diff_vs_usp"] < 2e-5
    assert "reference usp-unchecked" in outputs["scaling"] and "ours/ref" in outputs["scaling"]
    for name, medians in document["reference_medians"].items():
        mine = [r for r in references if r["reference"] == name]
        assert medians["cases"] == len(mine)
        for key in ("usp_over_reference", "usp_kernels_over_reference"):
            assert medians[key] == pytest.approx(statistics.median(r[key] for r in mine))
        assert (f"median over {len(mine)} cases, {name}: ours/ref {medians['usp_over_reference']:.3f}, "
                f"kern/ref {medians['usp_kernels_over_reference']:.3f}") in outputs["scaling"]
    assert set(document["reference_medians"]) == {"usp-unchecked", "torch-cp-alltoall"}
    assert "float64 oracle for s64" in outputs["scaling"] and "best of ours" in outputs["scaling"]
    # the progress line of each case shows the figure the table and the JSON hold
    progress = re.findall(r"N=(\d+) (\S+) +s(\d+) +(\S+) +([\d.]+) ms;", outputs["scaling"])
    assert len(progress) == len(records)
    by_case = {(r["world_size"], r["impl"], r["seqlen"], r["pass"]): r["ms"] for r in records}
    for world, impl, seqlen, pass_, ms in progress:
        assert float(ms) == pytest.approx(by_case[(int(world), impl, int(seqlen), pass_)], abs=0.006)


def test_emulate_command(toy_results):
    out, outputs = toy_results
    document = _timed_document(out, "emulate")
    records = document["records"]
    assert {r["impl"] for r in records} == {"usp-u2r2-zigzag", "usp-u2r2-contiguous", "usp-u2r2-stripe"}
    assert len(records) == 6
    for r in records:
        per_rank = r["per_rank_compute_ms"]
        assert r["seqlen"] == 32 and len(per_rank) == 2
        assert r["imbalance"] == pytest.approx(max(per_rank) / (sum(per_rank) / len(per_rank)))
        assert r["ms"] == pytest.approx(max(per_rank))
        slow, fast = r["predictions"]["slow"], r["predictions"]["fast"]
        assert slow["predicted_ms"] > fast["predicted_ms"] >= r["ms"] * (1 - 1e-9)
    # every step the ring plan computes was timed: zigzag causal computes on every step of every rank
    zigzag_fwd = next(r for r in records if r["impl"] == "usp-u2r2-zigzag" and r["pass"] == "fwd")
    assert all(t > 0 for steps in zigzag_fwd["step_ms"]["fwd"] for t in steps)
    contiguous = next(r for r in records if r["impl"] == "usp-u2r2-contiguous" and r["pass"] == "fwd")
    assert contiguous["step_ms"]["fwd"][0][1] == 0  # rank 0 sees nothing of rank 1's later keys
    stripe = next(r for r in records if r["impl"] == "usp-u2r2-stripe" and r["pass"] == "fwd")
    assert all(t > 0 for steps in stripe["step_ms"]["fwd"] for t in steps)  # a triangle on every step
    assert document["timelines"]["zigzag"]
    assert "layout zigzag, schedule ring: 2 ring ranks" in outputs["emulate"]
    # causal pairs over 32 tokens: ring rank 0 sees 136 (its triangle), rank 1 256 + 136
    assert contiguous["work_imbalance"] == pytest.approx(392 / 264) and zigzag_fwd["work_imbalance"] == 1.0


def test_emulate_with_documents_a_window_and_both_schedules(tmp_path, capsys):
    """Packed documents (fixed 8 over 64 tokens), a window of 5, both schedules: the
    all-gather makes one call per rank; a ring step of the contiguous layout that sees
    another document only is skipped (timed 0)."""
    argv = ["emulate", "--world-size", "4", "--tokens-per-rank", "16", "--heads", "2", "--kv-heads", "1",
            "--head-dim", "16", "--docs", "fixed:8", "--window", "5", "--schedule", "ring", "allgather",
            "--layout", "contiguous", "zigzag", "--pass", "fwd", "--warmup", "0", "--repeats", "1",
            "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    document = _timed_document(tmp_path, "emulate")
    by = {(r["layout"], r["schedule"]): r for r in document["records"]}
    assert set(by) == {(layout, schedule) for layout in ("contiguous", "zigzag") for schedule in ("ring", "allgather")}
    assert all(len(steps) == 1 for steps in by["zigzag", "allgather"]["step_ms"]["fwd"])
    assert by["contiguous", "ring"]["step_ms"]["fwd"][0][1:] == [0, 0, 0]  # documents never cross ranks here
    # each rank holds two whole documents: contiguous is balanced; zigzag's one-token chunks under the window are not
    assert by["contiguous", "ring"]["work_imbalance"] == 1.0 < by["zigzag", "ring"]["work_imbalance"]
    assert by["zigzag", "ring"]["documents"] == 8
    # TFLOP/s of the visible pairs only: 4 x heads x head dim per pair, over the ranks, per slowest-rank time
    record = by["zigzag", "ring"]
    flops = 4 * 2 * 16 * sum(record["per_rank_work"])
    assert record["tflops"] == pytest.approx(flops / 4 / (record["ms"] * 1e-3) / 1e12, rel=1e-6)
    assert "8 documents, window 5" in capsys.readouterr().out


@pytest.mark.parametrize("backend, merge, calls_inside, recorded", [
    ("triton", "kernel", 4, "kernel"), ("triton", "separate", 0, "separate"), ("torch", "kernel", 0, "separate")])
def test_emulate_merges_inside_the_kernel_or_separately_as_asked(tmp_path, monkeypatch, backend, merge, calls_inside,
                                                                 recorded):
    """Two ring ranks, zigzag: each merges both its steps inside the kernel
    (``forward_into``, the first into a fresh accumulator) unless told to merge
    separately; a backend that cannot merge inside merges separately, and the result says so."""
    from usp.kernels import backends

    triton, calls = backends.BACKENDS["triton"], []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("causal"))
        return triton.forward_into(*args, **kwargs)

    monkeypatch.setitem(backends.BACKENDS, "triton", dataclasses.replace(triton, forward_into=counted))
    argv = ["emulate", "--world-size", "2", "--tokens-per-rank", "16", "--heads", "2", "--kv-heads", "1",
            "--head-dim", "16", "--backend", backend, "--layout", "zigzag", "--pass", "fwd", "--warmup", "0",
            "--repeats", "1", "--merge", merge, "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    assert len(calls) == calls_inside
    assert _document(tmp_path, "emulate")["config"]["merge"] == recorded


@pytest.mark.slow
def test_scaling_with_documents_a_window_and_the_allgather_schedule(tmp_path):
    """On 2 gloo processes: packed documents and a window through the all-gather schedule;
    the references are left out and said so."""
    argv = [sys.executable, "-m", "usp.bench", "scaling", "--world-size", "2", "--seqlen", "64", "--heads", "4",
            "--kv-heads", "2", "--head-dim", "16", "--docs", "fixed:24", "--window", "10", "--schedule", "allgather",
            "--pass", "fwd+bwd", "--warmup", "0", "--repeats", "1", "--out-dir", str(tmp_path)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "references left out: they take no documents or windows" in proc.stdout
    document = _timed_document(tmp_path, "scaling")
    ring = next(r for r in document["records"] if r["ring_degree"] == 2)
    assert ring["impl"] == "ring-u1r2-zigzag-allgather" and ring["schedule"] == "allgather"
    assert ring["docs"] == {"kind": "fixed", "length": 24} and ring["window"] == 10
    # per rank: K and V shards of 32 tokens x 2 heads x 16 fp32 gathered in each pass, dK and dV
    # reduce-scattered, and the few bytes of the rank check
    shard = 32 * 2 * 16 * 4
    assert 0 < ring["bytes_sent_per_rank"] - (2 * 2 * shard + 2 * shard) < 100


def test_model_command(toy_results):
    out, outputs = toy_results
    document = _document(out, "model")
    assert [row["degree"] for row in document["volumes"]] == [2, 8]
    ranking = document["ranking"]
    assert [p["rank"] for p in ranking] == list(range(1, len(ranking) + 1))
    assert [p["total_ms"] for p in ranking] == sorted(p["total_ms"] for p in ranking)
    for p in ranking:  # every field the interface promises
        assert {"total_ms", "tflops_per_gpu", "comm_bytes", "memory_bytes", "ulysses_degree", "ring_degree"} <= set(p)
    assert len(document["paper_agreement"]) == 10
    assert "against the paper's Tables 3 and 4" in outputs["model"] and "ms/call" in outputs["model"]


def test_train_command(toy_results):
    out, outputs = toy_results
    document = _document(out, "train")
    assert document["config"]["world_size"] == 2 and document["config"]["dtype"] == "fp64"
    (record,) = document["records"]
    assert record["name"] == "u1r2-zigzag"
    assert len(record["losses"]) == len(record["reference_losses"]) == len(record["tokens_per_s"]) == 2
    assert record["max_relative_difference"] <= 1e-10 and record["parity"] is True
    assert "one process: step 2/2, loss" in outputs["train"] and "parity (bar 1e-10;" in outputs["train"]


def test_scaling_under_torchrun(tmp_path):
    """The torchrun path: every process is a rank of the launcher's group (gloo without
    CUDA), rank 0 gathers the figures and writes the file."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "usp.bench", "scaling", "--mesh", "2x1", "--seqlen", "32",
                           "--heads", "4", "--kv-heads", "4", "--head-dim", "16", "--pass", "fwd", "--warmup", "0",
                           "--repeats", "2", "--out-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = _timed_document(tmp_path, "scaling")["records"]
    assert record["impl"] == "ulysses-u2r1" and record["world_size"] == 2 and len(record["ranks"]) == 2
    assert all(len(rank["times_ms"]) == 2 for rank in record["ranks"])


def test_model_with_a_custom_shape_block_scope_and_json(tmp_path, capsys):
    json_path = tmp_path / "plan" / "model.json"
    assert main(["model", "--model", "custom", "--hidden", "1024", "--heads", "8", "--kv-heads", "2", "--layers", "4",
                 "--ffn-hidden", "4096", "--cluster", "2x8xA800", "--scope", "block", "--tp", "2",
                 "--seqlen-per-rank", "2048", "--degrees", "2", "4", "--json", str(json_path),
                 "--out-dir", str(tmp_path)]) == 0
    document = json.loads(json_path.read_text())
    assert document == _document(tmp_path, "model")
    assert document["config"]["model"]["name"] == "custom" and document["config"]["seqlen"] == 2048 * 16
    assert document["config"]["block_params"] == 1024 * 128 * (16 + 4) + 3 * 1024 * 4096 + 2 * 1024
    # 16 GPUs, tp 2: 8 sequence-parallel ranks over 4 heads and 1 K/V head per TP rank: u in 1, 2, 4;
    # the hybrid has two placements
    meshes = [(p["tensor_parallel"], p["ulysses_degree"], p["ring_degree"], p["placement"])
              for p in document["ranking"]]
    assert sorted(meshes) == [(2, 1, 8, "ulysses_inner"), (2, 2, 4, "ring_inner"), (2, 2, 4, "ulysses_inner"),
                              (2, 4, 2, "ring_inner"), (2, 4, 2, "ulysses_inner")]
    assert all(p["tensor_parallel_ms"] > 0 and p["matmul_ms"] > 0 for p in document["ranking"])
    output = capsys.readouterr().out
    assert "tp2 x u" in output and ("tie:" in output or "best:" in output)


def test_model_with_documents_and_a_window(tmp_path, capsys):
    """Documents of 8192 tokens: a contiguous ring of up to 4 ranks holds whole documents
    (balanced); on 8 each document spans two ranks of c = 4096 tokens, whose halves see
    c (c + 1) / 2 and c^2 + c (c + 1) / 2 pairs (busiest / mean = (3c + 1) / (2c + 1));
    zigzag per document stays balanced."""
    c = 4096
    for layout, expected in (("contiguous", {1: 1.0, 2: 1.0, 4: 1.0, 8: (3 * c + 1) / (2 * c + 1)}),
                             ("zigzag", {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0})):
        assert main(["model", "--seqlen", "32768", "--docs", "fixed:8192", "--layout", layout, "--scope", "block",
                     "--out-dir", str(tmp_path / layout)]) == 0
        document = _document(tmp_path / layout, "model")
        assert document["config"]["documents"] == list(range(0, 32769, 8192))
        imbalance = {p["ring_degree"]: p["attention"]["work_imbalance"] for p in document["ranking"]}
        assert imbalance == pytest.approx(expected, rel=1e-12), layout
    printed = capsys.readouterr().out
    assert "masks: 4 document(s) per sequence (fixed, seed 0), 8192 to 8192 tokens;" in printed
    assert "imbalance" in printed.splitlines()[3]
    assert main(["model", "--seqlen", "32768", "--window", "1024", "--out-dir", str(tmp_path / "window")]) == 0
    assert "masks: 1 document(s) per sequence; window 1024;" in capsys.readouterr().out


def test_plot_writes_png_figures_from_the_toy_runs(toy_results, tmp_path):
    out, _ = toy_results
    figures = tmp_path / "figures"
    assert plots_main([str(out), "--out-dir", str(figures)]) == 0
    names = {p.name for p in figures.glob("*.png")}
    assert {"kernels-fp32-d16-full.png", "kernels-fp32-d16-causal.png", "scaling-fwd.png", "scaling-fwd-bwd.png",
            "comm-volume.png", "model-vs-paper.png", "ring-timeline-scaling.png", "ring-timeline-emulate.png",
            "scaling-references-causal.png", "train-fp64.png", "balance.png"} == names
    for path in figures.glob("*.png"):
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_plot_refuses_results_of_different_machines(toy_results, tmp_path, capsys):
    out, _ = toy_results
    (kernels,) = out.glob("kernels-*.json")
    other = json.loads(kernels.read_text())
    other["machine"]["cpu"] = "Some Other CPU"
    (tmp_path / "kernels-other.json").write_text(json.dumps(other))
    (scaling,) = out.glob("scaling-*.json")
    shutil.copy(scaling, tmp_path)
    assert plots_main([str(tmp_path), "--out-dir", str(tmp_path / "f")]) == 1
    error = capsys.readouterr().err
    assert "these results come from different machines: " in error and "Some Other CPU" in error
    assert plots_main([str(tmp_path), "--out-dir", str(tmp_path / "f"), "--mixed-machines"]) == 0


def test_plot_refuses_a_result_without_figures(tmp_path, capsys, monkeypatch):
    bogus = tmp_path / "x.json"
    bogus.write_text(json.dumps({"kind": "verify"}))
    assert plots_main([str(bogus), "--out-dir", str(tmp_path / "f")]) == 1
    assert "no figures for results of kind 'verify'" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert plots_main([]) == 2  # no runs/ folder here
    assert "no results under runs/" in capsys.readouterr().err


@pytest.mark.slow  # 6-12 s of subprocesses: the slow step keeps the default suite's budget
def test_the_main_job_writes_one_run_folder_and_nothing_else(tmp_path, monkeypatch, capsys):
    """usp-bench all: every step's JSON and the figures in one new folder under runs/;
    without transformers the train step is skipped, saying why (the train command runs
    in ``toy_results``)."""
    toy = dict(TOY_RUNS, verify=["--backend", "naive", "--no-distributed"],
               scaling=["--seqlen", "32", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--pass", "fwd",
                        "--warmup", "0", "--repeats", "1"])
    real = main_job.step_options
    monkeypatch.setattr(main_job, "step_options", lambda step, args: real(step, args) + toy[step])
    monkeypatch.setattr(main_job, "transformers_installed", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert main(["all", "--world-size", "1", "2"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert list(tmp_path.iterdir()) == [tmp_path / "runs"]
    kinds = sorted(json.loads(p.read_text())["kind"] for p in run_dir.glob("*.json"))
    assert kinds == ["balance", "emulate", "kernels", "model", "scaling", "verify"]
    assert {p.name for p in (run_dir / "figures").glob("*.png")} >= {"scaling-fwd.png", "comm-volume.png",
                                                                     "ring-timeline-emulate.png"}
    output = capsys.readouterr().out
    assert f"results in runs/{run_dir.name}, figures in runs/{run_dir.name}/figures" in output
    assert "== train: skipped, transformers is not installed" in output


def test_every_run_gets_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = new_run_dir("kernels"), new_run_dir("kernels")
    assert first != second and first.is_dir() and second.is_dir() and first.parent == second.parent == Path("runs")
    stamp = first.name[:len("20260101-000000")]
    assert second.name == f"{first.name}-2" or not second.name.startswith(stamp)  # same second: a suffix


def test_two_results_of_one_kind_in_one_second_are_both_kept(tmp_path, monkeypatch):
    from usp.bench import results

    real = results._dt

    class FrozenClock:  # the datetime module as results uses it, stopped at one second
        timezone = real.timezone

        class datetime:
            @staticmethod
            def now(tz):
                return real.datetime(2026, 11, 27, 7, 54, 10, tzinfo=tz)

    monkeypatch.setattr(results, "_dt", FrozenClock)
    paths = [results.write_result("emulate", "cpu", dict(run=i), tmp_path) for i in range(3)]
    assert [p.name.split("-20261127-075410")[1] for p in paths] == [".json", "-2.json", "-3.json"]
    assert [json.loads(p.read_text())["run"] for p in paths] == [0, 1, 2]
    assert newest_results(tmp_path) == [paths[-1]]  # the plots take the last one written


def test_a_failing_step_does_not_stop_the_main_job(tmp_path, monkeypatch, capsys):
    """A step that fails (here: an option its command refuses) is reported; the others still run."""
    toy = dict(TOY_RUNS, verify=["--backend", "naive", "--no-distributed"], kernels=["--seqlen", "0"],
               train=["--steps", "0"],
               scaling=["--world-size", "1", "--seqlen", "32", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                        "--pass", "fwd", "--warmup", "0", "--repeats", "1"])
    monkeypatch.setattr(main_job, "step_options", lambda step, args: toy[step])
    monkeypatch.chdir(tmp_path)
    assert main(["all"]) == 1
    (run_dir,) = (tmp_path / "runs").iterdir()
    kinds = sorted(json.loads(p.read_text())["kind"] for p in run_dir.glob("*.json"))
    assert kinds == ["balance", "emulate", "model", "scaling", "verify"]
    assert "failed: kernels, train" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["scaling", "--world-size", "2", "--seqlen", "30"], "--seqlen 30"),
    (["emulate", "--world-size", "4", "--ulysses-degree", "3"], "must divide the world size"),
    (["model", "--model", "custom", "--hidden", "64"], "model custom needs --heads"),
    (["model", "--seqlen", "1000"], "must be divisible by 2 x 8"),
    (["model", "--world-size", "16"], "exceeds the cluster's 8 GPUs"),
    (["model", "--tp", "2"], "--tp needs --scope block"),
    (["model", "--docs", "fixed:0"], "documents must be fixed:N or lognormal:mean=M"),
    (["model", "--docs", "fixed:4096", "--batch", "2"], "--docs needs --batch 1"),
    (["model", "--cluster-file", "/nonexistent/cluster.json"], "cannot read the cluster file"),
    (["scaling", "--mesh", "2y2"], "expected a mesh like 2x4"),
    (["emulate", "--bandwidth", "nvlink"], "expected NAME=GB/s"),
    (["train", "--mesh", "3x1"], "u x r must divide the world size 4"),
    (["train", "--hidden", "30"], "--hidden 30 must be divisible by --heads 4"),
    (["train", "--mesh", "1x2", "--batch", "1"], "must be divisible by the data-parallel degree 2"),
    (["train", "--seqlen", "12"], "sequence length 12 must be divisible by 2 x ring_degree = 8"),
])
def test_bad_options_get_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    captured = capsys.readouterr()
    assert message in str(exit_info.value.code) + captured.err


def test_interleaved_timing_takes_turns_and_drops_what_fails():
    from usp.bench.timing import measure_interleaved

    order = []

    def fn(name, fails_on=None, error=RuntimeError):
        def call():
            order.append(name)
            if order.count(name) == fails_on:
                raise error(f"{name} cannot run this")
        return call

    timings = measure_interleaved({"a": fn("a"), "bad": fn("bad", fails_on=1), "late": fn("late", fails_on=3),
                                   "b": fn("b")}, "cpu", warmup=1, repeats=3, errors=(RuntimeError,))
    # one call each per round, each round starting one later; "late" fails in a timed round
    assert order == ["a", "bad", "late", "b",  # warm-up
                     "late", "b", "a",  # repeat 1 starts at "bad", dropped
                     "late", "b", "a",  # repeat 2 starts at "late": its third call raises
                     "b", "a"]  # repeat 3 starts at "b"
    assert list(timings) == ["a", "bad", "late", "b"]
    for name in ("bad", "late"):  # the exception without the frames that would hold the call's tensors
        assert isinstance(timings[name], RuntimeError) and timings[name].__traceback__ is None
    for name in ("a", "b"):
        assert timings[name]["repeats"] == 3 == len(timings[name]["ms_all"])
        assert timings[name]["ms"] == statistics.median(timings[name]["ms_all"])
        assert timings[name]["host_ms"] == timings[name]["ms"]  # on a CPU the host's time is the time
    with pytest.raises(KeyboardInterrupt):  # not an error of the function: Ctrl-C stops the measurement
        measure_interleaved({"stop": fn("stop", fails_on=1, error=KeyboardInterrupt)}, "cpu", errors=(Exception,))
    with pytest.raises(ValueError, match="repeats"):
        measure_interleaved({"a": fn("a")}, "cpu", repeats=0)


@pytest.mark.gpu
def test_gpu_timing_leaves_the_host_work_out():
    """A call whose host work (a 1 ms Python sleep, shorter than the timing's head start)
    is longer than its GPU work (a 0.5 ms GPU sleep) is timed at the GPU's 0.5 ms, with
    the host's time kept beside it (an idle GPU's events would give 1.5 ms or more)."""
    from usp.bench.timing import _sleep_cycles_per_ms, measure_ms

    half_ms = round(_sleep_cycles_per_ms(torch.cuda.current_device()) / 2)

    def call():
        time.sleep(0.001)
        torch.cuda._sleep(half_ms)

    timing = measure_ms(call, "cuda", warmup=1, repeats=5)
    assert 0.4 < timing["ms"] < 0.9, timing
    assert timing["host_ms"] >= 1.0, timing


def test_an_interrupted_kernel_run_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    from usp.bench import kernel_bench

    real = kernel_bench.pass_call

    def interrupted_on_the_second_config(pass_, impl, config, device, seed):
        call = real(pass_, impl, config, device, seed)
        if config.seqlen == 32 and impl == "torch":  # Ctrl-C in the middle of a timing round
            def call():
                raise KeyboardInterrupt
        return call
    monkeypatch.setattr(kernel_bench, "pass_call", interrupted_on_the_second_config)
    assert main(["kernels", "--impl", "torch", "--impl", "sdpa-math", "--pass", "fwd", "--seqlen", "16", "32",
                 "--head-dim", "16", "--heads", "2", "--no-causal", "--warmup", "0", "--repeats", "1",
                 "--out-dir", str(tmp_path)]) == 130
    assert "interrupted after 1 of 2 configs" in capsys.readouterr().err
    document = _timed_document(tmp_path, "kernels")
    assert document["summary"]["interrupted"] is True and document["summary"]["configs_done"] == 1
    assert {(r["impl"], r["seqlen"]) for r in document["records"]} == {("torch", 16), ("sdpa-math", 16)}


@pytest.mark.parametrize("variant, causal, across", [("triton:across-heads", False, True),
                                                     ("triton:by-head", True, False), ("triton", True, True)])
def test_a_tile_order_variant_launches_every_kernel_in_its_order(monkeypatch, variant, causal, across):
    """``kernels --tile-order``: each timed call of a triton variant, its backward's
    launches too, hands its tiles out in that order, whatever the rule would pick (on a
    CPU the rule sends causal launches across heads, full ones head after head); the
    rule holds again outside the calls."""
    from usp.bench import kernel_bench
    from usp.kernels import flash_bwd, flash_fwd, triton_common

    verdicts = []

    def spy(mask, tiles, heads, device):
        verdicts.append(triton_common.tiles_across_heads(mask, tiles, heads, device))
        return verdicts[-1]
    for module in (flash_fwd, flash_bwd):
        monkeypatch.setattr(module, "tiles_across_heads", spy)
    config = kernel_bench.KernelConfig("fp32", 16, 32, causal, 1, 2, 2)
    # launches: the forward; the backward's dK/dV and dQ; "bwd" runs its forward once when it is set up
    for pass_, launches in (("fwd", 1), ("bwd", 1 + 2), ("fwd+bwd", 3)):
        verdicts.clear()
        kernel_bench.pass_call(pass_, variant, config, torch.device("cpu"), 0)()
        assert verdicts == [across] * launches, pass_
    cpu, causal_mask = torch.device("cpu"), triton_common.MaskSpec(right=0)
    assert triton_common.tiles_across_heads(causal_mask, 8, 2, cpu)  # the rule again after the calls
    assert not triton_common.tiles_across_heads(triton_common.MaskSpec(), 8, 2, cpu)


def test_scaling_says_why_a_reference_is_left_out(monkeypatch):
    references = {"missing": Reference("missing", "no_such_package_for_usp", "pip install it", "ulysses",
                                       lambda *shape: None, None),
                  "picky": Reference("picky", "", "", "ulysses", lambda u, r, h, kv: f"not with {kv} K/V heads", None),
                  "ring-only": Reference("ring-only", "", "", "ring", lambda *shape: None, None, by_default=False),
                  "forward-only": Reference("forward-only", "", "", "any", lambda *shape: None, None,
                                            by_default=False, cpu_passes=("fwd",))}
    monkeypatch.setattr(scaling, "REFERENCES", references)
    args = argparse.Namespace(no_references=False, references=None, kv_heads=2, layout="zigzag")
    assert scaling._references(args, [(1, 4), (4, 1)], heads=8) == ((), [
        "reference missing left out: no_such_package_for_usp is not installed (pip install it)",
        "reference picky left out on u4r1: not with 2 K/V heads"])
    args.references = ["ring-only"]  # asked for by name, run on the meshes of its method only
    assert scaling._references(args, [(1, 4), (4, 1)], heads=8) == (((1, 4, "ring-only", ("fwd", "fwd+bwd")),), [])
    # a layout it does not shard: left out on rings, said
    references["ring-only"] = Reference("ring-only", "", "", "any", lambda *shape: None, None, by_default=False,
                                        ring_layouts=("zigzag",))
    args.layout = "stripe"
    assert scaling._references(args, [(1, 4), (4, 1)], heads=8) == (
        ((4, 1, "ring-only", ("fwd", "fwd+bwd")),),
        ["reference ring-only left out on u1r4: it shards no stripe layout"])
    args.layout = "zigzag"
    # what a reference cannot run on a CPU is left out there, and said; on GPUs it runs every pass
    args.references = ["forward-only"]
    assert scaling._references(args, [(1, 4)], heads=8) == (
        ((1, 4, "forward-only", ("fwd",)),), ["reference forward-only: fwd only on a CPU"])
    assert scaling._references(args, [(1, 4)], 8, ("fwd+bwd",)) == (
        (), ["reference forward-only left out: runs only fwd on a CPU"])
    assert scaling._references(args, [(1, 4)], 8, ("fwd+bwd",), gpu=True) == (
        ((1, 4, "forward-only", ("fwd+bwd",)),), [])
    args.no_references = True
    assert scaling._references(args, [(1, 4), (4, 1)], heads=8) == ((), [])


def test_combine_estimates_our_compute_alone_from_each_ranks_share():
    settings = scaling.Settings(meshes=((1, 2),), seqlens=(64,), passes=("fwd",), batch=1, heads=2, kv_heads=2,
                                head_dim=16, dtype="fp32", backend="torch", layout="zigzag", causal=True,
                                placement="ulysses_inner", warmup=0, repeats=2, seed=0)

    def rank(times_ms, traced_ms, compute_ms, their_times_ms):
        reference = dict(times_ms=their_times_ms, max_abs_diff=1e-7, max_abs_error=2e-7, usp_max_abs_error=1e-7)
        return [dict(ulysses_degree=1, ring_degree=2, seqlen=64, pass_="fwd", times_ms=times_ms, traced_ms=traced_ms,
                     bytes_sent=0, p2p_bytes=0, all_to_all_bytes=0, compute_ms=compute_ms, comm_wait_ms=0.0, ring={},
                     peak_memory_bytes=None, timeline=[], references={"torch-cp-alltoall": reference})]
    # rank 0: median 11 ms, 90% of its traced call computing; rank 1: median 12 ms, 50%
    records, references = scaling.combine(settings, [rank([10.0, 12.0], 10.0, 9.0, [20.0, 22.0]),
                                                     rank([11.0, 13.0], 12.0, 6.0, [21.0, 23.0])], "cpu", 2, False)
    (record,), (reference,) = records, references
    assert record["ms"] == 12.0 and reference["ms"] == 22.0  # medians of the slowest rank per repeat
    assert reference["usp_over_reference"] == pytest.approx(12.0 / 22.0)
    assert reference["usp_kernels_over_reference"] == pytest.approx(9.9 / 22.0)  # rank 0's 11 x 0.9, not rank 1's 6
    assert scaling.reference_medians(references) == {"torch-cp-alltoall": dict(
        cases=1, usp_over_reference=pytest.approx(12 / 22), usp_kernels_over_reference=pytest.approx(9.9 / 22))}


def test_the_references_figure_marks_our_compute_alone_per_case():
    from usp.plots.figures import our_compute_alone
    case = dict(usp_impl="ring-u1r2-zigzag", world_size=2, seqlen=2048)
    references = [  # ours 40 ms, our compute 36 ms, against references of 41 and 48 ms
        dict(case, reference="torch-cp-alltoall", usp_over_reference=40 / 41, usp_kernels_over_reference=36 / 41,
             **{"pass": "fwd"}),
        dict(case, reference="torch-cp-allgather", usp_over_reference=40 / 48, usp_kernels_over_reference=36 / 48,
             **{"pass": "fwd"}),
        dict(case, reference="torch-cp-alltoall", usp_over_reference=1.0, **{"pass": "fwd+bwd"}),  # an older run
    ]
    assert our_compute_alone(references) == pytest.approx({("ring-u1r2-zigzag", 2, 2048, "fwd"): 0.9})


def test_a_reference_that_computed_a_wrong_result_is_marked():
    from usp.plots.figures import wrong_result
    assert wrong_result({"max_abs_error": 1.5, "usp_max_abs_error": 1e-6})  # yunchang's ring on a CPU
    assert not wrong_result({"max_abs_error": 3e-7, "usp_max_abs_error": 2e-6})  # as exact as ours
    assert not wrong_result({"max_abs_error": 5e-4, "usp_max_abs_error": 1e-7})  # below the 1e-3 floor


@pytest.mark.slow  # about a minute of subprocesses
def test_gpu_check_script_runs_its_steps_on_a_cpu(tmp_path):
    """``bench/gpu_check.sh --smoke``: every step of the GPU check, through the interpreter
    at tiny sizes, into at most 8 files; it refuses a folder that already holds files."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    # its own session, so that a timeout here stops every process the script started
    proc = subprocess.Popen(["bash", "bench/gpu_check.sh", "--smoke"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        printed, _ = proc.communicate(timeout=960)  # the steps' limits add up to 720 s
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, printed
    names = sorted(path.name for path in out.iterdir())
    assert [name.split("-")[0] for name in names] == ["check.log", "emulate", "emulate", "kernels", "kernels",
                                                      "summary.txt", "train", "verify"]
    summary = (out / "summary.txt").read_text()
    for step in ("setup", "tests", "verify", "tiles", "kernels", "emulate", "train"):
        assert re.search(rf"^{step} +ok +\d+ s$", summary, re.M), summary
    assert "--- tests, share 0 of 8: " in summary and "matmul rate: fp32 " in summary
    # the tiles step: the causal triton rows in each tile order, each over the rule's, before the kernels step
    for order in ("by-head", "across-heads"):
        line = rf"^tiles: tile order, triton:{order} over triton: fwd [0-9.]+x .*, bwd [0-9.]+x "
        assert re.search(line, summary, re.M), summary
    assert "triton, merge kernel" in summary and "triton, merge separate" in summary  # both emulations
    runs = sorted((json.loads(path.read_text()) for path in out.glob("kernels-*.json")), key=lambda d: d["created"])
    assert [d["config"]["tile_orders"] for d in runs] == [["rule", "by-head", "across-heads"], ["rule"]]
    (drawn,) = (path for path in newest_results(out) if path.name.startswith("kernels"))
    assert json.loads(drawn.read_text())["config"]["tile_orders"] == ["rule"]  # the figures show the kernels step
    kernels = runs[1]
    assert {r["impl"] for r in kernels["records"]} == {"triton", "sdpa-math"}
    assert kernels["summary"]["compile"]["groups"] and kernels["summary"]["matmul_tflops"]["fp32"] > 0
    again = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 2 and "is not empty" in again.stderr


def test_tune_command_times_each_candidate_against_the_table(tmp_path, capsys):
    assert main(["tune", "--kernel", "fwd", "bwd_dq", "bwd_dq_into", "--causal", "--candidate", "32x16,1,1",
                 "--candidate", "24x16,1,1", "--warmup", "0", "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    document = _document(tmp_path, "tune")
    assert [(g["kernel"], g["timed_pass"], g["causal"]) for g in document["groups"]] == [
        ("fwd", "fwd", True), ("bwd_dq", "bwd", True), ("bwd_dq_into", "bwd", True)]
    for group in document["groups"]:
        table, other, odd = group["candidates"]
        assert (table["config"], table["table"], other["config"]) == ("16x16,1,1", True, "32x16,1,1")
        assert odd["config"] == "24x16,1,1" and "skipped" in odd  # a tile Triton cannot build is reported
        assert table["max_difference"] == 0 and other["max_difference"] < 1e-5
        best = min((table, other), key=lambda r: r["ms"])
        assert group["best"] == best["config"] and group["table_over_best"] == pytest.approx(table["ms"] / best["ms"])
    assert "[ 1/3] fwd d16 causal (table 16x16,1,1)" in printed and "fastest " in printed


@pytest.mark.slow  # two spawned processes
def test_tune_compiles_the_candidates_in_worker_processes_first(tmp_path, capsys):
    assert main(["tune", "--kernel", "fwd", "--causal", "--candidate", "32x16,1,1", "--candidate", "24x16,1,1",
                 "--jobs", "2", "--warmup", "0", "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    assert "compiled the candidates in " in capsys.readouterr().out
    document = _document(tmp_path, "tune")
    assert document["config"]["jobs"] == 2 and document["config"]["compile_seconds"] > 0
    assert [row["config"] for row in document["groups"][0]["candidates"]] == ["16x16,1,1", "32x16,1,1", "24x16,1,1"]


def test_tune_candidates_must_read_as_tiles():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune", "--candidate", "128x64"])
