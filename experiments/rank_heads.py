r"""One full-rank attention head against many low-rank heads on the nearest-neighbour target (#201).

  python -m experiments.rank_heads --d=16 --n=8 --steps=2000

Trains, at the query-key budget H·r = d, the configurations (H, r) = (1, d), (d/4, 4) and (d, 1)
(`attnjax.models.rank_heads`, Amsel et al., arXiv:2407.16153) and prints each one's held-out mean
squared error against f(X, y) = the point nearest to y; docs/results.md records a run.
"""

import sys

from absl import app
from absl import flags

from attnjax.models import rank_heads

_D = flags.DEFINE_integer("d", 16, "Embedding dimension (a multiple of 4).")
_N = flags.DEFINE_integer("n", 8, "Points per context.")
_STEPS = flags.DEFINE_integer("steps", 2000, "Adam steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")


def main(argv):
  del argv
  d = _D.value
  sys.stdout.write("| heads H | rank r | held-out MSE |\n| ---: | ---: | ---: |\n")
  for heads, rank in ((1, d), (d // 4, 4), (d, 1)):
    mse = rank_heads.train_heads(heads, rank, n=_N.value, d=d, steps=_STEPS.value, seed=_SEED.value)
    sys.stdout.write(f"| {heads} | {rank} | {mse:.4f} |\n")


if __name__ == "__main__":
  app.run(main)
