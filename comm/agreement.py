"""Make ranks that disagree about a collective call fail loudly instead of hanging or
computing on garbage (gloo accepts a shorter message into a longer buffer).

Each rank describes its call as named fields; one small all-gather of their integer
codes shows every rank the whole table, so every rank raises the same ``ValueError``
when any field differs (and only then exchanges the readable values for the message).
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from . import traffic


def _codes(value) -> list[int]:
    """Stable integers for a field value (the same in every process)."""
    if isinstance(value, (tuple, list, torch.Size)):
        return [int(v) for v in value]
    if isinstance(value, bool):
        return [int(value)]
    if isinstance(value, float):
        return [int(torch.tensor([value], dtype=torch.float64).view(torch.int64).item())]
    return [zlib.crc32(str(value).encode())]


def ensure_ranks_agree(group: dist.ProcessGroup, what: str, fields: dict, device: torch.device) -> None:
    """Raise a ValueError on every rank of ``group`` unless all ranks pass equal ``fields``
    (``{name: shape tuple, bool, float or anything with a stable str}``).

    ``device``: where the exchanged tensor lives for a non-gloo (NCCL) group. Costs one
    all-gather of a few integers (on a GPU also a host synchronisation).
    """
    size = dist.get_world_size(group)
    if size == 1:
        return
    if dist.get_backend(group) == "gloo":
        device = torch.device("cpu")
    codes = [c for value in fields.values() for c in _codes(value)]
    # The count leads, so calls describing different field lists cannot line up silently.
    mine = torch.tensor([len(codes)] + codes, dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(size)]
    traffic.note("check", mine.numel() * mine.element_size() * (size - 1), size - 1, what)
    dist.all_gather(table, mine, group=group)
    if all(torch.equal(row, table[0]) for row in table):
        return
    readable = [None] * size
    dist.all_gather_object(readable, {name: str(value) for name, value in fields.items()}, group=group)
    differing = [name for name in fields if len({r[name] for r in readable}) > 1]
    ranks = dist.get_process_group_ranks(group)
    detail = "; ".join(f"rank {rank}: " + ", ".join(f"{name}={r[name]}" for name in differing)
                       for rank, r in zip(ranks, readable))
    raise ValueError(f"the ranks of the group disagree on {what} ({', '.join(differing)}): {detail}")


def call_fields(q, k, v, causal: bool, softmax_scale: float, layout: str, backend: str) -> dict:
    """The fields every rank of an attention call must agree on."""
    return dict(q_shape=tuple(q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape), dtype=q.dtype,
                causal=causal, softmax_scale=softmax_scale, layout=layout, backend=backend)
