"""``python -m usp.plots`` (or ``usp-bench plot``): PNG figures from the JSON files
``usp-bench`` wrote.

Inputs are result files or run folders (the newest result of each kind in a folder is
used); with none, the newest run folder under runs/ in the current directory. Figures:
kernel TFLOP/s against sequence length (ours and each SDPA backend), strong and weak
scaling over world sizes (or, with a single world size, time against sequence length),
communication volume against degree per method, and timelines of ring steps. Every
figure names the machine its data came from; results from different machines are
refused unless --mixed-machines is given.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from usp import RUNS_DIR

from .figures import FIGURES


def _write_order(path: Path) -> int:
    """Which of the results written in one second came later: ``-2``, ``-3``... after the time."""
    match = re.search(r"-\d{8}-\d{6}-(\d+)$", path.stem)
    return int(match.group(1)) if match else 1


def newest_results(folder: Path) -> list[Path]:
    """The newest file of each kind that has figures in ``folder``, by its ``created`` stamp
    (to the second) and, within a second, by the order the files were written."""
    newest: dict[str, tuple[tuple[str, int], Path]] = {}
    for path in folder.glob("*.json"):
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        kind, when = document.get("kind"), (document.get("created", ""), _write_order(path))
        if kind in FIGURES and (kind not in newest or when > newest[kind][0]):
            newest[kind] = (when, path)
    return [path for _, path in newest.values()]


def newest_run(runs_dir: Path) -> Path | None:
    """The most recent folder under ``runs_dir`` holding results with figures."""
    folders = sorted((p for p in runs_dir.glob("*") if p.is_dir() and newest_results(p)), key=lambda p: p.name)
    return folders[-1] if folders else None


def machine_key(document: dict) -> str:
    """The host a result was measured on (its devices, a GPU and the CPU, belong to it)."""
    machine = document.get("machine", {})
    host = f"host {machine['host']}, " if machine.get("host") else ""
    return f"{host}{machine.get('cpu', '?')} x {machine.get('cpu_count', '?')} cores, {machine.get('platform', '?')}"


def make_figures(paths: list[Path], out_dir: Path, mixed_machines: bool = False) -> list[Path]:
    """Draw every figure the given result files support; return the PNGs written.
    Raises ValueError for a file without figures, or for files from several machines
    unless ``mixed_machines``."""
    documents = []
    for path in paths:
        document = json.loads(Path(path).read_text())
        if document.get("kind") not in FIGURES:
            raise ValueError(f"{path}: no figures for results of kind {document.get('kind')!r} "
                             f"(known: {sorted(FIGURES)})")
        documents.append(document)
    machines = sorted({machine_key(d) for d in documents})
    if len(machines) > 1 and not mixed_machines:
        raise ValueError("these results come from different machines: " + "; ".join(machines)
                         + " (pass --mixed-machines to draw them anyway; each figure names its machine)")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for document in documents:
        for draw in FIGURES[document["kind"]]:
            written += draw(document, out_dir)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", type=Path,
                        help="result JSON files or run folders (default: the newest run folder under runs/)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where to write the PNGs (default: figures/ in the folder of the first input)")
    parser.add_argument("--mixed-machines", action="store_true",
                        help="draw results from different machines together (default: off, refused)")


def run(args: argparse.Namespace) -> int:
    inputs = list(args.inputs)
    if not inputs:
        latest = newest_run(RUNS_DIR)
        if latest is None:
            print(f"no results under {RUNS_DIR}/: run usp-bench <command> first, or name the files",
                  file=sys.stderr)
            return 2
        inputs = [latest]
    paths = []
    for item in inputs:
        found = newest_results(item) if item.is_dir() else [item]
        if item.is_dir() and not found:
            print(f"plot: no result files with figures in {item}", file=sys.stderr)
            return 2
        paths += found
    out_dir = args.out_dir or (inputs[0] if inputs[0].is_dir() else inputs[0].parent) / "figures"
    for path in paths:
        print(f"reading {path}")
    try:
        written = make_figures(paths, out_dir, args.mixed_machines)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        print(f"plot: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    print(f"{len(written)} figures in {out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m usp.plots", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
