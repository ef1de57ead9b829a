"""``usp-bench all``: the main job. Runs, with their defaults for this machine, verify,
kernels, scaling, emulate, balance, model and train (train only where transformers is
installed: ``pip install "usp-attention[hf]"``), each writing its JSON into one run
folder, then draws that folder's figures into its figures/ subfolder. Nothing outside the run folder
is written. Exits non-zero when a step fails (the later steps still run); Ctrl-C stops
the job, keeping what was written.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback
from pathlib import Path

from .cli_args import world_size_type
from .results import new_run_dir

STEPS = ("verify", "kernels", "scaling", "emulate", "balance", "model", "train")
INTERRUPTED = 130  # the exit status of a command stopped with Ctrl-C


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="the run folder (default: a new folder runs/<UTC time>-all under the current directory)")
    parser.add_argument("--world-size", type=world_size_type, nargs="+", default=[1, 2, 4],
                        help="process counts of the scaling step")


def run(args: argparse.Namespace) -> int:
    from .__main__ import build_parser  # the command table imports this module

    run_dir = args.out_dir or new_run_dir("all")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"main job: {', '.join(STEPS)}, then the figures; results in {run_dir}", flush=True)
    parser = build_parser()
    failed, started = [], time.perf_counter()
    for step in STEPS:
        if step == "train" and not transformers_installed():
            print('\n== train: skipped, transformers is not installed (pip install "usp-attention[hf]")', flush=True)
            continue
        argv = [step, "--out-dir", str(run_dir), *step_options(step, args)]
        print(f"\n== usp-bench {' '.join(argv)}", flush=True)
        step_start = time.perf_counter()
        status = _run_step(parser, argv)
        print(f"== {step}: {'ok' if status == 0 else f'exit status {status}'} in "
              f"{time.perf_counter() - step_start:.0f} s", flush=True)
        if status == INTERRUPTED:
            print(f"interrupted: what was measured so far is in {run_dir}", file=sys.stderr)
            return INTERRUPTED
        if status != 0:
            failed.append(step)
    print(f"\n== usp-bench plot {run_dir} --out-dir {run_dir / 'figures'}", flush=True)
    if _run_step(parser, ["plot", str(run_dir), "--out-dir", str(run_dir / "figures")]) != 0:
        failed.append("plot")
    print(f"\nmain job done in {time.perf_counter() - started:.0f} s: results in {run_dir}, figures in "
          f"{run_dir / 'figures'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def transformers_installed() -> bool:
    return importlib.util.find_spec("transformers") is not None


def step_options(step: str, args: argparse.Namespace) -> list[str]:
    """The options a step gets beyond its output folder."""
    return ["--world-size", *map(str, args.world_size)] if step == "scaling" else []


def _run_step(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """One command's exit status: an exception from it counts as a failure of the step,
    not the end of the job; Ctrl-C (``INTERRUPTED``) ends the job."""
    try:
        step_args = parser.parse_args(argv)
        return step_args.run(step_args)
    except KeyboardInterrupt:
        return INTERRUPTED
    except SystemExit as error:
        if error.code not in (0, None) and not isinstance(error.code, int):
            print(error.code, file=sys.stderr)
        return error.code if isinstance(error.code, int) else 1
    except Exception:  # the step failed; report it and go on with the next
        traceback.print_exc()
        return 1
