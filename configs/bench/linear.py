"""Gated linear attention benchmark: the chunked `xla` form against the `lax.scan` reference, the
quadratic `parallel` form and causal softmax attention (attnjax flex `xla` and jax.nn).

  python -m experiments.bench --config=configs/bench/linear.py --workdir=/tmp/attnjax_bench_linear

Forward and forward+backward, causal (the recurrence with a per-head decay per step, q and k through
elu+1) and `none` (non-causal `φ(Q)(φ(K)ᵀV)`); T in {1024, 2048, 4096, 8192, 16384}; B=1, N=8,
H=h=64, float32. The scan reference and the quadratic forms run up to T=4096 (`peer_max_T`: their
memory is still analysed above it). The issue's subset recorded in docs/benchmarks.md (fwd+bwd,
causal, T in {1k, 4k, 16k}, four peers) took 3 minutes on a 2-core CPU; the full grid is several
times that.

Issue targets, read from the table (docs/benchmarks.md records a run): chunked xla fwd+bwd at
least 10x faster than the scan at T=4096; 16x the length (1k -> 16k) costs at most 20x the time;
faster than causal softmax xla at T=16384; temporary memory linear in T.
`:small` runs T in {1024, 4096} only (a few minutes).

`:channel` is the per-channel gate (GLA's `[B, T, N, H]` log decay) against the per-head one, chunked
`xla` and the scan, causal fwd+bwd at T=4096 (the kernels issue's target: chunked ≥ 10x the scan):

  python -m experiments.bench --config=configs/bench/linear.py:channel --workdir=/tmp/attnjax_bench_gla
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.B = 1
  config.N = 8
  config.H = 64
  config.dtype = "float32"
  config.seed = 0
  config.modes = ("fwd", "fwd+bwd")
  config.masks = ("causal", "none")
  config.seq_lens = (1024, 2048, 4096, 8192, 16384)
  config.peers = ("linear_xla", "linear_reference", "linear_parallel", "xla", "jax_nn")
  config.warmup = 1
  config.repeats = 5
  config.min_repeats = 3
  config.max_case_seconds = 45.0
  config.peer_max_T = {"linear_reference": 4096, "linear_parallel": 4096}
  config.memory_fraction = 0.75
  config.memory_budget_gb = ml_collections.config_dict.placeholder(float)
  config.block_size = ml_collections.config_dict.placeholder(tuple)
  config.extra_cases = []
  if arg == "small":
    config.seq_lens = (1024, 4096)
  elif arg == "channel":
    config.seq_lens = (4096,)
    config.modes = ("fwd+bwd",)
    config.masks = ("causal",)
    config.peers = ("linear_xla_channel", "linear_reference_channel", "linear_xla",
                    "linear_reference")
  elif arg:
    raise ValueError(f"configs/bench/linear.py: unknown argument {arg!r}; expected '', 'small' or "
                     "'channel'")
  return config
