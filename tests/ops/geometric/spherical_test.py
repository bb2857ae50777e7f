"""Attention on the sphere (arXiv:2505.11157): equal quadrature weights give plain softmax attention;
the weighted softmax and the geodesic-disc mask against numpy loops; a query with no key in its disc
gives zeros; the grid's weights are its cell areas (sum 4π), and with them the attention integral on a
latitude-longitude grid agrees with a near-uniform point set's, where the unweighted sum does not."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops.geometric import spherical
from tests import tolerances

B, T, N, K, H, h = 2, 11, 4, 2, 8, 6
G = N // K


def _qkv(seed=0, S=T):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((B, T, N, H), (B, S, K, H), (B, S, K, h)))


def _np_attention(q, k, v, log_w, keep):
  """`keep [B, T, S]`; softmax of q·k/√H + log ω over the kept keys, zeros where none is kept."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  out = np.zeros((B, q.shape[1], N, h))
  for b in range(B):
    for n in range(N):
      for i in range(q.shape[1]):
        if not keep[b, i].any():
          continue
        s = k[b, :, n // G] @ q[b, i, n] / math.sqrt(H) + log_w[b]
        a = np.where(keep[b, i], np.exp(s - s[keep[b, i]].max()), 0.0)
        out[b, i, n] = a / a.sum() @ v[b, :, n // G]
  return out


def test_equal_weights_give_plain_softmax_attention():
  q, k, v = _qkv()
  got = aj.attention("spherical_attention", q, k, v, log_weights=jnp.full((B, T), -1.3))
  np.testing.assert_allclose(np.asarray(got), np.asarray(aj.attention("softmax", q, k, v)),
                             **tolerances.output(jnp.float32))


def test_weighted_softmax_matches_numpy():
  q, k, v = _qkv(1, S=9)
  log_w = np.random.default_rng(2).standard_normal((B, 9))
  got = spherical.spherical_attention(q, k, v, log_weights=jnp.asarray(log_w, jnp.float32))
  want = _np_attention(q, k, v, log_w, np.ones((B, T, 9), bool))
  np.testing.assert_allclose(np.asarray(got), want, **tolerances.output(jnp.float32))


def test_neighbourhood_is_the_geodesic_disc():
  q, k, v = _qkv(3)
  rng = np.random.default_rng(4)
  points = rng.standard_normal((B, T, 3))
  log_w = rng.standard_normal((B, T))
  cutoff = 1.1
  got = spherical.spherical_neighborhood_attention(
      q, k, v, log_weights=jnp.asarray(log_w, jnp.float32), points=jnp.asarray(points, jnp.float32),
      cutoff=cutoff)
  unit = points / np.linalg.norm(points, axis=-1, keepdims=True)
  dist = np.arccos(np.clip(np.einsum("bid,bjd->bij", unit, unit), -1, 1))
  keep = dist <= cutoff
  assert 0 < keep.mean() < 1
  np.testing.assert_allclose(np.asarray(got), _np_attention(q, k, v, log_w, keep),
                             **tolerances.output(jnp.float32))


def test_a_query_with_an_empty_disc_gives_zeros():
  S = 6
  q, k, v = _qkv(5, S=S)
  north = np.tile([0.0, 0.0, 1.0], (B, S, 1)) + 0.1 * np.random.default_rng(5).standard_normal((B, S, 3))
  query_points = np.tile([0.0, 0.0, -1.0], (B, T, 1))
  query_points[:, 0] = [0.0, 0.0, 1.0]      # the first query sits among the keys
  out = np.asarray(spherical.spherical_neighborhood_attention(
      q, k, v, log_weights=jnp.zeros((B, S)), points=jnp.asarray(north, jnp.float32),
      query_points=jnp.asarray(query_points, jnp.float32), cutoff=0.5))
  assert np.all(np.isfinite(out)) and np.all(out[:, 1:] == 0) and np.any(out[:, 0] != 0)


def _fibonacci_sphere(n):
  i = np.arange(n) + 0.5
  z = 1 - 2 * i / n
  phi = math.pi * (1 + 5 ** 0.5) * i
  r = np.sqrt(1 - z * z)
  return np.stack([r * np.cos(phi), r * np.sin(phi), z], -1)


def test_quadrature_weights_make_the_grid_sum_an_integral():
  points, weights = spherical.sphere_grid(12, 24)
  np.testing.assert_allclose(weights.sum(), 4 * math.pi, **tolerances.EXACT_VALUES[jnp.float32])
  # One query u · β against keys at the points, values f(y): the sum should approach
  # ∫ e^{β u·y} f(y) dy / ∫ e^{β u·y} dy, here from 200 000 near-uniform points with equal weights.
  u = np.array([0.3, 0.2, 0.93])
  u /= np.linalg.norm(u)
  beta = 3.0
  f = lambda y: y[..., 2] ** 2 + y[..., 0]  # noqa: E731
  ref_points = _fibonacci_sphere(200_000)
  e = np.exp(beta * ref_points @ u)
  reference = (e * f(ref_points)).sum() / e.sum()
  q = jnp.asarray(beta * u, jnp.float32).reshape(1, 1, 1, 3)
  k = jnp.asarray(points, jnp.float32)[None, :, None]
  v = jnp.asarray(f(points), jnp.float32)[None, :, None, None]
  errors = {}
  for name, log_w in (("weighted", np.log(weights)), ("unweighted", np.zeros_like(weights))):
    out = spherical.spherical_attention(q, k, v, log_weights=jnp.asarray(log_w, jnp.float32)[None],
                                        scale=1.0)
    errors[name] = abs(float(out[0, 0, 0, 0]) - reference)
  assert errors["weighted"] * tolerances.QUADRATURE_ERROR_REDUCTION_MIN < errors["unweighted"]


def test_bad_inputs_are_clear_errors():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"log_weights.*\[B, S\]"):
    spherical.spherical_attention(q, k, v, log_weights=jnp.zeros((B, T + 1)))
  with pytest.raises(ValueError, match=r"points.*\[B, S, 3\]"):
    spherical.spherical_neighborhood_attention(q, k, v, log_weights=jnp.zeros((B, T)),
                                               points=jnp.zeros((B, T, 2)))
