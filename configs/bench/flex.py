"""Flex-attention benchmark: the `xla` path against the dense reference, jax.nn and PyTorch.

    python -m experiments.bench --config=configs/bench/flex.py --workdir=/tmp/bench_flex
    python -m experiments.bench --config=configs/bench/flex.py:demo --workdir=/tmp/bench_demo

Default: masks none / causal / sliding window 256 / documents of 512 tokens, T in {1024, 4096, 16384},
B=1, N=8, H=64, float32, forward and forward+backward, median of 5 runs after one warm-up, plus T=65536
causal forward+backward on the `xla` path; about an hour on a 2-core CPU (the dense peers dominate).
`demo`: causal and window at T in {1024, 2048}, forward+backward; about two minutes on a 2-core CPU.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.masks = ("none", "causal", "window", "documents")
  config.seq_lens = (1024, 4096, 16384)
  config.modes = ("fwd", "fwd_bwd")
  config.providers = ("attnjax_xla", "attnjax_reference", "jax_nn", "torch_sdpa", "torch_flex")
  config.B, config.N, config.H = 1, 8, 64
  config.window = 256
  config.doc_len = 512
  config.dtype = "float32"
  config.repeats = 5
  config.warmup = 1
  # Fraction of physical memory a case may need before it is skipped instead of run.
  config.memory_fraction = 0.75
  config.extra_cases = [dict(mask="causal", T=65536, mode="fwd_bwd", providers=("attnjax_xla",))]
  if arg == "demo":
    config.masks = ("causal", "window")
    config.seq_lens = (1024, 2048)
    config.modes = ("fwd_bwd",)
    config.providers = ("attnjax_xla", "attnjax_reference", "jax_nn")
    config.repeats = 5
    config.extra_cases = []
  elif arg:
    raise ValueError(f"configs/bench/flex.py: unknown argument {arg!r}; use '' or 'demo'")
  return config
