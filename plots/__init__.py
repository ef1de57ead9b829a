"""Figures drawn from the JSON files ``usp-bench`` writes under ``bench/results/``
(``python -m usp.plots`` or ``usp-bench plot``); PNGs go to ``plots/figures/``."""
