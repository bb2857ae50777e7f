"""CoulGAT (arXiv:1912.08409) against a per-node numpy loop of the author's single_attn_mod /
single_hidden_out; the power matrix screens the adjacency (P = 0 makes every pair alike); the
parameters belong to nodes, so permuting the nodes is equivariant exactly when the per-node
attention vectors and per-pair powers are permuted with them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.graph import coulomb
from tests import tolerances

B, N, F, K, FO = 2, 5, 4, 2, 3


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, N, F)).astype(np.float32)
  adj = np.exp(rng.normal(size=(B, N, N))).astype(np.float32)
  return x, adj


def _params(seed=1):
  rng = np.random.default_rng(seed)
  return {"kernel": rng.normal(0, 0.6, (F, K, FO)).astype(np.float32),
          "bias": rng.normal(0, 0.2, (K, FO)).astype(np.float32),
          "attention": rng.normal(0, 0.6, (K, N, FO)).astype(np.float32),
          "power": rng.uniform(0.5, 1.5, (K, N, N)).astype(np.float32)}


def _np_coulgat(x, adj, p, concat=True):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  out = np.zeros((B, N, K, FO))
  for b in range(B):
    for k in range(K):
      g = x[b].astype(np.float64) @ p["kernel"][:, k] + p["bias"][k]
      a = adj[b].astype(np.float64) ** p["power"][k]
      a = np.exp(a - a.max(1, keepdims=True))
      a /= a.sum(1, keepdims=True)
      c = a @ g
      for i in range(N):
        e = c @ p["attention"][k, i]
        e = np.where(e > 0, e, 0.2 * e)
        w = np.exp(e - e.max())
        out[b, i, k] = (w / w.sum()) @ g
  return out.reshape(B, N, K * FO) if concat else out.mean(axis=2)


@pytest.mark.parametrize("concat", [True, False])
def test_matches_numpy_loop(concat):
  x, adj = _inputs()
  p = _params()
  got = coulomb.coulomb_graph_attention(x, adj, **p, concat=concat)
  np.testing.assert_allclose(got, _np_coulgat(x, adj, p, concat), **tolerances.OUTPUT[jnp.float32])


def test_zero_power_makes_every_pair_alike():
  x, adj = _inputs(2)
  p = {**_params(), "power": np.zeros((K, N, N), np.float32)}
  other = np.exp(np.random.default_rng(3).normal(size=adj.shape)).astype(np.float32)
  np.testing.assert_allclose(coulomb.coulomb_graph_attention(x, adj, **p),
                             coulomb.coulomb_graph_attention(x, other, **p),
                             **tolerances.OUTPUT[jnp.float32])
  assert tolerances.rel_rms(coulomb.coulomb_graph_attention(x, other, **_params()),
                            coulomb.coulomb_graph_attention(x, adj, **_params())) > (
      tolerances.CHANGED_REL_RMS)


def test_node_parameters_permute_with_the_nodes():
  x, adj = _inputs(4)
  p = _params()
  perm = np.random.default_rng(5).permutation(N)
  run = jax.jit(lambda x, a, p: coulomb.coulomb_graph_attention(x, a, **p))
  out = np.asarray(run(x, adj, p))
  xs, adjs = x[:, perm], adj[:, perm][:, :, perm]
  moved = {**p, "attention": p["attention"][:, perm], "power": p["power"][:, perm][:, :, perm]}
  np.testing.assert_allclose(run(xs, adjs, moved), out[:, perm], **tolerances.OUTPUT[jnp.float32])
  assert tolerances.rel_rms(run(xs, adjs, p), out[:, perm]) > tolerances.CHANGED_REL_RMS


def test_errors_name_the_argument():
  x, adj = _inputs()
  with pytest.raises(ValueError, match="`attention`"):
    coulomb.coulomb_graph_attention(x[:, :4], adj[:, :4, :4], **_params())
  with pytest.raises(ValueError, match="`adjacency`"):
    coulomb.coulomb_graph_attention(x, adj[:, :, :3], **_params())
