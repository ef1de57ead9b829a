"""Cluster presets for the cost model: every figure with its source beside it.

Nothing here is fitted to the paper's Tables 3 and 4, which the model is checked
against (``paper_tables.py``). Where no figure was published for the exact card, the
preset says which card's figure stands in and why. ``usp-bench comm`` measures a
cluster's own links and ``usp-bench kernels`` its kernel curve: prefer those.
"""

from __future__ import annotations

from .hardware import Cluster
from .kernel_curve import KernelCurve, wave_fill

# --- kernel curves -------------------------------------------------------------------
# FlashAttention's benchmark: 16K tokens per call (batch = 16384 / L), 16 heads of 128, so
# one call's forward work is 4·(16384/L)·16·L²·128 FLOPs, halved when causal.
FA_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)


def _fa_points(tflops, causal: bool) -> tuple[tuple[float, float], ...]:
    return tuple((4 * 16384 * 16 * 128 * length * (0.5 if causal else 1.0), t) for length, t in zip(FA_LENGTHS, tflops))


# FlashAttention-2 forward on H100 SXM5, head dim 128, read off the FlashAttention-3 paper's
# figures (arXiv 2407.08608): causal 191..335, full 309..370 TFLOP/s for L = 512..16K. Its
# peak agrees with the FlashAttention-2 announcement ("up to 335 TFLOPs/s" on H100,
# hazyresearch.stanford.edu/blog/2023-07-17-flash2).
H100_FA2_CAUSAL = (191, 260, 298, 319, 333, 335)
H100_FA2_FULL = (309, 350, 362, 368, 370, 370)
SOURCE_H100 = ("FlashAttention-2 forward, H100 SXM5, d128 (FlashAttention-3 paper, arXiv 2407.08608, figures); "
               "backward at 0.8 of the forward's rate (assumption: FlashAttention-2's backward reaches about 0.8 of "
               "its forward in the same paper)")
# No per-length A100 figures are published as text: the H100 curve's shape (the same
# FlashAttention-2 code, not using Hopper's features) scaled to FlashAttention-2's published
# A100 peak, "up to 230 TFLOPs/s" (hazyresearch.stanford.edu/blog/2023-07-17-flash2).
A100_SCALE = 230 / max(H100_FA2_FULL)
SOURCE_A100 = ("FlashAttention-2's per-length shape on H100 (arXiv 2407.08608) scaled to its published A100 peak of "
               "230 TFLOP/s (hazyresearch.stanford.edu/blog/2023-07-17-flash2); backward 0.8 of forward (assumption)")
# No FlashAttention figures are published for the L20: the A100 curve scaled by the dense
# bf16 peaks, 119.5 / 312 TFLOP/s (an assumption: the same share of peak on Ada's tensor cores).
L20_SCALE = A100_SCALE * 119.5 / 312


