"""Thin command-line entry points: ``python -m experiments.run`` and ``experiments.generate``."""
