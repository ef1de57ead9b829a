"""The FLOP convention, the paper's per-block volumes and the emulator's prediction
against values worked out by hand (the arithmetic is spelled out next to each number)."""

import time

import pytest

from usp.bench import cost_model as cm
from usp.bench.emulate import Problem, predict
from usp.bench.flops import attention_flops, tflops
from usp.bench.scaling import ring_overlap
from usp.comm import traffic
from usp.comm.traffic import Event, HostClock, record_traffic


def test_flop_counter_follows_the_convention():
    forward = 4 * 2 * 8 * 128 * 256 * 64  # 4 B Hq Sq Sk D
    assert attention_flops(2, 8, 128, 256, 64, False, "fwd") == forward
    assert attention_flops(2, 8, 128, 256, 64, True, "fwd") == forward / 2
    assert attention_flops(2, 8, 128, 256, 64, False, "bwd") == 2.5 * forward
    assert attention_flops(2, 8, 128, 256, 64, True, "fwd+bwd") == 3.5 * forward / 2
    assert tflops(3e12, 1500.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="pass must be one of"):
        attention_flops(1, 1, 1, 1, 1, False, "forward")


LLAMA2 = cm.MODELS["llama2-7b"]  # d 4096, 32 heads, 32 K/V heads (MHA)
LLAMA3 = cm.MODELS["llama3-8b"]  # d 4096, 32 heads, 8 K/V heads (g = 1/4)


def test_ulysses_ring_and_tp_volumes_for_llama2_by_hand():
    unit = 1 * 8192 * 4096  # b s d elements
    ulysses = cm.communication(LLAMA2, 1, 8192, 8, 1)
    # 4 all-to-alls forward + 4 backward of the b s d / 8 shard (q, k, v, out), 7/8 of it leaves the device
    assert ulysses["units"] == pytest.approx(8 * (7 / 8) / 8)
    assert ulysses["bytes"] == pytest.approx(0.875 * unit * 2) == 58_720_256
    tp = cm.megatron_tp_sp(1, 8192, 4096, 8)  # 6 all-gathers + 4 reduce-scatters, 7/8 of b s d each
    assert tp["units"] == pytest.approx(10 * 7 / 8) and tp["bytes"] == pytest.approx(8.75 * unit * 2)
    ring = cm.communication(LLAMA2, 1, 8192, 1, 4)
    # forward: K and V, 3 hops of b s d / 4 each = 1.5 units; backward: the same again, plus dK and dV 4 hops = 2
    assert ring["units"] == pytest.approx(1.5 + 1.5 + 2.0)
    assert ring["paper_units"] == pytest.approx(1.5 + 1.5)  # the paper leaves out K/V re-sent in backward
    assert ring["bytes"] == pytest.approx((1.5 + 1.5) * unit * 2 + 2.0 * unit * 4)  # accumulators in fp32


def test_usp_volume_for_llama3_gqa_by_hand():
    unit = 2 * 4096 * 4096
    usp = cm.communication(LLAMA3, 2, 4096, 2, 4)
    ulysses = (4 + 4 * 0.25) * (1 / 2) / 8  # q, out + k, v at g = 1/4; half leaves the device; shard 1/8
    kv = 4 / 32  # after the all-to-all: 8 / 2 = 4 K/V heads of 32, as a share of d
    ring_fwd = ring_bwd = 2 * kv * 3 / 4
    accumulators = 2 * kv
    assert usp["all_to_all_units"] == pytest.approx(0.3125) == pytest.approx(ulysses)
    assert usp["units"] == pytest.approx(ulysses + ring_fwd + ring_bwd + accumulators) == pytest.approx(0.9375)
    assert usp["bytes"] == pytest.approx((ulysses + ring_fwd + ring_bwd) * unit * 2 + accumulators * unit * 4)
    assert usp["bytes"] == pytest.approx(79_691_776)


def test_ulysses_beyond_the_kv_heads_counts_replicated_heads():
    # u = 16 > 8 K/V heads: every rank receives one replicated head, 16 of 32 heads' worth of K/V
    assert cm.communication(LLAMA3, 1, 4096, 16, 1)["units"] == pytest.approx((4 + 4 * 0.5) * (15 / 16) / 16)


