"""KV cache and split-K decode attention: appends at per-row lengths, and decoding through the cache
equals full attention over the filled prefix (Lean Attention, arXiv:2405.10480)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import kvcache
from attnjax.core.kvcache import KVCache
from attnjax.ops.softmax import dot_product_attention
from tests import tolerances

_decode = jax.jit(kvcache.decode_attention,
                  static_argnames=("num_splits", "split_size", "causal", "implementation"))
_dot_product = jax.jit(dot_product_attention, static_argnames=("causal", "implementation"))


def _normal(seed, shape, dtype=jnp.float32):
  # numpy draws: no per-shape compilation of a random kernel.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def _full_attention(q, cache, *, causal=True):
  """Per row: `dot_product_attention` over the row's filled prefix only (no padding mask)."""
  T = q.shape[1]
  rows = []
  for b, length in enumerate(np.asarray(cache.lengths)):
    if length == 0:
      rows.append(jnp.zeros(q.shape[1:3] + cache.v.shape[3:], q.dtype))
      continue
    rows.append(_dot_product(
        q[b:b + 1], cache.k[b:b + 1, :length], cache.v[b:b + 1, :length], causal=causal,
        q_offset=int(length) - T, implementation="reference")[0])
  return jnp.stack(rows)


# --------------------------------------------------------------------------------------------------
# The cache


def test_create_shapes_and_pytree():
  cache = KVCache.create(2, 11, 3, 8, value_head_dim=5, dtype=jnp.bfloat16)
  chex.assert_shape(cache.k, (2, 11, 3, 8))
  chex.assert_shape(cache.v, (2, 11, 3, 5))
  chex.assert_shape(cache.lengths, (2,))
  assert cache.k.dtype == cache.v.dtype == jnp.bfloat16 and cache.lengths.dtype == jnp.int32
  assert cache.max_length == 11
  assert len(jax.tree_util.tree_leaves(cache)) == 3
  passed = jax.jit(lambda c: c)(cache)
  assert isinstance(passed, KVCache)
  chex.assert_trees_all_equal(passed, cache)


def test_append_writes_at_each_rows_length():
  B, Smax, K, H, h, T = 3, 8, 2, 4, 3, 2
  k0, v0 = _normal(0, (B, Smax, K, H)), _normal(1, (B, Smax, K, h))
  lengths = np.array([0, 3, 6], np.int32)
  cache = KVCache(k0, v0, jnp.asarray(lengths))
  k_new, v_new = _normal(2, (B, T, K, H)), _normal(3, (B, T, K, h))
  out = jax.jit(KVCache.append)(cache, k_new, v_new)
  want_k, want_v = np.array(k0), np.array(v0)
  for b, length in enumerate(lengths):
    want_k[b, length:length + T] = k_new[b]
    want_v[b, length:length + T] = v_new[b]
  chex.assert_trees_all_equal(out.k, jnp.asarray(want_k))
  chex.assert_trees_all_equal(out.v, jnp.asarray(want_v))
  chex.assert_trees_all_equal(out.lengths, jnp.asarray(lengths + T))


def test_append_casts_to_the_cache_dtype():
  cache = KVCache.create(1, 4, 1, 2, dtype=jnp.bfloat16).append(jnp.ones((1, 1, 1, 2)),
                                                                 jnp.ones((1, 1, 1, 2)))
  assert cache.k.dtype == cache.v.dtype == jnp.bfloat16


def test_append_overflow_moves_the_write_back():
  """The documented behaviour: a write past Smax lands in the last T slots; lengths keep growing."""
  cache = KVCache(jnp.zeros((1, 5, 1, 1)), jnp.zeros((1, 5, 1, 1)), jnp.array([4], jnp.int32))
  new = jnp.array([1.0, 2.0]).reshape(1, 2, 1, 1)
  out = cache.append(new, new)
  chex.assert_trees_all_equal(out.k[0, :, 0, 0], jnp.array([0.0, 0.0, 0.0, 1.0, 2.0]))
  assert int(out.lengths[0]) == 6


