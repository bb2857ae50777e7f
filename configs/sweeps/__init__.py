"""Sweep configs: `python -m experiments.sweep --config=configs/sweeps/<name>.py`."""
