"""Decode benchmark: one decoding step over a contiguous and a paged KV cache, and cascade attention
for rows sharing a prefix.

  python -m experiments.bench --config=configs/bench/decode.py --workdir=/tmp/attnjax_bench_decode

Default (the paged-KV-cache issue's grid): decode (T = 1) step time, tokens/s and memory against
batch B in {1, 8, 16} and length L in {1024, 4096, 16384} tokens per row, for the contiguous cache
(`KVCache` + `decode_attention`) and the paged cache (`paged_attention` over a shuffled pool of
16-token pages: `xla` with split-K on (512-key splits) and off, and `cpu_flash` reading the pages in
place), the contiguous one with split-K on and off; then 16 rows sharing a 4096-token prefix with 128
suffix tokens each: cascade attention against per-row paged attention by `xla` and by `cpu_flash`
(and the contiguous cache, which holds one copy of the prefix per row). N=8 query heads, K=2 kv
heads, H=64, float32; 2 warm-up calls, then 10 rounds in which each path of a group runs once
(round-robin). About a minute on a 2-core CPU. Targets: paged within 1.3x of contiguous; cascade
faster than per-row.

`:small`: B in {1, 4}, L in {512, 1024}, 4 rows sharing a 1024-token prefix (about a minute).

Writes results.csv and results.md under the workdir. Override fields on the command line, e.g.
`--config.lengths='(4096,)'`, `--config.repeats=20`.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The default grid (the issue's), or the `small` grid."""
  config = ml_collections.ConfigDict()
  config.benchmark = "decode"
  config.batches = (1, 8, 16)
  config.lengths = (1024, 4096, 16384)
  config.N = 8
  config.K = 2
  config.H = 64
  config.page_size = 16
  config.split_tokens = 512
  config.dtype = "float32"
  config.seed = 0
  config.warmup = 2
  config.repeats = 10
  config.memory_fraction = 0.75
  config.shared_prefix = ml_collections.ConfigDict(dict(B=16, prefix=4096, suffix=128))
  if arg == "small":
    config.batches = (1, 4)
    config.lengths = (512, 1024)
    config.shared_prefix = ml_collections.ConfigDict(dict(B=4, prefix=1024, suffix=64))
  elif arg:
    raise ValueError(f"configs/bench/decode.py: unknown argument {arg!r}; expected '' or 'small'")
  return config
