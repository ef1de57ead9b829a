"""Moving tensors between ranks: the device mesh, ring point-to-point and all-to-all.

``init_mesh`` builds the ``dp x ulysses x ring`` groups; ``RingComm`` rotates blocks
around a ring with the next transfer in flight during compute; ``seq_to_head`` and
``head_to_seq`` are the Ulysses all-to-alls; ``record_traffic`` counts what was sent.
"""

from .all_to_all import head_to_seq, replicate_kv_heads, seq_to_head
from .mesh import PLACEMENTS, Mesh, init_mesh
from .ring import RingComm
from .traffic import TrafficLog, record_traffic

__all__ = ["Mesh", "PLACEMENTS", "RingComm", "TrafficLog", "head_to_seq", "init_mesh", "record_traffic",
           "replicate_kv_heads", "seq_to_head"]
