"""Compile every GPU kernel configuration ahead of time, on a machine without a GPU.

``python -m usp.kernels.aot [--family sm90] [--json]`` builds, for each config table entry,
each kernel the launchers would start (forward, the forward merging into a ring's
accumulator, backward preprocess, dK/dV, dQ), for
bf16 and fp32, and each mask variant (``MASK_VARIANTS``: full, causal, packed
documents with a causal sliding window, and that window by token, with and without
spans), into a cubin for the family's target with
``triton.compile``, and reports the shared memory each needs against the family's
limit, the PTX features it uses (wgmma, cp.async, TMA, vector loads), and, where
Triton ships ``cuobjdump``, the registers per thread and the stack bytes (register spills)
of the cubin. It uses the
launchers' own argument lists on meta tensors, specialised as Triton's JIT specialises
real inputs (``specialization``), so what is compiled is what runs (causal launches with
their tiles across heads, ``tiles_across_heads``; on a GPU with many heads they go head
after head, a few integer operations apart). Compiled kernels
land in Triton's cache, keyed by source and specialisation, so a second run is quick.
Run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .configs import GPU_FAMILIES, KERNELS, PADDED_HEAD_DIMS, GpuFamily, config_for_dtype, interpreter_active
from .flash_bwd import backward_launches
from .flash_fwd import forward_launch
from .tokens import TokenPositions
from .triton_common import Launch, MaskSpec

# Sequence lengths that are not multiples of any tile, so the masked variants are built.
_SEQLEN_Q, _SEQLEN_K = 1000, 1100
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32"}


@dataclass
class CompileResult:
    family: str
    kernel: str
    head_dim: int
    dtype: str
    variant: str  # a key of MASK_VARIANTS
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    shared_bytes: int
    shared_limit: int
    seconds: float
    ptx_features: list[str]  # of "wgmma", "cp.async", "tma", "vector loads": what the PTX uses
    registers: int | None = None  # per thread, from the cubin (None: no cuobjdump)
    stack_bytes: int | None = None  # per thread: register spills (0: none)

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= self.shared_limit


def specialization(value) -> tuple[str, bool]:
    """How Triton's JIT specialises one runtime argument of a real launch: its signature
    type and whether it gets ``tt.divisibility`` 16 (a pointer aligned to 16 bytes, an
    integer divisible by 16), or ``("constexpr", False)`` for an integer equal to 1 (a
    unit stride), which the JIT compiles in as a constant. Compiling without these would
    check a different kernel (for sm_90 d128 bf16, a forward with 49 KB of shared memory
    and scalar loads instead of 131 KB, vector loads and cp.async)."""
    if value is None:  # an unused optional pointer (no document offsets, no visit counts)
        return "constexpr", False
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"no Triton signature type for {type(value).__name__}")


def compile_launch(launch: Launch, capability: tuple[int, int]):
    """Compile one launch, specialised as the JIT would, for ``sm_<capability>``; Triton's compiled kernel."""
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for index, (name, value) in enumerate(zip(launch.kernel.arg_names, launch.args)):
        signature[name], divisible = specialization(value)
        if signature[name] == "constexpr":
            constexprs[name] = value
        elif divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in launch.constexprs})
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    return triton.compile(source, target=target,
                          options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


# The mask variants the launchers build: no mask, causal, packed documents with a causal
# sliding window (LEFT, RIGHT, VARLEN), and a causal sliding window by token (LEFT, RIGHT,
# TOKENS), with the spans the sequence-parallel layers find for their blocks of shards
# (tokens-window) and without, every block tested (tokens-tested: positions given alone).
MASK_VARIANTS = ("full", "causal", "packed-window", "tokens-window", "tokens-tested")
# The kernels into float32 buffers serve ring steps, dense (causal covers the full variant's
# code paths) or masked by token: the forward merging into (out, lse) and the dQ kernel adding
# into dQ (a table row of its own, ``bwd_dq_into``, so its own tile) in both; the dK/dV kernel
# writing float32 and the preprocess at the dQ-into tiling differ from the plain ones in their
# epilogue or tiling only: with the causal variant.
ACCUMULATE_VARIANTS = ("causal", "tokens-window", "tokens-tested")


def _mask(variant: str) -> MaskSpec:
    if variant in ("tokens-window", "tokens-tested"):
        q_side, k_side = (_meta(n, dtype=torch.int32) for n in (_SEQLEN_Q, _SEQLEN_K))
        spans = (None, None, None)
        if variant == "tokens-window":
            spans = (*(_meta(2, n, dtype=torch.int32) for n in (_SEQLEN_Q, _SEQLEN_K)), (256, 0))
        return MaskSpec(left=256, right=0, tokens=TokenPositions(q_side, q_side, k_side, k_side, *spans))
    if variant == "packed-window":
        offsets = _meta(5, dtype=torch.int32)
        return MaskSpec(left=256, right=0, cu_seqlens_q=offsets, cu_seqlens_k=offsets,
                        max_seqlen_q=_SEQLEN_Q, max_seqlen_k=_SEQLEN_Q)
    return MaskSpec(right=0) if variant == "causal" else MaskSpec()


def _launches(family: GpuFamily, head_dim: int, dtype: torch.dtype, variant: str) -> dict[str, Launch]:
    configs = {name: config_for_dtype(family.table[name][head_dim], dtype) for name in KERNELS}
    mask = _mask(variant)
    if mask.varlen:  # packed [total, H, D] tensors, lse [H, total]
        q = _meta(_SEQLEN_Q, 4, head_dim, dtype=dtype)
        k = _meta(_SEQLEN_Q, 2, head_dim, dtype=dtype)
        lse = _meta(4, _SEQLEN_Q, dtype=torch.float32)
    else:
        q = _meta(1, _SEQLEN_Q, 4, head_dim, dtype=dtype)
        k = _meta(1, _SEQLEN_K, 2, head_dim, dtype=dtype)
        lse = _meta(1, 4, _SEQLEN_Q, dtype=torch.float32)
    fwd = forward_launch(q, k, k, q, lse, mask=mask, scale=head_dim**-0.5, config=configs["fwd"])
    pre, dkdv, dq = backward_launches(q, q, k, k, q, lse, lse, lse, q, k, k, mask=mask,
                                      scale=head_dim**-0.5, configs=configs)
    launches = {"fwd": fwd, "bwd_preprocess": pre, "bwd_dkdv": dkdv, "bwd_dq": dq}
    q32, k32 = (_meta(*x.shape, dtype=torch.float32) for x in (q, k))
    if variant in ACCUMULATE_VARIANTS:  # merging into a float32 out and lse, adding into a float32 dQ
        launches["fwd_into"] = forward_launch(q, k, k, q32, lse, mask=mask, scale=head_dim**-0.5,
                                              config=configs["fwd"], accumulate=True)
        pre_into, dkdv_into, launches["bwd_dq_into"] = backward_launches(
            q, q, k, k, q, lse, lse, lse, q32, k32, k32, mask=mask, scale=head_dim**-0.5,
            configs=configs, accumulate=True)
        if variant == "causal":
            launches["bwd_preprocess_into"], launches["bwd_dkdv_into"] = pre_into, dkdv_into
    return launches


PTX_FEATURES = {"wgmma": "wgmma.mma_async", "cp.async": "cp.async", "tma": "cp.async.bulk.tensor",
                "vector loads": "ld.global.v4"}


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """Registers per thread and stack bytes (spills) of a cubin's kernel, read by the
    ``cuobjdump`` that ships with Triton's NVIDIA backend; ``(None, None)`` without it."""
    tool = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
    if not tool.exists():
        return None, None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        report = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return (int(match[1]), int(match[2])) if match else (None, None)


def ptx_features(ptx: str) -> list[str]:
    """The features of ``PTX_FEATURES`` a kernel's PTX uses."""
    return [name for name, instruction in PTX_FEATURES.items() if instruction in ptx]


def compile_family(family: GpuFamily, head_dims=PADDED_HEAD_DIMS, dtypes=(torch.bfloat16, torch.float32),
                   variants=MASK_VARIANTS, progress=None) -> list[CompileResult]:
    """Compile every kernel of every table entry of ``family``; one result per kernel."""
    results = []
    for head_dim in head_dims:
        for dtype in dtypes:
            for variant in variants:
                for name, launch in _launches(family, head_dim, dtype, variant).items():
                    if name == "bwd_preprocess" and variant != variants[0]:
                        continue  # the preprocess has no mask: build it once
                    start = time.perf_counter()
                    compiled = compile_launch(launch, family.capability)
                    result = CompileResult(
                        family.name, name, head_dim, _TRITON_TYPES[dtype], variant,
                        launch.constexprs["BLOCK_M"], launch.constexprs.get("BLOCK_N", 0),
                        launch.num_warps, launch.num_stages, compiled.metadata.shared,
                        family.shared_memory_bytes, time.perf_counter() - start, ptx_features(compiled.asm["ptx"]),
                        *resource_usage(compiled.asm["cubin"]))
                    results.append(result)
                    if progress:
                        progress(result)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usp.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=[f.name for f in GPU_FAMILIES], action="append",
                        help="config table to compile (repeatable; default: all)")
    parser.add_argument("--head-dim", type=int, action="append", choices=PADDED_HEAD_DIMS,
                        help="padded head dim to compile (repeatable; default: all)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], action="append",
                        help="input dtype to compile (repeatable; default: both)")
    parser.add_argument("--variant", choices=MASK_VARIANTS, action="append",
                        help="mask variant to compile (repeatable; default: all)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = parser.parse_args(argv)
    if interpreter_active():
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    families = [f for f in GPU_FAMILIES if not args.family or f.name in args.family]
    head_dims = tuple(args.head_dim or PADDED_HEAD_DIMS)
    dtypes = tuple(dtype for dtype, name in _TRITON_TYPES.items() if name in (args.dtype or ("bf16", "fp32")))

    def show(r: CompileResult) -> None:
        if not args.json:
            print(f"{r.family} {r.kernel:<14} d={r.head_dim:<3} {r.dtype:<4} {r.variant:<13} "
                  f"tile={r.block_m}x{r.block_n} warps={r.num_warps} stages={r.num_stages} "
                  f"smem={r.shared_bytes}/{r.shared_limit} {'ok' if r.fits else 'TOO BIG'} "
                  f"regs={r.registers} stack={r.stack_bytes} "
                  f"[{', '.join(r.ptx_features)}] ({r.seconds:.1f}s)",
                  flush=True)

    variants = tuple(v for v in MASK_VARIANTS if v in (args.variant or MASK_VARIANTS))
    results = [r for family in families
               for r in compile_family(family, head_dims, dtypes, variants, progress=show)]
    if args.json:
        print(json.dumps([asdict(r) | {"fits": r.fits} for r in results]))
    return 0 if all(r.fits for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
