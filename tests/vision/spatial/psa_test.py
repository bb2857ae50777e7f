"""Polarized self-attention (#58, arXiv:2107.00782): parallel and sequential layouts against a float64
numpy rewrite of the two branches, and the bound the sigmoid gates put on the output: both gates in
(0, 1), so |y| < 2|x| for the parallel sum and |y| < |x| for the sequential product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision import spatial
from tests import tolerances


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _softmax(z, axis):
  e = np.exp(z - z.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _channel_gate(x, p):
  B, H, W, C = x.shape
  out = np.zeros((B, C))
  for b in range(B):
    q = _softmax(np.einsum("hwc,c->hw", x[b], p["ch_wq"]).ravel(), 0)
    v = (x[b] @ p["ch_wv"] + p["ch_bv"]).reshape(H * W, -1)
    t = (q @ v) @ p["ch_wz"] + p["ch_bz"]
    t = (t - t.mean()) / np.sqrt(t.var() + 1e-5) * p["ln_scale"] + p["ln_bias"]
    out[b] = _sigmoid(t)
  return out


def _spatial_gate(x, p):
  B, H, W, C = x.shape
  out = np.zeros((B, H, W))
  for b in range(B):
    q = _softmax((x[b] @ p["sp_wq"] + p["sp_bq"]).mean(axis=(0, 1)), 0)
    v = x[b] @ p["sp_wv"] + p["sp_bv"]
    for i in range(H):
      for j in range(W):
        out[b, i, j] = _sigmoid(q @ v[i, j])
  return out


def _params(rng, C):
  d = C // 2
  shapes = dict(ch_wq=(C,), ch_wv=(C, d), ch_bv=(d,), ch_wz=(d, C), ch_bz=(C,), ln_scale=(C,),
                ln_bias=(C,), sp_wq=(C, d), sp_bq=(d,), sp_wv=(C, d), sp_bv=(d,))
  return {k: rng.standard_normal(s) / np.sqrt(s[0]) for k, s in shapes.items()}


@pytest.mark.parametrize("layout", ["parallel", "sequential"])
def test_psa_against_float64(layout):
  rng = np.random.default_rng(0)
  B, H, W, C = 2, 4, 5, 8
  x = rng.standard_normal((B, H, W, C)) + rng.standard_normal(C)
  p = _params(rng, C)
  y, (a_ch, a_sp) = spatial.polarized_self_attention(
      jnp.asarray(x, jnp.float32), **{k: jnp.asarray(v, jnp.float32) for k, v in p.items()},
      layout=layout, return_gate=True)
  want_ch = _channel_gate(x, p)
  u = x * want_ch[:, None, None, :]
  if layout == "parallel":
    want_sp = _spatial_gate(x, p)
    want = u + x * want_sp[..., None]
  else:
    want_sp = _spatial_gate(u, p)
    want = u * want_sp[..., None]
  np.testing.assert_allclose(a_ch, want_ch, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(a_sp, want_sp, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(y, want, **tolerances.output(jnp.float32))


@pytest.mark.parametrize("layout,bound", [("parallel", 2.0), ("sequential", 1.0)])
def test_gates_in_unit_interval_bound_the_output(layout, bound):
  B, H, W, C = 2, 9, 11, 16
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (B, H, W, C))
  layer = spatial.PolarizedSelfAttention(layout=layout)
  variables = layer.init(jax.random.PRNGKey(1), x)
  y, state = layer.apply(variables, x, mutable=["intermediates"])
  a_ch, a_sp = state["intermediates"]["gate"]
  assert a_ch.shape == (B, C) and a_sp.shape == (B, H, W)
  for gate in (a_ch, a_sp):
    assert bool(jnp.all(gate > 0)) and bool(jnp.all(gate < 1))
  assert bool(jnp.all(jnp.abs(y) <= bound * jnp.abs(x)))


def test_bad_layout_is_a_clear_error():
  p = {k: jnp.asarray(v, jnp.float32) for k, v in _params(np.random.default_rng(1), 4).items()}
  with pytest.raises(ValueError, match="polarized_self_attention: `layout` must be one of"):
    spatial.polarized_self_attention(jnp.ones((1, 3, 3, 4)), **p, layout="stacked")
