"""Cog attention (#83): signed weights sign(s)·e^{|s|} / Σ e^{|s|}, checked against a float64 rewrite
(outputs and gradients, at scores large enough that one-pass forms overflow), and the paper's claim:
weights can be negative and their absolute values sum to 1 per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import cog_attention
from tests import inputs
from tests import tolerances


def _cog_float64(q, k, v, *, causal, scale):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * scale
  visible = np.tril(np.ones(s.shape[-2:], bool)) if causal else np.ones(s.shape[-2:], bool)
  a = np.where(visible, np.abs(s), -np.inf)
  w = np.sign(s) * np.exp(a - a.max(-1, keepdims=True))
  w = w / np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", np.where(visible, w, 0.0), v)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_equals_the_papers_formula_with_large_negative_scores(implementation):
  # scale 12 gives |s| past 88, where e^{|s|} overflows float32, and the largest |s| is often negative.
  q, k, v = inputs.qkv(B=2, T=10, S=10, N=4, K=2, H=8, h=6, seed=2)
  fn = inputs.jit_with(cog_attention, causal=True, scale=12.0, implementation=implementation)
  out = fn(q, k, v)
  np.testing.assert_allclose(np.asarray(out), _cog_float64(q, k, v, causal=True, scale=12.0),
                             **tolerances.output(jnp.float32))


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_gradients_match_a_dense_float32_form(implementation):
  q, k, v = inputs.qkv(B=1, T=7, S=7, N=2, K=1, H=4, h=3, seed=8)
  dout = inputs.qkv(B=1, T=7, S=7, N=2, K=1, H=3, h=3, seed=9)[0]

  def dense(q, k, v):
    kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, kr) / 2.0
    visible = jnp.tril(jnp.ones((7, 7), bool))
    a = jnp.where(visible, jnp.abs(s), -jnp.inf)
    w = jnp.where(visible, jnp.sign(s) * jax.nn.softmax(a, axis=-1), 0.0)
    return jnp.einsum("bnts,bsnh->btnh", w, vr)

  op = lambda *a: cog_attention(*a, causal=True, implementation=implementation)
  inputs.assert_same_gradients(op, dense, (q, k, v), dout, ("dq", "dk", "dv"),
                               tol=tolerances.grad(jnp.float32))


def test_weights_are_signed_and_their_absolute_values_sum_to_one():
  # One-hot values turn the output row into the weight row.
  S = 6
  q, k, _ = inputs.qkv(B=1, T=S, S=S, N=1, K=1, H=4, seed=6)
  v = jnp.eye(S)[None, :, None, :]
  w = np.asarray(cog_attention(q, k, v, causal=True, scale=1.0))[0, :, 0]
  scores = np.einsum("th,sh->ts", np.asarray(q)[0, :, 0], np.asarray(k)[0, :, 0])
  seen = np.tril(np.ones((S, S), bool))
  assert (w < 0).any() and (w > 0).any()
  np.testing.assert_array_equal(np.sign(w[seen]), np.sign(scores[seen]))
  np.testing.assert_allclose(np.abs(w).sum(-1), 1.0, **tolerances.output(jnp.float32))


def test_fully_masked_row_gives_zeros():
  q, k, v = inputs.qkv(B=2, T=4, S=4, N=2, K=1, H=4, h=3)
  out = cog_attention(q, k, v, kv_lengths=jnp.array([0, 4]))
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  assert np.isfinite(np.asarray(out)).all()
