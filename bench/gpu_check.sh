#!/usr/bin/env bash
# Every GPU check of this repository in one go, for a machine with one CUDA GPU and the
# packages already installed (torch, triton, numpy, matplotlib, pytest, setuptools): the
# project is installed offline, then the gpu-marked tests, the numerics verification, the
# kernel benchmark against SDPA and the 8-rank emulation (LLaMA3-8B attention shape, 8K
# tokens per rank, bf16, causal, both layouts). The JSON results and two logs go to $OUT
# (default /tmp/usp-gpu); draw the figures afterwards with `python -m usp.plots $OUT`.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/usp-gpu}"
mkdir -p "$out"
status=0
pip install -q --no-deps --no-build-isolation -e . >"$out/gpu-tests.log" 2>&1 || status=1
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; python -c "import torch, triton; print(torch.__version__, triton.__version__)"; } >>"$out/gpu-tests.log" 2>&1
python -m pytest -q -m gpu -p no:cacheprovider >>"$out/gpu-tests.log" 2>&1 || status=1
for step in "verify --no-distributed" "kernels" "emulate"; do
  echo "+ usp-bench $step" >>"$out/bench.log"
  python -m usp.bench $step --out-dir "$out" >>"$out/bench.log" 2>&1 || status=1
done
tail -n 3 "$out/gpu-tests.log"; grep -E "passed|headline|predicted|wrote" "$out/bench.log"
exit $status
