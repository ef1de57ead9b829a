"""Make ranks that disagree about a collective call fail loudly instead of hanging or
computing on garbage (gloo accepts a shorter message into a longer buffer).

Each rank describes its call as named fields; one all-gather of two integers (a hash of
the call's name and field names, and one of the values) shows every rank whether all
agree, so every rank raises the same ``ValueError`` when any field differs (and only then
exchanges the readable values for the message). ``ranks_agree`` wraps a call's argument
checks too: a rank whose own arguments are bad tells the others, instead of raising
alone and leaving them waiting in the next collective.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from . import traffic


def _code(value: tuple) -> int:
    """An int64 equal in every process for equal tuples of strings, ints, floats and bools
    (their ``repr`` is exact)."""
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:8], "little", signed=True)


def ensure_ranks_agree(group: dist.ProcessGroup, what: str, fields: dict, device: torch.device) -> None:
    """Raise a ValueError on every rank of ``group`` unless all ranks pass equal ``what``
    and ``fields`` (``{name: value}``; values are compared by ``repr``, so pass plain
    values, not objects).

    ``device``: where the exchanged tensor lives for a non-gloo (NCCL) group. Costs one
    all-gather of two integers (on a GPU also a host synchronisation); every rank sends
    two whatever it describes, so different calls cannot misalign the exchange.
    """
    size = dist.get_world_size(group)
    if size == 1:
        return
    if dist.get_backend(group) == "gloo":
        device = torch.device("cpu")
    canonical = {name: value if isinstance(value, (str, int, float, bool)) else str(value)
                 for name, value in fields.items()}
    mine = torch.tensor([_code((what, *canonical)), _code(tuple(canonical.values()))], dtype=torch.int64,
                        device=device)
    table = [torch.empty_like(mine) for _ in range(size)]
    traffic.note(traffic.CHECK, mine.numel() * mine.element_size() * (size - 1), size - 1, what)
    dist.all_gather(table, mine, group=group)
    if all(torch.equal(row, table[0]) for row in table):
        return
    readable = [None] * size
    dist.all_gather_object(readable, (what, {name: str(value) for name, value in fields.items()}), group=group)
    names = list(dict.fromkeys(name for _, r in readable for name in r))
    differing = [name for name in names if len({r.get(name, "-") for _, r in readable}) > 1]
    if "error" in differing:  # some ranks' own arguments were wrong: that is the news
        differing = ["error"]
        readable = [(call, dict(r, error=r.get("error") or "none")) for call, r in readable]
    ranks = dist.get_process_group_ranks(group)
    detail = "; ".join(f"rank {rank}: " + (f"{call}, " if call != what else "")
                       + ", ".join(f"{name}={r.get(name, '-')}" for name in differing)
                       for rank, (call, r) in zip(ranks, readable))
    raise ValueError(f"the ranks of the group disagree on {what} ({', '.join(differing) or 'the call'}): {detail}")


class ranks_agree:
    """Check a collective call's arguments inside the block and set ``fields``; leaving
    it, the ranks of ``group`` make sure they all agree (``ensure_ranks_agree``), unless
    ``enabled`` is false. A ValueError or TypeError raised inside the block is part of
    what they compare: when every rank raised the same one, each raises it; when only
    some did, every rank raises the disagreement, which names each rank's error.

        with ranks_agree(group, "ring_attention", device, check_ranks) as call:
            ...argument checks...
            call.fields = dict(...)
    """

    def __init__(self, group: dist.ProcessGroup, what: str, device: torch.device, enabled: bool = True):
        self.group, self.what, self.device, self.enabled = group, what, device, enabled
        self.fields: dict = {}

    def __enter__(self) -> "ranks_agree":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if self.enabled and (error is None or isinstance(error, (ValueError, TypeError))):
            problem = "" if error is None else f"{type(error).__name__}: {error}"
            ensure_ranks_agree(self.group, self.what, {"error": problem, **(self.fields if error is None else {})},
                               self.device)
        return False  # a rank's own error goes on when every rank had it


def call_fields(q, k, v, causal: bool, softmax_scale: float, layout: str, backend: str) -> dict:
    """The fields every rank of an attention call must agree on."""
    return dict(q_shape=tuple(q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape), dtype=q.dtype,
                causal=causal, softmax_scale=softmax_scale, layout=layout, backend=backend)


def device_of(x) -> torch.device:
    """Where a call's collectives run: its tensor's device, or this process's current GPU (the CPU without one)."""
    if isinstance(x, torch.Tensor):
        return x.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
