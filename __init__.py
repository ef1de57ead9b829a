"""USP: Unified Sequence Parallelism for long-context attention.

``usp.kernels``: attention on one device (Triton flash attention with the LSE, PyTorch's
fused ops, plain torch math) and the exact LSE merge. ``usp.comm``: the device mesh,
ring point-to-point and the Ulysses all-to-alls. ``usp.attention``: ring, Ulysses and
USP attention with autograd, the sharding helpers and the float64 oracle.
``usp.bench`` (``usp-bench``): verification and benchmarks; ``usp.plots``: figures.

Importing ``usp`` imports none of its sub-packages, so ``TRITON_INTERPRET`` may still
be set before ``usp.kernels`` is imported.
"""

from pathlib import Path

__version__ = "0.2.0"
# Where usp-bench writes a run by default (a new folder per run) and usp.plots looks for
# the newest one: relative to the current directory.
RUNS_DIR = Path("runs")
