"""Entity-aware self-attention (LUKE, #187): the query of token i toward key j is the projection of
the pair (type of i, type of j) among words and entities, q_i^{τ(i)→τ(j)} · k_j.

Checked against a float64 rewrite that picks the pair's query for every (i, j) (both
implementations, self and causal, GQA), and the defining properties: when the four pair queries are
equal LUKE is softmax attention; a word query toward word keys uses only Q_{w→w} (the layer's q),
so with only word keys the other pair projections do not touch word rows, and entity rows read
only Q_{e→w}.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import entity_aware_attention, softmax_attention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, N, K, H, h = 2, 11, 4, 2, 8, 6


def _types(seed, shape):
  return jax.random.bernoulli(jax.random.PRNGKey(seed), 0.4, shape).astype(jnp.int32)


def _pair_queries(seed):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, T, 3, N, H))


def _luke_float64(q, k, v, pair_queries, query_types, key_types, *, causal):
  """e_ij = scale · Q_{τ(i)→τ(j)}(x_i) · k_j, one pair at a time, then softmax, in float64."""
  q, k, v, pq = (np.asarray(x, np.float64) for x in (q, k, v, pair_queries))
  qt, kt = np.asarray(query_types), np.asarray(key_types)
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  # queries[a][b]: word (0) / entity (1) query toward a word / entity key; Q_{w→w} is q itself.
  queries = {(0, 0): q, (0, 1): pq[:, :, 0], (1, 0): pq[:, :, 1], (1, 1): pq[:, :, 2]}
  Bq, L = q.shape[:2]
  s = np.zeros((Bq, q.shape[2], L, k.shape[1]))
  for b in range(Bq):
    for i in range(L):
      for j in range(k.shape[1]):
        s[b, :, i, j] = np.sum(queries[qt[b, i], kt[b, j]][b, i] * k[b, j], -1)
  s = s * q.shape[-1] ** -0.5
  if causal:
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bnts,bsnh->btnh", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_papers_pairwise_queries(implementation, causal):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=1)
  pq, qt = _pair_queries(2), _types(3, (B, T))
  fn = inputs.jit_with(entity_aware_attention, causal=causal, implementation=implementation)
  # LUKE's self-attention: each token's type serves as query type and key type.
  out = fn(q, k, v, pair_queries=pq, query_types=qt, key_types=qt)
  np.testing.assert_allclose(np.asarray(out), _luke_float64(q, k, v, pq, qt, qt, causal=causal),
                             **F32)


def test_equal_pair_queries_are_softmax_attention():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=4)
  pq = jnp.broadcast_to(q[:, :, None], (B, T, 3, N, H))
  qt = _types(5, (B, T))
  out = entity_aware_attention(q, k, v, pair_queries=pq, query_types=qt, key_types=qt)
  np.testing.assert_allclose(np.asarray(out), np.asarray(softmax_attention(q, k, v)), **F32)


def test_word_pairs_use_only_the_word_to_word_query():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=6)
  qt = _types(7, (B, T))
  words = jnp.zeros((B, T), jnp.int32)                # every key a word
  fn = jax.jit(lambda pq: entity_aware_attention(q, k, v, pair_queries=pq, query_types=qt,
                                                 key_types=words))
  base = fn(_pair_queries(8))
  word_rows = np.asarray(qt == 0)
  # Move Q_{w→e} and Q_{e→e} (unused: no entity keys): nothing changes.
  moved = fn(_pair_queries(8).at[:, :, 0].set(3.0).at[:, :, 2].set(-3.0))
  np.testing.assert_array_equal(np.asarray(moved), np.asarray(base))
  # Move Q_{e→w}: entity rows change, word rows (Q_{w→w} = q only) are bitwise unchanged.
  moved = np.asarray(fn(_pair_queries(8).at[:, :, 1].multiply(-2.0)))
  np.testing.assert_array_equal(moved[word_rows], np.asarray(base)[word_rows])
  assert tolerances.rel_rms(moved[~word_rows], np.asarray(base)[~word_rows]) > \
      tolerances.CHANGED_REL_RMS


def test_cross_type_pairs_use_their_own_query():
  # A word query toward entity keys uses Q_{w→e}: with all queries words and all keys entities,
  # the output is softmax attention with Q_{w→e} as the query.
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=9)
  pq = _pair_queries(10)
  out = entity_aware_attention(q, k, v, pair_queries=pq, query_types=jnp.zeros((B, T), jnp.int32),
                               key_types=jnp.ones((B, T), jnp.int32))
  np.testing.assert_allclose(np.asarray(out), np.asarray(softmax_attention(pq[:, :, 0], k, v)),
                             **F32)


def test_bad_input_is_a_clear_error():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h)
  qt = jnp.zeros((B, T), jnp.int32)
  with pytest.raises(ValueError, match=r"entity_aware_attention.*pair_queries.*\[B, T, 3, N, H\]"):
    entity_aware_attention(q, k, v, pair_queries=jnp.zeros((B, T, 4, N, H)), query_types=qt,
                           key_types=qt)
  with pytest.raises(ValueError, match=r"entity_aware_attention.*key_types.*\[B, S\]"):
    entity_aware_attention(q, k, v, pair_queries=_pair_queries(0), query_types=qt,
                           key_types=qt[:, :5])