@pytest.mark.parametrize("k_shape,v_shape,match", [
    ((2, 1, 2, 5), (2, 1, 2, 3), "k_new"),        # wrong H
    ((2, 1, 1, 4), (2, 1, 1, 3), "k_new"),        # wrong K
    ((1, 1, 2, 4), (1, 1, 2, 3), "k_new"),        # wrong B
    ((2, 1, 2), (2, 1, 2, 3), "k_new"),           # wrong rank
    ((2, 2, 2, 4), (2, 1, 2, 3), "v_new"),        # T differs between k_new and v_new
    ((2, 1, 2, 4), (2, 1, 2, 4), "v_new"),        # wrong h
    ((2, 7, 2, 4), (2, 7, 2, 3), "exceed"),       # more tokens than the cache holds
])
def test_append_bad_shapes_raise(k_shape, v_shape, match):
  cache = KVCache.create(2, 6, 2, 4, value_head_dim=3)
  with pytest.raises(ValueError, match=match):
    cache.append(jnp.zeros(k_shape), jnp.zeros(v_shape))


# --------------------------------------------------------------------------------------------------
# decode_attention


# (B, Smax, K, N, H, h, T, lengths, split, causal)
_CASES = {
    "gqa_one_token_uneven_splits": (3, 37, 2, 4, 8, 8, 1, [37, 20, 1], dict(num_splits=4), True),
    "prefill_chunk_split_size": (2, 50, 2, 6, 8, 5, 4, [9, 50], dict(split_size=16), True),
    "mqa_more_splits_than_fit": (2, 13, 1, 3, 4, 4, 2, [13, 2], dict(num_splits=7), True),
    "default_split_noncausal": (2, 19, 1, 2, 8, 6, 2, [5, 19], {}, False),
    "split_of_one_key": (2, 9, 1, 2, 4, 4, 3, [9, 4], dict(split_size=1), True),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_decode_equals_full_attention(case):
  B, Smax, K, N, H, h, T, lengths, split, causal = _CASES[case]
  cache = KVCache(_normal(0, (B, Smax, K, H)), _normal(1, (B, Smax, K, h)),
                  jnp.array(lengths, jnp.int32))
  q = _normal(2, (B, T, N, H))
  out = _decode(q, cache, causal=causal, **split)
  chex.assert_shape(out, (B, T, N, h))
  chex.assert_trees_all_close(out, _full_attention(q, cache, causal=causal),
                              **tolerances.output(jnp.float32))


def _gqa_case(lengths, dtype=jnp.float32):
  """The shapes of the first case above (so the jitted decode is reused), with other lengths."""
  B, Smax, K, N, H, h, T, _, split, _ = _CASES["gqa_one_token_uneven_splits"]
  cache = KVCache(_normal(0, (B, Smax, K, H), dtype), _normal(1, (B, Smax, K, h), dtype),
                  jnp.array(lengths, jnp.int32))
  return _normal(2, (B, T, N, H), dtype), cache, split


def test_keys_past_the_length_are_ignored():
  q, cache, split = _gqa_case([5, 30, 0])
  lengths = np.asarray(cache.lengths)
  past = jnp.arange(cache.max_length)[None, :, None, None] >= lengths[:, None, None, None]
  garbage = KVCache(jnp.where(past, 1e4, cache.k), jnp.where(past, -1e4, cache.v), cache.lengths)
  chex.assert_trees_all_close(_decode(q, garbage, **split), _decode(q, cache, **split),
                              **tolerances.output(jnp.float32))


def test_empty_row_gives_zeros_and_finite_gradients():
  q, cache, split = _gqa_case([0, 6, 1])
  out = _decode(q, cache, **split)
  chex.assert_tree_all_finite(out)
  chex.assert_trees_all_equal(out[0], jnp.zeros_like(out[0]))
  chex.assert_trees_all_close(out, _full_attention(q, cache), **tolerances.output(jnp.float32))
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      kvcache.decode_attention(q, KVCache(k, v, cache.lengths), **split) ** 2),
      argnums=(0, 1, 2)))(q, cache.k, cache.v)
  chex.assert_tree_all_finite(grads)


