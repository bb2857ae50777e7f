"""Softpick (#190): the paper's weights relu(e^s - 1) / (Σ|e^s - 1| + ε), checked against a float64
rewrite, with its defining properties: keys with negative scores get exactly zero weight, and a row of
equal (zero) scores gives no weight at all instead of a sink."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import softmax_attention, softpick_attention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)


def _softpick_float64(q, k, v, *, causal, scale):
  """The paper's formula per head, float64, GQA by repeating key/value heads; ε = 1e-6."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * scale
  T, S = s.shape[-2:]
  visible = np.tril(np.ones((T, S), bool)) if causal else np.ones((T, S), bool)
  e = np.where(visible, np.expm1(s), 0.0)
  w = np.maximum(e, 0.0) / (np.abs(e).sum(-1, keepdims=True) + 1e-6)
  return np.einsum("bnts,bsnh->btnh", w, v)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_papers_formula_at_large_scores(implementation, causal):
  # scale 1.5 puts scores far above 1 (e^s in the thousands): the stable form must still agree.
  q, k, v = inputs.qkv(B=2, T=11, N=4, K=2, H=8, h=6, seed=3)
  out = inputs.jit_with(softpick_attention, causal=causal, scale=1.5,
                        implementation=implementation)(q, k, v)
  want = _softpick_float64(q, k, v, causal=causal, scale=1.5)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_negative_scores_get_exactly_zero_weight():
  # One-hot values make the output row the weight row itself.
  T = S = 7
  q, k, _ = inputs.qkv(B=1, T=T, N=1, K=1, H=4, seed=5)
  v = jnp.eye(S)[None, :, None, :]
  weights = np.asarray(softpick_attention(q, k, v, scale=1.0))[0, :, 0]
  scores = np.einsum("th,sh->ts", np.asarray(q)[0, :, 0], np.asarray(k)[0, :, 0])
  assert (scores < 0).any() and (scores > 0).any()
  assert np.all(weights[scores < 0] == 0.0)
  assert np.all(weights[scores > 0] > 0.0)
  # Not a distribution: a row sums to at most 1 (the negative scores' mass stays in the denominator).
  assert np.all(weights.sum(-1) < 1.0)


def test_equal_scores_give_no_sink():
  # Zero queries: every score is 0, so e^s - 1 = 0 everywhere. Softmax spreads the row evenly (a
  # sink-like average of the values); softpick gives the row no weight at all.
  _, k, v = inputs.qkv(B=2, T=5, N=2, K=2, H=4, h=3, seed=7)
  q = jnp.zeros((2, 5, 2, 4))
  out = softpick_attention(q, k, v, causal=True)
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  assert np.abs(np.asarray(softmax_attention(q, k, v, causal=True))).max() > 0.1
