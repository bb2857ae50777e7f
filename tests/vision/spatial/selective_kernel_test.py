"""Selective kernel attention (#127, arXiv:2204.01005): against a float64 explicit-loop rewrite of
the SK equations, and the claim that the branch weights are a softmax across the branches (positive,
summing to 1 per channel), so the output is a per-channel convex combination of the branch maps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision import spatial
from tests import tolerances


def _conv_same(x, kernel, bias):
  B, H, W, C = x.shape
  k = kernel.shape[0]
  r = k // 2
  xp = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
  out = np.zeros((B, H, W, kernel.shape[3])) + bias
  for i in range(H):
    for j in range(W):
      for a in range(k):
        for b in range(k):
          out[:, i, j, :] += xp[:, i + a, j + b, :] @ kernel[a, b]
  return out


def _params(rng, C, d, sizes=(3, 5)):
  p = {}
  for m, k in enumerate(sizes):
    p[f"kernel_{m}"] = rng.standard_normal((k, k, C, C)) / (k * np.sqrt(C))
    p[f"bias_{m}"] = rng.standard_normal(C)
  p.update(w_z=rng.standard_normal((C, d)), b_z=rng.standard_normal(d),
           w_select=rng.standard_normal((2, d, C)))
  return p


def test_selective_kernel_against_float64_loops():
  rng = np.random.default_rng(0)
  B, H, W, C, d = 2, 5, 6, 4, 3
  x = rng.standard_normal((B, H, W, C))
  p = _params(rng, C, d)
  y, gate = spatial.selective_kernel_attention(
      jnp.asarray(x, jnp.float32), **{k: jnp.asarray(v, jnp.float32) for k, v in p.items()},
      return_gate=True)
  u = [np.maximum(_conv_same(x, p[f"kernel_{m}"], p[f"bias_{m}"]), 0) for m in range(2)]
  s = (u[0] + u[1]).mean(axis=(1, 2))
  z = np.maximum(s @ p["w_z"] + p["b_z"], 0)
  logits = np.stack([z @ p["w_select"][m] for m in range(2)], axis=1)      # [B, 2, C]
  a = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  want = a[:, 0, None, None, :] * u[0] + a[:, 1, None, None, :] * u[1]
  np.testing.assert_allclose(gate, a, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(y, want, **tolerances.output(jnp.float32))


def test_branch_weights_sum_to_one_and_the_output_lies_between_the_branches():
  B, H, W, C = 2, 9, 11, 16
  x = jax.random.normal(jax.random.PRNGKey(0), (B, H, W, C))
  layer = spatial.SelectiveKernelAttention()
  variables = layer.init(jax.random.PRNGKey(1), x)
  y, state = layer.apply(variables, x, mutable=["intermediates"])
  (gate,) = state["intermediates"]["gate"]
  assert gate.shape == (B, 2, C)
  assert bool(jnp.all(gate > 0))
  np.testing.assert_allclose(gate.sum(axis=1), np.ones((B, C)), **tolerances.output(jnp.float32))
  params = variables["params"]
  u = jnp.stack([jax.nn.relu(jax.lax.conv_general_dilated(
      x, params[f"kernel_{m}"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      + params[f"bias_{m}"]) for m in range(2)])
  slack = tolerances.output(jnp.float32)["atol"]        # rounding of a two-term weighted sum
  assert bool(jnp.all(y >= u.min(axis=0) - slack)) and bool(jnp.all(y <= u.max(axis=0) + slack))


def test_bad_selection_weights_are_a_clear_error():
  p = {k: jnp.asarray(v, jnp.float32) for k, v in _params(np.random.default_rng(1), 4, 3).items()}
  p["w_select"] = jnp.ones((3, 3, 4))
  with pytest.raises(ValueError, match="selective_kernel_attention: `w_select` must have shape"):
    spatial.selective_kernel_attention(jnp.ones((1, 5, 5, 4)), **p)
