"""Benchmark configs: `python -m experiments.bench --config=configs/bench/<name>.py[:arg]`."""
