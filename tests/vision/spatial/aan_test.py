"""A²N's attention in attention block (#55, arXiv:2104.09497): against a float64 explicit-loop
rewrite of the block, and the claim that the dynamic gate's two branch weights are a softmax (each in
(0, 1), summing to 1 per input) that interpolates between the attention and non-attention branches."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision import spatial
from tests import tolerances


def _lrelu(v):
  return np.where(v >= 0, v, 0.2 * v)


def _conv(x, kernel):
  B, H, W, _ = x.shape
  k = kernel.shape[0]
  r = k // 2
  xp = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
  out = np.zeros((B, H, W, kernel.shape[3]))
  for i in range(H):
    for j in range(W):
      for a in range(k):
        for b in range(k):
          out[:, i, j, :] += xp[:, i + a, j + b, :] @ kernel[a, b]
  return out


def _params(rng, C, h):
  shapes = dict(w_first=(C, C), w_a=(C, h), w_b=(h, 2), k_1=(3, 3, C, C), w_2=(C, C), b_2=(C,),
                k_3=(3, 3, C, C), k_4=(3, 3, C, C), k_n=(3, 3, C, C), w_last=(C, C))
  return {k: rng.standard_normal(s) / np.sqrt(np.prod(s[:-1]) if len(s) > 1 else 1.0)
          for k, s in shapes.items()}


def _reference(x, p, t):
  u = _lrelu(x @ p["w_first"])
  logits = np.maximum(u.mean(axis=(1, 2)) @ p["w_a"], 0) @ p["w_b"] / t
  pi = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  pixel = 1.0 / (1.0 + np.exp(-(_lrelu(_conv(u, p["k_1"])) @ p["w_2"] + p["b_2"])))
  attention = _conv(_conv(u, p["k_3"]) * pixel, p["k_4"])
  plain = _conv(u, p["k_n"])
  mixed = pi[:, 0, None, None, None] * attention + pi[:, 1, None, None, None] * plain
  return _lrelu(mixed) @ p["w_last"] + x, pi, pixel


@pytest.mark.parametrize("t", [1.0, 30.0])
def test_aab_against_float64_loops(t):
  rng = np.random.default_rng(int(t))
  B, H, W, C, h = 2, 4, 5, 4, 2
  x = rng.standard_normal((B, H, W, C))
  p = _params(rng, C, h)
  y, (pi, pixel) = spatial.attention_in_attention_block(
      jnp.asarray(x, jnp.float32), **{k: jnp.asarray(v, jnp.float32) for k, v in p.items()},
      temperature=t, return_gate=True)
  want_y, want_pi, want_pixel = _reference(x, p, t)
  np.testing.assert_allclose(pi, want_pi, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(pixel, want_pixel, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(y, want_y, **tolerances.output(jnp.float32))


def test_branch_weights_sum_to_one_and_select_the_branches():
  rng = np.random.default_rng(3)
  B, H, W, C, h = 2, 4, 5, 4, 2
  x = rng.standard_normal((B, H, W, C))
  p = _params(rng, C, h)
  f = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
  _, (pi, _) = spatial.attention_in_attention_block(jnp.asarray(x, jnp.float32), **f,
                                                     return_gate=True)
  assert bool(jnp.all(pi > 0)) and bool(jnp.all(pi < 1))
  np.testing.assert_allclose(pi.sum(axis=-1), np.ones(B), **tolerances.output(jnp.float32))
  # A gate driven to (1, 0) keeps only the attention branch: zeroing the non-attention kernel
  # then changes nothing (and, driven to (0, 1), zeroing the attention output kernel changes nothing).
  big = np.zeros((h, 2))
  for keep, other in ((0, "k_n"), (1, "k_4")):
    w_b = big.copy()
    w_b[:, keep] = 1e4
    # Positive features through W_first = I and a positive W_a: the gate MLP's hidden units are > 0.
    f_pos = {**f, "w_first": jnp.eye(C), "w_a": jnp.abs(f["w_a"]),
             "w_b": jnp.asarray(w_b, jnp.float32)}
    xp = jnp.abs(jnp.asarray(x, jnp.float32)) + 1.0
    y = spatial.attention_in_attention_block(xp, **f_pos, temperature=1.0)
    y0 = spatial.attention_in_attention_block(xp, **{**f_pos, other: jnp.zeros_like(f[other])},
                                              temperature=1.0)
    np.testing.assert_array_equal(y, y0)


def test_bad_gate_weights_are_a_clear_error():
  p = {k: jnp.asarray(v, jnp.float32) for k, v in _params(np.random.default_rng(1), 4, 2).items()}
  p["w_b"] = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="attention_in_attention_block: `w_a` must have shape"):
    spatial.attention_in_attention_block(jnp.ones((1, 3, 3, 4)), **p)
