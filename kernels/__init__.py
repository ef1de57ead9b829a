"""Attention on one device: Triton flash-attention kernels that return the log-sum-exp,
PyTorch's fused ops, plain torch math, and the exact LSE merge of partial results.

Tensors are ``[B, S, H, D]``; the LSE is natural log, ``[B, Hq, Sq]``, float32 (float64
for float64 inputs on the torch and naive backends). Packed documents (flash-attn's
varlen layout) are ``[total, H, D]`` with int32 offsets ``cu_seqlens`` and an LSE of
``[Hq, total_q]``. Every function takes flash-attn's sliding ``window_size``; the
backends also take a mask given token by token (``TokenPositions``: each query's and
key's global position and document), which sequence-parallel shards need.
To run the Triton kernels on a CPU, set ``TRITON_INTERPRET=1`` before importing this.
"""

from .autograd import flash_attn_func, local_attention
from .backends import BACKENDS, Backend, FunctionBackend, get_backend
from .checks import AttentionShape
from .flash_bwd import flash_attn_backward, flash_attn_backward_into, flash_attn_varlen_backward
from .flash_fwd import flash_attn_forward, flash_attn_forward_into, flash_attn_varlen_forward
from .merge import merge_attention
from .tokens import TokenPositions
from .varlen import flash_attn_varlen_func, varlen_backward, varlen_forward

__all__ = [
    "AttentionShape", "BACKENDS", "Backend", "FunctionBackend", "TokenPositions", "flash_attn_backward",
    "flash_attn_backward_into", "flash_attn_forward", "flash_attn_forward_into", "flash_attn_func",
    "flash_attn_varlen_backward", "flash_attn_varlen_forward", "flash_attn_varlen_func", "get_backend",
    "local_attention", "merge_attention", "varlen_backward", "varlen_forward",
]
