"""Marginal attention (#36): the weights are the float64 Bayes posterior of the pointer z under
q | z = j ~ N(k_j, σ² I) with prior π, and with equal-norm keys and a uniform prior the mechanism is
exactly softmax(q·k / σ²) attention (the paper's link to dot-product attention)."""

import jax.numpy as jnp
import numpy as np
import pytest

import attnjax.ops.theory  # noqa: F401  (registers the mechanism until attnjax.ops imports it)
from attnjax.ops.softmax import softmax_attention
from attnjax.ops.theory import marginal_attention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)


def _bayes_posterior_mean(q, k, v, *, causal, sigma2, prior):
  """Loops in float64: prior × Gaussian likelihood (with its full ||q - k||²), normalized."""
  q, k, v, prior = (np.asarray(x, np.float64) for x in (q, k, v, prior))
  B, T, N, _ = q.shape
  S, K = k.shape[1], k.shape[2]
  out = np.zeros((B, T, N, v.shape[-1]))
  for b in range(B):
    for n in range(N):
      kh = n // (N // K)
      for t in range(T):
        keys = range(t + 1) if causal else range(S)
        joint = np.array([prior[b, j] * np.exp(-np.sum((q[b, t, n] - k[b, j, kh]) ** 2)
                                               / (2 * sigma2)) for j in keys])
        post = joint / joint.sum()
        out[b, t, n] = sum(p * v[b, j, kh] for p, j in zip(post, keys, strict=True))
  return out


@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_bayes_posterior_mean(causal):
  q, k, v = inputs.qkv(B=2, T=6, N=4, K=2, H=3, h=2, seed=21)
  prior = np.random.default_rng(0).dirichlet(np.ones(6), size=2)  # [B, S]
  sigma2 = 2.0
  out = inputs.jit_with(marginal_attention, causal=causal, scale=1 / sigma2)(
      q, k, v, log_prior=jnp.log(jnp.asarray(prior, jnp.float32)))
  want = _bayes_posterior_mean(q, k, v, causal=causal, sigma2=sigma2, prior=prior)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_equal_norm_keys_and_uniform_prior_give_softmax_attention():
  q, k, v = inputs.qkv(B=2, T=7, N=2, K=2, H=4, h=3, seed=5)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True) * 1.7  # every key has norm 1.7
  out = marginal_attention(q, k, v, causal=True, scale=0.8)
  want = softmax_attention(q, k, v, causal=True, scale=0.8)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **F32)
  # Unequal norms break the equivalence: the -||k||²/2σ² term then matters.
  k_uneven = k * jnp.arange(1, 8, dtype=jnp.float32)[None, :, None, None]
  gap = np.abs(np.asarray(marginal_attention(q, k_uneven, v, causal=True, scale=0.8))
               - np.asarray(softmax_attention(q, k_uneven, v, causal=True, scale=0.8))).max()
  assert gap > 0.1


def test_rejects_a_misshaped_prior():
  q, k, v = inputs.qkv(B=2, T=4, N=2, K=2, H=4, h=3, seed=1)
  with pytest.raises(ValueError, match="log_prior"):
    marginal_attention(q, k, v, log_prior=jnp.zeros((2, 5)))
