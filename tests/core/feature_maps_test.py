"""Feature maps: each map's defining identity (the kernel its dot product computes) and its range."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import feature_maps as fm

X = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 5))
Y = jax.random.normal(jax.random.PRNGKey(1), (3, 7, 5))


def test_taylor2_dot_product_is_second_order_taylor_of_exp():
  x = jnp.sum(X * Y, axis=-1)
  got = jnp.sum(fm.taylor2(X) * fm.taylor2(Y), axis=-1)
  np.testing.assert_allclose(got, 1 + x + x * x / 2, rtol=1e-5, atol=1e-5)
  assert fm.taylor2(X).shape == (3, 7, 1 + 5 + 25)


def test_l2_normalize_gives_cosine_similarity_and_handles_zero_rows():
  got = jnp.sum(fm.l2_normalize(X) * fm.l2_normalize(Y), axis=-1)
  want = jnp.sum(X * Y, -1) / (jnp.linalg.norm(X, axis=-1) * jnp.linalg.norm(Y, axis=-1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  zero = fm.l2_normalize(jnp.zeros((2, 4)))
  assert bool(jnp.all(zero == 0))


@pytest.mark.parametrize("name", ["elu_plus_one", "softmax_features", "bounded_exp"])
def test_positive_maps_are_positive(name):
  phi = fm.get(name)(3.0 * X)
  assert bool(jnp.all(phi > 0)) and phi.dtype == jnp.float32


def test_softmax_features_sum_to_one_and_bounded_exp_peaks_at_one():
  np.testing.assert_allclose(jnp.sum(fm.softmax_features(X), -1), 1.0, rtol=1e-6)
  b = fm.bounded_exp(100.0 * X)         # no overflow whatever the scale
  assert bool(jnp.all(jnp.isfinite(b)))
  np.testing.assert_allclose(jnp.max(b, -1), 1.0)


def test_lognormal_is_exp_of_scaled_input():
  np.testing.assert_allclose(fm.lognormal(X, 0.5), jnp.exp(0.5 * X), rtol=1e-6)


def test_favor_plus_dot_product_is_mean_of_exponentials():
  """`φ(x)·φ(y) = Σ_i exp(w_i·(x+y) - (‖x‖²+‖y‖²)/2) / m`; check the formula term by term."""
  w = fm.orthogonal_random_features(jax.random.PRNGKey(2), 10, 5)
  got = jnp.sum(fm.favor_plus(X, w) * fm.favor_plus(Y, w), -1)
  logits = jnp.einsum("...f,mf->...m", X + Y, w) - 0.5 * jnp.sum(X * X + Y * Y, -1, keepdims=True)
  np.testing.assert_allclose(got, jnp.mean(jnp.exp(logits), -1), rtol=1e-5)


def test_favor_plus_row_stabilizer_cancels_in_normalized_weights():
  w = fm.orthogonal_random_features(jax.random.PRNGKey(3), 16, 5)
  kf = fm.favor_plus(Y, w)
  def weights(stab):
    s = jnp.einsum("tm,sm->ts", fm.favor_plus(X[0], w, stabilizer=stab), kf[0])
    return s / jnp.sum(s, -1, keepdims=True)
  np.testing.assert_allclose(weights(None), weights(jnp.full((7, 1), 3.0)), rtol=1e-5)


def test_unknown_name_lists_the_choices():
  with pytest.raises(ValueError, match="unknown feature map 'nope'.*elu_plus_one"):
    fm.get("nope")
