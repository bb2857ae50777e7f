"""MQAR (multi-query associative recall; Arora et al., "Zoology: Measuring and Improving Recall in
Efficient Language Models", arXiv:2312.04927) with a 2-layer decoder LM.

  python -m experiments.train --config=configs/mqar.py:mechanism=softmax,size=small \
      --workdir=/tmp/attnjax_mqar

size=small (default): vocab 256, T 64, 8 key-value pairs, width 64, 2 layers, 2 heads, batch 64,
1500 steps. About 3 minutes on a 2-core CPU; softmax reaches eval_accuracy >= 0.99 (the accuracy of
the answers, i.e. the weighted positions).
size=tiny: T 32, 4 pairs, 300 steps; about 30 s; a smoke test (no accuracy target).
Any field can be overridden, e.g. `--config.train.num_steps=3000 --config.task.num_kv_pairs=16`
(warm-up and the eval and checkpoint cadence follow num_steps unless set; `--show_config` prints
every field);
a windowed mechanism takes its window from `mechanism_kwargs`, e.g.
`mechanism=sliding_window,window=16` (required by sliding_window: each query sees its last 16
tokens, itself included).
"""

import ml_collections

from configs import common as config_lib

SIZES = {
    "tiny": dict(seq_len=32, num_kv_pairs=4, width=32, num_steps=300, batch_size=32),
    "small": dict(seq_len=64, num_kv_pairs=8, width=64, num_steps=1500, batch_size=64),
    "base": dict(seq_len=128, num_kv_pairs=16, width=128, num_steps=4000, batch_size=64),
}


def get_config(arg: str = ""):
  """`arg`: "mechanism=<registry name>,size=<tiny|small|base>[,window=<w>]"."""
  args = config_lib.parse_arg(arg, {"mechanism": "softmax", "size": "small", "window": 0})
  size = config_lib.pick_size(SIZES, args["size"])
  config = config_lib.base_config()
  config.task = ml_collections.ConfigDict()
  config.task.name = "mqar"  # attnjax.data task
  config.task.seed = 0  # data seed
  config.task.vocab_size = 256  # token vocabulary
  config.task.seq_len = size["seq_len"]  # T
  config.task.num_kv_pairs = size["num_kv_pairs"]  # key-value pairs to recall
  config.task.power_a = 0.01  # query gap distribution p(g) ∝ a (g + 1)^(a - 1)
  config.task.random_non_queries = True  # non-query positions hold random tokens (Zoology)
  config_lib.set_model(config, args, width=size["width"])
  config_lib.set_schedule(config, num_steps=size["num_steps"], batch_size=size["batch_size"],
                          learning_rate=3e-3)
  return config
