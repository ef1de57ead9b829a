"""Moving tensors between ranks: the device mesh, ring point-to-point and all-to-all.

``init_mesh`` builds the ``dp x ulysses x ring`` groups; ``RingComm`` posts transfers
to the next rank of a ring and waits for them when asked, so a loop can compute while
they travel; ``seq_to_head`` and ``head_to_seq`` are the Ulysses all-to-alls (``heads``
says how heads split over them); ``record_traffic`` counts what was sent.
"""

from .all_to_all import head_to_seq, seq_to_head
from .heads import replicate_kv_heads
from .mesh import PLACEMENTS, Mesh, init_mesh, mesh_shapes
from .ring import RingComm, RingTransport
from .traffic import TrafficLog, record_traffic

__all__ = ["Mesh", "PLACEMENTS", "RingComm", "RingTransport", "TrafficLog", "head_to_seq", "init_mesh",
           "mesh_shapes", "record_traffic", "replicate_kv_heads", "seq_to_head"]
