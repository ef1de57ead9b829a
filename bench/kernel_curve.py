"""The attention kernel's speed as a function of the work one call does.

A ring step hands the kernel a block of ``Sq x Sk`` tokens on ``h`` heads; a small block
runs far below the card's best rate (too few tiles to fill the SMs, fixed costs per
launch). A ``KernelCurve`` holds measured points ``(forward FLOPs of one call, TFLOP/s)``
for causal and for full calls, and interpolates between them in ``log(FLOPs)``; outside
the measured range the rate stays at the nearest point's. The shape of a call enters
through its work and its mask: the FLOPs follow the convention of ``flops.py``, and a
causal call (the diagonal block of a ring) reads the causal curve.

Work alone does not say how well a call fills the GPU. The kernel runs one thread block per
``tile_rows`` query rows of each head, ``tiles_per_sm`` at a time on every SM; a call whose
tiles leave its last wave part empty runs that much below a call whose waves are full.
``reference_fill`` is how full the waves of the curve's own calls were, on the card they
were measured on; ``wave_factor`` is a call's fill over it. A curve without tiling figures
(``tile_rows = 0``, as measured curves are) is read as it is. The factor is a rule for the
forward of full calls only: a causal call's tiles differ in length (tile ``m`` does ``m + 1``
key blocks), so its last wave is no fixed count of equal tiles, and the backward runs
other tiles (FlashAttention-2's hdim-128 backward: 128 key rows, 8 warps, about one per
SM); both are read off the curve as they are.

Points come from ``usp-bench kernels`` results (``from_kernel_results``) or from a
published curve (the presets of ``hardware.py``, each with its source).
"""

from __future__ import annotations

import bisect
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

Points = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class KernelCurve:
    """Forward TFLOP/s against the forward FLOPs of one call, for causal and full calls;
    the backward runs at ``backward_ratio`` times the forward's rate (its own curve
    when measured)."""

    name: str
    source: str
    causal: Points
    full: Points
    backward_causal: Points = ()
    backward_full: Points = ()
    backward_ratio: float = 1.0
    tile_rows: int = 0  # query rows per thread block (0: no wave model)
    tiles_per_sm: int = 1  # thread blocks resident on one SM
    reference_fill: float = 1.0  # how full the waves of the curve's own calls were

    def __post_init__(self):
        for label, points in (("causal", self.causal), ("full", self.full)):
            if not points:
                raise ValueError(f"kernel curve {self.name!r}: no {label} points")
        for points in (self.causal, self.full, self.backward_causal, self.backward_full):
            if any(f <= 0 or t <= 0 for f, t in points):
                raise ValueError(f"kernel curve {self.name!r}: FLOPs and TFLOP/s must be positive")

    def tflops(self, forward_flops: float, causal: bool, backward: bool = False) -> float:
        """The rate of one call doing ``forward_flops`` of forward work (its backward: 2.5x that)."""
        if backward:
            points = self.backward_causal if causal else self.backward_full
            if points:
                return _interpolate(points, forward_flops)
        rate = _interpolate(self.causal if causal else self.full, forward_flops)
        return rate * (self.backward_ratio if backward else 1.0)

    def wave_factor(self, sequences_x_heads: int, rows: int, sm_count: int | None) -> float:
        """Rate of a full forward call of ``rows`` query rows on each of ``sequences_x_heads``
        (batch x heads) over the curve's rate, from how full its last wave of tiles is::

            tiles = sequences_x_heads * ceil(rows / tile_rows),  slots = sm_count * tiles_per_sm
            factor = tiles / (ceil(tiles / slots) * slots) / reference_fill
        """
        if not (self.tile_rows and sm_count):
            return 1.0
        return wave_fill(sequences_x_heads * math.ceil(rows / self.tile_rows), sm_count * self.tiles_per_sm) \
            / self.reference_fill

    def to_json(self) -> dict:
        return dict(name=self.name, source=self.source, causal=[list(p) for p in self.causal],
                    full=[list(p) for p in self.full], backward_causal=[list(p) for p in self.backward_causal],
                    backward_full=[list(p) for p in self.backward_full], backward_ratio=self.backward_ratio,
                    tile_rows=self.tile_rows, tiles_per_sm=self.tiles_per_sm, reference_fill=self.reference_fill)

    @classmethod
    def from_json(cls, data: dict) -> KernelCurve:
        points = lambda key: tuple(sorted((float(f), float(t)) for f, t in data.get(key, ())))  # noqa: E731
        return cls(data["name"], data.get("source", ""), points("causal"), points("full"), points("backward_causal"),
                   points("backward_full"), float(data.get("backward_ratio", 1.0)), int(data.get("tile_rows", 0)),
                   int(data.get("tiles_per_sm", 1)), float(data.get("reference_fill", 1.0)))


def wave_fill(tiles: int, slots: int) -> float:
    """How full the waves of ``tiles`` equal thread blocks are on ``slots`` at a time."""
    return tiles / (math.ceil(tiles / slots) * slots)


def _interpolate(points: Points, x: float) -> float:
    """Linear in ``log x`` between the sorted points; flat beyond the ends."""
    xs = [p[0] for p in points]
    if x <= xs[0]:
        return points[0][1]
    if x >= xs[-1]:
        return points[-1][1]
    i = bisect.bisect_right(xs, x)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))


def from_kernel_results(path: str | Path, impl: str | None = None, dtype: str | None = None,
                        head_dim: int | None = None) -> KernelCurve:
    """A curve from a ``usp-bench kernels`` JSON file: per config the forward (and, when
    timed, backward) TFLOP/s of ``impl`` (default: the fastest implementation of each
    config, leaving out triton with a forced tile order, ``triton:by-head`` and the like:
    no production call runs it), of ``dtype`` and ``head_dim`` (default: those with the
    most records)."""
    document = json.loads(Path(path).read_text())
    if document.get("kind") != "kernels":
        raise ValueError(f"{path}: not a usp-bench kernels result (kind {document.get('kind')!r})")
    records = [r for r in document["records"] if r["impl"] == impl or (impl is None and ":" not in r["impl"])]
    for field, wanted in (("dtype", dtype), ("head_dim", head_dim)):
        if wanted is None and records:
            wanted = Counter(r[field] for r in records).most_common(1)[0][0]
        records = [r for r in records if r[field] == wanted]
    if not records:
        raise ValueError(f"{path}: no kernel timings for impl {impl}, dtype {dtype}, head dim {head_dim}")

    def best(pass_: str, causal: bool) -> Points:
        rates: dict[float, float] = {}
        for r in records:
            if r["pass"] == pass_ and r["causal"] == causal:
                work = r["flops"] / (2.5 if pass_ == "bwd" else 1.0)  # the forward FLOPs of the call
                rates[work] = max(rates.get(work, 0.0), r["tflops"])
        return tuple(sorted(rates.items()))

    causal, full = best("fwd", True), best("fwd", False)
    causal, full = causal or full, full or causal
    if not causal:
        raise ValueError(f"{path}: no forward timings to build a kernel curve from")
    first = records[0]
    return KernelCurve(f"measured {first['device']} {impl or 'fastest'} {first['dtype']} d{first['head_dim']}",
                       f"usp-bench kernels results {Path(path).name}", causal, full, best("bwd", True),
                       best("bwd", False))
