"""R-MAT attention (arXiv:2110.05841) against a per-pair numpy loop of the authors' RMatAttention;
without relations (edge MLPs zero) it is plain multi-head attention; atoms are permutation
equivariant when the pair features are permuted with them; padding atoms are never read; the Bessel
distance basis is the code's formula and vanishes past the cutoff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.graph import relative_molecule as rm
from tests import tolerances

B, N, D, E, H = 2, 5, 8, 3, 2


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(B, N, D)).astype(np.float32),
          rng.normal(size=(B, N, N, E)).astype(np.float32))


def _params(seed=1):
  x, pairs = _inputs()
  params = rm.RelativeMoleculeAttention(num_heads=H).init(jax.random.PRNGKey(seed), x, pairs)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + 0.3 * rng.normal(size=a.shape),
                                            jnp.float32), params["params"])


def _np_rmat(x, pairs, p, mask=None):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  d = D // H
  leaky = lambda z: np.where(z > 0, z, 0.1 * z)  # noqa: E731
  out = np.zeros((B, N, D))
  for b in range(B):
    q = np.einsum("nc,chd->nhd", x[b], p["query"])
    k = np.einsum("nc,chd->nhd", x[b], p["key"])
    v = np.einsum("nc,chd->nhd", x[b], p["value"])
    o = np.zeros((N, H, d))
    for i in range(N):
      for h in range(H):
        s, rvs = [], []
        for j in range(N):
          rk = (leaky(pairs[b, i, j] @ p["edge_key"]["w1"] + p["edge_key"]["b1"])
                @ p["edge_key"]["w2"]).reshape(H, d)[h]
          rv = (leaky(pairs[b, i, j] @ p["edge_value"]["w1"] + p["edge_value"]["b1"])
                @ p["edge_value"]["w2"] + p["edge_value"]["b2"]).reshape(H, d)[h]
          s.append((q[i, h] @ k[j, h] + (q[i, h] + k[i, h]) @ rk) / np.sqrt(d) + rk @ p["w"][h])
          rvs.append(rv)
        s = np.asarray(s)
        if mask is not None:
          s = np.where(mask[b], s, -np.inf)
        a = np.exp(s - s.max())
        a /= a.sum()
        o[i, h] = sum(a[j] * (v[j, h] + rvs[j]) for j in range(N))
    out[b] = np.einsum("nhd,hdc->nc", o, p["out"])
  return out


def test_matches_numpy_loop_with_padding():
  x, pairs = _inputs()
  p = _params()
  mask = np.ones((B, N), bool)
  mask[1, 3:] = False
  got = rm.relative_molecule_attention(x, pairs, mask, **p)
  np.testing.assert_allclose(got, _np_rmat(x, pairs, p, mask), **tolerances.OUTPUT[jnp.float32])
  # The padding atoms' features and pairs are never read by the real atoms.
  x2, pairs2 = x.copy(), pairs.copy()
  x2[1, 3:] += 4.0
  pairs2[1, :, 3:] -= 4.0
  again = rm.relative_molecule_attention(x2, pairs2, mask, **p)
  np.testing.assert_allclose(np.asarray(again)[1, :3], np.asarray(got)[1, :3],
                             **tolerances.OUTPUT[jnp.float32])


def test_without_relations_it_is_multi_head_attention():
  x, pairs = _inputs(2)
  p = _params()
  zero = jax.tree.map(jnp.zeros_like, p["edge_value"])
  p = {**p, "edge_key": jax.tree.map(jnp.zeros_like, p["edge_key"]), "edge_value": zero}
  got = rm.relative_molecule_attention(x, pairs, **p)
  q, k, v = (np.einsum("bnc,chd->bnhd", x, np.asarray(p[n])) for n in ("query", "key", "value"))
  s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D // H)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  want = np.einsum("bihd,hdc->bic", np.einsum("bhij,bjhd->bihd", a, v), np.asarray(p["out"]))
  np.testing.assert_allclose(got, want, **tolerances.OUTPUT[jnp.float32])
  # The relations matter once their MLPs are not zero.
  assert tolerances.rel_rms(rm.relative_molecule_attention(x, pairs, **_params()), got) > (
      tolerances.CHANGED_REL_RMS)


def test_permutation_equivariance():
  x, pairs = _inputs(3)
  p = _params()
  perm = np.random.default_rng(4).permutation(N)
  out = np.asarray(rm.relative_molecule_attention(x, pairs, **p))
  permuted = rm.relative_molecule_attention(x[:, perm], pairs[:, perm][:, :, perm], **p)
  np.testing.assert_allclose(permuted, out[:, perm], **tolerances.OUTPUT[jnp.float32])


def test_bessel_basis():
  d = np.asarray([[[0.5, 2.0, 6.0]]], np.float32)
  got = np.asarray(rm.bessel_basis(d, num_radial=3, cutoff=5.0, exponent=5))
  x = (d.astype(np.float64)[..., None] + 1e-6) / 5.0
  env = 1 / x - 28 * x ** 5 + 48 * x ** 6 - 21 * x ** 7   # a, b, c for p = exponent + 1 = 6
  want = np.where(x < 1, env, 0) * np.sin(np.arange(1, 4) * np.pi * x)
  np.testing.assert_allclose(got, want, **tolerances.OUTPUT[jnp.float32])
  assert (got[0, 0, 2] == 0).all()   # 6.0 is past the cutoff


def test_errors_name_the_argument():
  x, pairs = _inputs()
  p = _params()
  with pytest.raises(ValueError, match="`pairs`"):
    rm.relative_molecule_attention(x, pairs[:, :3], **p)
  with pytest.raises(ValueError, match="`mask`"):
    rm.relative_molecule_attention(x, pairs, np.ones((B, N + 1), bool), **p)
