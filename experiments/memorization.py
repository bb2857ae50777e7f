r"""Memorization capacity of one multi-head attention layer against its number of heads (#237).

  python -m experiments.memorization --heads=1,2,4,8 --d=16 --n=8

For each H, the largest N of the grid whose random ±1 labels the layer fits to 100% training
accuracy (`attnjax.models.memorization.capacity`, Mahdavi et al., arXiv:2306.02010); docs/results.md
records a run.
"""

import sys

from absl import app
from absl import flags

from attnjax.models import memorization

_HEADS = flags.DEFINE_list("heads", ["1", "2", "4", "8"], "Numbers of heads.")
_GRID = flags.DEFINE_list("grid", ["64", "96", "128", "192", "256", "384", "512", "768", "1024",
                                   "1536", "2048"], "Example counts tried.")
_D = flags.DEFINE_integer("d", 16, "Token dimension.")
_N = flags.DEFINE_integer("n", 8, "Tokens per sequence.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 4, "Per-head query/key/value width.")
_STEPS = flags.DEFINE_integer("steps", 2000, "Full-batch Adam steps.")


def main(argv):
  del argv
  grid = [int(g) for g in _GRID.value]
  sys.stdout.write("| heads H | capacity N |\n| ---: | ---: |\n")
  for heads in (int(h) for h in _HEADS.value):
    n = memorization.capacity(heads, grid, n=_N.value, d=_D.value, head_dim=_HEAD_DIM.value,
                              steps=_STEPS.value)
    top = " (the grid's largest)" if n == grid[-1] else ""
    sys.stdout.write(f"| {heads} | {n}{top} |\n")


if __name__ == "__main__":
  app.run(main)
