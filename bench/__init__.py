"""Benchmarks and numerics verification: ``usp-bench <command>``."""
