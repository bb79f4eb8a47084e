"""The benchmarks (``python -m bench`` runs them all; each script also runs on its own)."""
