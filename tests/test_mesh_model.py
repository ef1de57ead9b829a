"""The cost model's predictions (``usp.bench.predict``) against arithmetic done by hand,
its inputs (kernel curves, cluster files, ``usp-bench comm``), and its agreement with the
USP paper's measured Tables 3 and 4, which is the bar the model must keep."""

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from usp.bench import paper_tables as pt
from usp.bench.clusters import CLUSTERS, host_bridged_all_to_all
from usp.bench.comm_bench import Settings, profile
from usp.bench.cost_model import MODELS
from usp.bench.cost_model_cli import paper_agreement
from usp.bench.hardware import Cluster, load_cluster
from usp.bench.kernel_curve import KernelCurve, from_kernel_results
from usp.bench.predict import Attention, masked_ring_steps, predict_attention, predict_block, ring_steps

ROOT = Path(__file__).resolve().parents[1]


def flat_cluster(rate_tflops=100.0, a2a_gbs=10.0, p2p_gbs=10.0, memory_gbs=1e12, domain=8, node=8, nodes=1):
    """A cluster whose kernel runs at one rate whatever the block, with no latency or launch
    cost and (by default) free memory passes: every time below is FLOPs or bytes over a rate."""
    curve = KernelCurve("flat", "test", ((1.0, rate_tflops),), ((1.0, rate_tflops),))
    levels = ("domain", "node", "network")
    return Cluster("flat", domain, node, nodes, 1000.0, memory_gbs, {lv: {2: a2a_gbs} for lv in levels},
                   {lv: p2p_gbs for lv in levels}, {lv: 0.0 for lv in levels}, curve, launch_us=0.0)


def test_kernel_curve_interpolates_in_log_flops_and_is_flat_outside():
    curve = KernelCurve("c", "test", ((1e9, 10.0), (1e11, 30.0)), ((1e9, 20.0),), backward_ratio=0.5)
    assert curve.tflops(1e10, causal=True) == pytest.approx(20.0)  # halfway in log(FLOPs)
    assert curve.tflops(1e8, causal=True) == 10.0 and curve.tflops(1e13, causal=True) == 30.0
    assert curve.tflops(5e12, causal=False) == 20.0
    assert curve.tflops(1e10, causal=True, backward=True) == pytest.approx(10.0)
    assert KernelCurve.from_json(json.loads(json.dumps(curve.to_json()))) == curve
    with pytest.raises(ValueError, match="no full points"):
        KernelCurve("c", "test", ((1.0, 1.0),), ())


def test_kernel_curve_from_kernel_results(tmp_path):
    record = dict(device="GPU", impl="triton", dtype="bf16", head_dim=128, heads=16, batch=1, kv_heads=16)
    records = [dict(record, seqlen=s, causal=c, flops=f, tflops=t, **{"pass": p})
               for s, c, p, f, t in ((1024, True, "fwd", 1e10, 50.0), (4096, True, "fwd", 1e11, 80.0),
                                     (1024, False, "fwd", 2e10, 60.0), (1024, True, "bwd", 2.5e10, 40.0))]
    records.append(dict(record, impl="torch", seqlen=1024, causal=True, flops=1e10, tflops=90.0, **{"pass": "fwd"}))
    # a forced tile order (usp-bench kernels --tile-order) is a probe: never the fastest by default
    records.append(dict(record, impl="triton:across-heads", seqlen=4096, causal=True, flops=1e11, tflops=99.0,
                        **{"pass": "fwd"}))
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps(dict(kind="kernels", records=records)))
    fastest = from_kernel_results(path)
    assert fastest.causal == ((1e10, 90.0), (1e11, 80.0)) and fastest.full == ((2e10, 60.0),)
    assert fastest.backward_causal == ((1e10, 40.0),)  # keyed by the forward FLOPs of the call
    assert from_kernel_results(path, impl="triton").causal == ((1e10, 50.0), (1e11, 80.0))
    assert from_kernel_results(path, impl="triton:across-heads").causal == ((1e11, 99.0),)
    path.write_text(json.dumps(dict(kind="scaling", records=[])))
    with pytest.raises(ValueError, match="not a usp-bench kernels result"):
        from_kernel_results(path)


def test_topology_levels_of_the_pcie_box_and_a_two_node_cluster():
    l20, two_nodes = CLUSTERS["8xL20-PCIe"], CLUSTERS["2x8xH100"]
    assert l20.level([0, 1, 2, 3]) == "domain" and l20.level([0, 4]) == "node" and l20.level(range(8)) == "node"
    assert l20.ring_level([0, 2, 4, 6]) == "node" and l20.ring_level([4, 5]) == "domain"
    assert two_nodes.level(range(8)) == "domain" and two_nodes.level([7, 8]) == "network"
    # an all-to-all over n GPUs on two 8-GPU nodes: the NIC carries (n-8)/(n-1) of what each sends
    assert two_nodes.all_to_all_gbs["network"][16] == pytest.approx(48.0 * 15 / 8)


