#!/usr/bin/env bash
# Every GPU check of this repository in one go, for a machine with one CUDA GPU and the
# packages already installed (torch, triton, numpy, matplotlib, pytest, setuptools), in
# under 8 minutes. Each step runs under its own time limit, so one that fails or hangs
# cannot eat the others' time:
#   setup     install the project offline; the card, its clocks, torch and triton
#   tests     the gpu-marked tests (bf16 numerics of every kernel, the NCCL paths, no host
#             syncs), in 8 pytest processes side by side, so Triton's compiles use the cores
#   verify    `usp-bench verify --no-distributed`: every backend against float64, the cases
#             in 8 processes side by side (its --jobs default on a GPU)
#   tiles     `usp-bench kernels --impl triton --causal --tile-order rule by-head
#             across-heads`: the causal rows of the kernel benchmark with the tiles handed out
#             by the rule, head after head and across heads, interleaved, each order's time
#             over the rule's (before `kernels`, so that the figures show that run)
#   kernels   `usp-bench kernels`: triton against SDPA's flash, cuDNN and efficient
#             backends, bf16, head dim 64 and 128, 16K tokens per call (2048 / d heads),
#             1K to 16K tokens, causal and not, forward and backward; the kernels'
#             compile time and the card's bf16 matmul rate, measured in the same run
#   emulate   `usp-bench emulate`: the 8-rank ring for LLaMA3-8B's attention (32 query
#             and 8 K/V heads, d128, bf16, 8K tokens per rank, causal), first zigzag with
#             each step's merge outside the kernel (--merge separate), then every layout
#   train     `usp-bench train` under torchrun on NCCL (one rank): bf16 autocast, MFU
# $OUT (default /tmp/usp-gpu; new or empty) gets at most 8 files: check.log (every step's output),
# summary.txt (each step's verdict and time, then the headline lines) and each step's
# JSON result (two for emulate; tiles and kernels each write a kernels-*.json, kernels the
# later). Draw the figures afterwards with `python -m usp.plots DIR`. A step that runs over
# its limit gets SIGTERM, then SIGKILL 5 s later; tiles and kernels get SIGINT instead, on
# which `usp-bench kernels` writes what it measured, as on Ctrl-C.
#
# `bench/gpu_check.sh --smoke` runs the same steps on a CPU, through Triton's
# interpreter at tiny sizes, to show that the plumbing works (the tests check it).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/usp-gpu}"
smoke=0
if [ "${1:-}" = "--smoke" ]; then
  smoke=1
  export TRITON_INTERPRET=1
