"""Numerics of a backend against the float64 oracle, in the flash-attn style.

For each quantity (out, lse, dq, dk, dv) the error is the largest absolute difference
from the oracle: float64 naive attention, gradients through autograd. A backend passes
when its error is at most ``MULTIPLIER`` times the error of the same computation done
by plain torch in the input dtype (the ``naive`` backend: the same flash-style
backward with ``delta = rowsum(dout * out)``), plus a floor at the reference's scale:
one unit of the dtype's precision and the rounding of one float32 dot product over the
head dim (``sqrt(D)`` float32 units; it matters where a gradient cancels to ~0, as for
a row that sees one key). Without a baseline (the naive backend itself, and float64,
the oracle's own dtype) the bound is ``NAIVE_ULPS`` units of the dtype, which checks
the float64 formulas to ~1e-14. NaN anywhere fails; ``-inf`` LSEs must match exactly.
Outputs are allocated poisoned (NaN), so an element a kernel never writes fails too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field

import torch

from usp.attention import naive_attention
from usp.attention.naive import document_mask
from usp.kernels import AttentionShape, get_backend, varlen_backward, varlen_forward
from usp.kernels.backends import window_kwargs
from usp.kernels.tokens import position_kwargs

QUANTITIES = ("out", "lse", "dq", "dk", "dv")
MULTIPLIER = {"out": 3.0, "lse": 3.0, "dq": 4.0, "dk": 4.0, "dv": 4.0}
NAIVE_ULPS = 64.0
TOLERANCE_RULE = (f"error <= k x error of the naive backend in the input dtype (k: {MULTIPLIER}) "
                  "+ (eps(dtype) + sqrt(head_dim) x eps(float32)) x max(1, |reference|); "
                  f"naive backend and float64: {NAIVE_ULPS:g} x eps(dtype) x max(1, |reference|)")
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass(frozen=True)
class Case:
    """One verification problem: a backend, a dtype and an attention shape; optionally a
    sliding window and packed documents, given as (query length, key length) pairs whose
    sums are the shape's ``seqlen_q`` and ``seqlen_k`` (batch 1)."""

    backend: str
    dtype: torch.dtype
    shape: AttentionShape
    causal: bool
    softmax_scale: float | None = None  # None: head_dim ** -0.5
    window_size: tuple[int, int] = (-1, -1)
    documents: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        if self.documents is not None:
            totals = tuple(sum(lengths) for lengths in zip(*self.documents))
            if self.shape.batch != 1 or totals != (self.shape.seqlen_q, self.shape.seqlen_k):
                raise ValueError(f"documents {self.documents} do not pack into {self.shape}")

    @property
    def label(self) -> str:
        s = self.shape
        scale = "" if self.softmax_scale is None else f" scale{self.softmax_scale:g}"
        window = "" if self.window_size == (-1, -1) else f" window{self.window_size[0]},{self.window_size[1]}"
        docs = "" if self.documents is None else " docs" + "+".join(
            str(a) if a == b else f"{a}:{b}" for a, b in self.documents)
        return (f"{self.backend} {DTYPE_NAMES[self.dtype]} b{s.batch} sq{s.seqlen_q} sk{s.seqlen_k} "
                f"h{s.heads}/{s.kv_heads} d{s.head_dim}{' causal' if self.causal else ''}{scale}{window}{docs}")

    def offsets(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cu_seqlens_q, cu_seqlens_k`` (int32) of the documents."""
        return tuple(torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
                     for lengths in zip(*self.documents))


class Verdict:
    """``passed`` and ``worst_ratio`` of a result that has ``errors``, ``tolerances`` and ``failures``."""

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def worst_ratio(self) -> float:
        return worst_ratio(self.errors, self.tolerances)


@dataclass
class CaseResult(Verdict):
    case: Case
    seed: int
    errors: dict[str, float]
    tolerances: dict[str, float]
    seconds: float
    failures: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """A JSON-ready summary."""
        return dict(backend=self.case.backend, dtype=DTYPE_NAMES[self.case.dtype], causal=self.case.causal,
                    softmax_scale=self.case.softmax_scale, window_size=list(self.case.window_size),
                    documents=self.case.documents,
                    **dataclasses.asdict(self.case.shape), errors=self.errors, tolerances=self.tolerances,
                    seed=self.seed, worst_ratio=self.worst_ratio, passed=self.passed, failures=self.failures,
                    seconds=round(self.seconds, 3))


def worst_ratio(errors: dict[str, float], tolerances: dict[str, float]) -> float:
    """The largest error / tolerance over the quantities: below 1 passes (NaN counts as inf)."""
    def ratio(error: float, tol: float) -> float:
        if math.isnan(error):
            return math.inf
        return error / tol if tol > 0 else (0.0 if error == 0 else math.inf)
    return max(ratio(errors[name], tolerances[name]) for name in errors)


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |actual - reference| in float64; equal infinities count as 0, NaN as NaN."""
    actual, reference = actual.to(torch.float64), reference.to(torch.float64)
    diff = torch.where(actual == reference, torch.zeros_like(actual), (actual - reference).abs())
    return diff.max().item() if diff.numel() else 0.0


def _inputs(case: Case, device, generator: torch.Generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=case.dtype)
    s = case.shape
    q = randn(s.batch, s.seqlen_q, s.heads, s.head_dim)
    k = randn(s.batch, s.seqlen_k, s.kv_heads, s.head_dim)
    v = randn(s.batch, s.seqlen_k, s.kv_heads, s.head_dim)
    dout = randn(s.batch, s.seqlen_q, s.heads, s.head_dim)
    return q, k, v, dout


def reference(q, k, v, dout, causal: bool, softmax_scale=None, mask=None) -> dict[str, torch.Tensor]:
    """The oracle: float64 naive attention's out, lse and gradients through autograd;
    ``mask``: a boolean [Sq, Sk] in place of causal (see ``document_mask``)."""
    q, k, v = (x.detach().to(torch.float64).requires_grad_() for x in (q, k, v))
    out, lse = naive_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, mask=mask)
    out.backward(dout.to(torch.float64))
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def run_backend(backend, q, k, v, dout, causal: bool, softmax_scale=None, window_size=(-1, -1),
                offsets=None, positions=None) -> dict[str, torch.Tensor]:
    """A backend's out, lse and gradients (its backward fed its own out and lse). With
    ``offsets`` (``cu_seqlens_q, cu_seqlens_k``), the batch-1 inputs run packed through
    ``varlen_forward`` / ``varlen_backward``; results come back in the batch-1 shapes.
    ``positions``: a ``TokenPositions`` the mask is read in (dense inputs)."""
    backend = get_backend(backend)
    if offsets is None:
        options = dict(causal=causal, softmax_scale=softmax_scale, **window_kwargs(window_size),
                       **position_kwargs(positions))
        out, lse = backend.forward(q, k, v, **options)
        dq, dk, dv = backend.backward(dout, q, k, v, out, lse, **options)
        return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)
    documents = (*offsets, *(int((cu[1:] - cu[:-1]).max()) for cu in offsets))
    options = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size)
    dout, q, k, v = (x[0] for x in (dout, q, k, v))
    out, lse = varlen_forward(backend, q, k, v, *documents, **options)
    dq, dk, dv = varlen_backward(backend, dout, q, k, v, out, lse, *documents, **options)
    return dict(out=out[None], lse=lse[None], dq=dq[None], dk=dk[None], dv=dv[None])


