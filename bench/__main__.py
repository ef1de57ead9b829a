"""``python -m bench <command>``: numerics verification (and, later, benchmarks)."""

from __future__ import annotations

import argparse
import os
import sys


def _interpret_triton_without_gpu() -> None:
    """Without a GPU, run the Triton kernels through the interpreter. Must run before
    ``kernels`` is imported: Triton reads the variable when it decorates a kernel."""
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"


def main(argv=None) -> int:
    _interpret_triton_without_gpu()
    from . import verify

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    verify_parser = commands.add_parser("verify", help="check every backend against float64 naive attention",
                                        description=verify.__doc__)
    verify.add_arguments(verify_parser)
    verify_parser.set_defaults(run=verify.run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
