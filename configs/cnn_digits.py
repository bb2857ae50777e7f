"""A small ResNet-style CNN (attnjax/models/cnn.py) on sklearn's 8x8 handwritten digits (shipped
with scikit-learn; 1797 images, 20% held out), with an attention module of `attnjax.modules` in every
residual block (after its second convolution, before the residual add) or none.

  python -m experiments.train --config=configs/cnn_digits.py:module=squeeze_excitation,size=small \
      --workdir=/tmp/attnjax_cnn_digits

module: a feature-map module name (`attnjax.list_modules("feature_map")`) or "none" (default).
budget: 0 (default) keeps the widths; a parameter count scales the widths to the count closest to it
(model.param_budget), as the module sweep does (configs/sweeps/cnn_modules.py).
size=small (default): widths 16, 32, 64 (strides 1, 2, 2: 8x8 -> 4x4 -> 2x2), one basic block per
stage, batch 64, 1500 steps. Run time on a 2-core CPU: about 100 steps a second (measured on
2026-12-04 through experiments.train: no attention, 300 steps in 11.5 s, eval_accuracy 0.992), so
about 20 s; digits saturate, the module comparison is on configs/cnn_textures.py. size=tiny: widths
8, 16, 32, 300 steps: a smoke test (no accuracy target). Metric: eval_accuracy over the 10 digits.
"""

import ml_collections

from configs import common

SIZES = {
    "tiny": dict(widths=(8, 16, 32), blocks=(1, 1, 1), num_steps=300, batch_size=32),
    "small": dict(widths=(16, 32, 64), blocks=(1, 1, 1), num_steps=1500, batch_size=64),
}
ARGS = {"module": "none", "size": "small", "budget": 0}


def set_cnn(config: ml_collections.ConfigDict, args, size):
  """The cnn model fields (arch "cnn"); the transformer fields of the base config are unused."""
  config.model.arch = "cnn"
  config.model.widths = list(size["widths"])  # channels per stage
  config.model.blocks = list(size["blocks"])  # residual basic blocks per stage
  # Feature-map module in every block (None: no attention) and its Linen settings.
  config.model.attention_module = (ml_collections.config_dict.placeholder(str)
                                   if args["module"] == "none" else args["module"])
  config.model.attention_kwargs = {}
  # None: the widths as given; else scale them to this parameter count (equal-budget comparisons).
  config.model.param_budget = ml_collections.config_dict.placeholder(int)
  if args["budget"]:
    config.model.param_budget = args["budget"]
  config.model.width_multiple = 4  # scaled widths are multiples of it
  config.model.dropout = 0.0  # dropout before the classifier


def get_config(arg: str = ""):
  """`arg`: "module=<module name|none>,size=<tiny|small>,budget=<parameter count|0>"."""
  args = common.parse_arg(arg, ARGS)
  size = common.pick_size(SIZES, args["size"])
  config = common.base_config()
  config.task = ml_collections.ConfigDict()
  config.task.name = "digits"  # attnjax.data task
  config.task.seed = 0  # data seed
  config.task.representation = "image"  # [8, 8, 1] float images
  config.task.valid_fraction = 0.2  # fraction of the examples held out
  config.task.split_seed = 0  # seed of the held-out choice
  set_cnn(config, args, size)
  common.set_schedule(config, num_steps=size["num_steps"], batch_size=size["batch_size"],
                      learning_rate=3e-3)
  config.optimizer.weight_decay = 0.05  # decoupled weight decay
  # 256 of the 359 held-out images per eval batch; two batches cover the split.
  config.train.eval_batch_size = 256  # held-out images per eval batch
  config.train.eval_batches = 2  # eval batches (cover the split)
  return config
