"""Attention with autograd composed from the local kernels and the communication layer:
ring, Ulysses and USP attention on local sequence shards, the sharding helpers, and
the float64 oracle."""

from .layout import LAYOUTS
from .naive import document_mask, naive_attention
from .sequence import gather_sequence, pad_documents, sequence_positions, shard_sequence
from .functions import USPAttention, ring_attention, ulysses_attention, usp_attention
from .compat import LongContextAttention

__all__ = ["LAYOUTS", "LongContextAttention", "USPAttention", "document_mask", "gather_sequence", "naive_attention",
           "pad_documents", "ring_attention", "sequence_positions", "shard_sequence", "ulysses_attention",
           "usp_attention"]
