"""Attention diversification loss (#222): the mean pairwise row cosine against a float64 loop, and
the claim: identical rows give 1 (its maximum), one-hot rows on different keys give 0, and a few
gradient steps on free logits reduce it."""

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.train.regularizers import diversity
from tests import tolerances


def _reference(weights):
  out = []
  for w in weights:
    w = np.asarray(w, np.float64)
    for b in range(w.shape[0]):
      for n in range(w.shape[1]):
        a = w[b, n]
        t = a.shape[0]
        cos = [a[i] @ a[j] / (np.linalg.norm(a[i]) * np.linalg.norm(a[j]))
               for i in range(t) for j in range(t) if i != j]
        out.append((len(out), np.mean(cos)))
  per_layer = len(out) // len(weights)
  return np.mean([np.mean([v for _, v in out[k * per_layer:(k + 1) * per_layer]])
                  for k in range(len(weights))])


def test_matches_a_loop_over_pairs():
  rng = np.random.default_rng(0)
  weights = [jax.nn.softmax(jnp.asarray(rng.standard_normal((2, 3, 4, 5)) * 2, jnp.float32))
             for _ in range(2)]
  np.testing.assert_allclose(diversity.attention_diversity_loss(weights), _reference(weights),
                             **tolerances.output(jnp.float32))


def test_identical_rows_give_one_orthogonal_rows_zero_and_descent_reduces_it():
  row = jax.nn.softmax(jnp.arange(5.0))
  identical = jnp.broadcast_to(row, (1, 2, 4, 5))
  np.testing.assert_allclose(diversity.attention_diversity_loss([identical]), 1.0,
                             **tolerances.COSINE[jnp.float32])
  one_hot = jnp.broadcast_to(jnp.eye(4, 5), (1, 2, 4, 5))
  assert diversity.attention_diversity_loss([one_hot]) == 0.0

  loss = jax.jit(lambda lg: diversity.attention_diversity_loss([jax.nn.softmax(lg)]))
  logits = jnp.asarray(np.random.default_rng(1).standard_normal((1, 2, 4, 5)), jnp.float32)
  start = loss(logits)
  step = jax.jit(lambda lg: lg - 5.0 * jax.grad(loss)(lg))
  for _ in range(10):
    logits = step(logits)
  assert loss(logits) < 0.8 * start, (start, loss(logits))


def test_needs_two_queries():
  with np.testing.assert_raises_regex(ValueError, "T >= 2"):
    diversity.pairwise_row_cosine(jnp.ones((1, 1, 1, 3)))
