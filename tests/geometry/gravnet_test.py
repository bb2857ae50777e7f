"""GravNetNorm (arXiv:2307.16662) against a per-pair numpy loop of the authors' GravConv (mean
channel, normalized learned space, radius graph with self-loops, Gaussian kernel, L1-normalized
messages, feature MLP on [aggregate, features]); points outside the radius send nothing; the layer
is permutation equivariant; padding points are never read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.geometry import gravnet
from tests import tolerances

B, N, C = 2, 7, 4
R, G = 1.1, 3.0


def _inputs(seed=0):
  return np.random.default_rng(seed).normal(size=(B, N, C)).astype(np.float32)


def _params(seed=1):
  layer = gravnet.GravNetNorm(emb_dims=3, radius=R, grav_weight=G)
  params = layer.init(jax.random.PRNGKey(seed), _inputs())["params"]
  rng = np.random.default_rng(seed)
  return layer, jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + 0.2 * rng.normal(size=a.shape),
                                                   jnp.float32), params)


def _np_mlp(x, layers, last):
  for i in range(len(layers)):
    x = x @ np.asarray(layers[f"layer_{i}"]["kernel"], np.float64) + np.asarray(
        layers[f"layer_{i}"]["bias"], np.float64)
    if i < len(layers) - 1 or last:
      x = np.maximum(x, 0)
  return x


def _np_gravnet(x, p):
  out = []
  for b in range(B):
    h = np.concatenate([x[b], x[b].mean(-1, keepdims=True)], -1).astype(np.float64)
    s = _np_mlp(h, p["spatial"], False)
    s /= np.linalg.norm(s, axis=-1, keepdims=True)
    send = h / np.abs(h).sum(-1, keepdims=True)
    agg = np.zeros_like(h)
    for i in range(N):
      for j in range(N):
        d2 = ((s[i] - s[j]) ** 2).sum()
        if d2 < R ** 2:
          agg[i] += np.exp(-G * d2 / R ** 2) * send[j]
    out.append(_np_mlp(np.concatenate([agg, h], -1), p["feature"], True))
  return np.stack(out)


def test_matches_numpy_loop():
  layer, p = _params()
  x = _inputs()
  np.testing.assert_allclose(layer.apply({"params": p}, x), _np_gravnet(x, p),
                             **tolerances.OUTPUT[jnp.float32])


def test_only_neighbours_in_the_learned_space_send():
  w = np.asarray(gravnet.learned_space_weights(
      jnp.asarray([[[0.0, 0.0], [0.5, 0.0], [3.0, 0.0]]]), radius=1.0, grav_weight=2.0))
  np.testing.assert_allclose(w[0, 0], [1.0, np.exp(-0.5), 0.0], **tolerances.OUTPUT[jnp.float32])
  assert w[0, 2, 0] == 0 and w[0, 2, 2] == 1.0
  # With knn = 2 each point also hears its nearest other point, however far.
  wk = np.asarray(gravnet.learned_space_weights(
      jnp.asarray([[[0.0, 0.0], [0.5, 0.0], [3.0, 0.0]]]), radius=1.0, grav_weight=2.0, knn=2))
  assert wk[0, 2, 1] > 0


def test_permutation_equivariance_and_padding():
  layer, p = _params()
  x = _inputs(2)
  run = jax.jit(lambda x, m: layer.apply({"params": p}, x, m))
  full = np.ones((B, N), bool)
  out = np.asarray(run(x, full))
  perm = np.random.default_rng(3).permutation(N)
  np.testing.assert_allclose(run(x[:, perm], full), out[:, perm], **tolerances.OUTPUT[jnp.float32])
  mask = full.copy()
  mask[:, 5:] = False
  base = np.asarray(run(x, mask))
  x2 = x.copy()
  x2[:, 5:] += 3.0
  np.testing.assert_allclose(np.asarray(run(x2, mask))[:, :5], base[:, :5],
                             **tolerances.OUTPUT[jnp.float32])


def test_errors_name_the_argument():
  layer, p = _params()
  with pytest.raises(ValueError, match="`mask`"):
    layer.apply({"params": p}, _inputs(), np.ones((B, N + 1), bool))
