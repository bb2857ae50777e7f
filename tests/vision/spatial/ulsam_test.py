"""ULSAM (#111, arXiv:2006.15102): against a float64 explicit-loop rewrite of the paper's equations,
and the claim that each subspace's map is a softmax over positions (positive, summing to 1 over H·W)
that only reweights its own group's channels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision import spatial
from tests import tolerances


def _reference(x, dw, pw):
  """float64 loops: depthwise conv (zero padded), 3×3 max pool (stride 1), 1×1 conv, softmax."""
  B, H, W, C = x.shape
  k, g, cg = dw.shape[0], pw.shape[0], pw.shape[1]
  r = k // 2
  xp = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
  u = np.zeros_like(x)
  for i in range(H):
    for j in range(W):
      for a in range(k):
        for b in range(k):
          u[:, i, j, :] += dw[a, b, 0, :] * xp[:, i + a, j + b, :]
  pooled = np.zeros_like(u)
  for i in range(H):
    for j in range(W):
      pooled[:, i, j, :] = u[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2, :].max(axis=(1, 2))
  y, maps = np.zeros_like(x), np.zeros((B, H, W, g))
  for n in range(g):
    f = x[..., n * cg:(n + 1) * cg]
    logits = pooled[..., n * cg:(n + 1) * cg] @ pw[n]                     # [B, H, W]
    e = np.exp(logits - logits.max(axis=(1, 2), keepdims=True))
    a = e / e.sum(axis=(1, 2), keepdims=True)
    maps[..., n] = a
    y[..., n * cg:(n + 1) * cg] = a[..., None] * f + f
  return y, maps


@pytest.mark.parametrize("k,g", [(1, 4), (3, 2)])
def test_ulsam_against_float64_loops(k, g):
  rng = np.random.default_rng(k)
  B, H, W, C = 2, 5, 6, 8
  x = rng.standard_normal((B, H, W, C))
  dw, pw = rng.standard_normal((k, k, 1, C)), rng.standard_normal((g, C // g))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, maps = spatial.ulsam_subspace_attention(f32(x), dw_kernel=f32(dw), pw_kernel=f32(pw),
                                             return_gate=True)
  want_y, want_maps = _reference(x, dw, pw)
  np.testing.assert_allclose(maps, want_maps, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(y, want_y, **tolerances.output(jnp.float32))


def test_each_subspace_map_is_a_softmax_over_positions_of_its_own_group():
  B, H, W, C, g = 2, 9, 11, 16, 4
  x = jax.random.normal(jax.random.PRNGKey(0), (B, H, W, C))
  layer = spatial.SubspaceAttention(groups=g)
  variables = layer.init(jax.random.PRNGKey(1), x)
  _, state = layer.apply(variables, x, mutable=["intermediates"])
  (maps,) = state["intermediates"]["gate"]
  assert maps.shape == (B, H, W, g)
  assert bool(jnp.all(maps > 0))
  np.testing.assert_allclose(maps.sum(axis=(1, 2)), np.ones((B, g)), **tolerances.output(jnp.float32))
  # Changing group 0's features leaves the other groups' outputs unchanged.
  cg = C // g
  x2 = x.at[..., :cg].multiply(3.0)
  y, y2 = layer.apply(variables, x), layer.apply(variables, x2)
  np.testing.assert_array_equal(y[..., cg:], y2[..., cg:])
  assert not np.allclose(y[..., :cg], y2[..., :cg])


def test_bad_point_kernel_is_a_clear_error():
  with pytest.raises(ValueError, match="ulsam_subspace_attention: `pw_kernel` must have shape"):
    spatial.ulsam_subspace_attention(jnp.ones((1, 3, 3, 8)), dw_kernel=jnp.ones((1, 1, 1, 8)),
                                     pw_kernel=jnp.ones((3, 2)))
