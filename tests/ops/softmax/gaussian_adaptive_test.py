"""Gaussian adaptive attention (#139, GAAM) and its speech application (#214, DAAM): each head's values
times a product of Gaussian densities of their standardized entries (learned mean offsets and scales
per head), normalized along the axis. Checked against a float64 rewrite of the papers' equations
along the feature axis (per token: causal, padded, GQA) and along the sequence axis (padded and
packed), with finite-difference gradients for the values and both learned arrays, and the defining
properties: with zero offset and unit scale the weights are the standard normal density of the
z-scores (largest at the mean, decreasing with |z|), a learned offset moves the peak, each token is
recalibrated from its own values only (feature axis), q and k are never read, and the sequence form
refuses causal attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import gaussian_adaptive_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
GRAD = tolerances.grad(jnp.float32)
B, T, N, K, H, h, G = 2, 11, 4, 2, 8, 6, 3
RNG = np.random.default_rng(139)
OFFSETS = (0.5 * RNG.standard_normal((N, G))).astype(np.float32)
SCALES = (1.5 + 0.3 * RNG.standard_normal((N, G))).astype(np.float32)


def _density_float64(x, mean, var, offsets, scales, eps=1e-8):
  """Π_g exp(-z_g²/(2c_g²)) / sqrt(2π c_g²), z_g = (x - (μ + δ_g)) / sqrt(σ² + ε): x `[..., N, L]`
  (L the normalized axis last), offsets and scales `[N, G]`."""
  out = np.ones_like(x)
  for g in range(offsets.shape[1]):
    d, c = offsets[:, g][:, None], scales[:, g][:, None]
    z = (x - (mean + d)) / np.sqrt(var + eps)
    out = out * np.exp(-z ** 2 / (2 * c ** 2)) / np.sqrt(2 * math.pi * c ** 2)
  return out


def _features_float64(v, offsets, scales, *, n_heads, valid=None):
  """Feature axis: per token and head, statistics and normalization over the h channels."""
  v = np.repeat(np.asarray(v, np.float64), n_heads // v.shape[2], axis=2)        # [B, S, N, h]
  offsets, scales = (np.asarray(a, np.float64) for a in (offsets, scales))
  mean = v.mean(-1, keepdims=True)
  var = ((v - mean) ** 2).mean(-1, keepdims=True)                                   # population
  m = _density_float64(v, mean, var, offsets, scales)
  y = v * m / m.sum(-1, keepdims=True)
  return y if valid is None else np.where(valid[:, :, None, None], y, 0.0)


def _sequence_float64(v, offsets, scales, *, n_heads, lengths, segments):
  """Sequence axis: per run of equal segment ids among the first `lengths` slots, per head and
  channel, statistics and normalization over the run's positions."""
  v = np.repeat(np.asarray(v, np.float64), n_heads // v.shape[2], axis=2)
  offsets, scales = (np.asarray(a, np.float64) for a in (offsets, scales))
  y = np.zeros_like(v)
  for b in range(v.shape[0]):
    for seg in np.unique(segments[b, :lengths[b]]):
      idx = np.flatnonzero((segments[b] == seg) & (np.arange(v.shape[1]) < lengths[b]))
      x = np.moveaxis(v[b, idx], 0, -1)                                             # [N, h, L]
      mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
      m = _density_float64(np.moveaxis(x, 1, 0), np.moveaxis(mean, 1, 0), np.moveaxis(var, 1, 0),
                           offsets, scales)                                         # [h, N, L]
      m = np.moveaxis(m, 0, 1)
      y[b, idx] = np.moveaxis(x * m / m.sum(-1, keepdims=True), -1, 0)
  return y


def test_features_equal_the_papers_equations():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=2)
  lengths = np.array([T, 7])
  out = inputs.jit_with(gaussian_adaptive_attention, causal=True)(
      q, k, v, mean_offsets=OFFSETS, scales=SCALES, kv_lengths=jnp.asarray(lengths))
  valid = np.arange(T)[None] < lengths[:, None]
  np.testing.assert_allclose(np.asarray(out), _features_float64(v, OFFSETS, SCALES, n_heads=N,
                                                                valid=valid), **F32)


@pytest.mark.parametrize("packed", [False, True])
def test_sequence_axis_equals_the_papers_equations(packed):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=3)
  lengths = np.array([T, 8])
  segments = (np.array([[0] * 4 + [1] * 7, [0] * 6 + [1] * 5]) if packed
              else np.zeros((B, T), np.int64))
  out = inputs.jit_with(gaussian_adaptive_attention, axis="sequence")(
      q, k, v, mean_offsets=OFFSETS, scales=SCALES, kv_lengths=jnp.asarray(lengths),
      segment_ids=jnp.asarray(segments) if packed else None)
  want = _sequence_float64(v, OFFSETS, SCALES, n_heads=N, lengths=lengths, segments=segments)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


