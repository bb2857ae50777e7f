"""Flex attention benchmark: attnjax `xla` and `reference` against jax.nn and PyTorch.

Default (the foundation issue's grid, `make bench`):

  python -m experiments.bench --config=configs/bench/flex.py --workdir=/tmp/attnjax_bench

  forward and forward+backward; masks none / causal / window256 / documents512;
  T in {1024, 4096, 16384}; B=1, N=8, H=64, float32; median of 5 runs after one warm-up (fewer, at
  least 3, when a case would take more than `max_case_seconds`); plus T=65536 causal
  forward+backward for the xla path only (one run). Cases whose compiled memory exceeds the RAM
  budget are reported as skipped, and so is the dense `reference` above T=4096 (`peer_max_T`; its
  memory is still analysed). About 45 minutes on a 2-core CPU with torch installed
  (`pip install -e .[bench]`), most of it in the dense peers at T=16384 and the T=65536 case.

Demo (`make demo`):

  python -m experiments.bench --config=configs/bench/flex.py:demo --workdir=/tmp/attnjax_demo

  forward+backward, causal and window256, T in {1024, 2048}: xla vs jax.nn vs reference (and torch
  sdpa when installed). About 1 minute on a 2-core CPU; the xla path should be faster than jax.nn on
  every row, by the largest factor on window256.

CPU kernel (the kernels issue's CPU targets: the CPU default, `cpu_flash`, against `xla` and
torch's `scaled_dot_product_attention`, B=1, N=8, H=64, T=4096, fp32; forward no mask and causal
forward+backward ≤ 1.5x torch's time; a few minutes):

  python -m experiments.bench --config=configs/bench/flex.py:cpu --workdir=/tmp/attnjax_bench_cpu

`:growth`: causal forward+backward at T=16384 and 65536 with `cpu_flash` (4x the length, 16x the
work: the issue asks the time to grow at most 18x; about 10 minutes).

Outputs under the workdir: results.csv, results.md (the printed table), time.png, memory.png.
Override fields on the command line, e.g. `--config.seq_lens='(1024, 4096)'`,
`--config.block_size='(256, 512)'`, `--config.peers='("xla", "jax_nn")'`.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The default grid, or the small `demo` grid."""
  config = ml_collections.ConfigDict()
  config.B = 1
  config.N = 8
  config.H = 64
  config.dtype = "float32"
  config.seed = 0
  config.modes = ("fwd", "fwd+bwd")
  config.masks = ("none", "causal", "window256", "documents512")
  config.seq_lens = (1024, 4096, 16384)
  config.peers = ("cpu_flash", "xla", "reference", "jax_nn", "torch_sdpa", "torch_flex")
  config.warmup = 1
  config.repeats = 5
  config.min_repeats = 3
  config.max_case_seconds = 45.0
  # The dense reference takes minutes per run at T=16384 on 2 cores; its memory is still reported.
  config.peer_max_T = {"reference": 4096}
  config.memory_fraction = 0.75
  config.memory_budget_gb = ml_collections.config_dict.placeholder(float)
  config.block_size = ml_collections.config_dict.placeholder(tuple)
  config.extra_cases = [ml_collections.ConfigDict(dict(
      peers=("cpu_flash", "xla"), mask="causal", T=65536, mode="fwd+bwd", warmup=0, repeats=1))]
  if arg == "demo":
    config.modes = ("fwd+bwd",)
    config.masks = ("causal", "window256")
    config.seq_lens = (1024, 2048)
    config.peers = ("xla", "reference", "jax_nn", "torch_sdpa")
    config.extra_cases = []
  elif arg == "cpu":
    config.modes = ("fwd", "fwd+bwd")
    config.masks = ("none", "causal")
    config.seq_lens = (4096,)
    config.peers = ("cpu_flash", "xla", "torch_sdpa")
    config.extra_cases = []
  elif arg == "growth":
    config.modes = ("fwd+bwd",)
    config.masks = ("causal",)
    config.seq_lens = (16384, 65536)
    config.peers = ("cpu_flash",)
    config.repeats, config.min_repeats = 2, 1
    config.max_case_seconds = 600.0
    config.extra_cases = []
  elif arg:
    raise ValueError(f"configs/bench/flex.py: unknown argument {arg!r}; expected '', 'demo', 'cpu' "
                     "or 'growth'")
  return config
