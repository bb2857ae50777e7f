"""Neighborhood attention against full attention in a ViT on sklearn's 8x8 digits (issue: local and
block-sparse attention).

  python -m experiments.sweep --config=configs/sweeps/digits_na.py --workdir=/tmp/attnjax_digits_na

configs/digits_vit.py (2x2 patches: a 4x4 grid of 16 tokens, width 64, 2 layers, 4 heads, 1500
steps) with mean pooling (a grid mechanism sees the patches alone, no CLS token): softmax over all 16
patches, and 2-D neighborhood attention with a 3x3 window (each patch sees 9 of 16, the window shifted
at the borders), which the ViT gets its patch grid for. Eval accuracy in docs/results.md.
"""

import ml_collections

VIT = "configs/digits_vit.py:size=small"


def _run(name, mechanism, **kwargs):
  overrides = {"model.mechanism": mechanism, "model.pooling": "mean"}
  if kwargs:
    overrides["model.mechanism_kwargs"] = kwargs
  return {"name": name, "config": VIT, "overrides": overrides}


def get_config():
  config = ml_collections.ConfigDict()
  config.budget_tolerance = 0.1
  config.runs = [
      _run("softmax", "softmax"),
      _run("neighborhood_3x3", "neighborhood_attention", kernel_size=3),
  ]
  return config
