"""``usp-bench faults``: the plans, the tripwire and the verdicts on made-up outcomes,
and (slow step) a short fault-injection run that must end without a hang."""

import json
from pathlib import Path

import pytest

from usp.bench.__main__ import main
from usp.bench.faults import FAULT_KINDS, METHODS, Config, FaultPlan, _Tripwire, judge, make_plans
from usp.bench.launch import RankOutcome

CONFIG = Config(timeout_s=3.0, margin_s=10.0)


def test_plans_are_reproducible_and_meet_every_kind_and_method():
    plans = make_plans(18, 7, CONFIG)
    assert plans == make_plans(18, 7, CONFIG) and plans != make_plans(18, 8, CONFIG)
    assert {(p.kind, p.method) for p in plans} == {(k, m) for k in FAULT_KINDS for m in METHODS}
    first_round_of_each = make_plans(12, 0, CONFIG)
    assert sorted(p.kind for p in first_round_of_each) == sorted(FAULT_KINDS * 2)
    assert {p.method for p in first_round_of_each[:6]} == set(METHODS)
    assert {p.tensor for p in make_plans(18, 0, CONFIG) if p.kind == "nan"} == {"q", "k", "v"}
    for kinds in (("kill", "raise"), ("nan",), FAULT_KINDS[:5]):  # any list of kinds meets every method
        for methods in (METHODS, ("ring", "usp")):
            plans = make_plans(len(kinds) * len(methods), 0, CONFIG, kinds, methods)
            assert {(p.kind, p.method) for p in plans} == {(k, m) for k in kinds for m in methods}
    assert all(1 <= p.step < CONFIG.steps and 0 <= p.rank < CONFIG.world_size and 0 <= p.at < 1 for p in plans)


def test_the_tripwire_strikes_just_before_the_chosen_event():
    struck = []
    events = _Tripwire(2, lambda: struck.append(len(events)))
    for event in "abcd":
        events.append(event)
    assert struck == [2] and events == list("abcd")


def _plan(kind: str, rank: int = 1) -> FaultPlan:
    return FaultPlan(0, "usp", kind, rank, 1, 0.5, "k", 3)


def _raised(rank: int, seconds: float = 0.5, error: str = "RuntimeError: Connection closed by peer") -> RankOutcome:
    return RankOutcome(rank, True, dict(rank=rank, status="error", error=error, seconds=seconds), 1.0)


def _finished(rank: int, **seen) -> RankOutcome:
    return RankOutcome(rank, True, dict(rank=rank, status="finished", error="", seconds=0.1, **seen), 1.0)


def test_the_verdicts():
    killed = RankOutcome(1, False, "killed by signal 9 without a result", 1.0)
    assert judge(_plan("kill"), [_raised(0), killed, _raised(2), _raised(3)], CONFIG) == ("ok", [])
    hung = RankOutcome(2, False, "no result within 60 s of the start", 60.0)
    assert judge(_plan("kill"), [_raised(0), killed, hung, _raised(3)], CONFIG) == (
        "hang", ["rank 2: no result within 60 s of the start"])
    assert judge(_plan("raise"), [_raised(0), _raised(1), _finished(2), _raised(3, 14.0)], CONFIG) == (
        "silent", ["rank 2 finished every step",
                   "rank 3 raised after 14.00 s: RuntimeError: Connection closed by peer"])
    assert judge(_plan("stall"), [_raised(0, 13.5), killed, _raised(2), _raised(3)], CONFIG)[0] == "late"
    assert judge(_plan("skip_backward"), [_raised(0), _finished(1), _raised(2), _raised(3)], CONFIG)[0] == "silent"
    disagree = "ValueError: the ranks of the group disagree on usp_attention (q_shape, ...)"
    assert judge(_plan("shape"), [_raised(r, 0.1, disagree) for r in range(4)], CONFIG) == ("ok", [])
    assert judge(_plan("shape"), [_raised(r, 0.1, disagree) for r in range(3)] + [_raised(3)], CONFIG)[0] == "unclear"
    other = "ValueError: the ranks of the group disagree on usp_attention (dtype)"
    assert judge(_plan("shape"), [_raised(r, 0.1, disagree) for r in range(3)] + [_raised(3, 0.1, other)],
                 CONFIG)[0] == "unclear"
    early = RankOutcome(2, True, dict(rank=2, status="error", error="RuntimeError: boom", seconds=None), 1.0)
    assert judge(_plan("raise"), [_raised(0), _raised(1), early, _raised(3)], CONFIG) == (
        "unclear", ["rank 2 raised before the fault: RuntimeError: boom"])
    guard = "non-finite inputs to usp_attention (check_finite): rank 1: k (1 NaN)"
    documented = dict(nan_behaviour="as documented", guard=guard)
    assert judge(_plan("nan"), [_finished(r, **documented) for r in range(4)], CONFIG) == ("ok", [])
    wrong_rows = dict(documented, nan_behaviour="2 rows that see the NaN are not NaN")
    assert judge(_plan("nan"), [_finished(0, **wrong_rows)] + [_finished(r, **documented) for r in range(1, 4)],
                 CONFIG) == ("unclear", ["rank 0: 2 rows that see the NaN are not NaN"])
    unnamed = dict(documented, guard="non-finite inputs to usp_attention (check_finite): rank 2: k (1 NaN)")
    assert judge(_plan("nan"), [_finished(r, **unnamed) for r in range(4)], CONFIG)[0] == "unclear"


@pytest.mark.slow
def test_a_short_fault_run_ends_every_run_cleanly(tmp_path, capsys):
    """Two runs of each kind (every method appears): no hang, no silent result."""
    status = main(["faults", "--runs", "12", "--timeout", "3", "--guard-seqlen", "64", "--guard-repeats", "1",
                   "--out-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    document = json.loads(next(Path(tmp_path).glob("faults-*.json")).read_text())
    assert [row["kind"] for row in document["summary"]] == list(FAULT_KINDS)
    assert all(row["runs"] == 2 and row["ok"] == 2 for row in document["summary"])
    assert {run["plan"]["method"] for run in document["runs"]} == set(METHODS)
    for run in document["runs"]:
        if run["plan"]["kind"] not in ("nan",):
            assert run["worst_error_s"] is not None and run["worst_error_s"] <= document["config"]["bound_s"]
    assert set(document["guard_cost"]["ms"]) == {"no checks", "rank check", "rank check + check_finite"}
    assert "run 12/12" in printed
    assert any(line.split()[:3] == ["all", "12", "12"] for line in printed.splitlines())  # the table: 12 runs, 12 ok
