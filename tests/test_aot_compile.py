"""Every GPU kernel configuration compiles for its target on this CPU machine, through the
real Triton compiler, specialised as the JIT specialises real inputs, and its shared
memory fits the card. The default suite compiles the sm_90 (H100/H200) bf16 kernels of
every head dim; the exhaustive sweep (every family, bf16 and fp32) is marked slow and
runs as its own step in CI (python -m pytest -m slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from usp.kernels.configs import GPU_FAMILIES, HOPPER, KERNELS, PADDED_HEAD_DIMS

ROOT = Path(__file__).resolve().parents[1]
CAUSAL_ONLY = ("bwd_preprocess_into", "bwd_dkdv_into")  # into float32: epilogue or tiling differ only
# bwd_dq_into is both a table row (KERNELS) and an aot launch name: listed once
ALL_KERNELS = tuple(dict.fromkeys((*KERNELS, "bwd_preprocess", "fwd_into", *CAUSAL_ONLY)))
PREPROCESS = ("bwd_preprocess", "bwd_preprocess_into")  # no matmuls
VARIANTS = ("causal", "packed-window")  # together a superset of the full variant's code paths
# every kernel in every variant, but the preprocess, which has no mask, once; the kernels into a
# ring's float32 accumulators (forward, dQ), which serve dense and by-token masks, not packed
# documents; and those whose epilogue or tiling alone differ (CAUSAL_ONLY) with the causal variant
KERNEL_VARIANTS = [(k, v) for k in ALL_KERNELS for v in VARIANTS
                   if (k != "bwd_preprocess" or v == VARIANTS[0])
                   and (k not in ("fwd_into", "bwd_dq_into") or v != "packed-window")
                   and (k not in CAUSAL_ONLY or v == "causal")]


def _compile(groups: list[list[str]]) -> list[dict]:
    """Run ``python -m usp.kernels.aot --json`` once per option group, in parallel (one
    process per core), and return all results."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence triton 3.9's notice; fusion is the default
    procs = [subprocess.Popen([sys.executable, "-m", "usp.kernels.aot", "--json", *group], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for group in groups]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=1200)
        assert stdout.strip(), f"usp.kernels.aot failed (exit {proc.returncode}):\n{stderr[-4000:]}"
        results += json.loads(stdout)
    return results


def _too_big(results: list[dict]) -> list[str]:
    return [f"{r['family']} {r['kernel']} d={r['head_dim']} {r['dtype']}: {r['shared_bytes']} > {r['shared_limit']}"
            for r in results if r["shared_bytes"] > r["shared_limit"]]


_EVERY_VARIANT = [f"--variant={v}" for v in VARIANTS]


@pytest.fixture(scope="module")
def hopper_bf16():
    """Every head dim causal; the packed-window variant at d64 and d128 (both in the slow
    sweep, for every family); the masks by token at d128."""
    sm90 = ["--family", "sm90", "--dtype", "bf16"]
    return _compile([[*sm90, "--variant=causal", "--head-dim", "16", "--head-dim", "32", "--head-dim", "256"],
                     [*sm90, *_EVERY_VARIANT, "--head-dim", "64", "--head-dim", "128"],
                     [*sm90, "--variant=tokens-window", "--variant=tokens-tested", "--head-dim", "128"]])


TOKEN_VARIANTS = ("tokens-window", "tokens-tested")


def test_the_masks_by_token_compile_fit_and_pipeline_with_spans(hopper_bf16):
    """With spans (what the sequence-parallel layers give) the loops have no branch and
    Triton pipelines them: cp.async and the dense kernels' shared memory. Without, each
    block is tested before it is computed, which Triton does not pipeline (no cp.async):
    it compiles, fits and keeps wgmma (and the forward less than half the shared memory).
    The preprocess has no mask: built once."""
    tokens = {(r["kernel"], r["variant"]): r for r in hopper_bf16 if r["variant"] in TOKEN_VARIANTS}
    kernels = set(ALL_KERNELS) - set(CAUSAL_ONLY)
    assert set(tokens) == {(k, "tokens-window") for k in kernels} | {
        (k, "tokens-tested") for k in kernels - {"bwd_preprocess"}}
    assert not _too_big(list(tokens.values()))
    for (kernel, variant), result in tokens.items():
        if kernel not in PREPROCESS:
            assert "wgmma" in result["ptx_features"], (kernel, variant, result["ptx_features"])
            if variant == "tokens-window":
                assert "cp.async" in result["ptx_features"], (kernel, result["ptx_features"])
    assert tokens["fwd", "tokens-window"]["shared_bytes"] > 2 * tokens["fwd", "tokens-tested"]["shared_bytes"]


