"""DCAL (arXiv:2205.02151): attention rollout as the product of residual-mixed, head-averaged maps
(rows stay stochastic); GLCA attends from the top-R rollout tokens exactly as full attention does at
those rows; PWCA is attention over both images' keys, a distractor identical to the image changes
nothing (the duplicated keys keep every weight ratio) and a distractor that matches the queries
better draws the attention away."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.cross import dual_cross
from tests import tolerances

L, B, N, T, H, h = 3, 2, 2, 7, 8, 6


def _maps(seed=0):
  logits = np.random.default_rng(seed).normal(size=(L, B, N, T, T))
  return np.asarray(jax.nn.softmax(logits, axis=-1), np.float32)


def test_rollout_is_the_residual_product():
  w = _maps()
  got = np.asarray(dual_cross.attention_rollout(w))
  want = np.broadcast_to(np.eye(T), (B, T, T)).copy()
  for layer in range(L):
    bar = 0.5 * w[layer].astype(np.float64).mean(axis=1) + 0.5 * np.eye(T)
    want = bar @ want
  np.testing.assert_allclose(got, want, **tolerances.OUTPUT[jnp.float32])
  np.testing.assert_allclose(got.sum(-1), 1.0, **tolerances.OUTPUT[jnp.float32])


def _qkv(seed=1, s=T):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(B, T, N, H)).astype(np.float32),
          rng.normal(size=(B, s, 1, H)).astype(np.float32),
          rng.normal(size=(B, s, 1, h)).astype(np.float32))


def test_glca_is_full_attention_at_the_top_rollout_rows():
  q, k, v = _qkv()
  roll = dual_cross.attention_rollout(_maps())
  out, idx = dual_cross.glca(q, k, v, roll, ratio=0.3)
  assert idx.shape == (B, 3)
  want_idx = np.argsort(-np.asarray(roll)[:, 0], axis=-1, kind="stable")[:, :3]
  np.testing.assert_array_equal(idx, want_idx)
  full = np.asarray(aj.attention("softmax", q, k, v))
  np.testing.assert_allclose(out, np.take_along_axis(full, np.asarray(idx)[:, :, None, None], 1),
                             **tolerances.OUTPUT[jnp.float32])


def test_pwca_with_duplicate_and_with_better_distractor():
  q, k, v = _qkv(2)
  alone = np.asarray(aj.attention("softmax", q, k, v))
  np.testing.assert_allclose(dual_cross.pwca(q, k, v, k, v), alone,
                             **tolerances.OUTPUT[jnp.float32])
  # A distractor whose keys align with every query (and whose values are a constant) takes the mass.
  k2 = np.repeat(q.mean(axis=(1, 2), keepdims=True)[:, :, :, :] * 10, 4, axis=1)
  v2 = np.full((B, 4, 1, h), 7.0, np.float32)
  out = np.asarray(dual_cross.pwca(q, k, v, k2, v2))
  assert np.abs(out - 7.0).mean() < np.abs(alone - 7.0).mean()


def test_errors_name_the_argument():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="`rollout`"):
    dual_cross.glca(q, k, v, np.zeros((B, T, T + 1), np.float32))
  with pytest.raises(ValueError, match="`count`"):
    dual_cross.glca(q, k, v, dual_cross.attention_rollout(_maps()), count=T + 1)
  with pytest.raises(ValueError, match="`weights`"):
    dual_cross.attention_rollout(np.zeros((B, N, T, T), np.float32))
