"""APES edge sampling (arXiv:2302.14673) against a numpy loop of the authors' layers (kNN in feature
space with the point itself, neighbour differences, N2P softmax and its std as the local score;
P2P softmax and its column sums as the global score; the top-M points' attention outputs), and the
set behaviour: permuting the input points selects the same points with the same outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.geometry import apes
from tests import tolerances

B, N, C, M, K = 2, 13, 5, 4, 5


def _np_apes(x, wq, wk, wv, mode):
  x, wq, wk, wv = (np.asarray(a, np.float64) for a in (x, wq, wk, wv))
  outs, chosen = [], []
  for b in range(B):
    f = x[b]
    q = f @ wq
    if mode == "local":
      dist = ((f[:, None] - f[None]) ** 2).sum(-1)
      att, vals = [], []
      for i in range(N):
        nb = np.argsort(dist[i], kind="stable")[:K]
        d = f[nb] - f[i]
        e = (d @ wk) @ q[i] / np.sqrt(C)
        a = np.exp(e - e.max())
        att.append(a / a.sum())
        vals.append(d @ wv)
      att = np.asarray(att)
      score = att.std(axis=1)
      top = np.argsort(-score, kind="stable")[:M]
      outs.append(np.stack([att[i] @ vals[i] for i in top]))
    else:
      e = q @ (f @ wk).T / np.sqrt(C)
      a = np.exp(e - e.max(axis=1, keepdims=True))
      a /= a.sum(axis=1, keepdims=True)
      score = a.sum(axis=0)
      top = np.argsort(-score, kind="stable")[:M]
      outs.append(a[top] @ (f @ wv))
    chosen.append(top)
  return np.stack(outs), np.stack(chosen)


def _weights(seed=0):
  rng = np.random.default_rng(seed)
  return {n: rng.normal(0, 0.8, (C, C)).astype(np.float32) for n in ("query", "key", "value")}


@pytest.mark.parametrize("mode", apes.MODES)
def test_matches_authors_layers(mode):
  x = np.random.default_rng(1).normal(size=(B, N, C)).astype(np.float32)
  w = _weights()
  out, idx = apes.apes_downsample(x, **w, num_points=M, mode=mode, num_neighbors=K,
                                  return_indices=True)
  want, want_idx = _np_apes(x, w["query"], w["key"], w["value"], mode)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(out, want, **tolerances.OUTPUT[jnp.float32])


@pytest.mark.parametrize("mode", apes.MODES)
def test_permuting_points_selects_the_same_points(mode):
  x = np.random.default_rng(2).normal(size=(B, N, C)).astype(np.float32)
  perm = np.random.default_rng(3).permutation(N)
  w = _weights(1)
  run = jax.jit(lambda x: apes.apes_downsample(x, **w, num_points=M, mode=mode, num_neighbors=K,
                                               return_indices=True))
  out, idx = run(x)
  out_p, idx_p = run(x[:, perm])
  np.testing.assert_array_equal(perm[np.asarray(idx_p)], idx)
  np.testing.assert_allclose(out_p, out, **tolerances.OUTPUT[jnp.float32])


def test_errors_name_the_argument():
  x = np.zeros((1, 6, C), np.float32)
  w = _weights()
  with pytest.raises(ValueError, match="num_points"):
    apes.apes_downsample(x, **w, num_points=7)
  with pytest.raises(ValueError, match="`query`"):
    apes.apes_downsample(x, **{**w, "query": w["query"][:2]}, num_points=2)
  with pytest.raises(ValueError, match="mode"):
    apes.apes_downsample(x, **w, num_points=2, mode="edge")
