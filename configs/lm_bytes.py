"""Byte-level language modelling on the installed Python standard library's `.py` sources (split
train/valid by file; nothing is downloaded) with a decoder LM.

  python -m experiments.train --config=configs/lm_bytes.py:mechanism=softmax,size=small \
      --workdir=/tmp/attnjax_lm_bytes

size=small (default): T 128, width 128, 4 layers, 4 heads, batch 32, 2000 steps. Run time on a
2-core CPU: about 12 minutes. Metric: eval_loss in nats per byte (bits per byte = eval_loss / ln 2);
a uniform guess is ln 256 = 5.55; softmax should fall below 1.6 nats (2.3 bits) per byte: measured
1.389 nats (2.00 bits) per byte, next-byte accuracy 0.636 (docs/results.md).
size=tiny: T 64, width 32, 2 layers, 300 steps: a smoke test (no target).
"""

import ml_collections

from configs import common

SIZES = {
    "tiny": dict(seq_len=64, width=32, depth=2, heads=2, num_steps=300, batch_size=16),
    "small": dict(seq_len=128, width=128, depth=4, heads=4, num_steps=2000, batch_size=32),
}


def get_config(arg: str = ""):
  """`arg`: "mechanism=<registry name>,size=<tiny|small>[,window=<w>]"."""
  args = common.parse_arg(arg, {"mechanism": "softmax", "size": "small", "window": 0})
  size = common.pick_size(SIZES, args["size"])
  config = common.base_config()
  config.task = ml_collections.ConfigDict()
  config.task.name = "lm_bytes"  # attnjax.data task
  config.task.seed = 0  # data seed
  config.task.seq_len = size["seq_len"]  # T (bytes)
  config.task.data_dir = ml_collections.config_dict.placeholder(str)  # None: the standard library
  config.task.suffix = ".py"  # files read: names ending with this
  config.task.valid_fraction = 0.05  # fraction of the files held out
  common.set_model(config, args, width=size["width"])
  config.model.depth = size["depth"]  # blocks
  config.model.num_heads = size["heads"]  # query heads
  config.model.tie_embeddings = True  # logits through the byte embedding
  common.set_schedule(config, num_steps=size["num_steps"], batch_size=size["batch_size"],
                      learning_rate=2e-3)
  config.train.best_metric = "eval_loss"  # keep the checkpoint of lowest eval loss
  return config
