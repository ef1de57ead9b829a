"""``python -m usp.plots``: PNG figures from the JSON files ``usp-bench`` wrote.

By default, the newest result of each kind (kernels, scaling, emulate, model) under
``bench/results/``; or the files given. Figures: kernel TFLOP/s against sequence
length (ours against each SDPA backend), scaling (throughput and TFLOP/s per rank per
mesh), communication volume against degree per method, and a timeline of ring steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .figures import FIGURES

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
FIGURES_DIR = Path(__file__).resolve().parent / "figures"


def newest_results(results_dir: Path) -> dict[str, Path]:
    """The newest file of each kind that has figures, by its ``created`` stamp."""
    newest: dict[str, tuple[str, Path]] = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        kind, created = document.get("kind"), document.get("created", "")
        if kind in FIGURES and (kind not in newest or created >= newest[kind][0]):
            newest[kind] = (created, path)
    return {kind: path for kind, (_, path) in newest.items()}


def make_figures(paths: list[Path], out_dir: Path) -> list[Path]:
    """Draw every figure the given result files support; return the PNGs written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        document = json.loads(Path(path).read_text())
        kind = document.get("kind")
        if kind not in FIGURES:
            raise ValueError(f"{path}: no figures for results of kind {kind!r} (known: {sorted(FIGURES)})")
        for draw in FIGURES[kind]:
            written += draw(document, out_dir)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", type=Path,
                        help="result JSON files (default: the newest of each kind in --results-dir)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where to look (default bench/results)")
    parser.add_argument("--out-dir", type=Path, default=FIGURES_DIR, help="where to write (default plots/figures)")


def run(args: argparse.Namespace) -> int:
    inputs = list(args.inputs) or list(newest_results(args.results_dir).values())
    if not inputs:
        print(f"no result files in {args.results_dir}: run usp-bench <command> first", file=sys.stderr)
        return 2
    for path in inputs:
        print(f"reading {path}")
    try:
        written = make_figures(inputs, args.out_dir)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        print(f"plot: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usp.plots", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
