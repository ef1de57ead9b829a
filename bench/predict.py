"""Predicted time of one attention call on every GPU of a ``u x r`` mesh, from the
cluster's kernel curve and links (``hardware.py``).

One call, on the busiest rank:

1. Ulysses (``u > 1``): four all-to-alls per pass over the Ulysses group (bytes from
   ``usp.attention.volume``), each tensor copied into and out of its send buffer
   (memory-bound), nothing overlapped.
2. Ring (``r > 1``), ``c = S/r`` tokens per ring rank: step ``j`` computes one block
   while the next K/V block travels one hop; a step lasts ``max(compute, hop)`` and the
   last step has no hop. Steps after the first merge their output into the fp32
   accumulator (one memory pass). Backward, K/V and the fp32 dK/dV accumulators share
   the hop; the accumulators make one more hop home.
3. The blocks of each ring step (causal; ``h`` heads; the kernel's rate read off the curve
   at each block's own work; a full forward block corrected for how full its last wave of
   tiles is)::

       zigzag      step 0: c x c causal     steps 1..r-1: c x c/2 full on the ranks whose
                                            source comes earlier, c/2 x c full on the others
       contiguous  step 0: c x c causal     steps 1..r-1: c x c full  (rank r-1; rank 0
                                                                        only computes step 0)
       not causal  every step: c x c full

   Each hop waits for the neighbour's K/V, so the ring moves in step: a step lasts as long
   as its slowest block. Zigzag's two shapes do the same work, but ``c/2 x c`` has half the
   query tiles, and with few tiles per SM its last wave runs part empty. The contiguous
   split does ``(r - 1/2)`` blocks on its last rank where zigzag does ``r/2`` on every rank:
   that imbalance is what the paper's "basic" rows measure.

   With packed documents or a sliding window the blocks come from the masks instead: rank
   ``i``'s queries against the keys it holds at step ``s`` (those of rank ``i - s``), laid
   out as the library lays them out (zigzag cut per document), each block the rectangle
   of rows and keys that see each other, its work the visible (query, key) pairs: a block
   that sees all its pairs, or a square's causal half, is read as the dense model reads
   it, any other off the causal curve at its work; a block with nothing visible is skipped
   (its K/V still travel on), and ``work_imbalance`` is the busiest ring rank's pairs
   over the mean (``usp-bench balance``).

Times are milliseconds; ``flops.py`` gives the FLOP convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from usp.attention.layout import check_global_seqlen, ring_positions, visible_key_span
from usp.attention.volume import attention_volume
from usp.comm.heads import heads_per_rank, kv_heads_per_rank
from usp.comm.mesh import mesh_position

from usp.kernels.checks import resolve_window

from .balance import imbalance, rank_work
from .flops import attention_flops, masked_attention_flops
from .hardware import Cluster

LAYOUTS = ("zigzag", "contiguous")
# How far a prediction may be off: the kernel curves are published figures of the same code
# on another card or scaled by peak, and published FlashAttention rates differ by 5-10% between
# versions and runs. Meshes predicted within this fraction of the fastest are reported as tied.
UNCERTAINTY = 0.10
PASSES = ("fwd", "fwd+bwd")
ACCUMULATOR_SIZE = 4  # fp32 output, LSE and dK/dV accumulators


@dataclass(frozen=True)
class Attention:
    """One attention call: global sequence ``seqlen``, bf16 unless ``element_size`` says."""

    heads: int
    kv_heads: int
    head_dim: int
    batch: int
    seqlen: int
    pass_: str = "fwd"
    causal: bool = True
    layout: str = "zigzag"
    element_size: int = 2
    documents: tuple[int, ...] | None = None  # offsets of the documents packed in each sequence
    window: int | None = None  # a sliding window: keys this far back at most

    def __post_init__(self):
        if self.pass_ not in PASSES:
            raise ValueError(f"pass must be one of {PASSES}, got {self.pass_!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        d = self.documents
        if d is not None and (d[0] != 0 or d[-1] != self.seqlen or any(a > b for a, b in zip(d, d[1:]))):
            raise ValueError(f"documents must be non-decreasing offsets from 0 to the sequence length {self.seqlen}")

    @property
    def masked(self) -> bool:
        return self.documents is not None or self.window is not None

    @property
    def bounds(self) -> tuple[int | None, int | None]:
        """How far back and ahead of its position a query sees (None: unbounded)."""
        window_size = (-1, -1) if self.window is None else (self.window, 0 if self.causal else -1)
        return resolve_window(self.causal, window_size)

    def flops(self) -> float:
        """Useful FLOPs of the whole call (every rank together): the visible pairs' when masked."""
        if self.masked:
            positions = torch.arange(self.seqlen)
            first, last = visible_key_span(positions, positions, self.seqlen, self.documents, *self.bounds)
            pairs = int((last - first).clamp(min=0).sum())
            return masked_attention_flops(self.batch, self.heads, self.head_dim, pairs, self.pass_)
        return attention_flops(self.batch, self.heads, self.seqlen, self.seqlen, self.head_dim, self.causal,
                               self.pass_)


