"""Induction heads (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv:2312.00752, section 3.1; Olsson et al., "In-context Learning and Induction Heads",
arXiv:2209.11895) with a 2-layer decoder LM: after the trigger token, recall the token that
followed the trigger earlier.

  python -m experiments.train --config=configs/induction.py:mechanism=softmax,size=small \
      --workdir=/tmp/attnjax_induction

size=small (default): vocab 16, T 64, width 64, 2 layers, batch 64, 3000 steps. Run time on a
2-core CPU: about 4-5 minutes. Metric: eval_accuracy (the one answer per sequence); a 2-layer
softmax model reaches >= 0.99 (measured on 2026-12-02: 1.0 from step 1400 on, 260 s; a 1000-step
schedule stopped at 0.69; docs/results.md). An induction head needs two layers: depth 1 stays near
chance.
size=tiny: T 32, width 32, 300 steps: a smoke test (no accuracy target).
"""

import ml_collections

from configs import common

SIZES = {
    "tiny": dict(seq_len=32, width=32, num_steps=300, batch_size=32),
    "small": dict(seq_len=64, width=64, num_steps=3000, batch_size=64),
}


def get_config(arg: str = ""):
  """`arg`: "mechanism=<registry name>,size=<tiny|small>[,window=<w>]"."""
  args = common.parse_arg(arg, {"mechanism": "softmax", "size": "small", "window": 0})
  size = common.pick_size(SIZES, args["size"])
  config = common.base_config()
  config.task = ml_collections.ConfigDict()
  config.task.name = "induction"  # attnjax.data task
  config.task.seed = 0  # data seed
  config.task.vocab_size = 16  # token vocabulary
  config.task.seq_len = size["seq_len"]  # T
  common.set_model(config, args, width=size["width"])
  common.set_schedule(config, num_steps=size["num_steps"], batch_size=size["batch_size"],
                      learning_rate=3e-3)
  return config
