"""Bad input and faults in the sequence-parallel layer: clear ValueErrors naming the
argument, and ranks that disagree or stop end in an error on every rank within the
process group's timeout, never a hang."""

import datetime
import functools
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
from errors import error_of

from usp.attention import (USPAttention, gather_sequence, naive_attention, ring_attention, sequence_positions,
                           shard_sequence, ulysses_attention, usp_attention)
from usp.attention.layout import ring_positions
from usp.bench.launch import WorkersFailed, run, spawn
from usp.comm import head_to_seq, init_mesh, seq_to_head
from usp.kernels.backends import FunctionBackend

PG_TIMEOUT_S = 3.0  # the mesh's groups; the world group keeps a generous one for start-up


def _bad_inputs() -> dict:
    """Each bad call on 4 ranks, all ranks passing the same thing; fails before any transfer."""
    mesh = init_mesh(2, 2)
    ulysses4 = init_mesh(4, 1)
    ring4 = init_mesh(1, 4)

    def qkv(seqlen, heads=4, kv_heads=4, head_dim=8, k_seqlen=None):
        q = torch.randn(1, seqlen, heads, head_dim)
        k = torch.randn(1, k_seqlen or seqlen, kv_heads, head_dim)
        return q, k, k.clone()

    return {
        "odd_zigzag": error_of(lambda: usp_attention(*qkv(3), ring4, causal=True)),
        "odd_ring_zigzag": error_of(lambda: ring_attention(*qkv(5), mesh.ring_group, causal=True)),
        "heads": error_of(lambda: usp_attention(*qkv(4, heads=3, kv_heads=3), ulysses4)),
        "kv_heads": error_of(lambda: usp_attention(*qkv(4, heads=6, kv_heads=4), ulysses4)),
        "ulysses_heads": error_of(lambda: ulysses_attention(*qkv(4, heads=2, kv_heads=2), ulysses4.ulysses_group)),
        "causal_lengths": error_of(lambda: ring_attention(*qkv(4, k_seqlen=6), mesh.ring_group, causal=True)),
        "head_dims": error_of(lambda: usp_attention(qkv(4)[0], *qkv(4, head_dim=16)[1:], mesh)),
        "layout": error_of(lambda: usp_attention(*qkv(4), mesh, layout="striped")),
        "mesh_type": error_of(lambda: usp_attention(*qkv(4), mesh.ring_group)),
        "ring_group_type": error_of(lambda: ring_attention(*qkv(4), mesh)),
        "ulysses_group_type": error_of(lambda: ulysses_attention(*qkv(4), [0, 1, 2, 3])),
        "all_to_all_group_type": error_of(lambda: seq_to_head(torch.zeros(1, 4, 4, 2), "world")),
        "gather_mesh_type": error_of(lambda: gather_sequence(torch.zeros(1, 4, 1, 1), mesh.sp_group)),
        "positions_float": error_of(lambda: sequence_positions(8.0, mesh)),
        "positions_negative": error_of(lambda: sequence_positions(-8, mesh)),
        "degrees": error_of(lambda: init_mesh(3, 1)),
        "degree_type": error_of(lambda: init_mesh(0, 4)),
        "placement": error_of(lambda: init_mesh(2, 2, "nodes_inner")),
        "group_ranks": error_of(lambda: init_mesh(1, 1, group=[0, 9])),
        "seq_to_head": error_of(lambda: seq_to_head(torch.zeros(1, 4, 3, 2), ulysses4.ulysses_group)),
        "seq_to_head_shares": error_of(lambda: seq_to_head(torch.zeros(1, 4, 6, 2), ulysses4.ulysses_group,
                                                            [3, 1, 1, 0])),
        "head_to_seq": error_of(lambda: head_to_seq(torch.zeros(1, 6, 1, 2), ulysses4.ulysses_group)),
        "module_mesh": error_of(lambda: USPAttention(mesh.sp_group)),
        "shard_zigzag": error_of(lambda: shard_sequence(torch.zeros(1, 10, 1, 1), mesh)),
        "shard_ulysses": error_of(lambda: shard_sequence(torch.zeros(1, 6, 1, 1), ulysses4)),
    }


