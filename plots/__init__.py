"""Figures drawn from the JSON files ``usp-bench`` writes (``python -m usp.plots`` or
``usp-bench plot``), into the run folder's figures/ by default. Reads the JSON only."""
