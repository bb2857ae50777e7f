"""The theory papers' probes at tiny sizes: rank against heads (#201) and memorization capacity
against heads (#237); the recorded runs are in docs/results.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.models import memorization, rank_heads
from tests import tolerances

# The full-rank head's held-out error over the low-rank heads' at most (measured 0.48): the paper's
# separation is a factor of several at d = 16 (docs/results.md).
FULL_RANK_ERROR_RATIO_MAX = 0.7


def test_nearest_neighbour_target_and_heads():
  X, y, f = rank_heads.nearest_neighbour_batch(jax.random.PRNGKey(0), 5, 6, 4)
  np.testing.assert_allclose(np.linalg.norm(X, axis=-1), 1.0, **tolerances.output(jnp.float32))
  for b in range(5):
    np.testing.assert_array_equal(f[b], X[b, np.argmax(X[b] @ y[b])])
  # A full-rank head with W_QK = beta I and W_V = I is the nearest neighbour as beta grows.
  params = {"q": 30.0 * jnp.eye(4)[None], "k": jnp.eye(4)[None], "v": jnp.eye(4)[None]}
  assert float(jnp.mean(jnp.sum((rank_heads.apply_heads(params, X, y) - f) ** 2, -1))) < 0.05
  with pytest.raises(ValueError, match="rank <= d"):
    rank_heads.init_heads(jax.random.PRNGKey(0), 4, 2, 5)


def test_full_rank_head_beats_low_rank_heads_at_the_same_budget():
  """The paper's separation at d = 8: one head of rank 8 against 8 heads of rank 1 (measured 0.28
  against 0.58 here; 0.06 against 0.56 at d = 16 in docs/results.md)."""
  full = rank_heads.train_heads(1, 8, n=4, d=8, steps=150, batch=128, eval_batch=1024)
  low = rank_heads.train_heads(8, 1, n=4, d=8, steps=150, batch=128, eval_batch=1024)
  assert full < FULL_RANK_ERROR_RATIO_MAX * low, (full, low)


def test_capacity_grows_with_heads():
  """Random labels of N sequences: 4 heads fit at least twice as many as 1 (measured 48 against
  128, the grid's top)."""
  grid = [8, 16, 24, 32, 48, 64, 96, 128]
  one = memorization.capacity(1, grid, n=4, d=8, head_dim=2, steps=500)
  four = memorization.capacity(4, grid, n=4, d=8, head_dim=2, steps=500)
  assert four >= 2 * one > 0, (one, four)
  assert memorization.fit_accuracy(1, 8, n=4, d=8, head_dim=2, steps=500) == 1.0