elif [ $# -gt 0 ]; then
  echo "usage: bench/gpu_check.sh [--smoke]" >&2
  exit 2
fi
if [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  echo "$out is not empty: give OUT a new or empty folder (this run's files would mix with others)" >&2
  exit 2
fi
mkdir -p "$out"
py="${PYTHON:-python3}"  # the interpreter that holds torch (python3 on the GPU image)
work="$(mktemp -d)"  # each step's raw output, outside $OUT
trap 'rm -rf "$work"' EXIT
log="$out/check.log"
summary="$out/summary.txt"
: >"$log"
: >"$summary"
status=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, log it, note the verdict,
          # and bring its JSON result (written under $work/NAME) to $OUT at once
  local name=$1 limit=$2 begin=$SECONDS rc verdict signal=TERM
  shift 2
  # SIGINT only where it is caught (usp-bench kernels keeps its timings); elsewhere SIGTERM:
  # gpu_tests' background pytest shards ignore SIGINT, torchrun's worker is in its own session
  case $name in tiles|kernels) signal=INT ;; esac
  echo "=== $name (limit ${limit} s): $*" >>"$log"
  timeout -s "$signal" --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" >>"$log" 2>&1  # bash: setup, gpu_tests, emulate_both
  rc=$?
  case $rc in
    0) verdict="ok" ;;
    124|137) verdict="timed out" ;;
    *) verdict="failed ($rc)" ;;
  esac
  [ $rc -eq 0 ] || status=1
  printf '%-8s %-12s %4d s\n' "$name" "$verdict" $((SECONDS - begin)) | tee -a "$summary"
  case $name in
    verify|tiles|kernels|emulate|train)
      cp "$work/$name"/*.json "$out/" 2>/dev/null || echo "$name: no JSON result" | tee -a "$summary" ;;
  esac
}

setup() {
  "$py" -m pip install -q --no-deps --no-build-isolation -e . || return 1
  if [ $smoke -eq 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv || return 1
  fi
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
}

gpu_tests() {  # the gpu tests dealt round-robin to 8 pytest processes side by side; fails if any fails
  local ids=() bucket pids=() rc=0 i
  if ! "$py" -m pytest -m gpu --collect-only -q -p no:cacheprovider >"$work/collect.log" 2>&1; then
    cat "$work/collect.log"  # a test module that does not import is a failure, not a smaller suite
    return 1
  fi
  mapfile -t ids < <(grep -E "^tests/[^ ]*::" "$work/collect.log")  # test ids only, not warnings that quote one
  [ ${#ids[@]} -gt 0 ] || { echo "no gpu tests collected"; return 1; }
  for bucket in 0 1 2 3 4 5 6 7; do
    local mine=()
    for ((i = bucket; i < ${#ids[@]}; i += 8)); do mine+=("${ids[i]}"); done
    [ ${#mine[@]} -gt 0 ] || continue
    "$py" -m pytest -q -rfEs -m gpu -p no:cacheprovider "${mine[@]}" >"$work/tests-$bucket.log" 2>&1 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || rc=1; done
  return $rc
}

test_logs() {  # every shard's last line, then its log: also after a timeout, which cut the shards short
  local file
  for file in "$work"/tests-*.log; do
    [ -f "$file" ] || continue
    echo "--- tests, share $(basename "$file" .log | cut -d- -f2) of 8: $(tail -n 1 "$file")"
    cat "$file"
  done
}

emulate_both() {  # emulate ARGS...: zigzag merging outside the kernel, then the ring as it runs (merging inside);
                  # in this order, so that the figures (drawn from the newest emulate result) show the second
  "$py" -m usp.bench emulate "$@" --layout zigzag --merge separate --out-dir "$work/emulate" &&
    "$py" -m usp.bench emulate "$@" --out-dir "$work/emulate"
}

export -f setup gpu_tests emulate_both
export smoke work py
# one machine: gloo (the mesh's host checks, torchrun on a CPU) and NCCL's bootstrap on loopback
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}"

if [ $smoke -eq 1 ]; then  # tiny sizes, fp32 (the interpreter's bf16 is wrong), CPU gloo for torchrun
  kernels=(--impl triton --impl sdpa-math --dtype fp32 --head-dim 16 --seqlen 32 --heads 2 --batch 1 --pass fwd
           --pass bwd --warmup 0 --repeats 1)
  tiles=(--impl triton --causal --tile-order rule by-head across-heads --dtype fp32 --head-dim 16 --seqlen 32
         --heads 2 --batch 1 --pass fwd --pass bwd --warmup 0 --repeats 1)
  emulate=(--world-size 2 --tokens-per-rank 32 --heads 2 --kv-heads 1 --head-dim 16 --backend triton --layout zigzag)
  verify=(--backend torch --backend naive)
  train=(--mesh 1x1 --steps 2 --dtype fp32)
  limits=(60 120 90 90 120 120 120)
else
  kernels=(--impl triton --impl sdpa-flash --impl sdpa-cudnn --impl sdpa-efficient --dtype bf16 --head-dim 64 128
           --seqlen 1024 2048 4096 8192 16384 --pass fwd --pass bwd --warmup 3 --repeats 10)
  tiles=(--impl triton --causal --tile-order rule by-head across-heads --dtype bf16 --head-dim 64 128
         --seqlen 1024 2048 4096 8192 16384 --pass fwd --pass bwd --warmup 3 --repeats 10)
  emulate=()
  verify=()
  train=(--mesh 1x1 --steps 10 --seqlen 4096 --batch 2 --vocab 32000 --hidden 2048 --ffn-hidden 5632 --layers 4 --lr 3e-4
         --heads 16 --kv-heads 4)
  limits=(25 120 62 45 62 55 76)  # 445 s in all, the most each step may take (480 s with the kills)
fi

step setup "${limits[0]}" setup
step tests "${limits[1]}" gpu_tests
test_logs >>"$log"
# ${a[@]+"${a[@]}"}: an empty array under set -u on bash before 4.4
step verify "${limits[2]}" "$py" -m usp.bench verify --no-distributed ${verify[@]+"${verify[@]}"} \
  --out-dir "$work/verify"
step tiles "${limits[3]}" "$py" -m usp.bench kernels "${tiles[@]}" --out-dir "$work/tiles"
step kernels "${limits[4]}" "$py" -m usp.bench kernels "${kernels[@]}" --out-dir "$work/kernels"
step emulate "${limits[5]}" emulate_both ${emulate[@]+"${emulate[@]}"}
step train "${limits[6]}" "$py" -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m usp.bench train "${train[@]}" --out-dir "$work/train"

awk '/^=== [a-z]+ \(limit /{step = $2} {print (step == "tiles" ? "tiles: " : "") $0}' "$log" |  # tiles' lines say so
  grep -E "^(tiles: )?(--- tests|emulate: |headline|of the matmul rate|host time per call|matmul rate|\
compiled the triton|tile order, |interrupted after|config |u[0-9]+r[0-9]+ )|overhead [0-9.]+x|\
[0-9]+/[0-9]+ passed" >>"$summary"
exit $status
