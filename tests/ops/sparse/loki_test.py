"""Loki (#227): exact attention over each query's top-k keys ranked by PCA-projected scores.

Checked against a float64 rewrite of the paper's rule (rank visible keys by (qP_r)·(kP_r), softmax of
the full scores over the top k); the calibration against numpy's eigendecomposition; and the paper's
claims: r = H with k = S is exact attention, and keys that lie in an r-dimensional subspace are ranked
exactly by r PCA dimensions (the same top-k as the full scores)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.sparse import loki_attention, loki_calibrate
from attnjax.ops.softmax import softmax_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)


def _loki_float64(q, k, v, projection, *, rank, top_k, causal, kv_lengths=None):
  q, k, v, p = (np.asarray(x, np.float64) for x in (q, k, v, projection))
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  out = np.zeros((B, T, N, v.shape[-1]))
  vis = numpy_math.visible(B, T, S, causal=causal, kv_lengths=kv_lengths)[:, 0]
  for b in range(B):
    for n in range(N):
      pr = p[n // G][:, :rank]
      approx = (q[b, :, n] @ pr) @ (k[b, :, n // G] @ pr).T
      exact = q[b, :, n] @ k[b, :, n // G].T / np.sqrt(H)
      for t in range(T):
        cand = np.flatnonzero(vis[b, t])
        if cand.size == 0:
          continue
        chosen = cand[np.argsort(-approx[t, cand], kind="stable")[:top_k]]
        w = numpy_math.softmax(exact[t, chosen])
        out[b, t, n] = w @ v[b, chosen, n // G]
  return out


@pytest.mark.parametrize("causal", [False, True])
def test_matches_float64_rewrite(causal):
  q, k, v = inputs.qkv(B=2, T=13, S=13, N=4, K=2, H=8, h=6, seed=1)
  proj = jax.jit(loki_calibrate)(inputs.qkv(B=3, T=20, N=2, K=2, H=8, seed=9)[1])
  lengths = jnp.array([13, 9])
  fn = inputs.jit_with(loki_attention, causal=causal, rank=3, top_k=4)
  out = fn(q, k, v, projection=proj, kv_lengths=lengths)
  want = _loki_float64(q, k, v, proj, rank=3, top_k=4, causal=causal, kv_lengths=lengths)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_calibration_is_the_pca_basis():
  keys = inputs.qkv(B=2, T=17, N=2, K=2, H=6, seed=3)[1] * jnp.array([3.0, 2.0, 1.0, .5, .2, .1])
  proj = np.asarray(jax.jit(loki_calibrate)(keys), np.float64)
  x = np.asarray(keys, np.float64).reshape(-1, 2, 6)
  for head in range(2):
    xh = x[:, head] - x[:, head].mean(0)
    values, vectors = np.linalg.eigh(xh.T @ xh)
    order = np.argsort(-values)
    # Same directions up to sign, in order of decreasing variance, orthonormal.
    np.testing.assert_allclose(np.abs(np.sum(proj[head] * vectors[:, order], axis=0)), 1.0,
                               **tolerances.FEATURE_SUM[jnp.float32])
    np.testing.assert_allclose(proj[head].T @ proj[head], np.eye(6),
                               **tolerances.ORTHOGONALITY[jnp.float32])


def test_full_rank_and_all_keys_is_exact_attention():
  q, k, v = inputs.qkv(B=2, T=11, S=11, N=4, K=2, H=8, h=6, seed=4)
  proj = jax.jit(loki_calibrate)(k)
  lengths = jnp.array([11, 6])
  for causal in (False, True):
    out = inputs.jit_with(loki_attention, rank=8, top_k=11, causal=causal)(
        q, k, v, projection=proj, kv_lengths=lengths)
    want = inputs.jit_with(softmax_attention, causal=causal)(q, k, v, kv_lengths=lengths)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), **F32)


def test_low_rank_keys_are_ranked_exactly_by_r_pca_dimensions():
  # Keys in a random 3-dimensional subspace of H = 8: (q P_3)·(k P_3) = q·k for every key, so Loki
  # with r = 3 picks the same top-k as the exact scores; r = 1 does not (the claim can fail).
  B, S, N, H = 1, 20, 2, 8
  basis = np.linalg.qr(np.random.default_rng(0).standard_normal((H, 3)))[0]
  coef = jax.random.normal(jax.random.PRNGKey(1), (B, S, N, 3)) * jnp.array([3.0, 2.0, 1.0])
  k = jnp.einsum("bsnr,hr->bsnh", coef, jnp.asarray(basis, jnp.float32))
  q, _, v = inputs.qkv(B=B, T=S, S=S, N=N, K=N, H=H, h=4, seed=2)
  proj = jax.jit(loki_calibrate)(k)
  want = _loki_float64(q, k, v, np.broadcast_to(np.eye(H), (N, H, H)), rank=H, top_k=4,
                       causal=False)
  got3 = inputs.jit_with(loki_attention, rank=3, top_k=4)(q, k, v, projection=proj)
  np.testing.assert_allclose(np.asarray(got3), want, **F32)
  got1 = inputs.jit_with(loki_attention, rank=1, top_k=4)(q, k, v, projection=proj)
  assert tolerances.rel_rms(got1, want) > tolerances.CHANGED_REL_RMS


def test_bad_projection_shape_is_a_clear_error():
  q, k, v = inputs.qkv(B=1, T=5, N=2, K=2, H=8, h=4)
  with pytest.raises(ValueError, match="loki_attention.*projection"):
    loki_attention(q, k, v, projection=jnp.zeros((2, 8, 4)))