def test_prefill_then_token_by_token_decode_equals_full_forward():
  """Row 0 starts empty, row 1 holds a 3-token prefix: per-row positions through the whole loop."""
  B, Smax, K, N, H, P, L = 2, 16, 1, 2, 8, 5, 12
  pre = 3
  q, k, v = _normal(0, (B, L, N, H)), _normal(1, (B, L, K, H)), _normal(2, (B, L, K, H))
  qp, kp, vp = _normal(3, (1, pre, N, H)), _normal(4, (1, pre, K, H)), _normal(5, (1, pre, K, H))
  cache = KVCache.create(B, Smax, K, H)
  cache = KVCache(cache.k.at[1, :pre].set(kp[0]), cache.v.at[1, :pre].set(vp[0]),
                  jnp.array([0, pre], jnp.int32))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(cache, q_t, k_t, v_t):
    cache = cache.append(k_t, v_t)
    return cache, kvcache.decode_attention(q_t, cache, num_splits=3)

  cache = jax.jit(KVCache.append)(cache, k[:, :P], v[:, :P])
  outs = [_decode(q[:, :P], cache, num_splits=3)]
  for t in range(P, L):
    cache, out = step(cache, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
    outs.append(out)
  got = jnp.concatenate(outs, axis=1)
  chex.assert_trees_all_equal(cache.lengths, jnp.array([L, pre + L], jnp.int32))

  want0 = _dot_product(q[:1], k[:1], v[:1], causal=True, implementation="reference")
  cat = lambda a, b: jnp.concatenate([a, b], axis=1)
  want1 = _dot_product(cat(qp, q[1:]), cat(kp, k[1:]), cat(vp, v[1:]), causal=True,
                       implementation="reference")[:, pre:]
  chex.assert_trees_all_close(got, jnp.concatenate([want0, want1]),
                              **tolerances.output(jnp.float32))


def test_jit_does_not_retrace_when_only_values_change():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def decode(q, cache):
    return kvcache.decode_attention(q, cache, num_splits=2)

  for seed, lengths in enumerate(([3, 7], [0, 9], [9, 1])):
    cache = KVCache(_normal(seed, (2, 9, 1, 4)), _normal(seed + 1, (2, 9, 1, 4)),
                    jnp.array(lengths, jnp.int32))
    decode(_normal(seed + 2, (2, 1, 2, 4)), cache)


def test_bf16_close_to_fp32():
  q, cache, split = _gqa_case([37, 20, 9])
  want = _decode(q, cache, **split)
  bf = lambda x: x.astype(jnp.bfloat16)
  got = _decode(bf(q), KVCache(bf(cache.k), bf(cache.v), cache.lengths), **split)
  assert got.dtype == jnp.bfloat16
  assert tolerances.rel_rms(got, want) < tolerances.BF16_VS_FP32_REL_RMS


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_splits=2, split_size=4), "not both"),
    (dict(num_splits=0), "num_splits"),
    (dict(split_size=0), "split_size"),
])
def test_decode_bad_split_arguments_raise(kwargs, match):
  cache = KVCache.create(1, 8, 1, 4)
  with pytest.raises(ValueError, match=match):
    kvcache.decode_attention(jnp.zeros((1, 1, 2, 4)), cache, **kwargs)


@pytest.mark.parametrize("q_shape", [(1, 1, 2, 5), (2, 1, 2, 4), (1, 1, 3, 4), (1, 2, 4)])
def test_decode_bad_query_shapes_raise(q_shape):
  cache = KVCache.create(1, 8, 2, 4)
  with pytest.raises(ValueError, match="decode_attention"):
    kvcache.decode_attention(jnp.zeros(q_shape), cache)