def test_memory_by_hand():
    psi = 4096 * 4096 * 4 + 3 * 4096 * 11008 + 2 * 4096  # q k v o, SwiGLU, two norms
    assert LLAMA2.block_params == psi == 202_383_360
    assert cm.memory(LLAMA2, 1, 8192, 8, "dp")["params"] == 16 * psi
    assert cm.memory(LLAMA2, 1, 8192, 8, "zero1")["params"] == pytest.approx((4 + 12 / 8) * psi)
    assert cm.memory(LLAMA2, 1, 8192, 8, "sp+zero3")["params"] == 16 * psi / 8
    assert cm.memory(LLAMA2, 1, 8192, 8, "tp-sp")["params"] == 16 * psi / 8
    assert cm.memory(LLAMA2, 1, 8192, 8, "sp")["activations"] == 34 * 8192 * 4096 / 8
    with pytest.raises(ValueError, match="method must be one of"):
        cm.memory(LLAMA2, 1, 8192, 8, "fsdp")


def test_emulated_prediction_is_lock_step_by_hand():
    problem = Problem(world_size=2, ulysses_degree=1, tokens_per_rank=4, batch=1, heads=2, kv_heads=1, head_dim=8,
                      dtype="fp32", causal=True)
    volume = problem.volume()
    assert volume.kv_hop_bytes == 2 * 1 * 4 * 1 * 8 * 4  # K and V: b, s/r, kv heads, d, fp32
    assert volume.forward.all_to_all_bytes == volume.backward.all_to_all_bytes == 0  # no Ulysses
    times = {"fwd": [[1.0, 0.0], [2.0, 3.0]], "bwd": [[4.0, 0.0], [5.0, 6.0]]}
    # a 256-byte hop at 1e-6 GB/s (1000 B/s) takes 256 ms: step 0 waits for it, step 1 does not
    forward = predict(problem, times, "fwd", 1e-6, 0.0)
    assert forward["kv_hop_ms"] == pytest.approx(256.0)
    assert forward["predicted_ms"] == pytest.approx(max(2.0, 256.0) + 3.0)
    both = predict(problem, times, "fwd+bwd", 1e-6, 0.0)
    assert both["accumulator_hop_ms"] == pytest.approx(256.0)  # fp32 accumulators: the same 256 bytes
    # backward: step 0 waits for the K/V hop, step 1 for the accumulator hop, then the last one home
    assert both["predicted_ms"] == pytest.approx(259.0 + max(5.0, 256.0) + max(6.0, 256.0) + 256.0)


def test_ring_overlap_from_a_synthetic_timeline():
    events = [Event(traffic.COMPUTE, label=traffic.FORWARD, step=0, start=0.000, end=0.004),
              Event(traffic.WAIT, label=traffic.KV_FORWARD, step=1, start=0.004, end=0.006),
              Event(traffic.COMPUTE, label=traffic.FORWARD, step=1, start=0.006, end=0.009)]
    result = ring_overlap(events, 2, {"forward": 5.0})
    forward = result["forward"]
    assert forward["measured_ms"] == pytest.approx(9.0)
    assert forward["ideal_ms"] == pytest.approx(max(4.0, 5.0) + 3.0)
    assert forward["overlap"] == pytest.approx(8.0 / 9.0)
    assert forward["wait_ms"] == pytest.approx(2.0)
    assert "backward" not in result


def test_timed_traffic_log_measures_spans():
    with record_traffic(HostClock()) as log:
        traffic.note(traffic.P2P, 10, 1, traffic.KV_FORWARD, 1)
        with traffic.span(traffic.COMPUTE, label=traffic.FORWARD, step=0):
            time.sleep(0.02)
    posted, compute = log.timeline()
    assert posted.end is None and posted.start >= 0
    assert compute.end - compute.start >= 0.02 and compute.start >= posted.start
    with record_traffic() as untimed:
        with traffic.span(traffic.COMPUTE):
            pass
    assert len(untimed.events) == 1 and untimed.events[0].start is None
    with pytest.raises(ValueError, match="without a clock"):
        untimed.timeline()
