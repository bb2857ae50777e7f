"""RealViformer's improved channel attention (#235, arXiv:2407.13987): squeezed transposed
(covariance) attention with covariance-based channel rescaling, against a float64 loop rewrite; with
identical channels the covariance is the constant τ, the attention uniform and the rescaling gate
σ(GELU(τ(a + b)) 1ᵀ W_m), a function of the covariance alone."""

import math

import jax.numpy as jnp
import numpy as np

from attnjax.vision import tokens
from tests import tolerances


def _conv3x3(x, kernel, depthwise=False):
  H, W, _ = x.shape
  pad = np.pad(x, ((1, 1), (1, 1), (0, 0)))
  out = np.zeros((H, W, kernel.shape[-1]))
  for i in range(H):
    for j in range(W):
      for di in range(3):
        for dj in range(3):
          if depthwise:
            out[i, j] += pad[i + di, j + dj] * kernel[di, dj, 0]
          else:
            out[i, j] += pad[i + di, j + dj] @ kernel[di, dj]
  return out


def _softmax(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _gelu(z):
  return np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in z])


def _reference(x, w, heads):
  B, H, W, C = x.shape
  cs = w["squeeze_kernel"].shape[-1]
  c = cs // heads
  out = np.zeros_like(x)
  for b in range(B):
    xs = _conv3x3(x[b], w["squeeze_kernel"])
    n = xs / np.sqrt(xs.var(axis=-1, keepdims=True) + 1e-5) * w["norm_scale"]
    qkv = _conv3x3(n @ w["qkv_kernel"], w["qkv_dw_kernel"], depthwise=True).reshape(H * W, 3 * cs)
    o = np.zeros((H * W, cs))
    for g in range(heads):
      q, k, v = (qkv[:, s * cs + g * c: s * cs + (g + 1) * c] for s in range(3))
      q, k = q / np.linalg.norm(q, axis=0), k / np.linalg.norm(k, axis=0)
      cov = w["temperature"][g] * q.T @ k                         # [c, c]
      m = w["mask_w1"][0] * cov.max(axis=1) + w["mask_w1"][1] * cov.mean(axis=1)
      m = 1 / (1 + np.exp(-(_gelu(m) @ w["mask_w2"])))
      o[:, g * c:(g + 1) * c] = (_softmax(cov) @ v.T).T * m
    out[b] = _conv3x3((o @ w["proj"]).reshape(H, W, cs), w["excite_kernel"])
  return out


def _weights(rng, C, cs, heads):
  n = lambda *s: rng.standard_normal(s)
  c = cs // heads
  return dict(squeeze_kernel=n(3, 3, C, cs) / np.sqrt(9 * C), norm_scale=1 + 0.1 * n(cs),
              qkv_kernel=n(cs, 3 * cs) / np.sqrt(cs), qkv_dw_kernel=n(3, 3, 1, 3 * cs) / 3,
              temperature=1 + n(heads) ** 2, mask_w1=n(2), mask_w2=n(c, c), proj=n(cs, cs) / 2,
              excite_kernel=n(3, 3, cs, C) / np.sqrt(9 * cs))


def test_improved_channel_attention_against_float64_loops():
  rng = np.random.default_rng(0)
  B, H, W, C, cs, heads = 2, 3, 4, 8, 4, 2
  x = rng.standard_normal((B, H, W, C))
  w = _weights(rng, C, cs, heads)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, (attn, mask) = tokens.realviformer_channel_attention(
      f32(x), **{k: f32(v) for k, v in w.items()}, return_gate=True)
  assert attn.shape == (B, heads, 2, 2) and mask.shape == (B, heads, 2)
  np.testing.assert_allclose(y, _reference(x, w, heads), **tolerances.output(jnp.float32))


def test_rescaling_gate_is_the_same_for_every_output_channel_when_the_covariance_is_uniform():
  # With every squeezed channel equal, the covariance is constant: every row has the same (max,
  # mean) descriptor, so the gate differs across channels only through W_m's column sums.
  rng = np.random.default_rng(1)
  C, cs = 8, 4
  w = {k: jnp.asarray(v, jnp.float32) for k, v in _weights(rng, C, cs, 1).items()}
  w["squeeze_kernel"] = jnp.tile(w["squeeze_kernel"][..., :1], (1, 1, 1, cs))
  w["qkv_kernel"] = jnp.ones((cs, 3 * cs), jnp.float32)
  w["qkv_dw_kernel"] = jnp.tile(w["qkv_dw_kernel"][..., :1], (1, 1, 1, 3 * cs))
  x = jnp.asarray(rng.standard_normal((1, 3, 5, C)), jnp.float32)
  _, (attn, mask) = tokens.realviformer_channel_attention(x, **w, return_gate=True)
  np.testing.assert_allclose(attn, 1.0 / cs, **tolerances.output(jnp.float32))
  d = float(w["mask_w1"][0] + w["mask_w1"][1]) * float(w["temperature"][0])
  want = 1 / (1 + np.exp(-_gelu(np.full(cs, d)) @ np.asarray(w["mask_w2"], np.float64)))
  np.testing.assert_allclose(mask[0, 0], want, **tolerances.output(jnp.float32))