@pytest.mark.parametrize("axis", ["features", "sequence"])
def test_gradients_reach_the_learned_arrays_and_match_float64(axis):
  q, k, v = inputs.qkv(B=1, T=7, N=2, K=1, H=4, h=5, seed=6)
  offsets, scales = OFFSETS[:2], SCALES[:2]
  rng = np.random.default_rng(0)
  c = rng.standard_normal((1, 7, 2, 5))

  def loss(v, offsets, scales):
    out = gaussian_adaptive_attention(q, k, v, mean_offsets=offsets, scales=scales, axis=axis)
    return jnp.sum(out * jnp.asarray(c, jnp.float32))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(v, offsets, scales)
  for name, g in zip(("mean_offsets", "scales"), grads[1:], strict=True):
    assert np.all(np.abs(np.asarray(g)) > 0.0), name          # every head, every Gaussian
  args = [np.asarray(x, np.float64) for x in (v, offsets, scales)]
  if axis == "features":
    f64 = lambda v, o, s: _features_float64(v, o, s, n_heads=2)
  else:
    f64 = lambda v, o, s: _sequence_float64(v, o, s, n_heads=2, lengths=np.array([7]),
                                            segments=np.zeros((1, 7), np.int64))
  loss64 = lambda *a: float(np.sum(f64(*a) * c))
  numpy_math.check_directional_derivatives(grads, args, loss64, ("v", "mean_offsets", "scales"),
                                           rng=rng, tol=GRAD)


def _recalibration(v, offsets, scales):
  """The weights m `[B, T, N, h]` along the feature axis: y / v."""
  q = jnp.zeros(v.shape[:2] + (v.shape[2], 4))
  y = inputs.jit_with(gaussian_adaptive_attention)(q, q, v, mean_offsets=offsets, scales=scales)
  return np.asarray(y) / np.asarray(v)


def test_zero_offset_and_unit_scale_give_the_standard_normal_density_of_the_z_scores():
  v = jnp.asarray(np.random.default_rng(3).standard_normal((1, 5, 1, 9)), jnp.float32)
  m = _recalibration(v, jnp.zeros((1, 1)), jnp.ones((1, 1)))
  x = np.asarray(v, np.float64)
  z = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-8)
  phi = np.exp(-z ** 2 / 2) / np.sqrt(2 * math.pi)
  np.testing.assert_allclose(m, phi / phi.sum(-1, keepdims=True), **F32)
  # Largest at the mean, decreasing with the distance from it.
  order = np.argsort(np.abs(z), axis=-1)
  assert np.all(np.diff(np.take_along_axis(m, order, axis=-1), axis=-1) < 0)
  # A learned offset δ (in the units of x) moves the peak to the entry nearest μ + δ.
  m2 = _recalibration(v, jnp.full((1, 1), 1.0), jnp.ones((1, 1)))
  nearest = np.argmin(np.abs(x - (x.mean(-1, keepdims=True) + 1.0)), -1)
  np.testing.assert_array_equal(np.argmax(m2, -1), nearest)
  assert np.any(nearest != np.argmax(m, -1))


def test_features_axis_is_per_token_and_never_reads_q_or_k():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=5)
  f = inputs.jit_with(gaussian_adaptive_attention, causal=True)
  base = np.asarray(f(q, k, v, mean_offsets=OFFSETS, scales=SCALES))
  other = np.asarray(f(q * 3 + 1, -k, v.at[:, 4].set(7.0), mean_offsets=OFFSETS, scales=SCALES))
  rows = np.arange(T) != 4
  np.testing.assert_array_equal(other[:, rows], base[:, rows])   # only token 4's own output moved
  assert np.abs(other[:, 4] - base[:, 4]).max() > tolerances.CHANGED_MAX_ABS


def test_sequence_axis_refuses_causal_and_bad_settings_are_named():
  q, k, v = inputs.qkv(B=B, T=5, N=N, K=K, H=H, h=h)
  kw = dict(mean_offsets=OFFSETS, scales=SCALES)
  with pytest.raises(ValueError, match="causal"):
    gaussian_adaptive_attention(q, k, v, causal=True, axis="sequence", **kw)
  with pytest.raises(ValueError, match="axis"):
    gaussian_adaptive_attention(q, k, v, axis="time", **kw)
  with pytest.raises(ValueError, match="scale"):
    gaussian_adaptive_attention(q, k, v, scale=0.5, **kw)
  with pytest.raises(ValueError, match="scales"):
    gaussian_adaptive_attention(q, k, v, mean_offsets=OFFSETS, scales=SCALES[:, :2])