def test_bad_input_raises_value_errors_naming_the_argument():
    errors = run(4, _bad_inputs, pg_timeout_s=30)
    assert all(e == errors[0] for e in errors)  # every rank says the same
    e = errors[0]
    assert "per-ring-rank sequence length must be even" in e["odd_zigzag"] and "2 x ring_degree = 8" in e["odd_zigzag"]
    assert "local sequence length must be even" in e["odd_ring_zigzag"]
    assert e["heads"] == ("ValueError: the heads of q (3) must be at least the Ulysses degree (4): every rank takes "
                          "one or more")
    assert e["kv_heads"] == "ValueError: the heads of q (6) must be a multiple of the heads of k and v (4)"
    assert "heads of q (2) must be at least the Ulysses degree (4)" in e["ulysses_heads"]
    assert "same local sequence length, got 4 and 6" in e["causal_lengths"]
    assert "k has head dim 16 but q has 8" in e["head_dims"]
    assert "layout must be one of" in e["layout"]
    assert e["mesh_type"].startswith("TypeError: mesh must be a usp.comm.Mesh")
    assert e["ring_group_type"] == ("TypeError: group must be a torch.distributed ProcessGroup or None (the world), "
                                    "got Mesh (pick one of its groups, such as mesh.ring_group)")
    assert e["ulysses_group_type"].endswith("ProcessGroup or None (the world), got list")
    assert e["all_to_all_group_type"].endswith("ProcessGroup or None (the world), got str")
    assert e["gather_mesh_type"].startswith("TypeError: mesh must be a usp.comm.Mesh")
    assert e["positions_float"] == "TypeError: the sequence length must be an int, got 8.0"
    assert e["positions_negative"] == "ValueError: the sequence length must be positive, got -8"
    assert "3 x 1 = 3 must divide the number of ranks (4)" in e["degrees"]
    assert e["degree_type"] == "ValueError: ulysses_degree must be positive, got 0"
    assert "placement must be one of" in e["placement"]
    assert "group must list distinct ranks of the world (0 .. 3), got [0, 9]" in e["group_ranks"]
    assert "at least one head per rank of the group (4), got shape (1, 4, 3, 2)" in e["seq_to_head"]
    assert "shares must give each of the 4 ranks one head or more, got [3, 1, 1, 0]" in e["seq_to_head_shares"]
    assert "seqlen divisible by the group size 4, got shape (1, 6, 1, 2)" in e["head_to_seq"]
    assert e["module_mesh"].startswith("TypeError: mesh must be a usp.comm.Mesh")
    assert "sequence length 10 must be divisible by 2 x ring_degree = 4 for the zigzag layout" in e["shard_zigzag"]
    assert "sequence length 6 must be divisible by ulysses_degree x ring_degree = 4" in e["shard_ulysses"]


KINDS = ("seqlen", "dtype", "causal", "ring_heads", "broken_backend", "gather_length", "init_mesh", "bad_on_one_rank")
RING_KINDS = ("ring_heads", "broken_backend")  # a bare ring checks only its ring


def _broken(*args, **kwargs):
    raise RuntimeError("this backend always fails")


