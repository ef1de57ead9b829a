"""Figures drawn from the JSON files ``python -m bench`` writes under ``bench/results/``
(``python -m plots`` or ``python -m bench plot``); PNGs go to ``plots/figures/``."""
