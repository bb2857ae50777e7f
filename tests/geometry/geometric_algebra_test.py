"""Geometric algebra attention (arXiv:2110.02393): the pair invariants are the scalar and bivector
norm of the geometric product r_j r_i (computed here from its (1, e12, e13, e23) components), the
layer matches a per-pair numpy loop, and its outputs are invariant to rotating every vector and
equivariant (or, reduced, invariant) to permuting the points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.geometry import geometric_algebra as ga
from tests import tolerances

B, N, D = 2, 6, 5


def _rotation(seed):
  q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
  q = q * np.sign(np.diag(r))
  return q if np.linalg.det(q) > 0 else -q


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(B, N, D)).astype(np.float32),
          rng.normal(size=(B, N, 3)).astype(np.float32))


def _params(mode, seed=1):
  layer = ga.GeometricAlgebraAttention(invariant_mode=mode)
  v, p = _inputs()
  params = layer.init(jax.random.PRNGKey(seed), v, p)["params"]
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(np.asarray(a) + 0.3 * rng.normal(size=a.shape), jnp.float32)
          for k, a in params.items()}


def test_invariants_are_the_geometric_product():
  _, p = _inputs()
  got = np.asarray(ga.pair_invariants(p, "full"))
  for b in range(B):
    for i in range(N):
      for j in range(N):
        a, c = p[b, j].astype(np.float64), p[b, i].astype(np.float64)
        product = [a @ c, a[0] * c[1] - a[1] * c[0], a[0] * c[2] - a[2] * c[0],
                   a[1] * c[2] - a[2] * c[1]]                        # basis 1, e12, e13, e23
        want = [product[0], np.linalg.norm(product[1:]), np.linalg.norm(a), np.linalg.norm(c)]
        np.testing.assert_allclose(got[b, i, j], want, **tolerances.OUTPUT[jnp.float32])


@pytest.mark.parametrize("reduce", [False, True])
def test_matches_numpy_loop(reduce):
  v, p = _inputs()
  w = {k: np.asarray(a, np.float64) for k, a in _params("partial").items()}
  got = ga.geometric_algebra_attention(v, p, **_params("partial"), reduce=reduce,
                                       invariant_mode="partial")
  inv = np.asarray(ga.pair_invariants(p, "partial"), np.float64)
  u = np.zeros((B, N, N, D))
  s = np.zeros((B, N, N))
  for b in range(B):
    for i in range(N):
      for j in range(N):
        u[b, i, j] = (inv[b, i, j] @ w["value_kernel"] + w["value_bias"]
                      + (v[b, i] + v[b, j]) / 2) / 2
        s[b, i, j] = np.maximum(u[b, i, j] @ w["score_kernel"] + w["score_bias"], 0) @ w[
            "score_out"]
  if reduce:
    a = np.exp(s - s.max(axis=(1, 2), keepdims=True))
    a /= a.sum(axis=(1, 2), keepdims=True)
    want = np.einsum("bij,bijd->bd", a, u)
  else:
    a = np.exp(s - s.max(axis=2, keepdims=True))
    a /= a.sum(axis=2, keepdims=True)
    want = np.einsum("bij,bijd->bid", a, u)
  np.testing.assert_allclose(got, want, **tolerances.OUTPUT[jnp.float32])


@pytest.mark.parametrize("reduce", [False, True])
def test_rotation_invariant_and_permutation_equivariant(reduce):
  v, p = _inputs(2)
  params = _params("full")
  run = jax.jit(lambda v, p: ga.geometric_algebra_attention(v, p, **params, reduce=reduce,
                                                            invariant_mode="full"))
  out = run(v, p)
  rot = (p @ _rotation(3).T).astype(np.float32)
  np.testing.assert_allclose(run(v, rot), out, **tolerances.OUTPUT[jnp.float32])
  perm = np.random.default_rng(4).permutation(N)
  permuted = run(v[:, perm], p[:, perm])
  np.testing.assert_allclose(permuted, out if reduce else np.asarray(out)[:, perm],
                             **tolerances.OUTPUT[jnp.float32])
  # Not invariant to what it should see: moving one point changes the result.
  moved = p.copy()
  moved[:, 0] += 1.0
  assert tolerances.rel_rms(run(v, moved), out) > tolerances.CHANGED_REL_RMS


def test_errors_name_the_argument():
  v, p = _inputs()
  params = _params("single")
  with pytest.raises(ValueError, match="`positions`"):
    ga.geometric_algebra_attention(v, p[..., :2], **params)
  with pytest.raises(ValueError, match="`value_kernel`"):
    ga.geometric_algebra_attention(v, p, **params, invariant_mode="full")
