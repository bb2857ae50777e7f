"""Timing and memory benchmarks of attention implementations (see `harness`).

`experiments/bench.py` is the command-line entry; `configs/bench/*.py` describe the grids.
"""

from attnjax.bench.harness import Result as Result
from attnjax.bench.harness import measure as measure
from attnjax.bench.harness import memory_budget_bytes as memory_budget_bytes
from attnjax.bench.harness import run_benchmark as run_benchmark
from attnjax.bench.harness import run_cases as run_cases
from attnjax.bench.peers import Case as Case
