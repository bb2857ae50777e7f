"""Multi-scale self-guided attention (#212, arXiv:1906.02849): the guided block's position (P x P)
and channel (C x C) attention on concat(x, fused) against a float64 loop rewrite, and the guiding
loss: zero when the two refinement steps agree, the mean squared difference otherwise."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision import tokens
from tests import tolerances


def _softmax(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _conv3x3(x, kernel, bias):
  H, W, _ = x.shape
  pad = np.pad(x, ((1, 1), (1, 1), (0, 0)))
  out = np.zeros((H, W, kernel.shape[-1]))
  for i in range(H):
    for j in range(W):
      for di in range(3):
        for dj in range(3):
          out[i, j] += pad[i + di, j + dj] @ kernel[di, dj]
  return out + bias


def _phi(x, kernel, bias, alpha):
  y = _conv3x3(x, kernel, bias)
  return np.where(y >= 0, y, alpha * y)


def _reference(x, fused, w):
  B, H, W, C = x.shape
  out = np.zeros_like(x)
  for b in range(B):
    z = np.concatenate([x[b], fused[b]], axis=-1)
    a = _phi(z, w["pin_kernel"], w["pin_bias"], w["pin_alpha"]).reshape(H * W, C)
    q, k, v = a @ w["pam_wq"] + w["pam_bq"], a @ w["pam_wk"], a @ w["pam_wv"] + w["pam_bv"]
    s = np.array([[q[i] @ k[j] for j in range(H * W)] for i in range(H * W)])
    a = w["pam_gamma"] * (_softmax(s) @ v) + a
    c = _phi(z, w["cin_kernel"], w["cin_bias"], w["cin_alpha"]).reshape(H * W, C)
    e = c.T @ c
    zc = _softmax(e.max(axis=-1, keepdims=True) - e)
    c = w["cam_gamma"] * (c @ zc.T) + c
    out[b] = (_phi(a.reshape(H, W, C), w["pout_kernel"], w["pout_bias"], w["pout_alpha"])
              + _phi(c.reshape(H, W, C), w["cout_kernel"], w["cout_bias"], w["cout_alpha"]))
  return out


def test_guided_position_channel_attention_against_float64_loops():
  rng = np.random.default_rng(0)
  B, H, W, C, cq = 2, 3, 4, 4, 2
  n = lambda *s: rng.standard_normal(s)
  x, fused = n(B, H, W, C), n(B, H, W, C)
  w = dict(pin_kernel=n(3, 3, 2 * C, C) / 6, pin_bias=n(C), pin_alpha=0.2, cin_kernel=n(3, 3, 2 * C, C)
           / 6, cin_bias=n(C), cin_alpha=0.3, pout_kernel=n(3, 3, C, C) / 4, pout_bias=n(C),
           pout_alpha=0.1, cout_kernel=n(3, 3, C, C) / 4, cout_bias=n(C), cout_alpha=0.4,
           pam_wq=n(C, cq) / 2, pam_bq=n(cq), pam_wk=n(C, cq) / 2, pam_wv=n(C, C) / 2, pam_bv=n(C),
           pam_gamma=0.7, cam_gamma=1.3)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, (pos, chan) = tokens.guided_position_channel_attention(
      f32(x), f32(fused), **{k: f32(v) for k, v in w.items()}, return_gate=True)
  assert pos.shape == (B, H * W, H * W) and chan.shape == (B, C, C)
  np.testing.assert_allclose(y, _reference(x, fused, w), **tolerances.output(jnp.float32))


def test_guiding_loss_is_zero_when_the_stages_agree_and_the_mean_squared_difference_otherwise():
  rng = np.random.default_rng(1)
  e1 = [rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5))]
  f, f_hat = [rng.standard_normal((2, 3, 3, 4))], [rng.standard_normal((2, 3, 3, 4))]
  assert float(tokens.guided_attention_loss(e1, e1)) == 0.0
  assert float(tokens.guided_attention_loss(e1, e1, f, f)) == 0.0
  e2 = [e + rng.standard_normal(e.shape) for e in e1]
  want = (sum(np.mean((a - b) ** 2) for a, b in zip(e1, e2, strict=True))
          + np.mean((f[0] - f_hat[0]) ** 2))
  np.testing.assert_allclose(tokens.guided_attention_loss(e1, e2, f, f_hat), want,
                             **tolerances.output(jnp.float32))
  with pytest.raises(ValueError, match="guided_attention_loss"):
    tokens.guided_attention_loss(e1, e2[:1])
