"""Feature maps: each map's defining identity (the kernel its dot product computes), its range, and
the exact stabilizers of exponential features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import feature_maps as fm
from tests import tolerances

X = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 5))
Y = jax.random.normal(jax.random.PRNGKey(1), (3, 7, 5))


def test_taylor2_dot_product_is_second_order_taylor_of_exp():
  x = jnp.sum(X * Y, axis=-1)
  got = jnp.sum(fm.taylor2(X) * fm.taylor2(Y), axis=-1)
  np.testing.assert_allclose(got, 1 + x + x * x / 2, **tolerances.KERNEL_VALUE[jnp.float32])
  assert fm.taylor2(X).shape == (3, 7, 1 + 5 + 25)


def test_l2_normalize_gives_cosine_similarity_and_handles_zero_rows():
  got = jnp.sum(fm.l2_normalize(X) * fm.l2_normalize(Y), axis=-1)
  want = jnp.sum(X * Y, -1) / (jnp.linalg.norm(X, axis=-1) * jnp.linalg.norm(Y, axis=-1))
  np.testing.assert_allclose(got, want, **tolerances.COSINE[jnp.float32])
  zero = fm.l2_normalize(jnp.zeros((2, 4)))
  assert bool(jnp.all(zero == 0))


@pytest.mark.parametrize("name", ["elu_plus_one", "softmax_features", "bounded_exp"])
def test_positive_maps_are_positive(name):
  phi = fm.get(name)(3.0 * X)
  assert bool(jnp.all(phi > 0)) and phi.dtype == jnp.float32


def test_softmax_features_sum_to_one_and_bounded_exp_peaks_at_one():
  np.testing.assert_allclose(jnp.sum(fm.softmax_features(X), -1), 1.0,
                             **tolerances.ELEMENTWISE[jnp.float32])
  b = fm.bounded_exp(100.0 * X)         # no overflow whatever the scale
  assert bool(jnp.all(jnp.isfinite(b)))
  np.testing.assert_allclose(jnp.max(b, -1), 1.0)


def test_lognormal_is_exp_of_scaled_input():
  np.testing.assert_allclose(fm.lognormal(X, 0.5), jnp.exp(0.5 * X),
                             **tolerances.ELEMENTWISE[jnp.float32])


def test_favor_plus_dot_product_is_mean_of_exponentials():
  """`φ(x)·φ(y) = Σ_i exp(w_i·(x+y) - (‖x‖²+‖y‖²)/2) / m`; check the formula term by term."""
  w = fm.orthogonal_random_features(jax.random.PRNGKey(2), 10, 5)
  got = jnp.sum(fm.favor_plus(X, w) * fm.favor_plus(Y, w), -1)
  logits = jnp.einsum("...f,mf->...m", X + Y, w) - 0.5 * jnp.sum(X * X + Y * Y, -1, keepdims=True)
  np.testing.assert_allclose(got, jnp.mean(jnp.exp(logits), -1),
                             **tolerances.FEATURE_SUM[jnp.float32])


def test_favor_plus_row_stabilizer_cancels_in_normalized_weights():
  w = fm.orthogonal_random_features(jax.random.PRNGKey(3), 16, 5)
  kf = fm.favor_plus(Y, w)
  def weights(stab):
    s = jnp.einsum("tm,sm->ts", fm.favor_plus(X[0], w, stabilizer=stab), kf[0])
    return s / jnp.sum(s, -1, keepdims=True)
  np.testing.assert_allclose(weights(None), weights(jnp.full((7, 1), 3.0)),
                             **tolerances.FEATURE_SUM[jnp.float32])


def test_orthogonal_random_features_are_orthogonal_within_blocks():
  w = fm.orthogonal_random_features(jax.random.PRNGKey(0), 20, 8)
  assert w.shape == (20, 8)
  for block in (w[:8], w[8:16], w[16:]):
    gram = block @ block.T
    np.testing.assert_allclose(gram - jnp.diag(jnp.diag(gram)), 0.0,
                               **tolerances.ORTHOGONALITY[jnp.float32])
  regular = fm.orthogonal_random_features(jax.random.PRNGKey(0), 20, 8, scaling="sqrt_dim")
  np.testing.assert_allclose(jnp.linalg.norm(regular, axis=-1), 8 ** 0.5,
                             **tolerances.FEATURE_SUM[jnp.float32])


def test_orthogonal_random_features_rows_are_marginally_standard_normal():
  """Each row is N(0, I) over draws (what makes FAVOR+ unbiased): mean 0, covariance I. An
  unfixed QR would give every row a negative first entry."""
  draws = 3000
  w = jax.vmap(lambda key: fm.orthogonal_random_features(key, 6, 4))(
      jax.random.split(jax.random.PRNGKey(0), draws))                      # [draws, 6, 4]
  w = np.asarray(w, np.float64)
  z = np.abs(w.mean(0)) / (w.std(0) / draws ** 0.5)
  assert np.all(z < tolerances.Z_SCORE_MAX), z
  cov = np.einsum("drf,drg->rfg", w, w) / draws
  np.testing.assert_allclose(cov, np.broadcast_to(np.eye(4), cov.shape),
                             **tolerances.SAMPLE_COVARIANCE)


def test_stabilized_exp_features_are_exact_for_huge_exponents():
  """`φ_q·φ_k ∝ exp(a + b)` summed over features, normalized over keys, for exponents in the
  thousands (float64 log-space reference); every row keeps a nonzero sum."""
  ka, kb = jax.random.split(jax.random.PRNGKey(4))
  a = 1000.0 * jax.random.normal(ka, (2, 5, 4, 6))                      # [B,T,N,F]
  b = 1000.0 * jax.random.normal(kb, (2, 7, 2, 6))                      # [B,S,K,F], K=2
  b_max = fm.feature_max_over_keys(b)
  qf, kf = fm.stabilized_exp_features(a, b, b_max[:, :1], b_max)
  weights = jnp.einsum("btnf,bsnf->bnts", qf, jnp.repeat(kf, 2, axis=2))
  assert bool(jnp.all(jnp.sum(weights, -1) > 0))
  a64, b64 = np.asarray(a, np.float64), np.repeat(np.asarray(b, np.float64), 2, axis=2)
  log_w = np.logaddexp.reduce(a64[:, :, None] + b64[:, None], axis=-1)   # [B,T,S,N]
  want = np.exp(log_w - log_w.max(2, keepdims=True))
  want = np.transpose(want / want.sum(2, keepdims=True), (0, 3, 1, 2))
  np.testing.assert_allclose(weights / jnp.sum(weights, -1, keepdims=True), want,
                             **tolerances.STABILIZED_WEIGHTS[jnp.float32])


def test_running_max_gate_keeps_the_stabilized_state_exact():
  """`S_t = exp(g_t) S_{t-1} + exp(b_t - M_t)` with the running max M (restarting per document)
  equals `Σ_{s≤t, same document} exp(b_s - M_t)`, checked step by step in float64."""
  b = 50.0 * jax.random.normal(jax.random.PRNGKey(5), (2, 9, 1, 3))
  run = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0] * 9])
  m = fm.running_feature_max(b, run)
  g = fm.running_max_log_decay(m, run)
  b64, m64, g64, r = (np.asarray(x, np.float64) for x in (b, m, g, run))
  for i in range(2):
    state = np.zeros(3)
    for t in range(9):
      same = r[i, :t + 1] == r[i, t]
      np.testing.assert_allclose(m64[i, t, 0], b64[i, :t + 1][same, 0].max(0),
                                 **tolerances.ELEMENTWISE[jnp.float32])
      state = np.exp(g64[i, t, 0]) * state * (t > 0 and r[i, t] == r[i, t - 1])
      state = state + np.exp(b64[i, t, 0] - m64[i, t, 0])
      want = np.exp(b64[i, :t + 1][same, 0] - m64[i, t, 0]).sum(0)
      np.testing.assert_allclose(state, want, **tolerances.ELEMENTWISE[jnp.float32])
      assert np.all(g64[i, t] <= 0) and np.all(state >= 1.0 - tolerances.FLOAT64_ROUNDING)


def test_unknown_name_lists_the_choices():
  with pytest.raises(ValueError, match="unknown feature map 'nope'.*elu_plus_one"):
    fm.get("nope")
