"""Attention on one device: Triton flash-attention kernels that return the log-sum-exp,
PyTorch's fused ops, plain torch math, and the exact LSE merge of partial results.

Tensors are ``[B, S, H, D]``; the LSE is natural log, ``[B, Hq, Sq]``, float32 (float64
for float64 inputs on the torch and naive backends).
To run the Triton kernels on a CPU, set ``TRITON_INTERPRET=1`` before importing this.
"""

from .autograd import flash_attn_func, local_attention
from .backends import BACKENDS, Backend, FunctionBackend, get_backend
from .checks import AttentionShape
from .flash_bwd import flash_attn_backward
from .flash_fwd import flash_attn_forward
from .merge import merge_attention

__all__ = [
    "AttentionShape", "BACKENDS", "Backend", "FunctionBackend", "flash_attn_backward", "flash_attn_forward",
    "flash_attn_func", "get_backend", "local_attention", "merge_attention",
]
