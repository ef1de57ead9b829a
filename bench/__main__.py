"""``usp-bench <command>`` (or ``python -m usp.bench <command>``): verify numerics, time the
kernels, run and emulate sequence-parallel scaling, evaluate the paper's cost model, and
plot the results. Every command but plot writes a self-describing JSON file, by default
into a new folder ``runs/<UTC time>-<command>`` under the current directory; ``all`` runs
the main job into one such folder and draws its figures there."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .cli_args import HelpFormatter, plain

# command -> (module of usp.bench, one-line help); each module has add_arguments(parser) and run(args)
COMMANDS = {
    "all": ("main_job", "the main job: verify, kernels, scaling, emulate, balance, model and train into one run "
                        "folder, then plot"),
    "verify": ("verify", "check every backend and the sequence-parallel methods against float64 naive attention"),
    "kernels": ("kernel_bench", "time the local backends against PyTorch SDPA (TFLOP/s, ratio to SDPA)"),
    "scaling": ("scaling", "run ring, Ulysses and USP attention on N processes (gloo, or NCCL under torchrun)"),
    "emulate": ("emulate", "time the per-rank schedule of N virtual ranks on one device; predict the step time"),
    "tune": ("tune", "time candidate tile configs of each Triton kernel on this GPU, for the config table"),
    "train": ("train", "train a small LLaMA-family model with USP on gloo processes and on one; compare the losses"),
    "faults": ("faults", "inject one fault per run into ring, Ulysses and USP on gloo processes; count hangs"),
    "balance": ("balance", "per-rank work of each layout (dense causal, packed documents) and bytes per schedule"),
    "comm": ("comm_bench", "measure all-to-all and P2P bandwidth and latency here; write a cluster file for model"),
    "model": ("cost_model_cli", "which Ulysses x ring mesh to run: predicted time per mesh on a cluster, ranked"),
    "plot": ("plot", "draw PNG figures from result JSON files (same as python -m usp.plots)"),
}


def _interpret_triton_without_gpu() -> None:
    """Without a GPU, run the Triton kernels through the interpreter. Must run before
    ``usp.kernels`` is imported: Triton reads the variable when it decorates a kernel."""
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usp-bench", description=plain(__doc__), formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (module_name, summary) in COMMANDS.items():
        module = importlib.import_module(f".{module_name}", __package__)
        sub = commands.add_parser(name, help=summary, description=plain(module.__doc__), formatter_class=HelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    _interpret_triton_without_gpu()
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
