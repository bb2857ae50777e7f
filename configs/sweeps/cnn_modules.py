"""Vision attention modules compared in one small ResNet-style CNN at equal parameter budgets (issue
15): no attention, SE, ECA, FcaNet, BAM, PSA, LKA, SK and ELA, each in every residual block (after
the second convolution, before the residual add), on the odd-texture-patch task (default: it needs
channel and spatial selection) or on sklearn's digits.

  python -m experiments.sweep --config=configs/sweeps/cnn_modules.py --workdir=/tmp/attnjax_cnn
  python -m experiments.sweep --config=configs/sweeps/cnn_modules.py:task=digits \
      --workdir=/tmp/attnjax_cnn_digits

Every run is configs/cnn_<task>.py:size=small with `model.param_budget` = the no-attention model's
parameter count at widths 16, 32, 64 (`BUDGETS`, counted by attnjax.models.cnn_param_count): each
run's widths are scaled by one multiplier (multiples of 4) to the count closest to it, so a module's
own parameters are paid for with narrower convolutions. The sweep's plan counts every built model
and stops, with the counts, when one is more than `budget_tolerance` (10%) from the first run's; it
prints each run's count and its distance from the first before training. The leaderboard records
eval_accuracy, steps_per_sec and train_seconds (step time = 1 / steps_per_sec). A module that is not
registered stops the plan with the registered names (model.attention_module), before any training.
"""

import ml_collections

# The no-attention ResNetCNN at widths (16, 32, 64), one block per stage: 18x18x3 textures with 9
# classes, 8x8x1 digits with 10 (tests/models/cnn_test.py checks the counting).
BUDGETS = {"textures": 77_977, "digits": 77_754}
# (run name, module registry name or "none"), in the order; no attention comes first (the
# budget check measures every run against the first).
MODULES = (
    ("none", "none"),
    ("se", "squeeze_excitation"),
    ("eca", "eca_channel_attention"),
    ("fcanet", "fca_channel_attention"),
    ("bam", "balanced_attention_module"),
    ("psa", "polarized_self_attention"),
    ("lka", "large_kernel_attention"),
    ("sk", "selective_kernel_attention"),
    ("ela", "ela_local_attention"),
)

# Settings a module needs at this budget: FcaNet splits the channels into one group per frequency
# (the paper's top16) and ELA-B's GroupNorm takes 16 groups, so their scaled widths stay multiples
# of 16.
OVERRIDES = {"fcanet": {"model.width_multiple": 16}, "ela": {"model.width_multiple": 16}}


def get_config(arg: str = ""):
  """`arg`: "task=<textures|digits>" (default textures)."""
  task = "textures"
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, _, value = item.partition("=")
    if key.strip() != "task" or value.strip() not in BUDGETS:
      raise ValueError(f"config argument {item!r}: expected task=<{'|'.join(BUDGETS)}>")
    task = value.strip()
  config = ml_collections.ConfigDict()
  config.budget_tolerance = 0.1
  config.runs = [
      {"name": name, "config": f"configs/cnn_{task}.py:size=small,module={module},"
                               f"budget={BUDGETS[task]}",
       "overrides": dict(OVERRIDES.get(name, {}))}
      for name, module in MODULES
  ]
  return config
