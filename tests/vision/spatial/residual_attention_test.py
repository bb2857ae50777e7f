"""Residual attention module (#130, arXiv:1704.06904): against a float64 explicit-loop rewrite of the
trunk, the hourglass mask branch and their combination (1 + M) ⊙ T, and the attention residual
learning claim: with the mask driven to 0 the module returns the trunk unchanged (never erases it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision import spatial
from tests import tolerances

relu = lambda v: np.maximum(v, 0)


def _conv3(x, kernel, bias):
  B, H, W, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((B, H, W, kernel.shape[3])) + bias
  for i in range(H):
    for j in range(W):
      for a in range(3):
        for b in range(3):
          out[:, i, j, :] += xp[:, i + a, j + b, :] @ kernel[a, b]
  return out


def _unit(v, p, prefix):
  g = lambda n: p[prefix + n]
  h = relu(_conv3(relu(relu(v) @ g("w_a") + g("b_a")), g("k_b"), g("b_b")))
  return v + h @ g("w_c") + g("b_c")


def _max_pool(x):
  B, H, W, C = x.shape
  Ho, Wo = (H + 1) // 2, (W + 1) // 2
  out = np.zeros((B, Ho, Wo, C))
  for i in range(Ho):
    for j in range(Wo):
      r0, c0 = 2 * i - 1, 2 * j - 1
      out[:, i, j] = x[:, max(r0, 0):r0 + 3, max(c0, 0):c0 + 3].max(axis=(1, 2))
  return out


def _upsample(v, H, W):
  B, h, w, C = v.shape
  out = np.zeros((B, H, W, C))
  for i in range(H):
    for j in range(W):
      y = i * (h - 1) / (H - 1)
      x = j * (w - 1) / (W - 1)
      y0, x0 = int(np.floor(y)), int(np.floor(x))
      y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
      fy, fx = y - y0, x - x0
      out[:, i, j] = ((1 - fy) * (1 - fx) * v[:, y0, x0] + (1 - fy) * fx * v[:, y0, x1]
                      + fy * (1 - fx) * v[:, y1, x0] + fy * fx * v[:, y1, x1])
  return out


def _params(rng, C, d):
  p = {}
  for prefix in ("t_", "m_"):
    p.update({prefix + "w_a": rng.standard_normal((C, d)) / np.sqrt(C),
              prefix + "b_a": rng.standard_normal(d),
              prefix + "k_b": rng.standard_normal((3, 3, d, d)) / (3 * np.sqrt(d)),
              prefix + "b_b": rng.standard_normal(d),
              prefix + "w_c": rng.standard_normal((d, C)) / np.sqrt(d),
              prefix + "b_c": rng.standard_normal(C)})
  p.update(w_1=rng.standard_normal((C, C)) / np.sqrt(C), b_1=rng.standard_normal(C),
           w_2=rng.standard_normal((C, C)) / np.sqrt(C), b_2=rng.standard_normal(C))
  return p


def _run(x, p, **kw):
  return spatial.residual_attention_module(
      jnp.asarray(x, jnp.float32), **{k: jnp.asarray(v, jnp.float32) for k, v in p.items()}, **kw)


@pytest.mark.parametrize("H,W", [(5, 7), (4, 6)])
def test_residual_attention_against_float64_loops(H, W):
  rng = np.random.default_rng(H)
  B, C, d = 2, 4, 2
  x = rng.standard_normal((B, H, W, C))
  p = _params(rng, C, d)
  y, mask = _run(x, p, return_gate=True)
  trunk = _unit(x, p, "t_")
  up = _upsample(_unit(_max_pool(x), p, "m_"), H, W)
  want_mask = 1 / (1 + np.exp(-(relu(relu(up) @ p["w_1"] + p["b_1"]) @ p["w_2"] + p["b_2"])))
  np.testing.assert_allclose(mask, want_mask, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(y, (1 + want_mask) * trunk, **tolerances.output(jnp.float32))


def test_a_zero_mask_keeps_the_trunk_and_a_full_mask_doubles_it():
  rng = np.random.default_rng(0)
  B, H, W, C, d = 2, 5, 6, 4, 2
  x = rng.standard_normal((B, H, W, C))
  p = _params(rng, C, d)
  trunk = spatial.residual_attention.residual_unit(
      jnp.asarray(x, jnp.float32), *[jnp.asarray(p["t_" + n], jnp.float32)
                                     for n in spatial.residual_attention.UNIT])
  # The mask head's last bias at ∓1e4 saturates the sigmoid at exactly 0 (or 1) in float32.
  for bias, factor in ((-1e4, 1.0), (1e4, 2.0)):
    q = {**p, "w_2": np.zeros((C, C)), "b_2": np.full(C, bias)}
    y, mask = _run(x, q, return_gate=True)
    np.testing.assert_array_equal(mask, np.full(mask.shape, factor - 1.0))
    np.testing.assert_array_equal(y, factor * trunk)


def test_layer_mask_is_a_sigmoid_gate():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 11, 16))
  layer = spatial.ResidualAttention()
  variables = layer.init(jax.random.PRNGKey(1), x)
  _, state = layer.apply(variables, x, mutable=["intermediates"])
  (mask,) = state["intermediates"]["gate"]
  assert mask.shape == x.shape
  assert bool(jnp.all(mask > 0)) and bool(jnp.all(mask < 1))


def test_bad_unit_weight_is_a_clear_error():
  p = {k: jnp.asarray(v, jnp.float32) for k, v in _params(np.random.default_rng(1), 4, 2).items()}
  p["m_k_b"] = jnp.ones((3, 3, 2, 3))
  with pytest.raises(ValueError, match="residual_attention_module: `m_k_b` must have shape"):
    spatial.residual_attention_module(jnp.ones((1, 3, 3, 4)), **p)
