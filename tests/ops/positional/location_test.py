"""GMM attention and Dynamic Convolution Attention (location.py; Battenberg et al.,
arXiv:1910.10288): location-relative alignment for a decoder, the paper's claim being monotonic
alignment that generalizes to long memories.

Checked: one step of each against a float64 rewrite of the paper's equations (Table 1's three GMM
parameterizations; DCA's static, dynamic and causal prior filterings with explicit loops); GMM
means never decrease over a scan and its weights are nonnegative; DCA weights are nonnegative and
sum to 1 over the unpadded memory (zeros for an empty one, with finite gradients); the prior filter
is the beta-binomial pmf (scipy); with no energy term DCA moves the alignment forward only, its mean
by exactly the prior's mean per step.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from attnjax.ops.positional import location
from tests import inputs
from tests import tolerances

B, S, M, T, h = 2, 17, 3, 6, 5
FS, WS, FD, WD, A = 3, 5, 2, 3, 4
TOL = tolerances.output(jnp.float32)


def _normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _softplus(x):
  return np.log1p(np.exp(x))


def _gmm_reference(means, w_hat, delta_hat, sigma_hat, length, kv_lengths, version):
  """Table 1 and α_ij = Σ_k w/Z exp(-(j - μ)² / 2σ²) in float64, component by component."""
  w_hat, delta_hat, sigma_hat, means = (np.asarray(a, np.float64)
                                        for a in (w_hat, delta_hat, sigma_hat, means))
  out = np.zeros((means.shape[0], length))
  new_means = np.zeros_like(means)
  for b in range(means.shape[0]):
    if version == "v0":
      w, delta, sigma = np.exp(w_hat[b]), np.exp(delta_hat[b]), np.sqrt(np.exp(-sigma_hat[b]) / 2)
      z = np.ones_like(sigma)
    else:
      w = np.exp(w_hat[b]) / np.exp(w_hat[b]).sum()
      if version == "v1":
        delta, sigma = np.exp(delta_hat[b]), np.exp(sigma_hat[b])
      else:
        delta, sigma = _softplus(delta_hat[b]), _softplus(sigma_hat[b])
      z = np.sqrt(2 * math.pi * sigma ** 2)
    mu = means[b] + delta
    new_means[b] = mu
    for j in range(kv_lengths[b]):
      out[b, j] = sum(w[k] / z[k] * math.exp(-(j - mu[k]) ** 2 / (2 * sigma[k] ** 2))
                      for k in range(means.shape[1]))
  return out, new_means


@pytest.mark.parametrize("version", location.GMM_VERSIONS)
def test_gmm_step_matches_float64_rewrite(version):
  means = jnp.abs(_normal(0, (B, M), 4.0))
  w_hat, delta_hat, sigma_hat = _normal(1, (B, M)), _normal(2, (B, M)), _normal(3, (B, M))
  kv_lengths = jnp.array([S, 11])
  step = inputs.jit_with(location.gmm_attention_step, length=S, version=version)
  alignment, new_means = step(means, w_hat, delta_hat, sigma_hat, kv_lengths=kv_lengths)
  want, want_means = _gmm_reference(means, w_hat, delta_hat, sigma_hat, S, [S, 11], version)
  chex.assert_trees_all_close(alignment, want.astype(np.float32), **TOL)
  chex.assert_trees_all_close(new_means, want_means.astype(np.float32), **TOL)


@pytest.mark.parametrize("version", location.GMM_VERSIONS)
def test_gmm_means_never_decrease_and_weights_are_nonnegative(version):
  # Strongly negative mean-step logits: the steps shrink towards 0 but never go backwards.
  params = [_normal(4, (B, T, M)), _normal(5, (B, T, M), 3.0) - 4.0, _normal(6, (B, T, M))]
  memory = _normal(7, (B, S, h))
  contexts, alignments, final = jax.jit(location.gmm_attention_scan, static_argnames="version")(
      *params, memory, version=version)
  step = inputs.jit_with(location.gmm_attention_step, length=S, version=version)
  means, history = jnp.zeros((B, M)), [np.zeros((B, M))]
  for t in range(T):   # the scan equals the steps, one at a time
    alignment, means = step(means, *(p[:, t] for p in params))
    chex.assert_trees_all_close(alignments[:, t], alignment, **TOL)
    history.append(np.asarray(means))
  chex.assert_trees_all_close(final, means, **TOL)
  chex.assert_trees_all_close(contexts, jnp.einsum("bts,bsh->bth", alignments, memory), **TOL)
  assert np.all(np.diff(np.stack(history), axis=0) >= 0)
  assert np.all(np.asarray(alignments) >= 0)


def test_prior_filter_is_the_beta_binomial_pmf():
  for length, a, b in ((11, 0.1, 0.9), (5, 2.0, 3.0), (1, 0.5, 0.5)):
    prior = location.beta_binomial_prior(length, a, b)
    want = stats.betabinom.pmf(np.arange(length), length - 1, a, b)
    np.testing.assert_allclose(prior, want, **tolerances.ELEMENTWISE[jnp.float32])
    np.testing.assert_allclose(float(jnp.sum(prior)), 1.0, **tolerances.FEATURE_SUM[jnp.float32])


def _dca_weights(seed=10, v_scale=1.0):
  return dict(static_filters=_normal(seed, (FS, WS)), static_proj=_normal(seed + 1, (FS, A)),
              dynamic_proj=_normal(seed + 2, (FD, A)), bias=_normal(seed + 3, (A,)),
              v=_normal(seed + 4, (A,), v_scale), prior=location.beta_binomial_prior())


def _dca_reference(alignment, dynamic_filters, weights, kv_lengths, floor=1e-6):
  """e_j = vᵀ tanh(U f_j + T g_j + b) + log max(Σ_k P[k] α_(j-k), ε) with explicit loops, float64
  softmax over the valid slots."""
  a = np.asarray(alignment, np.float64)
  w = {k: np.asarray(x, np.float64) for k, x in weights.items()}
  g_filters = np.asarray(dynamic_filters, np.float64)
  at = lambda b, j: a[b, j] if 0 <= j < a.shape[1] else 0.0
  out = np.zeros_like(a)
  for b in range(a.shape[0]):
    energies = []
    for j in range(kv_lengths[b]):
      f = [sum(w["static_filters"][c, u] * at(b, j + u - (WS - 1) // 2) for u in range(WS))
           for c in range(FS)]
      g = [sum(g_filters[b, c, u] * at(b, j + u - (WD - 1) // 2) for u in range(WD))
           for c in range(FD)]
      p = sum(w["prior"][k] * at(b, j - k) for k in range(len(w["prior"])))
      hidden = np.tanh(np.array(f) @ w["static_proj"] + np.array(g) @ w["dynamic_proj"] + w["bias"])
      energies.append(hidden @ w["v"] + math.log(max(p, floor)))
    e = np.exp(np.array(energies) - max(energies))
    out[b, :kv_lengths[b]] = e / e.sum()
  return out


def test_dca_step_matches_float64_rewrite():
  weights = _dca_weights()
  previous = jax.nn.softmax(_normal(20, (B, S), 2.0), axis=-1).at[1, 12:].set(0.0)
  dynamic = _normal(21, (B, FD, WD))
  got = jax.jit(location.dca_attention_step)(previous, dynamic, kv_lengths=jnp.array([S, 12]),
                                             **weights)
  want = _dca_reference(previous, dynamic, weights, [S, 12])
  chex.assert_trees_all_close(got, want.astype(np.float32), **TOL)


def test_dca_weights_are_a_distribution_over_the_unpadded_memory():
  weights = _dca_weights(v_scale=3.0)
  dynamic = _normal(22, (B, T, FD, WD), 2.0)
  memory = _normal(23, (B, S, h))
  kv_lengths = jnp.array([S, 9])
  scan = jax.jit(location.dca_attention_scan)
  contexts, alignments, final = scan(dynamic, memory, kv_lengths=kv_lengths, **weights)
  assert np.all(np.asarray(alignments) >= 0)
  np.testing.assert_allclose(jnp.sum(alignments, -1), np.ones((B, T)),
                             **tolerances.FEATURE_SUM[jnp.float32])
  chex.assert_trees_all_equal(alignments[1, :, 9:], jnp.zeros((T, S - 9)))
  chex.assert_trees_all_equal(final, alignments[:, -1])
  chex.assert_trees_all_close(contexts, jnp.einsum("bts,bsh->bth", alignments, memory), **TOL)
  # An empty memory row: zero weights, finite gradients.
  empty = lambda d: location.dca_attention_scan(d, memory, kv_lengths=jnp.array([S, 0]),
                                                **weights)
  (value, (_, alignments, _)), grad = jax.jit(jax.value_and_grad(
      lambda d: (empty(d)[0].sum(), empty(d)), has_aux=True))(dynamic)
  chex.assert_tree_all_finite((value, grad))
  chex.assert_trees_all_equal(alignments[1], jnp.zeros((T, S)))


def test_dca_prior_alone_moves_the_alignment_forward_by_the_prior_mean():
  """v = 0 leaves only the prior: α_i = P ∗ α_(i-1), a forward-only move of mean (L-1) a/(a+b)."""
  weights = _dca_weights(v_scale=0.0)
  length, a, b = 11, 0.1, 0.9
  memory = _normal(24, (1, 40, h))
  dynamic = _normal(25, (1, 3, FD, WD))
  # A floor far below float32's resolution of the weights: the prior's exact support.
  _, alignments, _ = jax.jit(location.dca_attention_scan, static_argnames="prior_floor")(
      dynamic, memory, prior_floor=1e-30, **weights)
  steps = np.concatenate([np.eye(40)[:1], np.asarray(alignments[0])])
  cdf = np.cumsum(steps, axis=-1)
  assert np.all(cdf[1:] <= cdf[:-1] + tolerances.CUMULATIVE_WEIGHT_ABS)   # mass only moves forward
  mean_position = steps @ np.arange(40)
  np.testing.assert_allclose(np.diff(mean_position), np.full(3, (length - 1) * a / (a + b)),
                             **tolerances.FEATURE_SUM[jnp.float32])


@pytest.mark.parametrize("call,match", [
    (lambda: location.gmm_attention_step(jnp.zeros((B, M)), jnp.zeros((B, M + 1)),
                                         jnp.zeros((B, M)), jnp.zeros((B, M)), length=S), "w_hat"),
    (lambda: location.gmm_attention_step(jnp.zeros((B, M)), *(jnp.zeros((B, M)),) * 3, length=S,
                                         version="v3"), "version"),
    (lambda: location.dca_attention_step(jnp.zeros((B, S)), jnp.zeros((B, FD, 4)),
                                         **_dca_weights()), "odd width"),
    (lambda: location.dca_attention_step(jnp.zeros((B, S)), jnp.zeros((B, FD, WD)),
                                         kv_lengths=jnp.zeros((3,), jnp.int32), **_dca_weights()),
     "kv_lengths"),
])
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()
