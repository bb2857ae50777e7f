"""Clipped softmax and gated attention (#81): weights clip((ζ - γ)·softmax + γ, 0, 1) and the head
output times σ(G(x)), checked against a float64 rewrite (outputs, and gradients against a dense
form), with the paper's point: a head can output exact zeros at finite logits (every weight of a
flat row clipped to 0), which softmax cannot; ζ = 1, γ = 0 is softmax; the gate scales each head's
output by exactly σ(gate_logits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import clipped_softmax_gated_attention, softmax_attention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, N, K, H, h = 2, 13, 4, 2, 8, 6


def _gate(seed):
  return 2.0 * jax.random.normal(jax.random.PRNGKey(seed), (B, T, N))


def _clipped_float64(q, k, v, gate_logits, *, zeta, gamma, causal, scale):
  """The paper's equations per head in float64, with explicit clipping and gating."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * scale
  visible = np.tril(np.ones(s.shape[-2:], bool)) if causal else np.ones(s.shape[-2:], bool)
  z = np.where(visible, s, -np.inf)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  w = np.where(visible, np.minimum(np.maximum((zeta - gamma) * p + gamma, 0.0), 1.0), 0.0)
  out = np.einsum("bnts,bsnh->btnh", w, v)
  if gate_logits is not None:
    out = out / (1.0 + np.exp(-np.asarray(gate_logits, np.float64)))[..., None]
  return out, w


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_papers_equations(implementation, causal):
  # scale 1.5 makes some rows peaked, so with ζ = 1.1, γ = -0.1 both clips engage: weights below
  # 0.1/1.2 become 0 and weights above 1.1/1.2 become 1.
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=1)
  gate = _gate(2)
  kw = dict(zeta=1.1, gamma=-0.1, causal=causal, scale=1.5)
  fn = inputs.jit_with(clipped_softmax_gated_attention, implementation=implementation, **kw)
  out = fn(q, k, v, gate_logits=gate)
  want, w = _clipped_float64(q, k, v, gate, **kw)
  visible = np.broadcast_to(np.tril(np.ones((T, T), bool)) if causal else True, w.shape)
  assert (w[visible] == 0.0).any() and (w[visible] == 1.0).any()     # both clips are exercised
  np.testing.assert_allclose(np.asarray(out), want, **F32)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_gradients_match_a_dense_form(implementation):
  q, k, v = inputs.qkv(B=1, T=9, S=9, N=2, K=1, H=4, h=3, seed=3)
  dout = inputs.qkv(B=1, T=9, S=9, N=2, K=1, H=3, h=3, seed=4)[0]
  gate = jax.random.normal(jax.random.PRNGKey(5), (1, 9, 2))

  def dense(q, k, v, g):
    kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, kr) * 2.0
    visible = jnp.tril(jnp.ones((9, 9), bool))
    p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
    w = jnp.where(visible, jnp.clip(1.1 * p - 0.1, 0.0, 1.0), 0.0)
    return jnp.einsum("bnts,bsnh->btnh", w, vr) * jax.nn.sigmoid(g)[..., None]

  op = lambda q, k, v, g: clipped_softmax_gated_attention(
      q, k, v, gate_logits=g, causal=True, scale=2.0, zeta=1.0, gamma=-0.1,
      implementation=implementation)
  inputs.assert_same_gradients(op, dense, (q, k, v, gate), dout, ("dq", "dk", "dv", "dgate"),
                               tol=tolerances.grad(jnp.float32))


def test_a_head_can_output_exact_zeros():
  # Head 0 has zero queries: a flat row of 13 keys, p = 1/13 < -γ/(ζ - γ) = 0.1/1.1, so every weight
  # clips to 0 and the head outputs exactly 0 at finite logits. Softmax gives every key 1/13.
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=6)
  q = q.at[:, :, 0].set(0.0)
  out = np.asarray(clipped_softmax_gated_attention(q, k, v, zeta=1.0, gamma=-0.1))
  np.testing.assert_array_equal(out[:, :, 0], 0.0)
  assert np.all(np.abs(out[:, :, 1:]).max(axis=(1, 3)) > tolerances.CHANGED_MAX_ABS)
  plain = np.asarray(softmax_attention(q, k, v))
  assert np.abs(plain[:, :, 0]).max() > tolerances.CHANGED_MAX_ABS


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_zeta_one_gamma_zero_is_softmax(implementation):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=7)
  out = clipped_softmax_gated_attention(q, k, v, causal=True, zeta=1.0, gamma=0.0,
                                        implementation=implementation)
  want = softmax_attention(q, k, v, causal=True, implementation=implementation)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **F32)


def test_gate_scales_each_head_output_by_its_sigmoid():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=8)
  gate = _gate(9)
  ungated = np.asarray(clipped_softmax_gated_attention(q, k, v, causal=True), np.float64)
  gated = np.asarray(clipped_softmax_gated_attention(q, k, v, causal=True, gate_logits=gate))
  sigma = 1.0 / (1.0 + np.exp(-np.asarray(gate, np.float64)))
  np.testing.assert_allclose(gated, ungated * sigma[..., None], **tolerances.ELEMENTWISE[jnp.float32])


def test_fully_masked_row_gives_zeros():
  q, k, v = inputs.qkv(B=2, T=4, S=4, N=2, K=1, H=4, h=3)
  out = clipped_softmax_gated_attention(q, k, v, kv_lengths=jnp.array([0, 4]), gamma=-0.1)
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  assert np.isfinite(np.asarray(out)).all()


def test_bad_input_is_a_clear_error():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h)
  with pytest.raises(ValueError, match=r"clipped_softmax_gated_attention.*gate_logits.*\[B, T, N\]"):
    clipped_softmax_gated_attention(q, k, v, gate_logits=jnp.zeros((B, T, K)))
  with pytest.raises(ValueError, match="zeta"):
    clipped_softmax_gated_attention(q, k, v, zeta=0.9)
  with pytest.raises(ValueError, match="gamma"):
    clipped_softmax_gated_attention(q, k, v, gamma=0.1)
