"""Figures drawn from the JSON files under ``bench/results/`` (filled in by the benchmark work)."""
