"""``usp-bench plot``: the same as ``python -m usp.plots``.

PNG figures from the JSON files under ``bench/results/`` (the newest of each kind, or
the files given): kernel TFLOP/s against sequence length, scaling per mesh,
communication volume against degree, and a timeline of ring steps.
"""

from usp.plots.cli import add_arguments, run

__all__ = ["add_arguments", "run"]
