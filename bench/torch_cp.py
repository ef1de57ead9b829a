"""PyTorch's own context parallel (``torch.distributed.tensor.experimental``) as a
reference for ``usp-bench scaling``: SDPA on DTensors sharded along the sequence, run by
torch's ring, with K/V rotated by one all-gather per call (``allgather``) or by an
all-to-all per step (``alltoall``), and head-tail load balancing when causal: rank i
holds chunks i and 2N-1-i of the sequence, which is our zigzag layout, so both get the
very same shards.

On CUDA, torch's handlers run as shipped. On CPU, SDPA on a DTensor reaches
``aten._scaled_dot_product_flash_attention_for_cpu``, which torch's context parallel does
not handle. ``install`` hands that op and its backward to the templated ring loops torch
runs for its CUDA kernels (``_templated_ring_attention`` and its backward), with every
input and output sharded on the sequence (dim 2 of ``[B, H, S, D]``). Torch's ring,
merge and rotations run unchanged; the shim only routes the CPU op to them. It uses
torch's private names, so it lives here, in the benchmark, and never in the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SEQ_DIM = 2  # of [B, H, S, D], as torch's ring assumes
aten = torch.ops.aten


def _ring_module():
    from torch.distributed.tensor.experimental._context_parallel import _attention
    return _attention


def _dtensor_outputs(tensors, mesh):
    from torch.distributed.tensor import DTensor, Shard
    return tuple(DTensor.from_local(t, mesh, [Shard(SEQ_DIM)], run_check=False) for t in tensors)


def _cpu_forward(op_call, args, kwargs):
    """SDPA's CPU op on DTensors: torch's ring over the local shards -> (out, lse) DTensors."""
    from torch.distributed.tensor import DTensor
    info = DTensor._op_dispatcher.unwrap_to_op_info(op_call, args, kwargs)
    q, k, v, *rest = info.local_args
    options = dict(zip(("dropout_p", "is_causal"), rest), **info.local_kwargs)
    is_causal = options.pop("is_causal", False)
    out, lse = _ring_module()._templated_ring_attention(
        info.compute_mesh.get_group(), SEQ_DIM, aten._scaled_dot_product_flash_attention_for_cpu, q, k, v,
        is_causal=is_causal, **options)
    return _dtensor_outputs((out, lse), info.compute_mesh)


def _cpu_backward(op_call, args, kwargs):
    """The CPU op's backward on DTensors: torch's ring backward -> (dq, dk, dv) DTensors."""
    from torch.distributed.tensor import DTensor
    info = DTensor._op_dispatcher.unwrap_to_op_info(op_call, args, kwargs)
    grad_out, q, k, v, out, lse, dropout_p, is_causal = info.local_args
    grads = _ring_module()._templated_ring_attention_backward(
        info.compute_mesh.get_group(), SEQ_DIM, aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
        grad_out=grad_out, grad_out_name="grad_out", query=q, key=k, value=v, out=out, logsumexp=lse,
        is_causal=is_causal, dropout_p=dropout_p, **info.local_kwargs)
    return _dtensor_outputs(grads[:3], info.compute_mesh)


def install() -> None:
    """Turn on torch's context-parallel dispatch (CUDA ops) and add the CPU op's handlers.
    Only DTensor calls of these ops are affected; calling it again changes nothing."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental._attention import _enable_context_parallel_dispatcher
    handlers = DTensor._op_dispatcher._custom_op_handlers
    if aten._scaled_dot_product_flash_attention_for_cpu.default in handlers:
        return
    _enable_context_parallel_dispatcher()
    handlers = DTensor._op_dispatcher._custom_op_handlers  # replaced by the call above
    handlers[aten._scaled_dot_product_flash_attention_for_cpu.default] = _cpu_forward
    handlers[aten._scaled_dot_product_flash_attention_for_cpu_backward.default] = _cpu_backward


def context_parallel_attention(group, rotate: str, causal: bool, balanced: bool):
    """``(q, k, v) -> out`` on this rank's shards ``[B, S_local, H, D]`` (K/V may have fewer
    heads) by torch's context parallel over ``group``. ``rotate``: "allgather" or
    "alltoall"; ``balanced``: the shards are head-tail (zigzag) ones, which torch's causal
    ring then expects."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.experimental._attention import _cp_options, set_rotate_method
    install()
    mesh = None

    def call(q, k, v):
        nonlocal mesh
        if mesh is None:
            mesh = DeviceMesh.from_group(group, q.device.type)
        set_rotate_method(rotate)  # torch keeps these options globally; both passes read them
        _cp_options.enable_load_balance = causal and balanced
        q, k, v = (DTensor.from_local(x.transpose(1, 2), mesh, [Shard(SEQ_DIM)], run_check=False)
                   for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
        return out.to_local().transpose(1, 2)
    return call
