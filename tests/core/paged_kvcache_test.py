"""Paged KV cache: after any sequence of ragged appends, frees and prefix shares, every row reads back
exactly its own tokens in order, pages are counted (no leak, no page held by two rows unless shared),
shared pages are copied before they are written, and an exhausted pool flags the row instead of
corrupting another one (vLLM's PagedAttention, arXiv:2309.06180)."""

import chex
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core.paged_attention import paged_attention
from attnjax.core.paged_kvcache import PagedKVCache
from tests import tolerances

B, P, PS, MAXP, K, H, HV, T = 3, 9, 3, 4, 2, 2, 1, 4

_append = jax.jit(lambda c, k, v, n: c.append(k, v, n))
_free = jax.jit(lambda c, rows: c.free(rows))
_share = jax.jit(lambda c, s, d, n: c.share_prefix(s, d, n))
# One decode query per row (N = 2 heads over the K = 2 kv heads), at each row's last position.
_Q = np.random.default_rng(0).standard_normal((B, 1, 2, H)).astype(np.float32)
# The keys hold token ids (up to ~10⁴): a small scale keeps the weights spread over the row.
_SCALE = 1e-4
_decode = jax.jit(lambda c: paged_attention(_Q, c.k_pages, c.v_pages, c.page_table, c.lengths,
                                            q_offset=c.lengths - 1, scale=_SCALE))


def _tokens(seed, n):
  """n distinct tokens: key `[n, K, H]` filled with its id, value `[n, K, h]` with -id."""
  ids = seed * 1000 + np.arange(n, dtype=np.float32) + 1
  return (np.broadcast_to(ids[:, None, None], (n, K, H)).copy(),
          np.broadcast_to(-ids[:, None, None], (n, K, HV)).copy())