def tolerance(name: str, dtype: torch.dtype, head_dim: int, ref: torch.Tensor, baseline_error: float | None) -> float:
    """Allowed error: MULTIPLIER x the baseline's error + the floor (see the module doc);
    without a baseline, NAIVE_ULPS ulps. All at the reference's scale max(1, |ref|)."""
    finite = ref[torch.isfinite(ref)]
    scale = max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
    eps = torch.finfo(dtype).eps
    if baseline_error is None:
        return NAIVE_ULPS * eps * scale
    floor = (eps + math.sqrt(head_dim) * torch.finfo(torch.float32).eps) * scale
    return MULTIPLIER[name] * baseline_error + floor


def compare(case: Case, results: dict, ref: dict, baseline: dict | None,
            quantities=QUANTITIES) -> tuple[dict, dict, list[str]]:
    """Errors, tolerances and the names of the quantities that fail."""
    errors, tolerances, failures = {}, {}, []
    for name in quantities:
        actual = results[name]
        if tuple(actual.shape) != tuple(ref[name].shape):
            errors[name], tolerances[name] = float("inf"), 0.0
            failures.append(f"{name}: shape {tuple(actual.shape)} != {tuple(ref[name].shape)}")
            continue
        errors[name] = max_error(actual, ref[name])
        base = None if baseline is None else max_error(baseline[name], ref[name])
        tolerances[name] = tolerance(name, case.dtype, case.shape.head_dim, ref[name], base)
        if not errors[name] <= tolerances[name]:  # NaN fails here too
            failures.append(f"{name}: error {errors[name]:.3g} > tolerance {tolerances[name]:.3g}")
    return errors, tolerances, failures


@contextlib.contextmanager
def poisoned_allocations():
    """Within the block, ``torch.empty`` fills new memory with NaN, so an output element
    a kernel forgets to write shows up as NaN instead of passing by luck."""
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_filling
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)


def run_case(case: Case, device="cpu", seed: int = 0) -> CaseResult:
    """Run ``case`` on fresh random inputs, outputs poisoned, and judge it against the oracle."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    q, k, v, dout = _inputs(case, device, generator)
    s = case.shape
    masked = case.documents is not None or case.window_size != (-1, -1)
    offsets = case.offsets(device) if case.documents is not None else None
    mask = None
    if masked:  # the oracle's own rule: the document mask (one document per row when dense)
        single = tuple(torch.tensor([0, n], dtype=torch.int32) for n in (s.seqlen_q, s.seqlen_k))
        mask = document_mask(*(offsets or single), case.causal, case.window_size)
    ref = reference(q, k, v, dout, case.causal, case.softmax_scale, mask)
    options = dict(window_size=case.window_size, offsets=offsets)
    with poisoned_allocations():
        results = run_backend(case.backend, q, k, v, dout, case.causal, case.softmax_scale, **options)
    has_baseline = case.backend != "naive" and case.dtype != torch.float64
    baseline = (run_backend("naive", q, k, v, dout, case.causal, case.softmax_scale, **options)
                if has_baseline else None)
    errors, tolerances, failures = compare(case, results, ref, baseline)
    return CaseResult(case, seed, errors, tolerances, time.perf_counter() - start, failures)
