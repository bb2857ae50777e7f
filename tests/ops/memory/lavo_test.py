"""LAVO (#151): orthonormal bases; the linear-time form equals the definition with the per-step
orthogonal memory materialized; no `[T, T]` intermediate. `slow` holds only the same checks at extra
sizes.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.memory.lavo import LAVO_SPECS, orthogonal_basis, orthogonal_memory_attention
from attnjax.registry import example_params
from tests import numpy_math
from tests import tolerances
from tests.inputs import jit_with, largest_intermediate, qkv

TOL = tolerances.output(jnp.float32)


def test_orthogonal_basis_is_orthonormal():
  for r, d in ((8, 8), (5, 16), (1, 4)):
    basis = orthogonal_basis(r, d)
    np.testing.assert_allclose(basis @ basis.T, np.eye(r), **tolerances.ORTHONORMAL_ROWS[jnp.float32])


def _lavo_numpy(q, k, v, slope_logits, r, window, causal, scale=None):
  """LAVO by its definition, float64: the per-step orthogonal memory K̃_t, Ṽ_t materialized (the
  context decomposed on r orthonormal DCT bases, averaged over the c_t tokens seen), one softmax
  over the r slots and the local window with the relative-distance penalty."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  G = N // k.shape[2]
  scale = H ** -0.5 if scale is None else scale
  j = np.arange(r)[:, None]
  norm = np.sqrt(np.where(j > 0, 2.0, 1.0) / H)
  basis = np.cos(np.pi * (np.arange(H)[None] + 0.5) * j / H) * norm         # orthonormal DCT-II
  slopes = np.log1p(np.exp(np.asarray(slope_logits, np.float64)))
  out = np.zeros((B, T, N, v.shape[3]))
  for b in range(B):
    for n in range(N):
      kh, vh = k[b, :, n // G], v[b, :, n // G]
      w = kh @ basis.T                                            # [T, r]
      for t in range(T):
        seen = slice(0, t + 1) if causal else slice(0, T)
        c = (t + 1) if causal else T
        K_mem = w[seen].T @ kh[seen] / c                          # [r, H]
        V_mem = w[seen].T @ vh[seen] / c                          # [r, h]
        idx = np.arange(T)
        near = (idx > t - window) & (idx <= t) if causal else np.abs(idx - t) < window
        logits = np.concatenate([K_mem @ q[b, t, n], kh[near] @ q[b, t, n]]) * scale
        logits[r:] -= slopes[n] * np.abs(idx[near] - t)
        p = numpy_math.softmax(logits)
        out[b, t, n] = p[:r] @ V_mem + p[r:] @ vh[near]
  return out


def _check_lavo(causal, scale, *, r, window, chunk, seed, **sizes):
  q, k, v = qkv(seed=seed, **sizes)
  slope = jnp.linspace(-1.0, 1.5, q.shape[2])
  expected = _lavo_numpy(q, k, v, slope, r, window, causal, scale)
  for impl in ("xla", "reference"):
    run = jit_with(orthogonal_memory_attention, num_bases=r, window=window, causal=causal,
                   scale=scale, chunk_size=chunk, implementation=impl)
    out = run(q, k, v, relative_slope=slope)
    chex.assert_trees_all_close(out, expected, **TOL)


@pytest.mark.parametrize("causal,scale", [(True, None), (False, 0.7)])
def test_lavo_orthogonal_memory_compression_equals_its_definition(causal, scale):
  """The linear-time form (no per-step memory) equals the explicit rewrite: r = 5 bases of H = 8,
  window 3, chunks of 4 over T = 11, 2 query heads per kv head, 2 examples; a non-default `scale`
  scales the slot and local logits alike."""
  _check_lavo(causal, scale, r=5, window=3, chunk=4, seed=8)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_lavo_equals_its_definition_at_more_sizes(causal):
  _check_lavo(causal, None, r=8, window=5, chunk=8, seed=13, B=1, T=29, N=4, K=1)


def test_lavo_memory_grows_linearly():
  """Doubling T at most doubles (plus tiling slack) the largest forward+backward intermediate; a
  `[T, T]` score matrix would quadruple it."""
  params = example_params(LAVO_SPECS, N=1, K=1, H=4, perturb=0.3)
  fn = lambda q, k, v: jnp.sum(orthogonal_memory_attention(
      q, k, v, causal=True, window=16, chunk_size=16, **params))
  sizes = [largest_intermediate(jax.value_and_grad(fn, argnums=(0, 1, 2)),
                                *qkv(seed=9, B=1, T=T, N=1, K=1, H=4, h=4))
           for T in (1024, 2048)]
  assert sizes[1] <= tolerances.MEMORY_DOUBLING_RATIO_MAX * sizes[0], sizes
