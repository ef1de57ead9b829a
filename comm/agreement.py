"""Make ranks that disagree about a collective call fail loudly instead of hanging or
computing on garbage (gloo accepts a shorter message into a longer buffer).

Each rank describes its call as named fields; one all-gather of three integers (a hash
of the call's name and field names, one of the values, and which input tensors hold a NaN
or an infinity) shows every rank whether all agree, so every rank raises the same
``ValueError`` when any field differs (and only then exchanges the readable values for
the message). ``ranks_agree`` wraps a call's argument checks too: a rank whose own
arguments are bad tells the others, instead of raising alone and leaving them waiting in
the next collective. With ``check_finite`` the same exchange also makes every rank raise
when any rank's inputs hold a NaN or an infinity, naming the rank and the tensor.

Where the exchange runs: on the host whenever it can, so that checking never waits for
the GPU. A gloo group (or one made with a backend string such as "cpu:gloo,cuda:nccl")
exchanges CPU tensors itself; an NCCL group made by ``init_mesh`` has a gloo twin over
the same ranks (``host_group``). Only other NCCL groups exchange on the GPU, which costs
a host synchronisation when the result is read.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from . import traffic

# The name of an NCCL group made by init_mesh -> (that group, a gloo group over the same ranks)
# for the checks. The group is kept to tell it from a later group of the same name (torch
# numbers groups afresh after destroy_process_group).
_HOST_TWINS: dict = {}


def _code(value: tuple) -> int:
    """An int64 equal in every process for equal tuples of strings, ints, floats and bools
    (their ``repr`` is exact)."""
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:8], "little", signed=True)


@torch.no_grad()
def _nonfinite_flags(inputs: dict, device: torch.device) -> torch.Tensor:
    """An int64 on ``device`` with bit ``i`` set when the ``i``-th input's sum is not
    finite, computed on the inputs' device; moving it to another ``device`` (the host,
    for an exchange there) is its only synchronisation. A NaN or an infinity always makes
    the sum so; a finite tensor only when its sum overflows, which the exact count then
    clears."""
    where = next(iter(inputs.values())).device
    sums = torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).to(where)
                        for t in inputs.values()])
    weights = torch.tensor([1 << i for i in range(len(inputs))], dtype=torch.int64, device=where)
    return ((~torch.isfinite(sums)).to(torch.int64) * weights).sum().to(device)


@torch.no_grad()
def _nonfinite_detail(inputs: dict, flags: int) -> str:
    """Which inputs (among those whose bit is set in ``flags``) hold NaNs or
    infinities, and how many: ``"q (2 NaN), v (1 inf)"``."""
    parts = []
    for index, (name, t) in enumerate(inputs.items()):
        if not flags >> index & 1:
            continue
        counts = [f"{n} {kind}" for kind, n in (("NaN", int(torch.isnan(t).sum())), ("inf", int(torch.isinf(t).sum())))
                  if n]
        if counts:
            parts.append(f"{name} ({', '.join(counts)})")
    return ", ".join(parts)


def cpu_capable(backend: str) -> bool:
    """True when a group of this backend (``dist.get_backend``'s string) takes CPU tensors."""
    return "gloo" in str(backend)


def register_host_group(group: dist.ProcessGroup, twin: dist.ProcessGroup) -> None:
    """Let the checks on ``group`` exchange over ``twin``, a gloo group of the same ranks."""
    if dist.get_process_group_ranks(group) != dist.get_process_group_ranks(twin):
        raise ValueError("a host group must hold the same ranks, in the same order, as its group")
    _HOST_TWINS[group.group_name] = (group, twin)


def host_group(group: dist.ProcessGroup) -> dist.ProcessGroup | None:
    """The group that exchanges ``group``'s checks on the host: its registered gloo twin,
    else the group itself when it takes CPU tensors; None when the exchange must run on
    the GPU (then reading its result synchronises the host)."""
    registered, twin = _HOST_TWINS.get(group.group_name, (None, None))
    if registered is group:
        return twin
    return group if cpu_capable(dist.get_backend(group)) else None


def ensure_ranks_agree(group: dist.ProcessGroup, what: str, fields: dict | None, device: torch.device,
                       inputs: dict | None = None) -> None:
    """Raise a ValueError on every rank of ``group`` unless all ranks pass equal ``what``
    and ``fields`` (``{name: value}``; values are compared by ``repr``, so pass plain
    values, not objects; None: compare nothing), and, given ``inputs`` (``{name: tensor}``),
    unless every rank's inputs are finite.

    ``device``: where the exchanged tensor lives when the group has no host exchange
    (``host_group``). Costs one all-gather of three integers, on the host where it can
    (else also a host synchronisation), and with ``inputs`` a sum over each (on a GPU a
    host synchronisation); every rank sends three whatever it describes, so different
    calls cannot misalign the exchange.
    """
    post_agreement(group, what, fields, device, inputs).settle()


def post_agreement(group: dist.ProcessGroup, what: str, fields: dict | None, device: torch.device,
                   inputs: dict | None = None) -> "Agreement":
    """``ensure_ranks_agree`` in two halves: this one posts the all-gather and returns at
    once; the ``Agreement``'s ``settle()`` waits for it and raises."""
    size, transfers_on_gloo = dist.get_world_size(group), dist.get_backend(group) == "gloo"
    if size == 1 and not inputs:
        return Agreement(group, what, fields, {}, [], None, transfers_on_gloo)
    exchange = host_group(group)
    if exchange is not None:
        group, device = exchange, torch.device("cpu")
    canonical = {} if fields is None else {name: value if isinstance(value, (str, int, float, bool)) else str(value)
                                           for name, value in fields.items()}
    codes = [0, 0] if fields is None else [_code((what, *canonical)), _code(tuple(canonical.values()))]
    flags = _nonfinite_flags(inputs, device) if inputs else torch.zeros((), dtype=torch.int64, device=device)
    mine = torch.cat([torch.tensor(codes, dtype=torch.int64, device=device), flags.view(1)])
    if size == 1:
        return Agreement(group, what, fields, inputs, [mine], None, transfers_on_gloo)
    table = [torch.empty_like(mine) for _ in range(size)]
    traffic.note(traffic.CHECK, mine.numel() * mine.element_size() * (size - 1), size - 1, what)
    work = dist.all_gather(table, mine, group=group, async_op=True)
    return Agreement(group, what, fields, inputs or {}, table, work, transfers_on_gloo)


class Agreement:
    """A posted rank-agreement exchange (``post_agreement``).

    ``group`` is the group that exchanged (the call's own, or its host twin).
    ``settle()`` waits for it and raises the ValueError of ``ensure_ranks_agree`` on every
    rank when the ranks disagree or an input is not finite (later calls: nothing).
    ``when_agreed(post)`` runs ``post`` (which posts a transfer and returns it) once
    every rank's entry is in and they all agree, and returns a transfer whose ``wait()``
    settles first. When the call's own group is gloo (``transfers_on_gloo``), ``post``
    runs from gloo's own thread as soon as the exchange completes, so the caller can
    compute meanwhile; elsewhere it settles and posts at once. Why this cannot hang:
    every rank gets the same table, so either every rank posts the transfer or none does,
    and then all raise the same error; a caller that fails before waiting for the
    transfer must settle before it raises (``sp_forward`` does), so that ranks which
    disagreed all report the disagreement."""

    def __init__(self, group, what: str, fields: dict | None, inputs: dict, table: list, work,
                 transfers_on_gloo: bool):
        self.group, self.what, self.fields, self.inputs = group, what, fields, inputs
        self.table, self.work, self.settled = table, work, False
        self.transfers_on_gloo = transfers_on_gloo

    def _same_call(self) -> bool:
        return all(torch.equal(row[:2], self.table[0][:2]) for row in self.table)

    def _flagged(self) -> bool:
        """Some rank's inputs may hold a NaN or an infinity (its sum is not finite)."""
        return any(int(row[2]) for row in self.table)

    def settle(self) -> None:
        if self.settled:
            return
        self.settled = True
        if self.work is not None:
            self.work.wait()
        if not self._same_call():
            _raise_disagreement(self.group, self.what, self.fields)
        if self._flagged():
            mine = self.table[dist.get_rank(self.group)]
            _raise_if_nonfinite(self.group, self.what, self.inputs, int(mine[2]))

    def when_agreed(self, post):
        if self.work is None or self.settled or not self.transfers_on_gloo:
            self.settle()
            return post()
        def post_if_agreed(exchanged):
            exchanged.value()  # a failed exchange fails the transfer too
            return post() if self._same_call() and not self._flagged() else None
        return _AfterAgreement(self, self.work.get_future().then(post_if_agreed), post)


class _AfterAgreement:
    """A transfer posted by ``Agreement.when_agreed``'s callback (or, when some rank's
    flags were set, after settling: every rank saw the same table and does the same)."""

    def __init__(self, agreement: Agreement, posted, post):
        self.agreement, self.posted, self.post = agreement, posted, post

    def wait(self) -> list[torch.Tensor]:
        transfer = self.posted.wait()
        self.agreement.settle()  # raises on every rank when the ranks disagree or an input is not finite
        if transfer is None:  # a flag was set but the exact count cleared it (a finite sum overflowed)
            transfer = self.post()
        return transfer.wait()


def _raise_if_nonfinite(group: dist.ProcessGroup, what: str, inputs: dict, flags: int) -> None:
    """Some rank's inputs may hold a NaN or an infinity: every rank counts those of its
    own whose bit is set in ``flags`` exactly and, if any has one, raises the same
    ValueError naming each such rank and tensor."""
    details = [_nonfinite_detail(inputs, flags)]
    if dist.get_world_size(group) > 1:
        details = [None] * dist.get_world_size(group)
        dist.all_gather_object(details, _nonfinite_detail(inputs, flags), group=group)
    named = [f"rank {rank}: {detail}" for rank, detail in zip(dist.get_process_group_ranks(group), details) if detail]
    if named:
        raise ValueError(f"non-finite inputs to {what} (check_finite): {'; '.join(named)}")


def _raise_disagreement(group: dist.ProcessGroup, what: str, fields: dict) -> None:
    """The ranks' ``fields`` differ: exchange them readably and raise the same ValueError on every rank."""
    size = dist.get_world_size(group)
    readable = [None] * size
    dist.all_gather_object(readable, (what, {name: str(value) for name, value in (fields or {}).items()}),
                           group=group)
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
    """Check a collective call's arguments inside the block and set ``fields`` (and
    ``inputs``); leaving it, the ranks of ``group`` make sure they all agree
    (``ensure_ranks_agree``), unless ``enabled`` is false, and, with ``check_finite``,
    that no rank's ``inputs`` hold a NaN or an infinity. A ValueError or TypeError raised
    inside the block is part of what they compare: when every rank raised the same one,
    each raises it; when only some did, every rank raises the disagreement, which names
    each rank's error. With ``defer``, a block that raised nothing only posts the
    exchange: ``agreement`` (None when nothing is checked) must be settled, or passed to
    ``Agreement.when_agreed``, before the call's first transfer.

        with ranks_agree(group, "ring_attention", device, check_ranks, check_finite) as call:
            ...argument checks...
            call.fields, call.inputs = dict(...), dict(q=q, k=k, v=v)
    """

    def __init__(self, group: dist.ProcessGroup, what: str, device: torch.device, enabled: bool = True,
                 check_finite: bool = False, defer: bool = False):
        self.group, self.what, self.device, self.enabled = group, what, device, enabled
        self.check_finite, self.defer = check_finite, defer
        self.fields: dict = {}
        self.inputs: dict = {}
        self.agreement: Agreement | None = None

    def __enter__(self) -> "ranks_agree":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is not None and not isinstance(error, (ValueError, TypeError)):
            return False
        finite = self.inputs if self.check_finite and error is None else None
        if self.enabled:
            problem = "" if error is None else f"{type(error).__name__}: {error}"
            fields = {"error": problem, "check_finite": bool(self.check_finite),
                      **(self.fields if error is None else {})}
            self.agreement = post_agreement(self.group, self.what, fields, self.device, finite)
        elif finite:
            self.agreement = post_agreement(self.group, self.what, None, self.device, finite)
        if self.agreement is not None and (error is not None or not self.defer):
            self.agreement.settle()
        return False  # a rank's own error goes on when every rank had it


def call_fields(q, k, v, causal: bool, softmax_scale: float, layout: str, backend: str, documents=None,
                window_size=(-1, -1), schedule: str = "ring") -> dict:
    """The fields every rank of an attention call must agree on (``documents``: the
    packed sequence's offsets, None for none, compared by a hash that keeps messages short)."""
    if documents is not None:
        documents = f"{len(documents) - 1} documents, offsets {_code(documents) & 0xFFFFFFFFFFFF:012x}"
    return dict(q_shape=tuple(q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape), dtype=q.dtype,
                causal=causal, softmax_scale=softmax_scale, layout=layout, backend=backend, documents=documents,
                window_size=tuple(window_size), schedule=schedule)


def device_of(x) -> torch.device:
    """Where a call's collectives run: its tensor's device, or this process's current GPU (the CPU without one)."""
    if isinstance(x, torch.Tensor):
        return x.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
