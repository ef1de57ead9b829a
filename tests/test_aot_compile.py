"""Every GPU kernel configuration compiles for its target (sm_90 first) on this CPU
machine, through the real Triton compiler, and its shared memory fits the card."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from usp.kernels.configs import GPU_FAMILIES, KERNELS, PADDED_HEAD_DIMS

ROOT = Path(__file__).resolve().parents[1]
# Two compiler processes, one per core: sm90 alone, the smaller tables together.
GROUPS = [["sm90"], ["sm80", "sm86"]]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence triton 3.9's notice; fusion is the default
    procs = [subprocess.Popen([sys.executable, "-m", "usp.kernels.aot", "--causal-only", "--json",
                               *(arg for name in group for arg in ("--family", name))],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for group in GROUPS]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        assert stdout.strip(), f"kernels.aot failed (exit {proc.returncode}):\n{stderr[-4000:]}"
        results += json.loads(stdout)
    return results


@pytest.mark.slow
def test_every_table_entry_is_compiled(compiled):
    built = {(r["family"], r["kernel"], r["head_dim"], r["dtype"]) for r in compiled}
    kernels = (*KERNELS, "bwd_preprocess")
    expected = {(f.name, k, d, t) for f in GPU_FAMILIES for k in kernels for d in PADDED_HEAD_DIMS
                for t in ("bf16", "fp32")}
    assert built == expected


@pytest.mark.slow
def test_shared_memory_fits(compiled):
    too_big = [r for r in compiled if r["shared_bytes"] > r["shared_limit"]]
    assert not too_big, "\n".join(f"{r['family']} {r['kernel']} d={r['head_dim']} {r['dtype']}: "
                                  f"{r['shared_bytes']} > {r['shared_limit']} bytes" for r in too_big)
    assert any(r["family"] == "sm90" and r["shared_bytes"] > 0 for r in compiled)
