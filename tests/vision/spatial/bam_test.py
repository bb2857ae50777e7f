"""BAM for SISR (#11, arXiv:2104.07566): against a float64 explicit-loop rewrite of ACAM (avg-pool
channel gate) and MSAM (channel-max spatial gate), both applied in parallel to the same input; the
spatial gate sees only the channel maximum (a change that keeps it leaves MSAM unchanged)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision import spatial
from tests import tolerances


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _reference(x, w1, slope, w2, kernel):
  B, H, W, C = x.shape
  h = x.mean(axis=(1, 2)) @ w1
  h = np.where(h >= 0, h, slope * h)
  s = _sigmoid(h @ w2)
  peak = x.max(axis=-1)
  k = kernel.shape[0]
  r = k // 2
  pp = np.pad(peak, ((0, 0), (r, r), (r, r)))
  logits = np.zeros((B, H, W))
  for i in range(H):
    for j in range(W):
      for a in range(k):
        for b in range(k):
          logits[:, i, j] += kernel[a, b] * pp[:, i + a, j + b]
  m = _sigmoid(logits)
  return x * s[:, None, None, :] * m[..., None], s, m


@pytest.mark.parametrize("k", [3, 7])
def test_bam_against_float64_loops(k):
  rng = np.random.default_rng(k)
  B, H, W, C, hid = 2, 5, 6, 8, 3
  x = rng.standard_normal((B, H, W, C)) + rng.standard_normal(C)
  w1, slope = rng.standard_normal((C, hid)), rng.uniform(0.1, 0.5, hid)
  w2, kernel = rng.standard_normal((hid, C)), rng.standard_normal((k, k)) / k
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, (s, m) = spatial.balanced_attention_module(f32(x), w1=f32(w1), prelu_slope=f32(slope),
                                                w2=f32(w2), spatial_kernel=f32(kernel),
                                                return_gate=True)
  want_y, want_s, want_m = _reference(x, w1, slope, w2, kernel)
  np.testing.assert_allclose(s, want_s, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(m, want_m, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(y, want_y, **tolerances.output(jnp.float32))


def test_spatial_gate_sees_only_the_channel_maximum():
  B, H, W, C = 2, 9, 11, 16
  x = jax.random.normal(jax.random.PRNGKey(0), (B, H, W, C))
  layer = spatial.BalancedAttention()
  variables = layer.init(jax.random.PRNGKey(1), x)
  gates = lambda v: layer.apply(variables, v, mutable=["intermediates"])[1]["intermediates"]["gate"]
  s, m = gates(x)
  assert s.shape == (B, C) and m.shape == (B, H, W)
  # Lowering every non-maximal entry keeps each position's channel maximum: MSAM is unchanged,
  # ACAM (the average) is not.
  x2 = jnp.where(x == x.max(axis=-1, keepdims=True), x, x - 1.0)
  s2, m2 = gates(x2)
  np.testing.assert_array_equal(m, m2)
  assert not np.allclose(s, s2)


def test_bad_spatial_kernel_is_a_clear_error():
  with pytest.raises(ValueError, match="balanced_attention_module: `spatial_kernel` must have shape"):
    spatial.balanced_attention_module(jnp.ones((1, 3, 3, 4)), w1=jnp.ones((4, 2)),
                                      prelu_slope=jnp.ones(2), w2=jnp.ones((2, 4)),
                                      spatial_kernel=jnp.ones((2, 2)))
