"""The USP paper's attention-only measurements (arXiv 2405.07719, v5, Tables 3 and 4) and
how well the cost model ranks their meshes.

Both tables: the LLaMA3-8B attention (32 query heads, 8 K/V heads, head dim 128), batch
1, forward only, bf16, causal, 8 GPUs, every ``u x r = 8``; iterations per second. Rows
"zigzag" are the paper's load-balanced ring, "contiguous" its "basic" one.

The sequence length is read as the *global* length. Read per GPU (8 times longer
globally) the figures would exceed the cards' peak: 8K per GPU on 8 x L20 at 454.9 it/s
would be ``4·32·65536²·128/2/8`` FLOPs per GPU in 2.2 ms, about 2,000 TFLOP/s on a
119.5 TFLOP/s card (``implied_tflops`` computes both readings).

Agreement per row: the measured best mesh must be predicted best or tied with it
(predicted within the model's uncertainty), and Kendall's tau-b between the predicted
times and the measured ones must reach 2/3: with four meshes tau moves in steps of 1/3,
so 2/3 is one pair of six in the wrong order (0.67 rounded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .predict import Attention

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
TAU_BAR = 2 / 3


@dataclass(frozen=True)
class Row:
    table: str
    cluster: str
    seqlen: int
    layout: str
    iterations_per_s: tuple[float, float, float, float]  # in the order of MESHES

    @property
    def label(self) -> str:
        return f"{self.table} {self.cluster} {self.seqlen // 1024}K {self.layout}"

    def call(self, seqlen_per_rank: bool = False) -> Attention:
        seqlen = self.seqlen * 8 if seqlen_per_rank else self.seqlen
        return Attention(heads=32, kv_heads=8, head_dim=128, batch=1, seqlen=seqlen, pass_="fwd", causal=True,
                         layout=self.layout)


def _rows(table: str, cluster: str, figures: dict) -> list[Row]:
    return [Row(table, cluster, seqlen * 1024, layout, values) for (seqlen, layout), values in figures.items()]


ROWS = _rows("Table 3", "8xL20-PCIe", {
    (8, "zigzag"): (57.1, 152.2, 454.9, 362.0), (8, "contiguous"): (57.3, 153.1, 415.5, 358.6),
    (32, "zigzag"): (14.3, 32.8, 62.8, 58.4), (32, "contiguous"): (15.2, 28.6, 44.3, 40.5),
    (128, "zigzag"): (2.59, 4.24, 5.48, 5.19), (128, "contiguous"): (2.56, 3.22, 3.40, 3.13),
}) + _rows("Table 4", "8xA100-NVLink", {
    (32, "zigzag"): (136.4, 133.0, 133.0, 113.8), (32, "contiguous"): (135.6, 103.5, 91.4, 82.0),
    (128, "zigzag"): (2.785, 2.771, 2.89, 2.91), (128, "contiguous"): (2.782, 2.024, 1.73, 1.63),
})


def kendall_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b of two equally long lists (ties in either count for neither side)."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx * dy > 0:
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else 0.0


def implied_tflops(row: Row) -> dict[str, float]:
    """TFLOP/s per GPU the row's fastest mesh implies under each reading of its length."""
    best = max(row.iterations_per_s)
    return {reading: row.call(reading == "per_gpu").flops() / 8 * best / 1e12 for reading in ("global", "per_gpu")}


def agreement(row: Row, predicted_ms: list[float], uncertainty: float) -> dict:
    """How the predicted times (order of MESHES) rank the row's meshes against the measured speeds."""
    measured_ms = [1e3 / v for v in row.iterations_per_s]
    best_measured = min(range(len(MESHES)), key=measured_ms.__getitem__)
    fastest = min(predicted_ms)
    tied = [i for i, t in enumerate(predicted_ms) if t <= fastest * (1 + uncertainty)]
    tau = kendall_tau_b(predicted_ms, measured_ms)
    return dict(row=row.label, measured_best=MESHES[best_measured],
                predicted_best=MESHES[predicted_ms.index(fastest)], predicted_tied=[MESHES[i] for i in tied],
                best_ok=best_measured in tied,
                kendall_tau=tau, tau_ok=tau >= TAU_BAR - 1e-9,
                measured_relative=[min(measured_ms) / t for t in measured_ms],
                predicted_relative=[fastest / t for t in predicted_ms])
