"""The paper's per-transformer-block cost model (USP, arXiv 2405.07719, Table 2) as code.

For a model shape, a sequence length and N devices: the communication volume each
device sends per block (forward + backward) and the memory it holds, for SP-Ulysses,
SP-Ring, USP (every ``u x r``), Megatron TP with sequence parallelism and DP / ZeRO.
``predict.py`` turns these volumes into times on a cluster.

Notation: ``b`` batch, ``s`` global sequence length, ``d`` hidden size, ``g`` the K/V
share of the heads (``kv_heads / heads``), ``N`` the degree, ``e`` bytes per element.
A *unit* is ``b·s·d`` elements, the size of one full activation, as in the paper.

- SP-Ulysses: 4 all-to-alls forward (q, k, v in; out back) and 4 backward, each sending
  ``(N-1)/N`` of the local ``b·s·d/N`` (q, out) or ``g·b·s·d/N`` (k, v) tensor:
  ``(4 + 4g)/N · (N-1)/N`` units (the paper's ``8/N`` for MHA).
- SP-Ring: forward K and V make ``N-1`` hops of ``g·b·s·d/N`` each: ``2g (N-1)/N`` units;
  backward K and V go round again *and* the dK/dV accumulators make ``N`` hops:
  ``2g (N-1)/N + 2g`` units. The paper counts 4 units (2 forward, 2 backward: it does not
  count K/V re-sent in backward); counted this way it is 6 (for MHA, ``N`` large). Our
  accumulators travel in float32, so in bytes the dK/dV hops weigh ``4/e`` times more.
- USP ``u x r``: Ulysses over ``u`` on the local shard, then the ring over ``r`` with
  ``g·d/u`` K/V features per device (K/V heads repeated as ``usp.comm.heads`` says, up
  to one per query head when the query heads split unevenly).
- Megatron TP-SP: 2 all-gathers and 2 reduce-scatters of ``b·s·d`` forward; backward 2
  reduce-scatters and 4 all-gathers (the 2 of the forward's backward and 2 re-gathers of
  the sharded input for the weight gradients): ``10 (N-1)/N`` units, the paper's 10.
- DP / ZeRO: no activation traffic; gradient all-reduce ``2Ψ(N-1)/N`` elements per block
  (ZeRO-1/2 the same as reduce-scatter + all-gather, ZeRO-3 ``3Ψ(N-1)/N``). SP methods
  replicate the parameters, so they pay DP's gradient all-reduce over their group too.

Memory per device: parameters, gradients and Adam states at 2 + 2 + 12 bytes per
parameter (``16Ψ``; ``Ψ`` the block's parameters), divided by N where sharded (TP, ZeRO
levels); activations ``A/N`` with ``A = 34·b·s·d`` bytes per block (Korthikanti et al.,
without the ``s²`` score term that flash attention never stores) for every method here.
"""

from __future__ import annotations

from dataclasses import dataclass

from usp.attention.volume import attention_volume
from usp.comm.mesh import mesh_shapes


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    ffn_hidden: int
    head_size: int | None = None  # when not hidden / heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    @property
    def kv_share(self) -> float:
        return self.kv_heads / self.heads

    @property
    def block_params(self) -> int:
        """Parameters of one block: q, o (``d·Hq·D`` each), k, v (``d·Hkv·D`` each), a SwiGLU
        MLP (``3·d·ffn``) and two norms."""
        d = self.hidden
        return d * self.head_dim * (2 * self.heads + 2 * self.kv_heads) + 3 * d * self.ffn_hidden + 2 * d


MODELS = {
    "llama3-8b": ModelShape("LLaMA3-8B", 4096, 32, 8, 32, 14336),
    "llama2-7b": ModelShape("LLaMA2-7B", 4096, 32, 32, 32, 11008),
}


