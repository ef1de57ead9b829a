"""The README's runnable parts: the CPU examples (sequence-parallel attention, packed
documents over a USP mesh, and training a transformers model) run as written under
torchrun with 4 processes, and the commands it names exist."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from usp.bench.__main__ import COMMANDS
from usp.bench.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(marker: str) -> str:
    """The first fenced block after ``marker`` in the README."""
    rest = README.split(marker, 1)[1]
    return re.search(r"```\w*\n(.*?)```", rest, re.S).group(1)


def _run_example(marker: str, tmp_path: Path) -> str:
    """The README's example after ``marker``, run under torchrun with 4 processes: its output."""
    script = tmp_path / "example.py"
    script.write_text(_block_after(marker))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
                           str(free_port()), str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow  # 6-12 s of subprocesses: the slow step keeps the default suite's budget
def test_the_gloo_example_runs_as_written_under_torchrun(tmp_path):
    stdout = _run_example("<!-- example: gloo -->", tmp_path)
    (error,) = re.findall(r"max \|USP - float64\| = (\S+)", stdout)
    assert float(error) < 1e-5  # float32 attention against float64 on the whole sequence
    assert "rank 0 holds positions [0, 1, 2]" in stdout


@pytest.mark.slow
def test_the_documents_example_runs_as_written_under_torchrun(tmp_path):
    stdout = _run_example("<!-- example: documents -->", tmp_path)
    (error,) = re.findall(r"max \|USP - float64\| = (\S+)", stdout)
    assert float(error) < 1e-5
    assert "rank 0 positions [298, 299, 0, 1, 2, 9, 10, 11]" in stdout  # as the README says


@pytest.mark.slow
def test_the_training_example_runs_as_written_under_torchrun(tmp_path):
    pytest.importorskip("transformers")
    losses = [float(x) for x in re.findall(r"step \d: loss (\S+)", _run_example("<!-- example: hf -->", tmp_path))]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.1  # printed by rank 0 only; it learns


def test_the_commands_the_readme_names_exist():
    named = set(re.findall(r"usp-bench (\w+)", README))
    assert named and named <= set(COMMANDS), named - set(COMMANDS)
    assert _block_after("<!-- main-command -->").strip().endswith("usp-bench all")
    assert "python -m pytest" in _block_after("<!-- test-command -->")
