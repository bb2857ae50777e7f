"""DaViT's channel group attention (#208, arXiv:2204.03645): the C_g x C_g attention over all pixels
against a float64 loop rewrite of the paper's equation, and the claim that its cost is linear in the
number of pixels (compiled FLOPs at 4x the pixels are 4x)."""

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.vision import tokens
from tests import tolerances


def _weights(rng, C):
  return dict(w_qkv=rng.standard_normal((C, 3 * C)) / np.sqrt(C), b_qkv=rng.standard_normal(3 * C),
              w_proj=rng.standard_normal((C, C)) / np.sqrt(C), b_proj=rng.standard_normal(C))


def _reference(x, w_qkv, b_qkv, w_proj, b_proj, num_groups):
  B, H, W, C = x.shape
  cg = C // num_groups
  y = np.zeros((B, H * W, C))
  gates = np.zeros((B, num_groups, cg, cg))
  for b in range(B):
    X = x[b].reshape(H * W, C)
    qkv = X @ w_qkv + b_qkv
    Q, K, V = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
    Z = np.zeros((H * W, C))
    for i in range(num_groups):
      sl = slice(i * cg, (i + 1) * cg)
      s = Q[:, sl].T @ K[:, sl] / np.sqrt(cg)                    # [C_g, C_g]
      a = np.exp(s - s.max(axis=1, keepdims=True))
      a /= a.sum(axis=1, keepdims=True)
      gates[b, i] = a
      Z[:, sl] = (a @ V[:, sl].T).T
    y[b] = Z @ w_proj + b_proj
  return y.reshape(B, H, W, C), gates


def test_channel_group_attention_against_float64_loops():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 5, 8))
  w = _weights(rng, 8)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, gate = tokens.davit_channel_group_attention(f32(x), **{k: f32(v) for k, v in w.items()},
                                                 num_groups=2, return_gate=True)
  want_y, want_gate = _reference(x, **w, num_groups=2)
  assert gate.shape == (2, 2, 4, 4)                              # C_g x C_g, independent of H·W
  np.testing.assert_allclose(gate, want_gate, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(y, want_y, **tolerances.output(jnp.float32))


def _flops(H, W, C=16, groups=4):
  x = jax.ShapeDtypeStruct((1, H, W, C), jnp.float32)
  w = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32)
       for k, v in _weights(np.random.default_rng(0), C).items()}
  fn = lambda x, w: tokens.davit_channel_group_attention(x, **w, num_groups=groups)
  cost = jax.jit(fn).lower(x, w).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def test_cost_is_linear_in_the_number_of_pixels():
  small, large = _flops(6, 8), _flops(12, 16)
  np.testing.assert_allclose(large / small, 4.0, **tolerances.FLOPS_LINEAR_SCALING)