def _disagree() -> dict:
    """Rank 1 passes something different from the others, one kind of difference at a
    time; every rank records what it got and how long it took (the check raises before
    any transfer, so the group stays usable for the next kind)."""
    odd = dist.get_rank() == 1
    mesh = init_mesh(2, 2)

    def attention_call(kind):
        q = torch.randn(1, 6 if odd and kind == "seqlen" else 8, 4, 8, dtype=torch.float64)
        if kind == "dtype" and odd:
            q = q.float()
        if kind == "ring_heads":
            q = torch.randn(1, 8, 2 if odd else 4, 8)
            return ring_attention(q, q, q, mesh.ring_group, causal=True, backend="naive")
        if kind == "broken_backend":  # rank 1's backend fails in the first block, before the check is settled
            backend = FunctionBackend("broken", _broken, _broken) if odd else "naive"
            return ring_attention(q, q, q, mesh.ring_group, causal=True, backend=backend)
        return usp_attention(q, q, q, mesh, causal=not odd if kind == "causal" else True, backend="naive")

    calls = {kind: lambda kind=kind: attention_call(kind) for kind in ("seqlen", "dtype", "causal", *RING_KINDS)}
    calls["gather_length"] = lambda: gather_sequence(torch.zeros(1, 2 if odd else 4, 1, 1), mesh)
    calls["init_mesh"] = lambda: init_mesh(1, 4) if odd else init_mesh(2, 2)
    # arguments only rank 1's own checks refuse: it must not raise alone and leave the others waiting
    calls["bad_on_one_rank"] = lambda: usp_attention(*(torch.randn(1, 8, 4, 8, dtype=torch.float64),) * 3, mesh,
                                                     layout="striped" if odd else "zigzag", backend="naive")
    seen = {}
    for kind in KINDS:
        start = time.perf_counter()
        try:
            calls[kind]()
            seen[kind] = "finished"
        except ValueError as error:
            seen[kind] = f"ValueError: {error}"
        seen[f"{kind} seconds"] = time.perf_counter() - start
    # the rings still work: no rank posted a hop for a call they disagreed on
    whole = torch.randn(1, 16, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    positions = ring_positions(16, mesh.ring_degree, mesh.ring_rank, "zigzag")
    out = ring_attention(whole[:, positions], whole[:, positions], whole[:, positions], mesh.ring_group, causal=True)
    expected = naive_attention(whole, whole, whole, True)[0][:, positions]
    seen["ring afterwards"] = (out - expected).abs().max().item()
    return seen


@functools.cache
def _disagreements() -> list[dict]:
    return run(4, _disagree, pg_timeout_s=60)


@pytest.mark.parametrize("kind", KINDS)
def test_ranks_that_disagree_all_raise(kind):
    # usp checks the whole sequence group; a bare ring only its ring ({1, 3} holds rank 1, {0, 2} agrees).
    failing = {1, 3} if kind in RING_KINDS else {0, 1, 2, 3}
    for rank, seen in enumerate(_disagreements()):
        if rank in failing:
            assert seen[kind].startswith("ValueError: the ranks of the group disagree"), seen[kind]
            assert seen[f"{kind} seconds"] < 30  # at once, not after the group's 60 s timeout
        else:
            assert seen[kind] == "finished"
        assert seen["ring afterwards"] < 1e-12  # float64: rounding only


def test_the_disagreement_message_shows_each_rank():
    first = _disagreements()[0]
    assert first["dtype"] == ("ValueError: the ranks of the group disagree on usp_attention (dtype): rank 0: "
                              "dtype=torch.float64; rank 1: dtype=torch.float32; rank 2: dtype=torch.float64; "
                              "rank 3: dtype=torch.float64")
    assert "(q_shape, k_shape, v_shape): rank 0: q_shape=(1, 8, 4, 8)" in first["seqlen"]
    assert ("on gather_sequence (shape): rank 0: shape=(1, 4, 1, 1); rank 1: shape=(1, 2, 1, 1)"
            in first["gather_length"])
    assert first["bad_on_one_rank"] == ("ValueError: the ranks of the group disagree on usp_attention (error): rank 0: "
                                        "error=none; rank 1: error=ValueError: layout must be one of ('contiguous', "
                                        "'zigzag', 'stripe'), got 'striped'; rank 2: error=none; rank 3: error=none")
    assert first["init_mesh"] == ("ValueError: the ranks of the group disagree on init_mesh (ulysses_degree, "
                                  "ring_degree): rank 0: ulysses_degree=2, ring_degree=2; rank 1: ulysses_degree=1, "
                                  "ring_degree=4; rank 2: ulysses_degree=2, ring_degree=2; rank 3: ulysses_degree=2, "
                                  "ring_degree=2")


def _one_rank_stops(where: str):
    """Rank 1 raises (process ends) or hangs alive (sleeps) at ``where``; rank 0 goes on
    and reports how long after its attention call started it failed."""
    mesh = init_mesh(1, 2, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    q = torch.randn(1, 8, 2, 8, requires_grad=True)
    if dist.get_rank() == 1:
        if where == "raise_before":
            raise RuntimeError("rank 1 failed before attention")
        if where == "hang_before":
            time.sleep(60)  # alive, silent: the launcher kills it
            return "slept"
        out = usp_attention(q, q, q, mesh, causal=True, backend="naive")
        time.sleep(60)  # hang_between: after forward, before backward
        return "slept"
    start = time.perf_counter()
    try:
        out = usp_attention(q, q, q, mesh, causal=True, backend="naive")
        out.sum().backward()
    except Exception as error:  # the failure the group's timeout raises
        return ("failed", time.perf_counter() - start, type(error).__name__)
    return ("finished", time.perf_counter() - start, "")


@pytest.mark.parametrize("where", ["raise_before",
                                   # a stalled rank is found by the timeout: 11 s each, in the slow step
                                   pytest.param("hang_before", marks=pytest.mark.slow),
                                   pytest.param("hang_between", marks=pytest.mark.slow)])
def test_a_rank_that_stops_makes_the_others_fail_within_the_timeout(where):
    outcomes = spawn(2, _one_rank_stops, (where,), pg_timeout_s=60, timeout_s=3 * PG_TIMEOUT_S + 1)
    status, seconds, error = outcomes[0].value
    assert status == "failed", "rank 0 finished although rank 1 stopped"
    # timed from rank 0's attention call, so a slow start on a busy machine does not count
    assert seconds < 3 * PG_TIMEOUT_S, f"rank 0 took {seconds:.1f} s to fail ({error})"


def _die_or_dawdle():
    if dist.get_rank() == 1:
        os._exit(3)
    if dist.get_rank() == 2:
        time.sleep(60)
    if dist.get_rank() == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return "done"


@pytest.mark.slow  # 6-12 s of subprocesses: the slow step keeps the default suite's budget
def test_the_launcher_reports_ranks_that_die_or_overrun():
    """The run's timeout counts from the moment every rank has joined the group, so a
    slow start on a busy machine does not eat it."""
    outcomes = spawn(4, _die_or_dawdle, pg_timeout_s=60, timeout_s=3)
    assert outcomes[0].ok and outcomes[0].value == "done"
    assert not outcomes[1].ok and outcomes[1].value == "exited with code 3 without a result"
    assert not outcomes[2].ok and outcomes[2].value == "no result within 3 s of the start"
    assert outcomes[2].seconds < 30  # killed 3 s after the start, not waited for the 60 s it sleeps
    assert not outcomes[3].ok and outcomes[3].value == "killed by signal 9 without a result"
    with pytest.raises(WorkersFailed, match="rank 1: exited with code 3"):
        raise WorkersFailed(outcomes)


def _guarded_calls() -> dict:
    """``check_finite=True`` on 4 ranks: rank 1 puts a NaN in k, rank 3 two infinities in
    q, one call per method; then finite inputs whose sums overflow; then rank 1 alone
    asking for the guard; then a group of one rank."""
    rank = dist.get_rank()
    mesh = init_mesh(2, 2)
    torch.manual_seed(rank)
    q, k, v = (torch.randn(1, 8, 4, 8) for _ in range(3))
    bad_q, bad_k = q.clone(), k.clone()
    if rank == 1:
        bad_k[0, 5, 2, 1] = float("nan")
    if rank == 3:
        bad_q[0, 0, 0, :2] = float("inf")
    calls = {"usp": lambda q, k, v, **kw: usp_attention(q, k, v, mesh, causal=True, **kw),
             "ring": lambda q, k, v, **kw: ring_attention(q, k, v, None, causal=True, **kw),
             "ulysses": lambda q, k, v, **kw: ulysses_attention(q, k, v, None, causal=True, **kw),
             "module": lambda q, k, v, **kw: USPAttention(mesh, causal=True, **kw)(q, k, v)}
    seen = {}
    for name, call in calls.items():
        seen[name] = error_of(lambda: call(bad_q, bad_k, v, check_finite=True))
        seen[f"{name} unchecked"] = bool(torch.isnan(call(bad_q, bad_k, v)).any())  # documented NaN spread
        seen[f"{name} finite"] = torch.equal(call(q, k, v, check_finite=True), call(q, k, v))
        seen[f"{name} finite, no rank check"] = torch.equal(call(q, k, v, check_finite=True, check_ranks=False),
                                                             call(q, k, v))
    huge = torch.full((1, 8, 4, 8), 3e38)  # finite, but its sum overflows float32
    seen["overflowing sum"] = error_of(lambda: usp_attention(huge, q, v, mesh, check_finite=True))
    # a pure ring too, whose first hop waits for the check: posted once the exact count cleared the flag
    seen["overflowing sum, ring"] = error_of(lambda: ring_attention(huge, q, v, None, check_finite=True))
    seen["only rank 1 checks"] = error_of(lambda: usp_attention(q, k, v, mesh, check_finite=rank == 1))
    alone = [dist.new_group([r]) for r in range(4)][rank]  # every rank makes every group
    seen["alone"] = error_of(lambda: ring_attention(bad_q, bad_k, v, alone, check_finite=True))
    return seen


def test_check_finite_raises_on_every_rank_naming_rank_and_tensor():
    seen = run(4, _guarded_calls, pg_timeout_s=60)
    for name in ("usp", "ring", "ulysses", "module"):
        what = "usp_attention" if name == "module" else f"{name}_attention"
        expected = f"ValueError: non-finite inputs to {what} (check_finite): rank 1: k (1 NaN); rank 3: q (2 inf)"
        assert all(s[name] == expected for s in seen), [s[name] for s in seen]
        assert all(s[f"{name} finite"] and s[f"{name} finite, no rank check"] for s in seen)
        assert any(s[f"{name} unchecked"] for s in seen)  # without the guard the NaN goes through
    assert all(s["overflowing sum"] == s["overflowing sum, ring"] == "no error" for s in seen)
    assert all(s["only rank 1 checks"].startswith("ValueError: the ranks of the group disagree on usp_attention "
                                                  "(check_finite): rank 0: check_finite=False; rank 1: "
                                                  "check_finite=True") for s in seen)
    assert [s["alone"] for s in seen] == ["no error", "ValueError: non-finite inputs to ring_attention (check_finite): "
                                          "rank 1: k (1 NaN)", "no error", "ValueError: non-finite inputs to "
                                          "ring_attention (check_finite): rank 3: q (2 inf)"]