# Tiles: FlashAttention-2's forward at head dim 128 runs one thread block per 128 query rows
# of a head (run_mha_fwd_hdim128 in csrc/flash_attn/src/flash_fwd_launch_template.h of
# github.com/Dao-AILab/flash-attention: 128 x 64 tiles on sm80/sm90, 128 x 32 on sm89, whose
# comment says "we get 2 CTAs per SM"); two blocks per SM on every card (assumption for
# sm80/sm90: 64 KB of shared memory and 128 threads of up to 255 registers each fit twice).
# The curve's points are H100 runs of 16K tokens on 16 heads: 16384/128 x 16 = 2048 tiles on
# 132 SMs x 2, 8 waves, 2048/2112 full; the A100 and L20 curves keep that H100 shape.
FA_TILES = dict(tile_rows=128, tiles_per_sm=2, reference_fill=wave_fill(16384 // 128 * 16, 132 * 2))
SOURCE_TILES = ("; tiles of 128 query rows, 2 per SM (FlashAttention-2's flash_fwd_launch_template.h); the curve's "
                "calls filled 2048/2112 of their waves on the H100")


def _curve(name: str, source: str, scale: float) -> KernelCurve:
    return KernelCurve(name, source + SOURCE_TILES, _fa_points([t * scale for t in H100_FA2_CAUSAL], True),
                       _fa_points([t * scale for t in H100_FA2_FULL], False), backward_ratio=0.8, **FA_TILES)


KERNELS = {
    "H100": _curve("FlashAttention-2 on H100 (published)", SOURCE_H100, 1.0),
    "A100": _curve("FlashAttention-2 on A100 (published peak, H100 shape)", SOURCE_A100, A100_SCALE),
    "L20": _curve("FlashAttention-2 on L20 (A100 curve x peak ratio)", SOURCE_A100 + "; x 119.5/312 for the L20",
                  L20_SCALE),
}

# --- links ---------------------------------------------------------------------------
NVLINK_A100 = ("about 230 GB/s NCCL bus bandwidth on A100 NVLink (NCCL maintainer, "
               "github.com/NVIDIA/nccl-tests/issues/149)")
NVLINK_H100 = ("about 370 GB/s NCCL bus bandwidth on H100 NVLink for all-to-all-like and ring traffic (NCCL "
               "maintainer, github.com/NVIDIA/nccl-tests/issues/212)")
IB_200 = "24 GB/s per 200 Gb/s NIC, one NIC per GPU (github.com/NVIDIA/nccl-tests/issues/119)"
IB_400 = "48 GB/s per 400 Gb/s NDR NIC, one NIC per GPU (github.com/NVIDIA/nccl-tests/issues/267)"
LATENCY_NVLINK = "about 10 us for a small NCCL collective on A100 NVLink (github.com/NVIDIA/nccl-tests/issues/331)"
LATENCY_PCIE = ("about 12 us for an 8-byte all-to-all on 2 PCIe GPUs, about 42 us for an 8-GPU PCIe all-reduce "
                "(github.com/tinygrad/open-gpu-kernel-modules/issues/17, github.com/NVIDIA/nccl/issues/1530)")
LATENCY_NETWORK = "about 17 us for a small 2-node all-reduce (github.com/NVIDIA/nccl-tests/issues/293)"
# PCIe without NVLink: one GPU-to-GPU stream per GPU (a ring hop, a pair exchanging) runs near
# the PCIe 4.0 x16 rate, 25 GB/s one way within a socket and 20 across (p2pBandwidthLatencyTest
# on 8 x A40, two sockets: about 50 and 40 GB/s both ways, github.com/NVIDIA/nccl-tests/issues/74).
# Many streams at once through the CPU do not: an all-to-all over 4 GPUs with P2P through the CPU
# reaches 2 GB/s bus bandwidth (4 x RTX 4090, github.com/NVIDIA/nccl/issues/1603: "CPUs make very
# poor PCI switches ... A2A performance is bad when P2P is used across CPUs"). No figure is
# published for 8 GPUs across two sockets: ``host_bridged_all_to_all`` derives it from the 4-GPU
# figure (the NCCL maintainers: "the A2A performance of most CPU interconnects fall drastically
# under load", github.com/NVIDIA/nccl/issues/1163).
PCIE_P2P = "25 / 20 GB/s one way within / across sockets (8 x A40, github.com/NVIDIA/nccl-tests/issues/74)"
PCIE_ALL_TO_ALL = ("a pair: one stream each way, as a P2P hop; 4 GPUs of one socket: 2 GB/s bus bandwidth with P2P "
                   "through the CPU (4 x RTX 4090, github.com/NVIDIA/nccl/issues/1603); 8 GPUs over two sockets: "
                   "derived from the 4-GPU figure, each socket's root complex forwarding peer traffic at the rate it "
                   "reaches for its own 4 GPUs, now also carrying the other socket's traffic to its GPUs "
                   "(assumption; github.com/NVIDIA/nccl/issues/1163)")


def host_bridged_all_to_all(socket_gbs: float, per_socket: int, n: int) -> float:
    """Bus bandwidth of an all-to-all over ``n`` GPUs, ``per_socket`` under each CPU socket,
    when each socket's root complex forwards GPU-to-GPU traffic at one aggregate rate ``C``,
    whichever way it flows, and the link between the sockets is not the narrower.

    ``socket_gbs`` is the bus bandwidth of an all-to-all of the ``per_socket`` GPUs of one
    socket, so ``C = per_socket * socket_gbs``. Each GPU holds ``V`` bytes and sends ``V/n`` to
    every other member. A root complex forwards what its ``m = per_socket`` GPUs send,
    ``m (n-1)/n V``, and what the other sockets send to them, ``m (n-m)/n V``::

        time = m V (2n - m - 1) / (n C)        bus bandwidth = (n-1)/n V / time
             = (n - 1) C / (m (2n - m - 1))    8 GPUs, 4 per socket: 7 C / 44
    """
    m, capacity = per_socket, per_socket * socket_gbs
    return (n - 1) * capacity / (m * (2 * n - m - 1))


SM_COUNT = {"A100": 108, "H100": 132, "L20": 92}
SPECS = {
    "A100": "A100 SXM4 80GB: 312 TFLOP/s dense bf16, 2039 GB/s HBM2e (NVIDIA A100 datasheet), 108 SMs (NVIDIA "
            "A100 Tensor Core GPU architecture whitepaper)",
    "H100": "H100 SXM5: 989 TFLOP/s dense bf16, 3350 GB/s HBM3 (NVIDIA H100 datasheet), 132 SMs (NVIDIA H100 Tensor "
            "Core GPU architecture whitepaper)",
    "L20": "L20 48GB: 119.5 TFLOP/s dense bf16, 864 GB/s GDDR6, PCIe 4.0 x16 (NVIDIA L20 product brief), 92 SMs "
           "(AD102 with 11776 CUDA cores, 128 per SM; www.topcpu.net/en/gpu-c/a40-pcie-vs-l20)",
}
LAUNCH = "10 us per kernel issued from PyTorch (assumption: host dispatch and launch of one small op)"
GEMM = "0.7 of peak for the block's large bf16 matmuls (assumption: typical cuBLAS share at these shapes)"


def _nvlink_cluster(name: str, gpu: str, nodes: int, peak: float, memory: float, nvlink: float, nvlink_source: str,
                    network: float, network_source: str, memory_gib: float) -> Cluster:
    links = dict(all_to_all_gbs={"domain": {2: nvlink, 8: nvlink}}, p2p_gbs={"domain": nvlink},
                 latency_us={"domain": 10.0})
    sources = dict(spec=SPECS[gpu], domain=nvlink_source, latency=LATENCY_NVLINK, launch=LAUNCH, gemm=GEMM,
                   kernel=KERNELS[gpu].source)
    if nodes > 1:
        links["all_to_all_gbs"]["network"] = {n: network * (n - 1) / (n - 8) for n in (16, 32, 64)}
        links["p2p_gbs"]["network"] = network
        links["latency_us"]["network"] = 17.0
        sources.update(network=network_source + "; an all-to-all over n GPUs on 8-GPU nodes sends (n-8)/(n-1) of "
                       "its bytes over the network: bus bandwidth NIC x (n-1)/(n-8)", network_latency=LATENCY_NETWORK)
    return Cluster(name, 8, 8, nodes, peak, memory, kernel=KERNELS[gpu], launch_us=10.0, memory_gib=memory_gib,
                   sm_count=SM_COUNT[gpu], sources=sources, **links)


CLUSTERS = {
    "8xA100-NVLink": _nvlink_cluster("8xA100-NVLink", "A100", 1, 312.0, 2039.0, 230.0, NVLINK_A100, 0, "", 80),
    "8xL20-PCIe": Cluster(
        "8xL20-PCIe", gpus_per_domain=4, gpus_per_node=8, nodes=1, peak_tflops=119.5, memory_gbs=864.0,
        all_to_all_gbs={"domain": {2: 25.0, 4: 2.0}, "node": {8: host_bridged_all_to_all(2.0, 4, 8)}},
        p2p_gbs={"domain": 25.0, "node": 20.0}, latency_us={"domain": 12.0, "node": 42.0}, kernel=KERNELS["L20"],
        launch_us=10.0, memory_gib=48, sm_count=SM_COUNT["L20"],
        sources=dict(spec=SPECS["L20"], topology="two CPU sockets, four GPUs under each (the paper's 8 x L20 box)",
                     p2p=PCIE_P2P, all_to_all=PCIE_ALL_TO_ALL, latency=LATENCY_PCIE, launch=LAUNCH, gemm=GEMM,
                     kernel=KERNELS["L20"].source)),
    "2x8xA800": _nvlink_cluster("2x8xA800", "A100", 2, 312.0, 2039.0, 200.0 * 230 / 300,
                                "A800 NVLink: 400 GB/s both ways against the A100's 600, so 230 x 2/3 GB/s "
                                "(" + NVLINK_A100 + ")", 24.0, IB_200, 80),
    "8xH100-NVLink": _nvlink_cluster("8xH100-NVLink", "H100", 1, 989.0, 3350.0, 370.0, NVLINK_H100, 0, "", 80),
    "2x8xH100": _nvlink_cluster("2x8xH100", "H100", 2, 989.0, 3350.0, 370.0, NVLINK_H100, 48.0, IB_400, 80),
}
