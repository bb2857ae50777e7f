"""Low-rank multi-head attention pooling (#34, LAMA): M distributions over the states from
P^T(σ(U^T c) ∘ σ(V^T h_t)) against a global context vector, one pooled vector per head.

Checked against a float64 numpy rewrite (tanh projections, padding, a shared or per-example context),
and the paper's defining properties: without σ each head's score is a bilinear form c^T W_m h_t whose
W_m = U diag(P[:, m]) V^T has rank at most R (the low-rank factorization of the affinity), and the
parameter count is C·R + D·R + R·M (+ C) against M·C·D for full-rank heads, far fewer at the paper's
sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.pooling import low_rank_multihead_pooling, parameter_counts
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, S, D, C, R, M = 2, 10, 6, 5, 3, 4


def _arrays(seed, context_shape=(C,)):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  states = jax.random.normal(keys[0], (B, S, D))
  context = jax.random.normal(keys[1], context_shape)
  u = jax.random.normal(keys[2], (C, R)) * C ** -0.5
  v = jax.random.normal(keys[3], (D, R)) * D ** -0.5
  p = jax.random.normal(keys[4], (R, M)) * 2.0
  return states, context, u, v, p


def _lama_float64(states, context, u, v, p, mask, act=np.tanh):
  h, c, u, v, p = (np.asarray(x, np.float64) for x in (states, context, u, v, p))
  mask = np.asarray(mask)
  c = np.broadcast_to(c, (h.shape[0], c.shape[-1]))
  pooled = np.zeros((h.shape[0], p.shape[1], h.shape[2]))
  weights = np.zeros((h.shape[0], p.shape[1], h.shape[1]))
  for b in range(h.shape[0]):
    for t in range(h.shape[1]):
      if not mask[b, t]:
        continue
      f = p.T @ (act(u.T @ c[b]) * act(v.T @ h[b, t]))           # [M] scores of state t
      weights[b, :, t] = np.exp(f)
    weights[b] /= weights[b].sum(-1, keepdims=True)
    pooled[b] = weights[b] @ h[b]
  return pooled, weights


@pytest.mark.parametrize("context_shape", [(C,), (B, C)])
def test_equals_the_float64_formula(context_shape):
  states, context, u, v, p = _arrays(1, context_shape)
  mask = jnp.arange(S)[None, :] < jnp.array([[S], [7]])
  pooled, weights = jax.jit(lambda *a: low_rank_multihead_pooling(*a, mask=mask))(
      states, context, u, v, p)
  want_pooled, want_weights = _lama_float64(states, context, u, v, p, mask)
  np.testing.assert_allclose(np.asarray(weights), want_weights, **F32)
  np.testing.assert_allclose(np.asarray(pooled), want_pooled, **F32)


def test_each_head_is_a_rank_r_bilinear_affinity_against_the_context():
  states, context, u, v, p = _arrays(2)
  _, weights = low_rank_multihead_pooling(states, context, u, v, p, activation=None)
  w_heads = np.einsum("cr,rm,dr->mcd", *(np.asarray(x, np.float64) for x in (u, p, v)))
  scores = np.einsum("c,mcd,bsd->bms", np.asarray(context, np.float64), w_heads,
                     np.asarray(states, np.float64))
  want = np.exp(scores - scores.max(-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(weights), want / want.sum(-1, keepdims=True), **F32)
  singular = np.linalg.svd(w_heads, compute_uv=False)                        # [M, min(C, D)]
  assert np.all(singular[:, R:] < tolerances.RANK_SINGULAR_VALUE_MIN)      # rank <= R ...
  assert np.all(singular[:, R - 1] > tolerances.RANK_SINGULAR_VALUE_MIN)   # ... and R here
  assert not np.allclose(np.asarray(weights)[:, 0], np.asarray(weights)[:, 1])  # heads differ


def test_parameter_count_against_full_rank_heads():
  states, context, u, v, p = _arrays(3)
  counts = parameter_counts(C=C, D=D, R=R, M=M)
  assert counts["low_rank"] == sum(x.size for x in (context, u, v, p))
  assert counts["full_rank"] == M * C * D + C
  # Sentence-encoder sizes (a bidirectional GRU of 2 x 300 units), rank 64, 30 heads.
  big = parameter_counts(C=600, D=600, R=64, M=30)
  assert big == {"low_rank": 79_320, "full_rank": 10_800_600}         # the module docstring's example
  assert big["low_rank"] * 100 < big["full_rank"]


def test_padding_is_ignored_and_an_empty_sequence_gives_zeros():
  states, context, u, v, p = _arrays(4)
  mask = jnp.arange(S)[None, :] < jnp.array([[6], [0]])
  fn = jax.jit(lambda s: low_rank_multihead_pooling(s, context, u, v, p, mask=mask))
  pooled, weights = fn(states)
  garbage, _ = fn(states.at[:, 6:].set(1e4))
  np.testing.assert_allclose(np.asarray(garbage)[0], np.asarray(pooled)[0], **F32)
  np.testing.assert_array_equal(np.asarray(weights)[1], 0.0)
  np.testing.assert_array_equal(np.asarray(pooled)[1], 0.0)


def test_bad_input_is_a_clear_error():
  states, context, u, v, p = _arrays(0)
  with pytest.raises(ValueError, match=r"low_rank_multihead_pooling.*v.*\[D, R\]"):
    low_rank_multihead_pooling(states, context, u, v[:, :2], p)
  with pytest.raises(ValueError, match=r"context.*\[C\]"):
    low_rank_multihead_pooling(states, context[:3], u, v, p)
  with pytest.raises(ValueError, match=r"p.*\[R, M\]"):
    low_rank_multihead_pooling(states, context, u, v, p[:2])