def test_hopper_bf16_kernels_compile_and_fit(hopper_bf16):
    hopper_bf16 = [r for r in hopper_bf16 if r["variant"] not in TOKEN_VARIANTS]
    assert {(r["kernel"], r["head_dim"], r["variant"]) for r in hopper_bf16} == {
        (k, d, v) for k, v in KERNEL_VARIANTS for d in PADDED_HEAD_DIMS if v == "causal" or d in (64, 128)}
    assert not _too_big(hopper_bf16), _too_big(hopper_bf16)
    # specialised as for real inputs: the d128 forward holds its K/V pipeline in shared memory
    fwd128 = next(r for r in hopper_bf16 if r["kernel"] == "fwd" and r["head_dim"] == 128)
    assert fwd128["shared_bytes"] > HOPPER.shared_memory_bytes // 2


@pytest.mark.parametrize("kernel, variant", [(k, v) for k, v in KERNEL_VARIANTS if k not in PREPROCESS])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_bf16_kernels_use_wgmma_and_async_copies(hopper_bf16, kernel, head_dim, variant):
    (result,) = [r for r in hopper_bf16 if r["kernel"] == kernel and r["head_dim"] == head_dim
                 and r["variant"] == variant]
    assert {"wgmma", "cp.async"} <= set(result["ptx_features"]), result["ptx_features"]


def test_merging_into_the_accumulator_costs_no_registers_at_the_common_head_dims(hopper_bf16):
    """The forward that merges into a ring's accumulator and the dQ kernel that adds into
    one hold a second float32 tile in their epilogues: at d64 and d128 they must spill no
    more than the plain kernels (none, on sm_90 bf16), and the dK/dV kernel writing float32
    no more than the one writing bf16; d256's tiles spill in both (kernels/NOTES.md). The
    same tile takes the same shared memory (the d128 dQ into kernel has its own tile)."""
    usage = {(r["kernel"], r["head_dim"], r["variant"]): r for r in hopper_bf16}
    for head_dim in (64, 128):
        for plain, into in (("fwd", "fwd_into"), ("bwd_dq", "bwd_dq_into"), ("bwd_dkdv", "bwd_dkdv_into")):
            plain, into = usage[plain, head_dim, "causal"], usage[into, head_dim, "causal"]
            if plain["stack_bytes"] is None:
                pytest.skip("this Triton ships no cuobjdump to read registers with")
            assert into["stack_bytes"] <= plain["stack_bytes"], (head_dim, plain, into)  # d128 dQ: two tiles
            if (into["block_m"], into["block_n"], into["num_warps"], into["num_stages"]) == (
                    plain["block_m"], plain["block_n"], plain["num_warps"], plain["num_stages"]):
                assert into["shared_bytes"] == plain["shared_bytes"], (head_dim, plain, into)
        assert usage["fwd_into", head_dim, "causal"]["stack_bytes"] == usage["bwd_dq_into", head_dim, "causal"][
            "stack_bytes"] == 0
    # the dK/dV kernel's d64 tile (16 x 64, 4 warps, from the H200 tune) spills nothing;
    # the 32 x 128 tile spilled 584 bytes per thread with 4 warps
    assert usage["bwd_dkdv", 64, "causal"]["stack_bytes"] == 0


def test_specialisation_follows_the_jit():
    """Our rules give what Triton's own specialiser gives for the launchers' arguments."""
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from usp.kernels.aot import _launches, specialization

    launches = [launch for variant in VARIANTS
                for launch in _launches(HOPPER, 128, torch.bfloat16, variant).values()]
    values = [value for launch in launches for value in launch.args] + [1, 16, 17, 2 ** 40, 0.5, True, None]
    for value in values:
        kind, spec = native(BaseBackend, value, False, True, True)[:2]
        assert specialization(value) == (kind, spec == "D"), value


@pytest.fixture(scope="module")
def every_family():
    return _compile([["--family", "sm90", *_EVERY_VARIANT], ["--family", "sm80", "--family", "sm86", *_EVERY_VARIANT]])


@pytest.mark.slow
def test_every_table_entry_is_compiled_and_fits(every_family):
    built = {(r["family"], r["kernel"], r["head_dim"], r["dtype"], r["variant"]) for r in every_family}
    expected = {(f.name, k, d, t, v) for f in GPU_FAMILIES for k, v in KERNEL_VARIANTS for d in PADDED_HEAD_DIMS
                for t in ("bf16", "fp32")}
    assert built == expected
    assert not _too_big(every_family), _too_big(every_family)