def communication(shape: ModelShape, batch: int, seqlen: int, ulysses_degree: int, ring_degree: int,
                  element_size: int = 2) -> dict:
    """Per device, per block, forward + backward, of USP ``u x r`` (Ulysses when ``r = 1``,
    ring when ``u = 1``), from ``usp.attention.volume``: ``units`` (elements in units of
    ``b·s·d``), ``paper_units`` (the ring's backward counted as the paper does: the
    accumulators' ``r - 1`` hops, K/V not re-sent) and ``bytes`` (accumulators in float32)."""
    u, r = ulysses_degree, ring_degree
    volume = attention_volume(batch, seqlen, shape.heads, shape.kv_heads, shape.head_dim, u, r, element_size)
    unit = batch * seqlen * shape.hidden
    accumulator_size = max(element_size, 4)
    all_to_all = (volume.forward.all_to_all_bytes + volume.backward.all_to_all_bytes) / element_size / unit
    kv_hops = volume.kv_hop_bytes / element_size / unit  # one hop of K and V, in units
    accumulator_hops = volume.accumulator_hop_bytes / accumulator_size / unit
    ring_fwd = ring_bwd_kv = (r - 1) * kv_hops
    ring_bwd_acc = r * accumulator_hops if r > 1 else 0.0
    units = all_to_all + ring_fwd + ring_bwd_kv + ring_bwd_acc
    paper_units = all_to_all + ring_fwd + (r - 1) * accumulator_hops
    return dict(units=units, paper_units=paper_units, bytes=volume.bytes, all_to_all_units=all_to_all,
                ring_units=units - all_to_all, elements=units * unit, kv_hop_bytes=volume.kv_hop_bytes,
                accumulator_hop_bytes=volume.accumulator_hop_bytes)


def megatron_tp_sp(batch: int, seqlen: int, hidden: int, degree: int, element_size: int = 2) -> dict:
    """6 all-gathers and 4 reduce-scatters of ``b·s·d`` per block, each sending ``(N-1)/N`` of it."""
    units = 10 * (degree - 1) / degree
    return dict(units=units, paper_units=units, bytes=units * batch * seqlen * hidden * element_size)


def gradient_allreduce_bytes(block_params: int, degree: int, zero3: bool = False, element_size: int = 2) -> float:
    """Per device, per block: ring all-reduce (``2Ψ(N-1)/N``) or ZeRO-3 (``3Ψ(N-1)/N``) of bf16 gradients/params."""
    return (3 if zero3 else 2) * block_params * (degree - 1) / degree * element_size


def memory(shape: ModelShape, batch: int, seqlen: int, degree: int, method: str) -> dict:
    """Bytes per device per block: ``params`` (params + grads + Adam states) and ``activations``."""
    psi = shape.block_params
    sharded = {"dp": 16 * psi, "sp": 16 * psi, "zero1": (4 + 12 / degree) * psi, "zero2": (2 + 14 / degree) * psi,
               "zero3": 16 * psi / degree, "sp+zero3": 16 * psi / degree, "tp-sp": 16 * psi / degree}
    if method not in sharded:
        raise ValueError(f"method must be one of {sorted(sharded)}, got {method!r}")
    return dict(params=sharded[method], activations=34 * batch * seqlen * shape.hidden / degree)


def meshes(world_size: int, shape: ModelShape) -> list[tuple[int, int]]:
    """Every ``(u, r)`` with ``u x r = world_size`` whose Ulysses degree the heads allow."""
    return mesh_shapes(world_size, shape.heads, shape.kv_heads)


def volume_table(shape: ModelShape, batch: int, seqlen: int, degrees) -> list[dict]:
    """Per degree N: communication per device per block (fwd + bwd) of every method."""
    rows = []
    for n in degrees:
        row = dict(degree=n, methods={})
        allowed = meshes(n, shape)
        row["methods"]["SP-Ulysses"] = communication(shape, batch, seqlen, n, 1) if (n, 1) in allowed else None
        row["methods"]["SP-Ring"] = communication(shape, batch, seqlen, 1, n)
        for u, r in allowed:
            if u > 1 and r > 1:
                row["methods"][f"USP-u{u}r{r}"] = communication(shape, batch, seqlen, u, r)
        row["methods"]["Megatron TP-SP"] = megatron_tp_sp(batch, seqlen, shape.hidden, n)
        grads = gradient_allreduce_bytes(shape.block_params, n)
        row["methods"]["DP / ZeRO-1/2"] = dict(units=0.0, paper_units=0.0, bytes=grads, parameter_traffic=True)
        row["methods"]["ZeRO-3"] = dict(units=0.0, paper_units=0.0,
                                        bytes=gradient_allreduce_bytes(shape.block_params, n, zero3=True),
                                        parameter_traffic=True)
        row["gradient_allreduce_bytes"] = grads
        rows.append(row)
    return rows

