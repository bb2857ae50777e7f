"""Timing and memory harness behind `experiments/bench.py`."""
