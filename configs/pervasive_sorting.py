"""Pervasive Attention (arch "pervasive", attnjax/models/pervasive.py: a masked 2-D DenseNet over the
(target, source) grid, no encoder, decoder or attention) against a decoder-only transformer on the
same sequence-to-sequence task, sorting: T/2 source tokens, a separator, then the same tokens
sorted (the loss and accuracy count the sorted half).

  python -m experiments.train --config=configs/pervasive_sorting.py:model=pervasive,size=small \
      --workdir=/tmp/attnjax_pervasive_sorting
  python -m experiments.train --config=configs/pervasive_sorting.py:model=decoder_lm,size=small \
      --workdir=/tmp/attnjax_pervasive_sorting_lm

model=pervasive (default): embeddings of width D per side, L DenseNet layers of growth g (3×3
masked kernels), source_len = T/2: the source is the unsorted half and the target side starts at
the separator. model=decoder_lm: the baseline transformer (softmax attention, width 64, 2 layers)
reading the whole row causally.
size=small (default): vocab 32, T 24 (12 tokens to sort), D 32, L 6, g 16, batch 64, 1500 steps.
size=tiny: T 8, D 16, L 2, g 8, 200 steps: a smoke test (no accuracy target).
Metric: eval_accuracy (sorted tokens right); docs/results.md records both models' runs.
"""

from configs import common

SIZES = {
    "tiny": dict(seq_len=8, width=16, depth=2, growth_rate=8, num_steps=200, batch_size=32),
    "small": dict(seq_len=24, width=32, depth=6, growth_rate=16, num_steps=1500, batch_size=64),
}
ARGS = {"model": "pervasive", "size": "small"}


def get_config(arg: str = ""):
  """`arg`: "model=<pervasive|decoder_lm>,size=<tiny|small>"."""
  args = common.parse_arg(arg, ARGS)
  size = common.pick_size(SIZES, args["size"])
  if args["model"] not in ("pervasive", "decoder_lm"):
    raise ValueError(f"config argument model={args['model']!r}: expected pervasive or decoder_lm")
  config = common.base_config()
  config.task.name = "sorting"  # attnjax.data task
  config.task.seed = 0  # data seed
  config.task.vocab_size = 32  # tokens 1 … 31, separator 0
  config.task.seq_len = size["seq_len"]  # T: T/2 tokens, then T/2 sorted
  if args["model"] == "pervasive":
    config.model.arch = "pervasive"
    config.model.width = size["width"]  # embedding width D per side (the grid has 2D channels)
    config.model.depth = size["depth"]  # DenseNet layers L
    config.model.source_len = size["seq_len"] // 2  # the unsorted tokens
    config.model.growth_rate = size["growth_rate"]  # channels each layer adds
    config.model.kernel_size = 3  # target-masked k×k convolutions
    config.model.tie_embeddings = False  # own output layer, as the paper's default
  else:
    common.set_model(config, {"mechanism": "softmax"}, width=2 * size["width"])
  common.set_schedule(config, num_steps=size["num_steps"], batch_size=size["batch_size"],
                      learning_rate=3e-3)
  return config
