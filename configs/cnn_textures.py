"""A small ResNet-style CNN (attnjax/models/cnn.py) on the odd-texture-patch task
(attnjax/data/textures.py): 3x3 patches of 6x6 pixels with gratings in 3 channels; one patch has its
grating turned by 90° in one channel (which one changes from image to image), and the label is that
patch (9 classes). Finding it needs the channel that differs and the place where it does: channel and
spatial selection. An attention module of `attnjax.modules` sits in every residual block (after its
second convolution, before the residual add), or none.

  python -m experiments.train --config=configs/cnn_textures.py:module=eca_channel_attention \
      --workdir=/tmp/attnjax_cnn_textures

module: a feature-map module name (`attnjax.list_modules("feature_map")`) or "none" (default).
budget: 0 (default) keeps the widths; a parameter count scales the widths to the count closest to it
(model.param_budget), as the module sweep does (configs/sweeps/cnn_modules.py).
size=small (default): images 18x18x3, widths 16, 32, 64 (strides 1, 2, 2), one basic block per
stage, batch 64, 3000 steps (fresh examples every step). A run of the no-attention model at these
widths (plain optax loop, 2026-12-04) sat at chance until step ~650, then reached 0.957 held-out
accuracy at step 800, at about 30 ms a step on a shared 2-core CPU (the 3000 steps: about 2
minutes). size=tiny: widths 8, 16, 32, 300 steps: a smoke test (no accuracy target). Metric:
eval_accuracy over the 9 patches (chance 1/9).
"""

import ml_collections

from configs import cnn_digits
from configs import common

SIZES = {
    "tiny": dict(widths=(8, 16, 32), blocks=(1, 1, 1), num_steps=300, batch_size=32),
    "small": dict(widths=(16, 32, 64), blocks=(1, 1, 1), num_steps=3000, batch_size=64),
}


def get_config(arg: str = ""):
  """`arg`: "module=<module name|none>,size=<tiny|small>,budget=<parameter count|0>"."""
  args = common.parse_arg(arg, cnn_digits.ARGS)
  size = common.pick_size(SIZES, args["size"])
  config = common.base_config()
  config.task = ml_collections.ConfigDict()
  config.task.name = "textures"  # attnjax.data task (attnjax/data/textures.py)
  config.task.seed = 0  # data seed
  config.task.grid = 3  # grid x grid patches: the classes
  config.task.patch = 6  # pixels per patch side
  config.task.channels = 3  # image channels (the odd grating is in one of them)
  config.task.orientations = 4  # grating orientations k·45°
  config.task.period = 4.0  # grating period in pixels
  config.task.noise = 0.2  # pixel noise standard deviation
  # False: channel c's gratings share orientation c·45°; True: drawn per image (a harder task).
  config.task.random_orientation = False
  cnn_digits.set_cnn(config, args, size)
  common.set_schedule(config, num_steps=size["num_steps"], batch_size=size["batch_size"],
                      learning_rate=3e-3)
  config.optimizer.weight_decay = 0.05  # decoupled weight decay
  config.train.eval_batch_size = 256  # held-out images per eval batch
  config.train.eval_batches = 4  # eval batches (fresh held-out images)
  return config
