"""Attention with autograd composed from the local kernels and the communication layer."""

from .naive import naive_attention

__all__ = ["naive_attention"]
