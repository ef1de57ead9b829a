"""``usp-bench verify``: the table, the JSON file, and the exit status."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from usp.bench import verify
from usp.bench.cli_args import process_pool
from usp.bench.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def test_verify_end_to_end_in_a_fresh_process(tmp_path):
    """As a user runs it, in a new interpreter (that the command picks Triton's interpreter
    itself without a GPU is shown by the kernels command's toy run)."""
    proc = subprocess.run([sys.executable, "-m", "usp.bench", "verify", "--backend", "torch", "--dtype", "fp16",
                           "--no-distributed", "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(verify.CPU_SHAPES if not torch.cuda.is_available() else verify.GPU_SHAPES) * 2
    assert f"{n}/{n} passed" in proc.stdout
    assert f"[  1/{n}] torch   fp16" in proc.stdout  # progress, one row per case
    (path,) = tmp_path.glob("verify-*.json")
    doc = json.loads(path.read_text())
    assert doc["kind"] == "verify"
    assert {"device", "torch", "triton", "python", "platform"} <= set(doc["machine"])
    assert {k: doc["summary"][k] for k in ("cases", "passed", "failed")} == {"cases": n, "passed": n, "failed": 0}
    assert 0 < doc["summary"]["worst_ratio"]["torch fp16"] < 1
    assert "worst error / tolerance: torch fp16" in proc.stdout
    record = doc["records"][0]
    assert {"backend", "dtype", "causal", "batch", "seqlen_q", "seqlen_k", "heads", "kv_heads", "head_dim",
            "softmax_scale", "errors", "tolerances", "worst_ratio", "passed", "seed"} <= set(record)
    assert set(record["errors"]) == {"out", "lse", "dq", "dk", "dv"}


def test_verify_exits_non_zero_when_a_backend_is_wrong(tmp_path, monkeypatch, capsys):
    from usp.kernels import backends

    naive = backends.BACKENDS["naive"]

    def wrong_lse(q, k, v, **kwargs):
        out, lse = naive.forward(q, k, v, **kwargs)
        return out, lse + 1e-3

    monkeypatch.setitem(backends.BACKENDS, "torch", backends.FunctionBackend("torch", wrong_lse, naive.backward))
    monkeypatch.setattr(verify, "CPU_SHAPES", verify.CPU_SHAPES[:1])
    monkeypatch.setattr(verify, "GPU_SHAPES", verify.GPU_SHAPES[:1])
    status = main(["verify", "--backend", "torch", "--dtype", "fp32", "--no-distributed", "--out-dir", str(tmp_path)])
    output = capsys.readouterr().out
    assert status == 1
    assert "FAIL" in output and "lse: error" in output
    doc = json.loads(next(tmp_path.glob("verify-*.json")).read_text())
    assert doc["summary"]["failed"] == 2


def test_verify_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert all(option in usage for option in ("--backend", "--dtype", "--device", "--out-dir", "--seed",
                                              "--world-size", "--no-distributed", "--jobs"))


@pytest.mark.parametrize("device", ["tpu", "nonsense"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_verify_rejects_a_device_it_cannot_use(device, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--device", device])
    assert exit_info.value.code == 2
    assert "--device" in capsys.readouterr().err


def test_verify_skips_triton_on_a_cpu_without_the_interpreter(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(verify, "interpreter_active", lambda: False)
    monkeypatch.setattr(verify, "CPU_SHAPES", verify.CPU_SHAPES[:1])
    status = main(["verify", "--device", "cpu", "--backend", "triton", "--backend", "naive", "--dtype", "fp32",
                   "--no-distributed", "--out-dir", str(tmp_path)])
    output = capsys.readouterr().out
    assert status == 0
    assert "skipping triton: the Triton kernels need a CUDA device" in output
    assert "2/2 passed" in output and "triton  fp32" not in output


def test_verify_runs_the_distributed_checks(tmp_path, capsys):
    status = main(["verify", "--backend", "naive", "--world-size", "2", "--out-dir", str(tmp_path)])
    output = capsys.readouterr().out
    assert status == 0, output
    assert "launching 2 processes" in output
    assert "usp-u2r1-zigzag" in output and "naive   fp64" in output
    doc = json.loads(next(tmp_path.glob("verify-*.json")).read_text())
    assert doc["config"]["distributed_world_sizes"] == [2]
    (record,) = doc["distributed_records"]
    assert record["impl"] == "usp-u2r1-zigzag" and record["passed"] and record["transfers_overlap_compute"]
    assert set(record["errors"]) == {"out", "dq", "dk", "dv"} and max(record["errors"].values()) < 1e-13
    assert record["traffic_per_rank"]["forward"]["all_to_alls"] == 4
    assert doc["summary"]["worst_ratio"]["usp naive fp64"] < 1


def test_a_distributed_failure_on_any_rank_fails_the_case():
    from usp.bench.dist_checks import DistCase, merge_ranks

    case = DistCase("ring", 1, 2, 2)
    good = dict(errors=dict(out=1e-16), tolerances=dict(out=1e-14), failures=[], forward={}, backward={},
                overlapped=True, seconds=0.1)
    bad = dict(good, errors=dict(out=1.0), failures=["out: error 1 > tolerance 1e-14"])
    merged = merge_ranks(case, [good, bad])
    assert not merged.passed and merged.failures == ["rank 1: out: error 1 > tolerance 1e-14"]
    assert merged.errors == dict(out=1.0)  # the worst rank's errors
    late = merge_ranks(case, [good, dict(good, overlapped=False)])
    assert not late.passed and "before the next K/V transfer was posted" in late.failures[0]


@pytest.mark.slow
def test_verify_side_by_side_gives_the_same_rows_in_order(tmp_path, monkeypatch, capsys):
    """--jobs 2 runs the cases in two spawned processes: the same errors, seeds and
    verdicts as one process, printed in the cases' order."""
    monkeypatch.setattr(verify, "CPU_SHAPES", verify.CPU_SHAPES[:3])
    pools = []

    def spied_pool(jobs):
        pools.append(jobs)
        return process_pool(jobs)

    monkeypatch.setattr(verify, "process_pool", spied_pool)
    docs, shapes = {}, {}
    for jobs in (1, 2):
        out_dir = tmp_path / f"jobs{jobs}"
        assert main(["verify", "--backend", "naive", "--dtype", "fp32", "--no-distributed", "--jobs", str(jobs),
                     "--out-dir", str(out_dir)]) == 0
        # backend, dtype, shape and causal of each row, as printed
        shapes[jobs] = [line.split("] ", 1)[1][:53] for line in capsys.readouterr().out.splitlines()
                        if line.startswith("[")]
        docs[jobs] = json.loads(next(out_dir.glob("verify-*.json")).read_text())["records"]
    assert pools == [2]  # one pool, for --jobs 2
    assert shapes[1] == shapes[2] and len(set(shapes[1])) == 6  # printed in the cases' order
    strip = [{k: v for k, v in record.items() if k != "seconds"} for record in docs[1]]
    assert strip == [{k: v for k, v in record.items() if k != "seconds"} for record in docs[2]]


def test_verify_names_the_case_a_dead_worker_left(tmp_path, monkeypatch, capsys):
    from concurrent.futures.process import BrokenProcessPool

    class DeadPool:  # a pool whose worker is killed after the first case: reading the second raises
        def map(self, fn, *iterables):
            yield fn(*next(zip(*iterables)))
            raise BrokenProcessPool("a process in the pool was terminated abruptly")

        def shutdown(self, **kwargs):
            pass

    monkeypatch.setattr(verify, "process_pool", lambda jobs: DeadPool())
    monkeypatch.setattr(verify, "CPU_SHAPES", verify.CPU_SHAPES[:1])
    status = main(["verify", "--backend", "naive", "--dtype", "fp32", "--no-distributed", "--jobs", "2",
                   "--out-dir", str(tmp_path)])
    assert status == 1
    captured = capsys.readouterr()
    assert "[  1/2] naive" in captured.out
    assert "a worker process died during case 2 or a later one" in captured.err
    assert not list(tmp_path.glob("verify-*.json"))
