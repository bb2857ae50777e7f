"""Selective copying (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv:2312.00752, section 3.1) with a 2-layer decoder LM: copy the data tokens scattered among
blanks, in order, after the separator.

  python -m experiments.train --config=configs/selective_copy.py:mechanism=softmax,size=small \
      --workdir=/tmp/attnjax_selective_copy

size=small (default): vocab 16, T 64, 8 data tokens, width 64, 2 layers, batch 64, 1000 steps.
Run time on a 2-core CPU: about 2 minutes. Metric: eval_accuracy (the copied tokens); softmax
reaches >= 0.95 (0.982 measured on 2026-12-02 in 126 s on a shared machine; docs/results.md).
size=tiny: T 32, 4 tokens, width 32, 300 steps: a smoke test (no accuracy target).
"""

import ml_collections

from configs import common

SIZES = {
    "tiny": dict(seq_len=32, num_tokens=4, width=32, num_steps=300, batch_size=32),
    "small": dict(seq_len=64, num_tokens=8, width=64, num_steps=1000, batch_size=64),
}


def get_config(arg: str = ""):
  """`arg`: "mechanism=<registry name>,size=<tiny|small>[,window=<w>]"."""
  args = common.parse_arg(arg, {"mechanism": "softmax", "size": "small", "window": 0})
  size = common.pick_size(SIZES, args["size"])
  config = common.base_config()
  config.task = ml_collections.ConfigDict()
  config.task.name = "selective_copy"  # attnjax.data task
  config.task.seed = 0  # data seed
  config.task.vocab_size = 16  # token vocabulary
  config.task.seq_len = size["seq_len"]  # T
  config.task.num_tokens = size["num_tokens"]  # data tokens to copy
  config.task.num_noise_tokens = 0  # 0: blanks between the data tokens
  common.set_model(config, args, width=size["width"])
  common.set_schedule(config, num_steps=size["num_steps"], batch_size=size["batch_size"],
                      learning_rate=3e-3)
  return config
