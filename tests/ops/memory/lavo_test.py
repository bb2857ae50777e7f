"""LAVO (#151): orthonormal bases; the linear-time form equals the definition with the per-step
orthogonal memory materialized; no `[T, T]` intermediate; recurrent decoding (the memory's sums
and the last window - 1 tokens, a fixed size) gives the same rows in calls of any length. `slow`
holds only the same checks at extra sizes.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
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


def _decode_in_calls(fn, q, k, v, cuts, **kw):
  """`fn` over the tokens [0, cuts[0]), [cuts[0], cuts[1]), ... carrying the recurrent state: the
  first call from state None at offset 0, the others compiled with a traced offset. Returns the
  concatenated outputs and the state after each call."""
  step = jax.jit(lambda q, k, v, state, n: fn(q, k, v, causal=True, q_offset=n, initial_state=state,
                                              return_final_state=True, **kw))
  out, state = jax.jit(lambda q, k, v: fn(q, k, v, causal=True, initial_state=None,
                                          return_final_state=True, **kw))(
      q[:, :cuts[0]], k[:, :cuts[0]], v[:, :cuts[0]])
  outs, states = [out], [state]
  for a, b in zip(cuts, cuts[1:] + [q.shape[1]], strict=True):
    out, state = step(q[:, a:b], k[:, a:b], v[:, a:b], state, jnp.int32(a))
    outs.append(out)
    states.append(state)
  return jnp.concatenate(outs, axis=1), states


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_lavo_recurrent_decoding_carries_memory_sums_and_window(impl):
  """Prefill 4 tokens, a 7-token chunk (past two windows of 3 and two chunks of 4), then single
  steps: every row equals the float64 definition and the full forward, 2 query heads per kv head,
  r = 5 bases. The state keeps one shape and the registry's size; its memory is the unnormalized
  sums Σ k_i w_iᵀ, Σ w_i v_iᵀ of the prefix and its buffer the last window - 1 tokens."""
  r, window, T = 5, 3, 13
  q, k, v = qkv(seed=23, T=T)
  slope = jnp.linspace(-1.0, 1.5, q.shape[2])
  kw = dict(relative_slope=slope, num_bases=r, window=window, chunk_size=4, implementation=impl)
  out, states = _decode_in_calls(orthogonal_memory_attention, q, k, v, [4, 11, 12], **kw)
  chex.assert_trees_all_close(out, _lavo_numpy(q, k, v, slope, r, window, True), **TOL)
  full = jit_with(orthogonal_memory_attention, causal=True, num_bases=r, window=window,
                  chunk_size=4, implementation=impl)(q, k, v, relative_slope=slope)
  chex.assert_trees_all_close(out, full, **TOL)
  chex.assert_trees_all_equal_shapes(*states)
  mech = aj.get_mechanism("orthogonal_memory_attention")
  floats = sum(x.size for x in jax.tree.leaves(states[0])) // q.shape[0]
  assert floats == mech.decode_state_floats(T, 4, 2, 8, 6, {"num_bases": r, "window": window})
  basis = orthogonal_basis(r, 8).astype(np.float64)
  for n, state in zip([4, 11, 12, 13], states, strict=True):
    kp, vp = np.asarray(k[:, :n], np.float64), np.asarray(v[:, :n], np.float64)
    w = kp @ basis.T
    chex.assert_trees_all_close(state["key_memory"], np.einsum("bskh,bskr->bkhr", kp, w), **TOL)
    chex.assert_trees_all_close(state["value_memory"], np.einsum("bskr,bskh->bkrh", w, vp),
                                **TOL)
    chex.assert_trees_all_close((state["keys"], state["values"]),
                                (k[:, n - window + 1:n], v[:, n - window + 1:n]), **TOL)


def test_lavo_recurrent_decoding_is_causal_only():
  q, k, v = qkv(seed=24, T=4)
  slope = jnp.zeros((4,))
  with pytest.raises(ValueError, match="orthogonal_memory_attention: recurrent decoding .* causal"):
    orthogonal_memory_attention(q, k, v, relative_slope=slope, return_final_state=True)
  with pytest.raises(ValueError, match=r"orthogonal_memory_attention: `initial_state` must be"):
    orthogonal_memory_attention(q, k, v, relative_slope=slope, causal=True, initial_state={},
                                return_final_state=True)
