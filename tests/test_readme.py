"""The README's runnable parts: the CPU example of sequence-parallel attention runs as
written under torchrun with 4 processes, and the commands it names exist."""

import os
import re
import subprocess
import sys
from pathlib import Path

from usp.bench.__main__ import COMMANDS
from usp.bench.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(marker: str) -> str:
    """The first fenced block after ``marker`` in the README."""
    rest = README.split(marker, 1)[1]
    return re.search(r"```\w*\n(.*?)```", rest, re.S).group(1)


def test_the_gloo_example_runs_as_written_under_torchrun(tmp_path):
    script = tmp_path / "usp_example.py"
    script.write_text(_block_after("<!-- example: gloo -->"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
                           str(free_port()), str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (error,) = re.findall(r"max \|USP - float64\| = (\S+)", proc.stdout)
    assert float(error) < 1e-5  # float32 attention against float64 on the whole sequence
    assert "rank 0 holds positions [0, 1, 2]" in proc.stdout


def test_the_commands_the_readme_names_exist():
    named = set(re.findall(r"usp-bench (\w+)", README))
    assert named and named <= set(COMMANDS), named - set(COMMANDS)
    assert _block_after("<!-- main-command -->").strip().endswith("usp-bench all")
    assert "python -m pytest" in _block_after("<!-- test-command -->")
