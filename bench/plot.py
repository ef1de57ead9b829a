"""``usp-bench plot``: the same as ``python -m usp.plots``.

PNG figures from result JSON files or run folders: kernel TFLOP/s against sequence
length, strong and weak scaling, communication volume against degree, and timelines of
ring steps. Results from different machines are refused unless --mixed-machines.
"""

from usp.plots.cli import add_arguments, run

__all__ = ["add_arguments", "run"]
