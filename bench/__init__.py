"""Benchmarks and numerics verification: ``python -m bench <command>``."""
