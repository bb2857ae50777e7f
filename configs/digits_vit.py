"""A ViT (Dosovitskiy et al., "An Image is Worth 16x16 Words", arXiv:2010.11929) on sklearn's 8x8
handwritten digits (shipped with scikit-learn; 1797 images, 20% held out), 2x2 patches -> 16 tokens.

  python -m experiments.train --config=configs/digits_vit.py:mechanism=softmax,size=small \
      --workdir=/tmp/attnjax_digits_vit

size=small (default): patch 2, width 64, 2 layers, 4 heads, CLS pooling, batch 64, 1500 steps.
Run time on a 2-core CPU: about 1 minute. Metric: eval_accuracy over the 10 digits; softmax
reaches >= 0.95 (0.965 measured on 2026-12-02 in 63 s; docs/results.md).
size=tiny: width 32, 300 steps: a smoke test (no accuracy target).
"""

import ml_collections

from configs import common

SIZES = {
    "tiny": dict(width=32, num_steps=300, batch_size=32),
    "small": dict(width=64, num_steps=1500, batch_size=64),
}


def get_config(arg: str = ""):
  """`arg`: "mechanism=<registry name>,size=<tiny|small>[,window=<w>]"."""
  args = common.parse_arg(arg, {"mechanism": "softmax", "size": "small", "window": 0})
  size = common.pick_size(SIZES, args["size"])
  config = common.base_config()
  config.task = ml_collections.ConfigDict()
  config.task.name = "digits"  # attnjax.data task
  config.task.seed = 0  # data seed
  config.task.representation = "image"  # [8, 8, 1] float images (a ViT's input)
  config.task.valid_fraction = 0.2  # fraction of the examples held out
  config.task.split_seed = 0  # seed of the held-out choice
  common.set_model(config, args, width=size["width"], arch="vit")
  config.model.num_heads = 4  # query heads
  config.model.patch_size = 2  # 2x2 patches: 16 tokens per 8x8 image
  config.model.pooling = "cls"  # classify from a learned CLS token
  config.model.dropout = 0.1  # residual / embedding dropout (a small training set)
  common.set_schedule(config, num_steps=size["num_steps"], batch_size=size["batch_size"],
                      learning_rate=1e-3)
  # 256 of the 359 held-out images per eval batch (a power of two: divisible by any mesh); two
  # batches cover the split (the second wraps into a fresh epoch order).
  config.train.eval_batch_size = 256  # held-out images per eval batch
  config.train.eval_batches = 2  # eval batches (cover the split)
  return config