def test_cluster_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "cluster.json"
    l20 = CLUSTERS["8xL20-PCIe"]
    path.write_text(json.dumps(l20.to_json()))
    assert load_cluster(path) == l20
    broken = l20.to_json()
    del broken["all_to_all_gbs"]["node"]
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="no node link figures"):
        load_cluster(path)
    path.write_text(json.dumps(dict(l20.to_json(), colour="red")))
    with pytest.raises(ValueError, match="unknown cluster fields: colour"):
        load_cluster(path)


CALL = Attention(heads=8, kv_heads=2, head_dim=64, batch=1, seqlen=4096, pass_="fwd", causal=True, layout="zigzag")


def test_ulysses_time_by_hand():
    cluster = flat_cluster()
    p = predict_attention(CALL, cluster, 4, 1)
    flops = 4 * 2 * 4096 * 4096 * 64 / 2  # 2 heads per rank, the whole causal sequence
    assert p["compute_ms"] == pytest.approx(flops / 100e12 * 1e3)
    # q and out: 8 heads x 1024 tokens x 64 x 2 bytes per rank, 3/4 sent; k and v: the 2 K/V
    # heads repeated to 4, one for each of the 4 ranks (usp.comm.heads)
    sent = (2 * 8 + 2 * 4) * 1024 * 64 * 2 * 3 / 4
    assert p["all_to_all_ms"] == pytest.approx(sent / 10e9 * 1e3, rel=1e-6)  # copies cost nothing here
    assert p["exposed_ring_ms"] == 0 and p["total_ms"] == pytest.approx(p["compute_ms"] + p["all_to_all_ms"])