def _check(cache, rows):
  """The cache holds exactly `rows` (a list of per-row key-id lists) and counts its pages."""
  cache = jax.device_get(cache)
  np.testing.assert_array_equal(cache.lengths, [len(r) for r in rows])
  for b, want in enumerate(rows):
    k, v = (np.asarray(x) for x in PagedKVCache.gather(cache, b))
    np.testing.assert_array_equal(k[:len(want), 0, 0], want)
    np.testing.assert_array_equal(v[:len(want), 0, 0], -np.asarray(want, np.float32))
  held = cache.page_table[cache.page_table >= 0]
  counts = np.bincount(held, minlength=P)
  np.testing.assert_array_equal(counts, cache.refcount)     # refcount = rows holding each page
  # Pages a row needs and nothing beyond.
  for b, r in enumerate(rows):
    assert np.sum(cache.page_table[b] >= 0) == -(-len(r) // PS)
  # Decoding over the pages equals softmax attention over the row's own tokens, in order.
  out = np.asarray(_decode(cache))
  for b, r in enumerate(rows):
    if not r:
      np.testing.assert_array_equal(out[b], 0.0)
      continue
    ids = np.asarray(r, np.float64)
    s = np.einsum("nh,s->ns", _Q[b, 0].astype(np.float64), ids) * _SCALE      # keys: id · 1
    w = np.exp(s - s.max(-1, keepdims=True))
    want = (w / w.sum(-1, keepdims=True)) @ -ids                                # values: -id
    np.testing.assert_allclose(out[b, 0, :, 0], want, **tolerances.OUTPUT[jnp.float32])


def _pages_demanded(cache, rows, counts):
  """Fresh pages an append needs: pages past each row's last one, plus a copy of a shared, partly
  filled last page that the row writes into."""
  total = 0
  for b, r in enumerate(rows):
    if counts[b] == 0:
      continue
    total += -(-(len(r) + counts[b]) // PS) - -(-len(r) // PS)
    if len(r) % PS and cache.refcount[cache.page_table[b, len(r) // PS]] > 1:
      total += 1
  return total


_OPS = st.lists(st.one_of(
    st.tuples(st.just("append"), st.lists(st.integers(0, T), min_size=B, max_size=B)),
    st.tuples(st.just("free"), st.integers(0, B - 1)),
    st.tuples(st.just("share"), st.integers(0, B - 1), st.integers(0, B - 1), st.integers(0, 8))),
    min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(_OPS)
def test_any_sequence_of_appends_frees_and_shares_keeps_every_row(ops):
  cache = PagedKVCache.create(B, P, PS, MAXP, K, H, HV)
  rows = [[] for _ in range(B)]
  seed = 0
  for op in ops:
    if op[0] == "append":
      counts = np.asarray(op[1], np.int32)
      seed += 1
      ks, vs = zip(*[_tokens(seed * 10 + b, T) for b in range(B)], strict=True)
      before = jax.device_get(cache)
      demanded = _pages_demanded(before, rows, counts)
      too_long = any(len(rows[b]) + counts[b] > MAXP * PS for b in range(B))
      cache = _append(cache, np.stack(ks), np.stack(vs), counts)
      over = np.asarray(cache.overflow)
      for b in range(B):
        if not over[b]:
          rows[b] += list(ks[b][:counts[b], 0, 0])
      if np.any(over):
        # Only an exhausted pool or a full row overflows.
        assert demanded > np.sum(before.refcount == 0) or too_long
        cache = _free(cache, over)
        rows = [[] if over[b] else r for b, r in enumerate(rows)]
    elif op[0] == "free":
      mask = np.arange(B) == op[1]
      cache = _free(cache, mask)
      rows[op[1]] = []
    else:
      _, src, dst, n = op
      if src == dst:
        continue
      cache = _free(cache, np.arange(B) == dst)
      cache = _share(cache, src, dst, n)
      rows[dst] = rows[src][:n]
    _check(cache, rows)


def test_shared_prefix_is_copied_on_write_and_each_row_keeps_its_suffix():
  cache = PagedKVCache.create(B, P, PS, MAXP, K, H, HV)
  k, v = _tokens(1, T)
  zeros_k, zeros_v = np.zeros_like(k), np.zeros_like(v)
  cache = _append(cache, np.stack([k, zeros_k, zeros_k]), np.stack([v, zeros_v, zeros_v]),
                  np.array([4, 0, 0]))                          # row 0: 4 tokens, pages 2 (4 = 3+1)
  cache = _share(cache, 0, 1, 4)
  cache = _share(cache, 0, 2, 3)                                # row 2 shares the full first page only
  assert int(cache.refcount[cache.page_table[0, 0]]) == 3
  assert int(cache.refcount[cache.page_table[0, 1]]) == 2
  pool_before = np.asarray(cache.k_pages)
  k1, v1 = _tokens(2, T)
  cache = _append(cache, np.stack([k1] * 3), np.stack([v1] * 3), np.array([1, 2, 1]))
  rows = [list(k[:4, 0, 0]) + list(k1[:1, 0, 0]), list(k[:4, 0, 0]) + list(k1[:2, 0, 0]),
          list(k[:3, 0, 0]) + list(k1[:1, 0, 0])]
  _check(cache, rows)
  # The first page is still one page for all three rows, untouched; the partly filled second page was
  # copied for both writers (rows 0 and 1), so the original is free again.
  first = int(cache.page_table[0, 0])
  assert (np.asarray(cache.page_table[:, 0]) == first).all()
  np.testing.assert_array_equal(np.asarray(cache.k_pages)[first], pool_before[first])
  assert cache.page_table[0, 1] != cache.page_table[1, 1]


def test_exhausted_pool_flags_the_row_and_leaves_the_others_intact():
  cache = PagedKVCache.create(2, 3, 2, 4, K, H, HV)
  k, v = _tokens(1, 4)
  cache = _append(cache, np.stack([k, k]), np.stack([v, v]), np.array([4, 0]))   # row 0: 2 pages
  k2, v2 = _tokens(2, 4)
  cache = _append(cache, np.stack([k2, k2]), np.stack([v2, v2]), np.array([0, 4]))  # needs 2, 1 free
  np.testing.assert_array_equal(np.asarray(cache.overflow), [False, True])
  np.testing.assert_array_equal(np.asarray(cache.lengths), [4, 0])
  assert int(cache.num_free_pages()) == 1
  np.testing.assert_array_equal(np.asarray(cache.gather(0)[0])[:4, 0, 0], k[:, 0, 0])


def test_create_and_append_reject_bad_input():
  with pytest.raises(ValueError, match="PagedKVCache.create.*page_size"):
    PagedKVCache.create(1, 4, 0, 2, 1, 8)
  cache = PagedKVCache.create(2, 4, 2, 2, 1, 8)
  with pytest.raises(ValueError, match="PagedKVCache.append.*k_new.*B, T, K, H"):
    cache.append(jnp.zeros((3, 1, 1, 8)), jnp.zeros((3, 1, 1, 8)))
  with pytest.raises(ValueError, match="PagedKVCache.append.*num_new"):
    cache.append(jnp.zeros((2, 1, 1, 8)), jnp.zeros((2, 1, 1, 8)), jnp.zeros((3,), jnp.int32))


def test_is_a_pytree_through_jit():
  cache = PagedKVCache.create(2, 4, 2, 2, 1, 8, dtype=jnp.bfloat16)
  assert len(jax.tree.leaves(cache)) == 6
  chex.assert_trees_all_equal(jax.jit(lambda c: c)(cache), cache)