@dataclass(frozen=True)
class Block:
    """One kernel call: ``batch`` sequences of ``rows x keys`` tokens on ``heads`` heads;
    ``causal`` for a diagonal block."""

    rows: int
    keys: int
    heads: int
    causal: bool
    batch: int = 1
    pairs: int | None = None  # visible (query, key) pairs per sequence and head, when masked


def ring_steps(call: Attention, ulysses_degree: int, ring_degree: int) -> list[tuple[Block, ...]]:
    """Per ring step, the distinct blocks the ring's ranks compute (see the module doc)."""
    h, r = heads_per_rank(call.heads, ulysses_degree), ring_degree
    c, b = call.seqlen // r, call.batch
    if r == 1 or not call.causal:
        return [(Block(c, c, h, call.causal, b),)] * r
    if call.layout == "zigzag":
        later = (Block(c, c // 2, h, False, b), Block(c // 2, c, h, False, b))
    else:
        later = (Block(c, c, h, False, b),)
    return [(Block(c, c, h, True, b),)] + [later] * (r - 1)


def masked_ring_steps(call: Attention, ulysses_degree: int, ring_degree: int) -> list[tuple[Block, ...]]:
    """Per ring step, the blocks the ring's ranks compute under the call's documents and
    window (a rank whose block sees nothing computes none)."""
    h, r = heads_per_rank(call.heads, ulysses_degree), ring_degree
    check_global_seqlen(call.seqlen, ulysses_degree, r, call.layout, call.documents)
    held = [ring_positions(call.seqlen, r, rank, call.layout, call.documents) for rank in range(r)]
    steps = []
    for step in range(r):
        blocks = []
        for rank in range(r):
            first, last = visible_key_span(held[rank], held[(rank - step) % r], call.seqlen, call.documents,
                                           *call.bounds)
            seen = torch.nonzero(last > first).flatten()
            if seen.numel():
                rows, keys = int(seen[-1] - seen[0]) + 1, int(last[seen].max() - first[seen].min())
                blocks.append(_block_of(rows, keys, int((last - first)[seen].sum()), h, call.batch))
        steps.append(tuple(blocks))
    return steps


def _block_of(rows: int, keys: int, pairs: int, heads: int, batch: int) -> Block:
    """A block that sees every pair, or a square's causal half, as the dense model reads
    it (full or causal, on the curve's own terms); any other as a masked block of ``pairs``."""
    if pairs == rows * keys:
        return Block(rows, keys, heads, False, batch)
    if rows == keys and pairs == rows * (rows + 1) // 2:
        return Block(rows, keys, heads, True, batch)
    return Block(rows, keys, heads, True, batch, pairs)


def kernel_ms(cluster: Cluster, block: Block, head_dim: int, backward: bool) -> float:
    """One launch of the attention kernel (forward, or the backward of the same block). The
    wave factor applies to full forward calls only (``kernel_curve.py``); a masked block
    runs at the causal curve's rate for its visible pairs."""
    if block.pairs is None:
        forward = attention_flops(block.batch, block.heads, block.rows, block.keys, head_dim, block.causal, "fwd")
    else:
        forward = masked_attention_flops(block.batch, block.heads, head_dim, block.pairs)
    work = forward * (2.5 if backward else 1.0)
    rate = cluster.kernel.tflops(forward, block.causal, backward)
    if not (block.causal or backward):
        rate *= cluster.kernel.wave_factor(block.batch * block.heads, block.rows, cluster.sm_count)
    return work / (rate * 1e12) * 1e3 + cluster.launch_us * 1e-3


def memory_pass_ms(cluster: Cluster, nbytes: float) -> float:
    """A memory-bound kernel that moves ``nbytes`` (reads and writes)."""
    return nbytes / (cluster.memory_gbs * 1e9) * 1e3 + cluster.launch_us * 1e-3


def groups(ulysses_degree: int, ring_degree: int, placement: str, stride: int = 1) -> tuple[list[int], list[int]]:
    """Global ranks of the Ulysses group and of the ring group of mesh position 0 (each
    position ``stride`` GPUs apart: the tensor-parallel degree sits innermost)."""
    u, r = ulysses_degree, ring_degree
    ulysses = [stride * mesh_position(0, j, 0, u, r, placement) for j in range(u)]
    ring = [stride * mesh_position(0, 0, i, u, r, placement) for i in range(r)]
    return ulysses, ring


def _block_ms(cluster: Cluster, block: Block, step: int, backward: bool, head_dim: int, element_size: int,
              kv_heads: int, ring_degree: int) -> tuple[float, float]:
    """The kernel and the merge of one block of a ring step."""
    merge_bytes = 0
    if step > 0 and not backward:  # out and LSE into the accumulator: read both, write one
        merge_bytes = block.batch * block.rows * block.heads * head_dim * (2 * ACCUMULATOR_SIZE + element_size)
    elif backward and ring_degree > 1:  # dK and dV into the accumulators
        merge_bytes = 2 * block.batch * block.keys * kv_heads * head_dim * (2 * ACCUMULATOR_SIZE + element_size)
    return kernel_ms(cluster, block, head_dim, backward), memory_pass_ms(cluster, merge_bytes) if merge_bytes else 0.0


def predict_attention(call: Attention, cluster: Cluster, ulysses_degree: int, ring_degree: int,
                      placement: str = "ulysses_inner", stride: int = 1) -> dict:
    """Milliseconds of one call on the busiest rank, by part; see the module doc."""
    u, r = ulysses_degree, ring_degree
    ulysses_ranks, ring_ranks = groups(u, r, placement, stride)
    volume = attention_volume(call.batch, call.seqlen, call.heads, call.kv_heads, call.head_dim, u, r,
                              call.element_size)
    e, d = call.element_size, call.head_dim
    passes = ("fwd", "bwd") if call.pass_ == "fwd+bwd" else ("fwd",)
    parts = dict(all_to_all_ms=0.0, compute_ms=0.0, merge_ms=0.0, exposed_ring_ms=0.0)
    steps = masked_ring_steps(call, u, r) if call.masked else ring_steps(call, u, r)
    kv_heads = kv_heads_per_rank(call.heads, call.kv_heads, u)
    accumulator_hop = cluster.hop_ms(volume.accumulator_hop_bytes, ring_ranks) if r > 1 else 0.0  # backward
    for pass_ in passes:
        backward = pass_ == "bwd"
        if u > 1:
            sent = (volume.backward if backward else volume.forward).all_to_all_bytes
            local = sent * u / (u - 1)  # the tensors before the exchange
            parts["all_to_all_ms"] += cluster.all_to_all_ms(sent, ulysses_ranks, messages=4) \
                + 2 * memory_pass_ms(cluster, 2 * local)  # copies into and out of the send buffers
        hop = cluster.hop_ms(volume.kv_hop_bytes, ring_ranks) if r > 1 else 0.0
        if backward:
            hop += accumulator_hop
        for step, blocks in enumerate(steps):
            compute, merge = max((_block_ms(cluster, block, step, backward, d, e, kv_heads, r) for block in blocks),
                                 key=sum, default=(0.0, 0.0))
            parts["compute_ms"] += compute
            parts["merge_ms"] += merge
            if step < r - 1:
                parts["exposed_ring_ms"] += max(0.0, hop - compute - merge)
        if backward:  # the accumulators' hop home
            parts["exposed_ring_ms"] += accumulator_hop
    total = sum(parts.values())
    # held at once: the q, k, v shards, their copies after the all-to-all, two K/V blocks of the
    # ring (one computing, one arriving) and the fp32 output accumulator with its LSE
    shard = call.batch * call.seqlen // (u * r) * (call.heads + 2 * call.kv_heads) * d * e
    heads = heads_per_rank(call.heads, u)
    gathered = call.batch * call.seqlen // r * (heads + 2 * kv_heads) * d * e if u > 1 else 0
    accumulator = call.batch * call.seqlen // r * heads * (d + 1) * ACCUMULATOR_SIZE
    memory = shard + gathered + (2 * volume.kv_hop_bytes if r > 1 else 0) + accumulator
    work_imbalance = None
    if call.masked:
        work_imbalance = imbalance(rank_work(call.seqlen, r, call.layout, call.documents, call.bounds))
    return dict(ulysses_degree=u, ring_degree=r, placement=placement, **parts, total_ms=total, memory_bytes=memory,
                work_imbalance=work_imbalance,
                tflops_per_gpu=call.flops() / (u * r) / (total * 1e-3) / 1e12,
                comm_bytes=(volume.forward.bytes + (volume.backward.bytes if call.pass_ == "fwd+bwd" else 0)),
                ulysses_level=cluster.level(ulysses_ranks), ring_level=cluster.ring_level(ring_ranks))


def predict_block(shape, cluster: Cluster, batch: int, seqlen: int, tensor_parallel: int, ulysses_degree: int,
                  ring_degree: int, placement: str = "ulysses_inner", pass_: str = "fwd+bwd", causal: bool = True,
                  layout: str = "zigzag", element_size: int = 2, documents: tuple[int, ...] | None = None,
                  window: int | None = None) -> dict:
    """One transformer block (``cost_model.ModelShape``) on a ``tp x u x r`` mesh, tensor
    parallelism innermost (Megatron with sequence parallelism), ZeRO-1 over the ``u x r``
    ranks that hold the same weights. Adds to the attention: the block's matmuls at
    ``gemm_efficiency`` of peak, TP-SP's collectives of ``b·s·d/(u r)`` elements (2
    all-gathers + 2 reduce-scatters forward, 4 + 2 backward: 10 units), not overlapped, and
    the gradients' reduce-scatter and the parameters' all-gather, exposed only beyond the
    backward's compute."""
    t, u, r = tensor_parallel, ulysses_degree, ring_degree
    n, sp = t * u * r, u * r
    if shape.heads % t or (shape.kv_heads % t and t % shape.kv_heads):
        raise ValueError(f"tensor parallelism {t} must divide the {shape.heads} heads and divide or be a multiple of "
                         f"the {shape.kv_heads} K/V heads")
    call = Attention(shape.heads // t, max(1, shape.kv_heads // t), shape.head_dim, batch, seqlen, pass_, causal,
                     layout, element_size, documents, window)
    attention = predict_attention(call, cluster, u, r, placement, stride=t)
    factor = 3.0 if pass_ == "fwd+bwd" else 1.0
    linear_params = shape.block_params - 2 * shape.hidden
    linear_flops = 2.0 * batch * seqlen * linear_params * factor / n
    matmul_ms = linear_flops / (cluster.peak_tflops * 1e12 * cluster.gemm_efficiency) * 1e3
    tp_ranks = list(range(t))
    activation = batch * seqlen // sp * shape.hidden * element_size  # one b·s·d/(u r) tensor
    collectives = (2, 2) if pass_ == "fwd" else (6, 4)
    tp_ms = sum(collectives) * cluster.collective_ms(activation * (t - 1) / t, tp_ranks) if t > 1 else 0.0
    weights = linear_params / t * element_size
    sp_ranks = [t * i for i in range(sp)]
    gradient_bytes = weights * (sp - 1) / sp if pass_ == "fwd+bwd" else 0.0  # each of the two collectives
    gradient_ms = 2 * cluster.collective_ms(gradient_bytes, sp_ranks) if gradient_bytes else 0.0
    backward_compute = (matmul_ms + attention["compute_ms"]) * 2 / 3 if pass_ == "fwd+bwd" else 0.0
    exposed_gradient = max(0.0, gradient_ms - backward_compute)
    total = attention["total_ms"] + matmul_ms + tp_ms + exposed_gradient
    flops = call.flops() * t + 2.0 * batch * seqlen * linear_params * factor
    # per GPU, all layers: bf16 weights and gradients split by TP, fp32 Adam states by TP and ZeRO-1
    # over the u x r ranks; activations 34·b·s·d bytes per block (Korthikanti et al.) split over all n
    memory = shape.layers * (shape.block_params / t * (4 + 12 / sp) + 34 * batch * seqlen * shape.hidden / n)
    return dict(tensor_parallel=t, ulysses_degree=u, ring_degree=r, placement=placement, total_ms=total,
                attention_ms=attention["total_ms"], matmul_ms=matmul_ms, tensor_parallel_ms=tp_ms,
                exposed_gradient_ms=exposed_gradient, tflops_per_gpu=flops / n / (total * 1e-3) / 1e12,
                comm_bytes=attention["comm_bytes"] + sum(collectives) * activation * (t - 1) / t + 2 * gradient_bytes,
                memory_bytes=memory,
                attention=attention)