def test_ring_steps_overlap_their_hops_by_hand():
    slow_link = flat_cluster(p2p_gbs=0.01)
    p = predict_attention(CALL, slow_link, 1, 2)
    c = 2048
    steps = ring_steps(CALL, 1, 2)
    assert [[(b.rows, b.keys, b.causal) for b in step] for step in steps] == [
        [(c, c, True)], [(c, c // 2, False), (c // 2, c, False)]]  # zigzag: the two shapes of step 1
    step = 4 * 8 * c * c * 64 / 2 / 100e12 * 1e3  # both steps do half a c x c block on 8 heads
    hop = 2 * c * 2 * 64 * 2 / 0.01e9 * 1e3  # K and V: c tokens x 2 heads x 64 x bf16
    assert p["compute_ms"] == pytest.approx(2 * step)
    assert p["exposed_ring_ms"] == pytest.approx(hop - step)  # the one hop outlasts step 0
    fast_link = predict_attention(CALL, flat_cluster(p2p_gbs=1e6), 1, 2)
    assert fast_link["exposed_ring_ms"] == 0


def test_wave_factor_by_hand():
    """10 SMs x 2 tiles = 20 slots; the curve's own calls filled 0.8 of their waves."""
    curve = KernelCurve("c", "test", ((1.0, 1.0),), ((1.0, 1.0),), tile_rows=128, tiles_per_sm=2, reference_fill=0.8)
    assert curve.wave_factor(4, 128 * 10, 10) == pytest.approx(1 / 0.8)  # 40 tiles: two full waves
    assert curve.wave_factor(4, 128 * 6, 10) == pytest.approx(24 / 40 / 0.8)  # 24 tiles: the second wave 4 of 20
    assert curve.wave_factor(20, 100, 10) == pytest.approx(1 / 0.8)  # 100 rows still take one tile each
    assert curve.wave_factor(4, 128 * 6, None) == 1.0  # no SM count: read as it is
    assert KernelCurve("c", "test", ((1.0, 1.0),), ((1.0, 1.0),)).wave_factor(1, 128, 10) == 1.0
    assert KernelCurve.from_json(json.loads(json.dumps(curve.to_json()))) == curve


def _wave_cluster():
    """48 SMs x 2 tiles = 96 slots, the curve's calls one full wave (fill 1)."""
    curve = KernelCurve("c", "test", ((1.0, 100.0),), ((1.0, 100.0),), tile_rows=128, tiles_per_sm=2)
    return replace(flat_cluster(p2p_gbs=1e6), kernel=curve, sm_count=48)


def test_zigzag_step_lasts_as_its_slower_shape():
    """c = 4096, 8 heads on 96 slots: the c x c/2 shape has 8 x 32 = 256 tiles (3 waves,
    256/288 filled), c/2 x c has 128 tiles (2 waves, 128/192 filled): the same work, and the
    ring waits for the slower. The diagonal (causal) is read without the factor."""
    cluster = _wave_cluster()
    p = predict_attention(replace(CALL, seqlen=8192), cluster, 1, 2)  # 2 ring ranks: c = 4096, 8 heads
    half_block = 4 * 8 * 4096 * 2048 * 64 / 100e12 * 1e3
    assert p["compute_ms"] == pytest.approx(half_block + half_block / (128 / 192))
    contiguous = predict_attention(replace(CALL, seqlen=8192, layout="contiguous"), cluster, 1, 2)
    assert contiguous["compute_ms"] == pytest.approx(half_block + 2 * half_block / (256 / 288))


def test_wave_factor_counts_every_sequence_and_spares_the_backward():
    """Batch 2: the c/2 x c shape has 2 x 8 x 16 = 256 tiles (256/288), c x c/2 512 (512/576,
    the same fill): both shapes take half_block x 2 / (8/9). The backward reads the curve as it
    is (2.5 x the forward's work, no factor)."""
    cluster = _wave_cluster()
    call = replace(CALL, seqlen=8192, batch=2)
    half_block = 2 * 4 * 8 * 4096 * 2048 * 64 / 100e12 * 1e3  # both sequences
    assert predict_attention(call, cluster, 1, 2)["compute_ms"] == pytest.approx(half_block + half_block * 9 / 8)
    both = predict_attention(replace(call, pass_="fwd+bwd"), cluster, 1, 2)
    assert both["compute_ms"] == pytest.approx(half_block + half_block * 9 / 8 + 2 * 2.5 * half_block)


def test_host_bridged_all_to_all_by_hand():
    """One socket gives back its own figure; 8 GPUs on two sockets of 4: each root complex
    forwards 4 x 7/8 V out and 4 x 4/8 V in, 5.5 V where one socket's 4 GPUs had 3 V."""
    assert host_bridged_all_to_all(2.0, 4, 4) == pytest.approx(2.0)
    capacity = 4 * 2.0  # what one socket's root complex forwarded: 4 GPUs at 2 GB/s
    assert host_bridged_all_to_all(2.0, 4, 8) == pytest.approx((7 / 8) / (5.5 / capacity))  # sent / time, V = 1
    assert CLUSTERS["8xL20-PCIe"].all_to_all_gbs["node"][8] == host_bridged_all_to_all(2.0, 4, 8)


@pytest.mark.parametrize("r", [2, 4, 8])
def test_contiguous_split_costs_its_causal_imbalance(r):
    """Compute-bound: the last rank of a contiguous split does r - 1/2 blocks where zigzag
    does r/2 on every rank."""
    cluster = flat_cluster(p2p_gbs=1e6)
    zigzag = predict_attention(CALL, cluster, 1, r)
    contiguous = predict_attention(replace(CALL, layout="contiguous"), cluster, 1, r)
    assert contiguous["compute_ms"] / zigzag["compute_ms"] == pytest.approx((r - 0.5) / (r / 2))


def test_documents_on_separate_ranks_leave_the_second_step_empty():
    """Contiguous r = 2 with one document per rank: step 0 is each rank's causal diagonal
    (a dense causal block); at step 1 no query sees the other rank's keys, nothing is
    computed and the one hop is exposed beyond step 0. A window makes the diagonal a
    masked block of its pairs."""
    c, slow_link = 2048, flat_cluster(p2p_gbs=0.01)
    call = replace(CALL, layout="contiguous", documents=(0, c, 2 * c))
    steps = masked_ring_steps(call, 1, 2)
    assert [[(b.rows, b.keys, b.causal, b.pairs) for b in step] for step in steps] == [[(c, c, True, None)] * 2, []]
    windowed = masked_ring_steps(replace(call, window=100), 1, 2)
    assert [[(b.rows, b.keys, b.pairs) for b in step] for step in windowed] == [
        [(c, c, sum(min(p, 100) + 1 for p in range(c)))] * 2, []]
    p = predict_attention(call, slow_link, 1, 2)
    step = 4 * 8 * c * c / 2 * 64 / 100e12 * 1e3
    hop = 2 * c * 2 * 64 * 2 / 0.01e9 * 1e3
    assert p["compute_ms"] == pytest.approx(step) and p["exposed_ring_ms"] == pytest.approx(hop - step)
    assert p["work_imbalance"] == 1.0 and predict_attention(CALL, slow_link, 1, 2)["work_imbalance"] is None
    assert call.flops() == pytest.approx(4 * 8 * 64 * c * (c + 1))  # two documents of c(c + 1)/2 pairs per head


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_one_document_over_the_whole_sequence_is_the_dense_call(layout):
    """The masks of a single document see what dense causal attention sees: the blocks
    are the dense model's (so is every predicted time, on the A100 preset with its curve
    and wave factor), and the zigzag ranks are balanced."""
    s, r = 4096, 4
    call = replace(CALL, layout=layout, documents=(0, s))
    dense = replace(CALL, layout=layout)
    steps = masked_ring_steps(call, 1, r)
    assert [set(step) for step in steps] == [set(step) for step in ring_steps(dense, 1, r)]
    for u, r_ in ((1, 4), (2, 2), (4, 1)):
        for pass_ in ("fwd", "fwd+bwd"):
            masked = predict_attention(replace(call, pass_=pass_), CLUSTERS["8xA100-NVLink"], u, r_)
            expected = predict_attention(replace(dense, pass_=pass_), CLUSTERS["8xA100-NVLink"], u, r_)
            # TFLOP/s: the masks count the diagonal's S (S + 1) / 2 pairs, the dense convention S^2 / 2
            assert masked["tflops_per_gpu"] == pytest.approx(expected["tflops_per_gpu"] * (s + 1) / s)
            same = set(expected) - {"work_imbalance", "tflops_per_gpu"}
            assert {k: masked[k] for k in same} == pytest.approx({k: expected[k] for k in same}), (u, r_, pass_)
    assert len(steps[0]) == r  # every rank's diagonal
    imbalance = predict_attention(call, flat_cluster(), 1, r)["work_imbalance"]
    assert imbalance == 1.0 if layout == "zigzag" else imbalance == pytest.approx(
        (s // r * (s // r + 1) // 2 + (r - 1) * (s // r) ** 2) / (s * (s + 1) / 2 / r))


def test_a_window_counts_the_pairs_it_sees_by_hand():
    s, w = 4096, 1000
    call = replace(CALL, window=w)
    pairs = sum(min(p, w) + 1 for p in range(s))  # query p sees keys p - w .. p
    assert call.flops() == pytest.approx(4 * 8 * 64 * pairs)
    ulysses = predict_attention(call, flat_cluster(), 4, 1)  # one block: 2 heads per rank, all the pairs
    assert ulysses["compute_ms"] == pytest.approx(4 * 2 * 64 * pairs / 100e12 * 1e3)
    with pytest.raises(ValueError, match="documents must be non-decreasing offsets from 0"):
        replace(CALL, documents=(0, 100))
    with pytest.raises(ValueError, match="cuts every document into 2 x ring_degree = 8 chunks: document 0 has 100 "
                       "tokens, pad it to 104"):
        masked_ring_steps(replace(CALL, documents=(0, 100, 4096)), 1, 4)


def test_backward_sends_kv_and_accumulators_and_one_hop_home():
    cluster = flat_cluster(p2p_gbs=0.01)
    both = predict_attention(replace(CALL, pass_="fwd+bwd"), cluster, 1, 2)
    c = 2048
    kv_hop = 2 * c * 2 * 64 * 2 / 0.01e9 * 1e3
    accumulator_hop = kv_hop * 2  # fp32
    step_fwd = 4 * 8 * c * c * 64 / 2 / 100e12 * 1e3
    step_bwd = 2.5 * step_fwd
    assert both["exposed_ring_ms"] == pytest.approx((kv_hop - step_fwd) + (kv_hop + accumulator_hop - step_bwd)
                                                    + accumulator_hop)


def test_block_counts_ten_tensor_parallel_collectives_by_hand():
    cluster = flat_cluster(p2p_gbs=10.0)
    shape = MODELS["llama2-7b"]
    block = predict_block(shape, cluster, 1, 8192, 2, 2, 2, pass_="fwd+bwd")
    activation = 8192 // 4 * 4096 * 2  # b s d / (u r) in bf16
    assert block["tensor_parallel_ms"] == pytest.approx(10 * activation / 2 / 10e9 * 1e3)
    linear = (shape.block_params - 2 * 4096) * 2 * 8192 * 3 / 8
    assert block["matmul_ms"] == pytest.approx(linear / (1000e12 * 0.7) * 1e3)
    forward = predict_block(shape, cluster, 1, 8192, 2, 2, 2, pass_="fwd")
    assert forward["tensor_parallel_ms"] == pytest.approx(4 * activation / 2 / 10e9 * 1e3)
    with pytest.raises(ValueError, match="must divide the 32 heads"):
        predict_block(shape, cluster, 1, 8192, 3, 1, 1)


def test_kendall_tau_b_by_hand():
    assert pt.kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1
    assert pt.kendall_tau_b([1, 2, 3, 4], [40, 30, 20, 10]) == -1
    assert pt.kendall_tau_b([1, 2, 3, 4], [20, 10, 30, 40]) == pytest.approx(4 / 6)  # one pair of six swapped
    # a tie in y: 5 concordant of 5 + 1 tied in y: 5 / sqrt(6 x 5)
    assert pt.kendall_tau_b([1, 2, 3, 4], [1, 2, 2, 4]) == pytest.approx(5 / math.sqrt(30))


def test_the_tables_read_as_global_lengths():
    """Read per GPU, the paper's figures would beat the cards' peak."""
    for row in pt.ROWS:
        implied = pt.implied_tflops(row)
        peak = CLUSTERS[row.cluster].peak_tflops
        assert implied["global"] < peak < implied["per_gpu"], row.label


@pytest.mark.parametrize("result", paper_agreement(), ids=lambda a: a["row"])
def test_the_model_ranks_the_papers_meshes(result):
    """The bar: the measured best mesh predicted best or tied, and Kendall's tau >= 2/3."""
    assert result["best_ok"], (result["measured_best"], result["predicted_tied"])
    assert result["tau_ok"], result["kendall_tau"]


def test_link_profile_from_rank_timings_by_hand():
    """Two domains of 2 on 4 ranks: the groups of 2 sit in a domain, the group of 4 spans the node."""
    settings = Settings(sizes=(4096, 1 << 20), gpus_per_domain=2, gpus_per_node=4, warmup=0, repeats=1)
    fast = {"all_to_all": {"2/4096": 0.01, "2/1048576": 0.1, "4/4096": 0.02, "4/1048576": 0.5},
            "p2p": {"domain/4096": 0.005, "domain/1048576": 0.1, "node/4096": 0.008, "node/1048576": 0.2}}
    slow = {kind: {key: 2 * ms for key, ms in times.items()} for kind, times in fast.items()}
    cluster, measured = profile([fast, slow], settings, 4, CLUSTERS["8xA100-NVLink"], "test")
    # the slowest rank counts; an all-to-all over n sends (n-1)/n of the message
    assert cluster.all_to_all_gbs == {"domain": {2: pytest.approx(2 ** 20 / 2 / 0.2e6)},
                                      "node": {4: pytest.approx(2 ** 20 * 3 / 4 / 1.0e6)}}
    assert cluster.p2p_gbs == {"domain": pytest.approx(2 ** 20 / 0.2e6), "node": pytest.approx(2 ** 20 / 0.4e6)}
    assert cluster.latency_us == {"domain": pytest.approx(10.0), "node": pytest.approx(16.0)}
    assert cluster.gpus_per_domain == 2 and cluster.nodes == 1 and len(measured["points"]) == 8
    assert cluster.kernel == CLUSTERS["8xA100-NVLink"].kernel  # what links cannot tell comes from the base


@pytest.mark.slow
def test_comm_command_writes_a_cluster_file_the_model_reads(tmp_path):
    run = lambda *argv: subprocess.run([sys.executable, "-m", "usp.bench", *argv], cwd=ROOT, capture_output=True,  # noqa: E731
                                       text=True, timeout=300)
    proc = run("comm", "--world-size", "2", "--sizes", "4096", "65536", "--warmup", "0", "--repeats", "2",
               "--out-dir", str(tmp_path), "--name", "two-gloo-ranks")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cluster = load_cluster(tmp_path / "cluster.json")
    assert cluster.name == "two-gloo-ranks" and cluster.gpus_per_node == 2 and cluster.nodes == 1
    assert set(cluster.all_to_all_gbs) == {"domain"} and set(cluster.all_to_all_gbs["domain"]) == {2}
    assert cluster.p2p_gbs["domain"] > 0 and cluster.latency_us["domain"] > 0
    measured = json.loads((tmp_path / "cluster.json").read_text())["measured"]["points"]
    assert {(p["kind"], p["bytes"]) for p in measured} == {(k, b) for k in ("all_to_all", "p2p") for b in (4096, 65536)}
    proc = run("model", "--cluster-file", str(tmp_path / "cluster.json"), "--seqlen", "4096", "--out-dir",
               str(tmp_path / "model"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cluster: two-gloo-ranks, 2 of 2 GPUs" in proc.stdout and "u2 x r1" in proc.stdout
