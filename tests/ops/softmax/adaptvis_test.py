"""Temperature on a token subset (AdaptVis / ScalingVis, #23): the logits of the keys in a subset
(a VLM's image tokens) are multiplied by α before the softmax; AdaptVis picks α per example from
the model's confidence.

Checked against a float64 rewrite (α a float and one per example, both implementations, GQA), and
the defining properties: α = 1 is softmax attention; only the subset's logits are scaled (weight
log-ratios of keys outside the subset do not move, those of subset keys move by (α - 1) s); with
positive subset logits the subset's attention mass grows with α (sharpening) and shrinks for α < 1
(smoothing); the decoding rule sharpens confident examples and smooths the others.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import softmax_attention, temperature_on_token_subset
from attnjax.ops.softmax.adaptvis import adaptvis_alpha, generation_confidence
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, S, N, K, H, h = 2, 9, 14, 4, 2, 8, 6


def _subset(seed, shape=(B, S)):
  return jax.random.bernoulli(jax.random.PRNGKey(seed), 0.5, shape)


def _scaled_float64(q, k, v, subset, alpha, *, causal):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * q.shape[-1] ** -0.5
  a = np.broadcast_to(np.asarray(alpha, np.float64), (q.shape[0],))[:, None, None, None]
  s = np.where(np.asarray(subset)[:, None, None, :], a * s, s)
  if causal:
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bnts,bsnh->btnh", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_equals_the_scaled_logits_softmax(implementation):
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=1)
  subset = _subset(2)
  fn = inputs.jit_with(temperature_on_token_subset, implementation=implementation)
  for alpha in (1.7, jnp.array([0.5, 2.0])):
    out = fn(q, k, v, subset=subset, alpha=alpha)
    np.testing.assert_allclose(np.asarray(out),
                               _scaled_float64(q, k, v, subset, alpha, causal=False), **F32)
  qs, ks, vs = inputs.qkv(B=B, T=S, N=N, K=K, H=H, h=h, seed=3)
  out = inputs.jit_with(temperature_on_token_subset, causal=True, implementation=implementation)(
      qs, ks, vs, subset=subset, alpha=0.6)
  np.testing.assert_allclose(np.asarray(out), _scaled_float64(qs, ks, vs, subset, 0.6, causal=True),
                             **F32)


def test_alpha_one_is_softmax_attention():
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=4)
  out = temperature_on_token_subset(q, k, v, subset=_subset(5), alpha=1.0)
  np.testing.assert_allclose(np.asarray(out), np.asarray(softmax_attention(q, k, v)), **F32)


def test_only_the_subsets_logits_are_scaled():
  # One-hot values read the weights: log w_ij - log w_ij' = s_ij - s_ij' outside the subset for
  # every α, and α s_ij - s_ij' for a subset key j against a key j' outside it.
  q, k, _ = inputs.qkv(B=1, T=3, S=S, N=1, K=1, H=H, h=h, seed=6)
  v = jnp.eye(S)[None, :, None, :]
  subset = _subset(7, (1, S))
  inside, outside = np.flatnonzero(subset[0]), np.flatnonzero(~subset[0])
  s = np.einsum("th,sh->ts", np.asarray(q, np.float64)[0, :, 0],
                np.asarray(k, np.float64)[0, :, 0]) * H ** -0.5
  for alpha in (0.5, 2.5):
    logw = np.log(np.asarray(temperature_on_token_subset(q, k, v, subset=subset, alpha=alpha),
                             np.float64)[0, :, 0])
    ref = outside[0]
    np.testing.assert_allclose(logw[:, outside] - logw[:, [ref]], s[:, outside] - s[:, [ref]],
                               atol=tolerances.LOG_WEIGHT_ABS)
    np.testing.assert_allclose(logw[:, inside] - logw[:, [ref]], alpha * s[:, inside] - s[:, [ref]],
                               atol=tolerances.LOG_WEIGHT_ABS)


def test_subset_mass_grows_with_alpha_when_its_logits_are_positive():
  # Keys of the subset point along the queries (positive logits); the mass on them rises with α.
  rng = np.random.default_rng(8)
  u = np.zeros(H)
  u[0] = 1.5
  q = jnp.asarray(u + 0.2 * rng.standard_normal((1, T, 1, H)), jnp.float32)
  subset = np.zeros((1, S), bool)
  subset[0, ::3] = True
  k = np.where(subset[0, :, None], u, 0.0) + 0.3 * rng.standard_normal((S, H))
  k = jnp.asarray(k[None, :, None], jnp.float32)
  assert np.all(np.einsum("th,sh->ts", np.asarray(q)[0, :, 0], np.asarray(k)[0, subset[0], 0]) > 0)
  v = jnp.asarray(subset[0].astype(np.float32))[None, :, None, None]   # output = mass on the subset
  fn = jax.jit(lambda alpha: temperature_on_token_subset(q, k, v, subset=subset, alpha=alpha))
  mass = np.stack([np.asarray(fn(jnp.float32(a)))[0, :, 0, 0] for a in (0.5, 0.8, 1.0, 1.5, 2.0)])
  assert np.all(np.diff(mass, axis=0) > 0)             # every query row: smoothing < 1 < sharpening


def test_adaptvis_rule_sharpens_confident_examples_and_smooths_the_others():
  logits = jnp.array([[8.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.2, 0.0]])
  confidence = generation_confidence(logits)
  probs = np.exp(np.asarray(logits, np.float64))
  np.testing.assert_allclose(np.asarray(confidence), (probs / probs.sum(-1, keepdims=True)).max(-1),
                             **tolerances.ELEMENTWISE[jnp.float32])
  alpha = adaptvis_alpha(confidence, threshold=0.3, alpha_smooth=0.5, alpha_sharpen=1.5)
  np.testing.assert_array_equal(np.asarray(alpha), [1.5, 0.5])
  # The per-example α goes straight into the mechanism.
  q, k, v = inputs.qkv(B=2, T=T, S=S, N=N, K=K, H=H, h=h, seed=9)
  subset = _subset(10)
  out = temperature_on_token_subset(q, k, v, subset=subset, alpha=alpha)
  for b, a in enumerate((1.5, 0.5)):
    alone = temperature_on_token_subset(q[b:b + 1], k[b:b + 1], v[b:b + 1], subset=subset[b:b + 1],
                                        alpha=a)
    np.testing.assert_allclose(np.asarray(out[b:b + 1]), np.asarray(alone), **F32)


def test_bad_input_is_a_clear_error():
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h)
  with pytest.raises(ValueError, match=r"temperature_on_token_subset.*subset.*\[B, S\]"):
    temperature_on_token_subset(q, k, v, subset=jnp.ones((B, T), bool))
  with pytest.raises(ValueError, match=r"temperature_on_token_subset.*alpha.*\[B\]"):
    temperature_on_token_subset(q, k, v, subset=_subset(0), alpha=jnp.ones((3,)))
