"""FcaNet (#32, arXiv:2012.11879): the multi-spectral gate against a float64 rewrite with explicit DCT
loops, and the paper's claim that the lowest DCT frequency is GAP scaled by √(HW), so FcaNet with
only (0, 0) is SE (no biases) with W₁ scaled by √(HW), with SE's parameter count."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision import channel
from tests import tolerances


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _dct(t, u, L):
  c = math.cos(math.pi * u * (t + 0.5) / L) / math.sqrt(L)
  return c * math.sqrt(2) if u else c


def test_multi_spectral_gate_against_float64_loops():
  rng = np.random.default_rng(0)
  B, H, W, C, r = 2, 7, 8, 8, 2
  freqs = [(0, 0), (0, 1), (6, 0), (0, 5)]               # the paper's top4, in order
  assert channel.fca_frequencies("top4") == tuple(freqs)
  x = rng.standard_normal((B, H, W, C))
  w1, w2 = rng.standard_normal((C, C // r)), rng.standard_normal((C // r, C))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, gate = channel.fca_channel_attention(f32(x), w1=f32(w1), w2=f32(w2), frequencies="top4",
                                          return_gate=True)
  z = np.zeros((B, C))
  for c in range(C):
    u, v = freqs[c // (C // len(freqs))]
    for h in range(H):
      for w in range(W):
        z[:, c] += x[:, h, w, c] * _dct(h, u, H) * _dct(w, v, W)
  want = _sigmoid(np.maximum(z @ w1, 0) @ w2)
  np.testing.assert_allclose(gate, want, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(y, x * want[:, None, None, :], **tolerances.output(jnp.float32))


def test_lowest_frequency_is_scaled_gap_so_fca_top1_is_se():
  rng = np.random.default_rng(1)
  B, H, W, C, r = 2, 9, 11, 8, 2
  f32x = jnp.asarray(rng.standard_normal((B, H, W, C)), jnp.float32)
  basis = channel.dct_basis(H, W, channel.fca_frequencies("top1"), C)
  np.testing.assert_allclose(basis, np.full((H, W, C), 1 / math.sqrt(H * W)),
                             **tolerances.FLOAT64_WEIGHT_SUM)
  w1 = jnp.asarray(rng.standard_normal((C, C // r)), jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((C // r, C)), jnp.float32)
  fca = channel.fca_channel_attention(f32x, w1=w1, w2=w2, frequencies="top1")
  se = channel.squeeze_excitation(f32x, w1=w1 * math.sqrt(H * W), b1=jnp.zeros(C // r), w2=w2,
                                  b2=jnp.zeros(C))
  np.testing.assert_allclose(fca, se, **tolerances.output(jnp.float32))
  # A higher frequency is not GAP: the gate changes.
  top2 = channel.fca_channel_attention(f32x, w1=w1, w2=w2, frequencies="top2")
  assert tolerances.rel_rms(top2, fca) > tolerances.CHANGED_REL_RMS


def test_same_parameters_as_se_without_biases():
  x = jnp.ones((1, 7, 7, 64))
  params = channel.FrequencyChannelAttention().init(jax.random.PRNGKey(0), x)["params"]
  assert jax.tree.map(jnp.shape, params) == {"w1": (64, 4), "w2": (4, 64)}


def test_bad_arguments_are_clear_errors():
  x = jnp.ones((1, 7, 7, 12))
  with pytest.raises(ValueError, match="fca_channel_attention: the channels C = 12"):
    channel.fca_channel_attention(x, w1=jnp.ones((12, 3)), w2=jnp.ones((3, 12)))
  with pytest.raises(ValueError, match="fca_channel_attention: `frequencies` must be 'topN'"):
    channel.fca_channel_attention(x, w1=jnp.ones((12, 3)), w2=jnp.ones((3, 12)), frequencies="top3")


def test_a_map_smaller_than_the_dct_grid_is_pooled_to_7x7_first():
  """As the reference code: adaptive average pooling to 7x7 (windows [⌊i·L/7⌋, ⌈(i+1)·L/7⌉)), then
  the 7x7 DCT components."""
  rng = np.random.default_rng(2)
  B, H, W, C = 2, 4, 5, 16
  x = rng.standard_normal((B, H, W, C))
  freqs = channel.fca_frequencies("top16")
  pooled = np.zeros((B, 7, 7, C))
  for i in range(7):
    for j in range(7):
      h0, h1 = (i * H) // 7, -(-(i + 1) * H // 7)
      w0, w1 = (j * W) // 7, -(-(j + 1) * W // 7)
      pooled[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  z = np.zeros((B, C))
  for c in range(C):
    u, v = freqs[c // (C // len(freqs))]
    for i in range(7):
      for j in range(7):
        z[:, c] += pooled[:, i, j, c] * _dct(i, u, 7) * _dct(j, v, 7)
  basis = channel.dct_basis(H, W, freqs, C)
  np.testing.assert_allclose(np.einsum("bhwc,hwc->bc", x, basis), z, **tolerances.FLOAT64_REORDERED)
