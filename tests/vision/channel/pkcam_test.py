"""PKCAM (#204, arXiv:2211.07521): the fused local + previous-knowledge gate against a float64 rewrite
(explicit ECA convolution loops, the interleaved kernel-2 stride-2 fusions of the reference code),
with a previous layer of another size and half the channels, and the claim's mechanism: the previous
layer's descriptor changes the gate."""

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.vision import channel
from tests import tolerances


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _eca(z, kernel):
  k, C = len(kernel), z.shape[-1]
  out = np.zeros_like(z)
  for c in range(C):
    for j in range(k):
      src = c + j - (k - 1) // 2
      if 0 <= src < C:
        out[:, c] += kernel[j] * z[:, src]
  return out


def _stride2_fusion(first, second, w):
  """The reference code's Conv1d(1, 1, kernel 2, stride 2) over [first_0, second_0, first_1, ...]."""
  inter = np.stack([first, second], axis=-1).reshape(first.shape[0], -1)
  return np.stack([w[0] * inter[:, 2 * c] + w[1] * inter[:, 2 * c + 1]
                   for c in range(first.shape[1])], axis=1)


def test_gate_against_float64_with_a_smaller_previous_layer():
  rng = np.random.default_rng(0)
  B, H, W, C, Cp, k = 2, 4, 5, 8, 4, 3
  x, prev = rng.standard_normal((B, H, W, C)), rng.standard_normal((B, H + 3, W + 1, Cp))
  kl, kg, a, b = (rng.standard_normal(n) for n in (k, k, 2, 2))
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  y, gate = channel.pkcam_channel_attention(f32(x), f32(prev), local_kernel=f32(kl),
                                            global_kernel=f32(kg), in_fusion=f32(a),
                                            out_fusion=f32(b), return_gate=True)
  z = x.mean(axis=(1, 2))
  p = prev.mean(axis=(1, 2))
  p_tiled = np.stack([p[:, c % Cp] for c in range(C)], axis=1)
  local = _sigmoid(_eca(z, kl))
  glob = _sigmoid(_eca(np.maximum(_stride2_fusion(p_tiled, z, a), 0), kg))
  want = _sigmoid(_stride2_fusion(local, glob, b))
  np.testing.assert_allclose(gate, want, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(y, x * (1 + want[:, None, None, :]), **tolerances.output(jnp.float32))


def test_the_previous_layer_changes_the_gate():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 5, 16)), jnp.float32)
  prev = jnp.asarray(rng.standard_normal((2, 9, 9, 8)), jnp.float32)
  layer = channel.PreviousKnowledgeChannelAttention()
  params = layer.init(jax.random.PRNGKey(0), x, prev)["params"]
  params = {**params, "in_fusion": jnp.array([1.0, 0.5]), "out_fusion": jnp.array([0.5, 2.0])}
  gate = lambda prev: channel.pkcam_channel_attention(x, prev, **params, return_gate=True)[1]
  assert tolerances.rel_rms(gate(prev + 1.0), gate(prev)) > tolerances.CHANGED_REL_RMS
