"""Other projects' sequence-parallel attention, timed by ``usp-bench scaling`` beside
ours: the same inputs on the same processes, repeats interleaved with ours.

A reference runs where its package is installed and it can run the case; otherwise the
run says why it was left out. It wraps the local attention ours uses (the same
backend), so what differs is the distributed part. Each reference record carries our
time over its time (``usp_over_reference``: below 1, ours is faster) and the largest
difference between its output (and gradients) and ours on the same inputs.

``torch-cp-allgather`` and ``torch-cp-alltoall`` are PyTorch's context parallel ring
(``bench/torch_cp.py``) on ring meshes, K/V rotated by one all-gather or an all-to-all
per step. ``yunchang`` is the paper's own ``LongContextAttention`` on our groups (on a
CPU through its torch "math" path, forward only: it returns no usable LSE there, so its
ring merges are wrong, which its error column shows). ``usp-unchecked`` (only when asked
for) is ours without the rank-agreement check (``check_ranks=False``; ours is timed as
called by default, with it): its ratio is what the check costs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

from usp.attention import usp_attention
from usp.attention.layout import LAYOUTS
from usp.kernels import local_attention


@dataclass(frozen=True)
class Reference:
    """One other implementation: what it needs, which of our meshes it matches, when it
    cannot run a case, and how to build its call ``(q, k, v) -> out`` on local shards."""

    name: str
    package: str  # the module that must import ("" for none)
    install: str  # how to install it, for the skip message
    method: str  # the meshes it runs on: "ring" (u = 1), "ulysses" (r = 1), or "any"
    why_not: Callable[[int, int, int, int], str | None]  # (u, r, heads, kv_heads) -> reason, or None
    build: Callable  # (mesh, settings of usp-bench scaling) -> call
    by_default: bool = True  # timed unless --reference names others
    cpu_passes: tuple = ("fwd", "fwd+bwd")  # what it can run on a CPU (on GPUs: every pass)
    ring_layouts: tuple = LAYOUTS  # the shard layouts it reads on meshes with a ring

    def missing(self) -> str | None:
        """Why the reference cannot run on this machine at all, or None."""
        try:
            found = not self.package or importlib.util.find_spec(self.package) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        return None if found else f"{self.package} is not installed ({self.install})"


def _always(u: int, r: int, heads: int, kv_heads: int) -> None:
    return None


def _unchecked_build(mesh, settings):
    return lambda q, k, v: usp_attention(q, k, v, mesh, settings.causal, None, settings.layout, settings.backend,
                                         check_ranks=False)


def _several_ranks(u: int, r: int, heads: int, kv_heads: int) -> str | None:
    return "one rank: nothing to parallelise" if u * r == 1 else None


def _torch_cp_build(rotate: str):
    def build(mesh, settings):
        from .torch_cp import context_parallel_attention
        return context_parallel_attention(mesh.ring_group, rotate, settings.causal, settings.layout == "zigzag")
    return build


def _yunchang_build(mesh, settings):
    from yunchang import LongContextAttention
    from yunchang.globals import PROCESS_GROUP
    from yunchang.kernels import AttnType
    PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = mesh.ulysses_group, mesh.ring_group  # ours, not new ones
    on_cpu = dist.get_backend() == "gloo"
    attention = LongContextAttention(ring_impl_type="zigzag" if settings.layout == "zigzag" else "basic",
                                     attn_type=AttnType.TORCH_MATH if on_cpu else AttnType.FA)
    return lambda q, k, v: attention(q, k, v, causal=settings.causal)


def _deepspeed_why_not(u: int, r: int, heads: int, kv_heads: int) -> str | None:
    if kv_heads < u:
        return f"DeepSpeed-Ulysses needs a K/V head per rank ({kv_heads} K/V heads, {u} ranks)"
    return None


def _deepspeed_build(mesh, settings):
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)  # adopts the existing group
    attention = DistributedAttention(lambda q, k, v: local_attention(q, k, v, settings.causal,
                                                                     backend=settings.backend),
                                     mesh.ulysses_group, scatter_idx=2, gather_idx=1)  # [B, S, H, D]
    return lambda q, k, v: attention(q, k, v, 0)


def _yunchang_why_not(u: int, r: int, heads: int, kv_heads: int) -> str | None:
    if heads != kv_heads:
        return f"yunchang's all-to-all needs as many K/V heads as query heads ({kv_heads} and {heads})"
    if heads % u:
        return f"yunchang's all-to-all needs heads divisible by the Ulysses degree ({heads} heads, {u} ranks)"
    return _several_ranks(u, r, heads, kv_heads)


TORCH_CP = "torch.distributed.tensor.experimental._context_parallel"
TWO_CHUNK_LAYOUTS = ("contiguous", "zigzag")  # the ones torch's context parallel and yunchang shard as we do
REFERENCES = {
    "torch-cp-allgather": Reference("torch-cp-allgather", TORCH_CP, "torch >= 2.9", "ring", _several_ranks,
                                    _torch_cp_build("allgather"), ring_layouts=TWO_CHUNK_LAYOUTS),
    "torch-cp-alltoall": Reference("torch-cp-alltoall", TORCH_CP, "torch >= 2.9", "ring", _several_ranks,
                                   _torch_cp_build("alltoall"), ring_layouts=TWO_CHUNK_LAYOUTS),
    "usp-unchecked": Reference("usp-unchecked", "", "", "any", _always, _unchecked_build, by_default=False),
    "deepspeed-ulysses": Reference("deepspeed-ulysses", "deepspeed", "DS_BUILD_OPS=0 pip install deepspeed",
                                   "ulysses", _deepspeed_why_not, _deepspeed_build),
    # yunchang on a CPU: its torch "math" path, forward only (its torch backward raises)
    "yunchang": Reference("yunchang", "yunchang", "pip install yunchang", "any", _yunchang_why_not,
                          _yunchang_build, cpu_passes=("fwd",), ring_layouts=TWO_CHUNK_LAYOUTS),
}
