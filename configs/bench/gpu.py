"""GPU attention throughput on the FlashAttention grid: attnjax flex `pallas_triton` and `xla` against
jax.nn.dot_product_attention (`cudnn` and `xla`), in TFLOP/s.

  python -m experiments.bench --config=configs/bench/gpu.py --workdir=/tmp/attnjax_bench_gpu

The FlashAttention-2/3 benchmark grid: 16k tokens per batch (B·T = 16384, T in 512 .. 16384), model
width 2048 (N = 2048 / H heads), head dim H in {64, 128, 256}, masks none and causal, forward and
forward+backward, bf16; plus GQA (K = N / 4 key/value heads, H = 128) and packed documents (causal
within documents of about 1024 tokens, from segment ids: a traced block mask for attnjax, a dense
mask for jax.nn) at every T and at T = 65536 (B = 1; cuDNN and the kernels only). TFLOP/s in the
FlashAttention convention: 4·B·N·T²·H forward (×½ causal; the exact visible pair count for
documents), backward 2.5× the forward, so forward+backward is 3.5×
(`attnjax.bench.peers.attention_flops`; results.md's third table, the CSV's `tflops`).
Needs a CUDA GPU: on a CPU the GPU peers are reported as skipped ("needs a GPU"), and the xla peers
would take hours. About an hour on an H100 / H200, mostly compiling.

Small (`experiments/gpu_check.sh`; about 3 minutes on an H100 / H200):

  python -m experiments.bench --config=configs/bench/gpu.py:small --workdir=/tmp/attnjax_bench_gpu

the issue's targets only: H = 128, bf16, cuDNN against the two attnjax kernels; masks none and
causal at T = 8192 (B = 2), forward and forward+backward; GQA causal forward+backward at T = 8192;
packed documents (about 1024 tokens each) at T = 65536 (B = 1), forward and forward+backward.
"""

import ml_collections

TOKENS = 16384
WIDTH = 2048
PEERS = ("jax_nn_cudnn", "jax_nn", "pallas_triton", "pallas_mosaic_gpu", "xla")
KERNEL_PEERS = ("jax_nn_cudnn", "pallas_triton", "pallas_mosaic_gpu")


def _case(mask, T, H, mode, *, gqa=False, peers=PEERS, B=None):
  N = WIDTH // H
  return ml_collections.ConfigDict(dict(peers=peers, mask=mask, T=T, mode=mode,
                                        B=B or TOKENS // T, N=N, H=H, K=N // 4 if gqa else N))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The FlashAttention grid, or `small`."""
  config = ml_collections.ConfigDict()
  config.B = 1
  config.N = 16
  config.H = 128
  config.K = ml_collections.config_dict.placeholder(int)
  config.dtype = "bfloat16"
  config.seed = 0
  # The grid is all in extra_cases (its batch size and heads vary with T and H).
  config.modes = ("fwd", "fwd+bwd")
  config.masks = ()
  config.seq_lens = ()
  config.peers = PEERS
  config.warmup = 2
  config.repeats = 10
  config.min_repeats = 3
  config.max_case_seconds = 20.0
  config.peer_max_T = {}
  config.memory_fraction = 0.75
  # The peers run on the GPU (H100 80 GB / H200 141 GB), not in host RAM, which the default budget
  # reads (and which a lent VM grows only as it is used).
  config.memory_budget_gb = 72.0
  config.block_size = ml_collections.config_dict.placeholder(tuple)
  config.report_tflops = True
  seq_lens = (512, 1024, 2048, 4096, 8192, 16384)
  cases = []
  for mode in config.modes:
    for H in (64, 128, 256):
      for mask in ("none", "causal"):
        cases += [_case(mask, T, H, mode) for T in seq_lens]
    cases += [_case("causal", T, 128, mode, gqa=True) for T in seq_lens]
    cases += [_case("documents1024", T, 128, mode) for T in seq_lens if T >= 2048]
    # The issue's 64k-token documents target (the xla peers' dense masks would not fit).
    cases += [_case("documents1024", 65536, 128, mode, B=1, peers=KERNEL_PEERS)]
  if arg == "small":
    config.warmup = 1
    config.repeats = 5
    cases = [_case(mask, 8192, 128, mode, peers=KERNEL_PEERS)
             for mode in config.modes for mask in ("none", "causal")]
    cases += [_case("causal", 8192, 128, "fwd+bwd", gqa=True, peers=KERNEL_PEERS)]
    cases += [_case("documents1024", 65536, 128, mode, B=1, peers=KERNEL_PEERS)
              for mode in config.modes]
  elif arg:
    raise ValueError(f"configs/bench/gpu.py: unknown argument {arg!r}; expected '' or 'small'")
  config.extra_cases = cases
  return config
