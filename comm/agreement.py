"""Make ranks that disagree about a collective call fail loudly instead of hanging or
computing on garbage (gloo accepts a shorter message into a longer buffer).

Each rank describes its call as named fields; one small all-gather of one integer code
per field shows every rank the whole table, so every rank raises the same
``ValueError`` when any field differs (and only then exchanges the readable values for
the message).
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from . import traffic


def _code(value) -> int:
    """One int64 per field value, equal in every process for equal values (``repr`` of
    ints, floats, bools, dtypes and strings is exact; sequences become tuples)."""
    text = repr(tuple(value)) if isinstance(value, (tuple, list, torch.Size)) else repr(value)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def ensure_ranks_agree(group: dist.ProcessGroup, what: str, fields: dict, device: torch.device) -> None:
    """Raise a ValueError on every rank of ``group`` unless all ranks pass equal ``fields``
    (``{name: value}``; values are compared by ``repr``, so pass plain values, not objects).

    ``device``: where the exchanged tensor lives for a non-gloo (NCCL) group. Costs one
    all-gather of ``len(fields) + 1`` integers (on a GPU also a host synchronisation).
    """
    size = dist.get_world_size(group)
    if size == 1:
        return
    if dist.get_backend(group) == "gloo":
        device = torch.device("cpu")
    # The field names lead, so calls describing different things cannot line up silently;
    # every rank sends the same number of integers whatever the values.
    codes = [_code(tuple(fields))] + [_code(value) for value in fields.values()]
    mine = torch.tensor(codes, dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(size)]
    traffic.note(traffic.CHECK, mine.numel() * mine.element_size() * (size - 1), size - 1, what)
    dist.all_gather(table, mine, group=group)
    if all(torch.equal(row, table[0]) for row in table):
        return
    readable = [None] * size
    dist.all_gather_object(readable, {name: str(value) for name, value in fields.items()}, group=group)
    differing = [name for name in fields if len({r.get(name) for r in readable}) > 1]
    ranks = dist.get_process_group_ranks(group)
    detail = "; ".join(f"rank {rank}: " + ", ".join(f"{name}={r.get(name)}" for name in differing)
                       for rank, r in zip(ranks, readable))
    raise ValueError(f"the ranks of the group disagree on {what} ({', '.join(differing)}): {detail}")


def call_fields(q, k, v, causal: bool, softmax_scale: float, layout: str, backend: str) -> dict:
    """The fields every rank of an attention call must agree on."""
    return dict(q_shape=tuple(q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape), dtype=q.dtype,
                causal=causal, softmax_scale=softmax_scale, layout=layout, backend=backend)


def collective_device() -> torch.device:
    """The device for this process's collectives on a group that may be NCCL: its current GPU, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
