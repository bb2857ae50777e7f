"""Entropy-band regularizer (#133): entropy and E_max = log(visible keys) against a float64 loop
under a causal mask, and the claim: zero (value and gradient) inside the band, positive outside,
and a gradient step on the logits moves a head's entropy back towards the band from either side."""

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.train.regularizers import entropy
from tests import tolerances

T = 6


def _maps(logits):
  """Causal weights and logits ([B, N, T, T], -inf above the diagonal) from free logits."""
  causal = jnp.tril(jnp.ones((T, T), bool))
  masked = jnp.where(causal, logits, -jnp.inf)
  return jax.nn.softmax(masked, axis=-1), masked


def _reference(weights, logits, target, tolerance):
  terms = []
  for w, lg in zip(weights, logits, strict=True):
    w, lg = np.asarray(w, np.float64), np.asarray(lg, np.float64)
    rows = []
    for b in range(w.shape[0]):
      for n in range(w.shape[1]):
        for t in range(w.shape[2]):
          seen = np.isfinite(lg[b, n, t])
          p = w[b, n, t][seen]
          e = -sum(x * np.log(x) for x in p if x > 0)
          e_max = np.log(seen.sum())
          d = e - target[n] * e_max
          rows.append((n, d * d if abs(d) > tolerance * e_max else 0.0))
    heads = [np.mean([v for m, v in rows if m == n]) for n in range(w.shape[1])]
    terms.append(np.mean(heads))
  return np.mean(terms)


def test_penalty_matches_a_loop_over_rows():
  rng = np.random.default_rng(0)
  target = np.array([0.2, 0.9])
  layers = [_maps(jnp.asarray(rng.standard_normal((2, 2, T, T)) * s, jnp.float32))
            for s in (0.5, 4.0)]
  weights, logits = [w for w, _ in layers], [lg for _, lg in layers]
  got = entropy.entropy_band_penalty(weights, logits, target=jnp.asarray(target), tolerance=0.1)
  want = _reference(weights, logits, target, 0.1)
  assert want > 0
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))
  e, e_max = entropy.row_entropy(*layers[0])
  np.testing.assert_allclose(e_max[0, 0], np.log(np.arange(1, T + 1)), **tolerances.output(
      jnp.float32))
  assert np.all(np.asarray(e) <= np.asarray(e_max) + 1e-6)


def _mean_fraction(logits):
  e, e_max = entropy.row_entropy(*_maps(logits))
  return float((e[..., 1:] / e_max[..., 1:]).mean())   # row 0 sees one key: E = E_max = 0


def test_zero_inside_the_band_positive_outside_and_the_gradient_restores_it():
  uniform = jnp.zeros((1, 1, T, T), jnp.float32)   # every row at E = E_max (fraction 1)
  fn = lambda lg, target: entropy.entropy_band_penalty(*map(lambda a: [a], _maps(lg)),
                                                       target=target, tolerance=0.2)
  # Inside: target 0.9 ± 0.2 covers fraction 1.
  assert fn(uniform, 0.9) == 0.0
  assert np.all(np.asarray(jax.grad(fn)(uniform + 0.01, 0.9)) == 0.0)
  # Above the band (overload): target 0.3.
  assert fn(uniform, 0.3) > 0
  peaked = jnp.asarray(np.random.default_rng(1).standard_normal((1, 1, T, T)) * 8, jnp.float32)
  # Below the band (collapse): target 0.9 for nearly one-hot rows.
  assert _mean_fraction(peaked) < 0.5 and fn(peaked, 0.9) > 0
  start = uniform + 0.01 * jnp.asarray(np.random.default_rng(2).standard_normal((1, 1, T, T)),
                                       jnp.float32)
  for logits, target, direction in ((start, 0.3, -1), (peaked, 0.9, +1)):
    grad = jax.grad(fn)(logits, target)
    moved = logits - 0.5 * grad
    assert direction * (_mean_fraction(moved) - _mean_fraction(logits)) > 0, target
    assert fn(moved, target) < fn(logits, target)


def test_target_per_layer_and_head_and_bad_shapes():
  w, lg = _maps(jnp.zeros((1, 2, T, T), jnp.float32))
  per_layer = entropy.entropy_band_penalty([w, w], [lg, lg], target=jnp.array([[0.3, 1.0],
                                                                                [1.0, 1.0]]))
  only_first = entropy.entropy_band_penalty([w], [lg], target=jnp.array([0.3, 1.0]))
  np.testing.assert_allclose(per_layer, only_first / 2, **tolerances.output(jnp.float32))
  with np.testing.assert_raises_regex(ValueError, "heads"):
    entropy.entropy_band_penalty([w], [lg], target=jnp.array([0.3, 0.5, 1.0]))
