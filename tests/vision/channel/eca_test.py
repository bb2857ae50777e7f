"""ECA (#188, arXiv:1910.03151) and the squeeze-and-excitation baseline: the adaptive kernel size of
the paper's formula (as timm computes it), and both gates against float64 rewrites (ECA keeps the C
channels: no reduction)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.vision import channel
from tests import tolerances


@pytest.mark.parametrize("C,k", [(64, 3), (128, 5), (256, 5), (512, 5), (16, 3), (2048, 7)])
def test_kernel_size_from_channels(C, k):
  assert channel.eca_kernel_size(C) == k
  assert channel.eca_kernel_size(C, gamma=2, b=1) % 2 == 1


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def test_eca_is_a_1d_convolution_across_channel_descriptors_without_reduction():
  rng = np.random.default_rng(0)
  B, H, W, C, k = 2, 5, 7, 16, 5
  x = rng.standard_normal((B, H, W, C))
  kernel = rng.standard_normal(k)
  y, gate = channel.eca_channel_attention(jnp.asarray(x, jnp.float32),
                                          kernel=jnp.asarray(kernel, jnp.float32), return_gate=True)
  z = x.mean(axis=(1, 2))                                        # [B, C]
  want_gate = np.zeros((B, C))
  for c in range(C):
    for j in range(k):
      src = c + j - (k - 1) // 2
      if 0 <= src < C:
        want_gate[:, c] += kernel[j] * z[:, src]
  want_gate = _sigmoid(want_gate)
  assert gate.shape == (B, C)                                    # one gate per channel: C kept
  np.testing.assert_allclose(gate, want_gate, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(y, x * want_gate[:, None, None, :], **tolerances.output(jnp.float32))


def test_the_layer_uses_the_adaptive_kernel_and_has_k_parameters():
  x = jnp.ones((1, 3, 3, 256))
  params = channel.EfficientChannelAttention().init(jax.random.PRNGKey(0), x)["params"]
  assert jax.tree.map(jnp.shape, params) == {"kernel": (5,)}


def test_squeeze_excitation_against_float64():
  rng = np.random.default_rng(1)
  B, H, W, C, r = 2, 4, 3, 8, 2
  x = rng.standard_normal((B, H, W, C))
  w1, b1 = rng.standard_normal((C, C // r)), rng.standard_normal(C // r)
  w2, b2 = rng.standard_normal((C // r, C)), rng.standard_normal(C)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y = channel.squeeze_excitation(f32(x), w1=f32(w1), b1=f32(b1), w2=f32(w2), b2=f32(b2))
  gate = _sigmoid(np.maximum(x.mean(axis=(1, 2)) @ w1 + b1, 0) @ w2 + b2)
  np.testing.assert_allclose(y, x * gate[:, None, None, :], **tolerances.output(jnp.float32))


def test_bad_kernel_is_a_clear_error():
  with pytest.raises(ValueError, match="eca_channel_attention: `kernel` must have shape"):
    channel.eca_channel_attention(jnp.ones((1, 2, 2, 4)), kernel=jnp.ones((4,)))
  with pytest.raises(ValueError, match="squeeze_excitation: `x` must be a feature map"):
    aj.get_module("squeeze_excitation").fn(jnp.ones((2, 4)), w1=None, b1=None, w2=None, b2=None)
