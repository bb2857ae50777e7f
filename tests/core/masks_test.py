"""The mask and score-mod library against hand-written numpy masks and numpy re-implementations."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import masks
from tests import tolerances

B, N, T, S = 3, 2, 13, 17


def dense(mask_mod, b=B, n=N, t=T, s=S):
  out = np.asarray(masks.evaluate_mask(mask_mod, b, n, t, s))
  chex.assert_shape(out, (b, n, t, s))
  return out


def grid(t=T, s=S):
  """Numpy (q, kv) index grids of shape [T, S]."""
  return np.arange(t)[:, None], np.arange(s)[None, :]


def expect(mask_ts_or_bts):
  """Broadcasts a `[T,S]` or `[B,T,S]` numpy mask to `[B, N, T, S]`."""
  m = np.asarray(mask_ts_or_bts, bool)
  if m.ndim == 2:
    m = m[None]
  return np.broadcast_to(m[:, None], (B, N, T, S))


def assert_mask(mask_mod, expected):
  np.testing.assert_array_equal(dense(mask_mod), expect(expected))


# --------------------------------------------------------------------------------------------------
# Masks


def test_full_mask():
  assert_mask(masks.full_mask, np.ones((T, S)))
  assert_mask(None, np.ones((T, S)))


@pytest.mark.parametrize("offset", [0, 4, -2])
def test_causal_int_offset(offset):
  q, kv = grid()
  assert_mask(masks.causal(offset), q + offset >= kv)


def test_causal_per_batch_offset():
  offsets = np.array([0, 3, 9])
  q, kv = grid()
  assert_mask(masks.causal(jnp.asarray(offsets)), [q + o >= kv for o in offsets])


@pytest.mark.parametrize("left,right", [(3, 0), (2, 5), (None, 1), (4, None), (None, None), (0, 0)])
def test_sliding_window(left, right):
  q, kv = grid()
  want = np.ones((T, S), bool)
  if left is not None:
    want &= kv >= q - left
  if right is not None:
    want &= kv <= q + right
  assert_mask(masks.sliding_window(left, right), want)


def test_sliding_window_offset_and_errors():
  q, kv = grid()
  offsets = np.array([0, 2, 5])
  want = [(kv >= q + o - 3) & (kv <= q + o) for o in offsets]
  assert_mask(masks.sliding_window(3, 0, offset=jnp.asarray(offsets)), want)
  with pytest.raises(ValueError, match="left"):
    masks.sliding_window(-1, 0)
  with pytest.raises(ValueError, match="right"):
    masks.sliding_window(2, -3)


def test_prefix_lm():
  q, kv = grid()
  assert_mask(masks.prefix_lm(5), (kv < 5) | (q >= kv))
  prefixes = np.array([0, 4, 20])
  assert_mask(masks.prefix_lm(jnp.asarray(prefixes)), [(kv < p) | (q >= kv) for p in prefixes])


def test_document_self_and_cross():
  rng = np.random.default_rng(0)
  q_seg = np.sort(rng.integers(0, 4, (B, T)), axis=1)
  kv_seg = np.sort(rng.integers(0, 4, (B, S)), axis=1)
  assert_mask(masks.document(jnp.asarray(q_seg), jnp.asarray(kv_seg)),
              q_seg[:, :, None] == kv_seg[:, None, :])
  self_seg = np.sort(rng.integers(0, 3, (B, T)), axis=1)
  np.testing.assert_array_equal(
      dense(masks.document(jnp.asarray(self_seg)), s=T),
      np.broadcast_to((self_seg[:, :, None] == self_seg[:, None, :])[:, None], (B, N, T, T)))


def test_padding():
  q, kv = grid()
  kv_len, q_len = np.array([17, 5, 0]), np.array([13, 2, 7])
  assert_mask(masks.padding(kv_lengths=jnp.asarray(kv_len)), [kv < n + 0 * q for n in kv_len])
  assert_mask(masks.padding(q_lengths=jnp.asarray(q_len)), [q < n + 0 * kv for n in q_len])
  assert_mask(masks.padding(jnp.asarray(kv_len), jnp.asarray(q_len)),
              [(kv < a) & (q < c) for a, c in zip(kv_len, q_len, strict=True)])
  assert_mask(masks.padding(), np.ones((T, S)))


@pytest.mark.parametrize("size,offset", [(4, 0), (5, 3), (1, 0), (100, 0)])
def test_chunked(size, offset):
  q, kv = grid()
  assert_mask(masks.chunked(size, offset=offset), (q + offset) // size == kv // size)


def test_chunked_rejects_bad_size():
  with pytest.raises(ValueError, match="chunk_size"):
    masks.chunked(0)


@pytest.mark.parametrize("dilation,offset", [(1, 0), (3, 0), (2, 1), (4, 7)])
def test_dilated(dilation, offset):
  q, kv = grid()
  assert_mask(masks.dilated(dilation, offset=offset), (q + offset - kv) % dilation == 0)
  with pytest.raises(ValueError, match="dilation"):
    masks.dilated(0)


def test_global_tokens_with_local_window():
  q, kv = grid()
  assert_mask(masks.global_tokens(2), (q < 2) | (kv < 2))
  local = masks.or_masks(masks.sliding_window(1, 1), masks.global_tokens(3))
  assert_mask(local, (np.abs(q - kv) <= 1) | (q < 3) | (kv < 3))


@pytest.mark.parametrize("sinks,window,offset", [(2, 3, 0), (1, 1, 0), (0, 4, 2), (3, 5, 4)])
def test_sink_window(sinks, window, offset):
  q, kv = grid()
  pos = q + offset
  want = (kv <= pos) & ((kv < sinks) | (kv > pos - window))
  assert_mask(masks.sink_window(sinks, window, offset=offset), want)


def test_from_array_broadcasting():
  rng = np.random.default_rng(1)
  full = rng.random((B, N, T, S)) > 0.5
  np.testing.assert_array_equal(dense(masks.from_array(jnp.asarray(full))), full)
  for shape in [(1, 1, T, S), (B, 1, T, S), (1, N, 1, S), (1, 1, 1, 1)]:
    m = rng.random(shape) > 0.3
    np.testing.assert_array_equal(dense(masks.from_array(jnp.asarray(m))),
                                  np.broadcast_to(m, (B, N, T, S)))
  with pytest.raises(ValueError, match="4 dims"):
    masks.from_array(jnp.ones((T, S), bool))


def test_combinators():
  q, kv = grid()
  c, w = q >= kv, np.abs(q - kv) <= 2
  causal, window = masks.causal(), masks.sliding_window(2, 2)
  assert_mask(masks.and_masks(causal, window), c & w)
  assert_mask(masks.or_masks(causal, window), c | w)
  assert_mask(masks.not_mask(causal), ~c)
  assert_mask(masks.and_masks(causal), c)
  assert_mask(masks.combine_masks(None, causal, None, window), c & w)
  assert masks.combine_masks(None, None) is None
  with pytest.raises(ValueError):
    masks.and_masks()
  with pytest.raises(ValueError):
    masks.or_masks()


def test_mask_mods_work_on_tile_shaped_indices():
  # Kernels call mods on other broadcastable layouts (e.g. [B, K, G, bq, bk]); the result must
  # agree.
  seg = jnp.asarray(np.sort(np.random.default_rng(2).integers(0, 3, (B, T)), axis=1))
  mod = masks.and_masks(masks.causal(), masks.document(seg), masks.sliding_window(4, 0))
  b = jnp.arange(B)[:, None, None, None, None]
  n = (jnp.arange(1)[:, None] * N + jnp.arange(N))[None, :, :, None, None]
  q = jnp.arange(T)[None, None, None, :, None]
  kv = jnp.arange(T)[None, None, None, None, :]
  five = jnp.broadcast_to(mod(b, n, q, kv), (B, 1, N, T, T)).reshape(B, N, T, T)
  np.testing.assert_array_equal(five, dense(mod, s=T))


# --------------------------------------------------------------------------------------------------
# Score mods


def _paper_alibi_slopes(n):
  """The ALiBi authors' reference (github.com/ofirpress/attention_with_linear_biases)."""

  def get_slopes_power_of_2(n):
    start = 2 ** (-2 ** -(math.log2(n) - 3))
    ratio = start
    return [start * ratio ** i for i in range(n)]

  if math.log2(n).is_integer():
    return get_slopes_power_of_2(n)
  closest = 2 ** math.floor(math.log2(n))
  return get_slopes_power_of_2(closest) + _paper_alibi_slopes(2 * closest)[0::2][:n - closest]


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 24, 40])
def test_alibi_slopes_match_paper(heads):
  slopes = masks.alibi_slopes(heads)
  chex.assert_shape(slopes, (heads,))
  np.testing.assert_allclose(slopes, _paper_alibi_slopes(heads),
                             **tolerances.ELEMENTWISE[jnp.float32])


def test_alibi_slopes_values():
  np.testing.assert_allclose(masks.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)],
                             **tolerances.EXACT_VALUES[jnp.float32])
  # 12 heads: the 8 slopes of 8 heads then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 (odd slopes of 16 heads).
  want = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(i + 0.5) for i in range(4)]
  np.testing.assert_allclose(masks.alibi_slopes(12), want, **tolerances.ELEMENTWISE[jnp.float32])
  with pytest.raises(ValueError):
    masks.alibi_slopes(0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_alibi_score_mod(symmetric):
  slopes = masks.alibi_slopes(N)
  offsets = np.array([0, 2, 5])
  mod = masks.alibi(slopes, symmetric=symmetric, offset=jnp.asarray(offsets))
  score = np.random.default_rng(3).normal(size=(B, N, T, S)).astype(np.float32)
  out = mod(jnp.asarray(score), *masks.index_grid((B, N, T, S)))
  q, kv = grid()
  dist = (q[None] + offsets[:, None, None] - kv[None])[:, None]
  dist = np.abs(dist) if symmetric else dist
  chex.assert_trees_all_close(out, score - slopes[None, :, None, None] * dist,
                              **tolerances.output(jnp.float32))


def test_softcap_bound_and_values():
  score = jnp.asarray(np.linspace(-1e4, 1e4, 101, dtype=np.float32))
  out = masks.softcap(30.0)(score, 0, 0, 0, 0)
  assert bool(jnp.all(jnp.abs(out) <= 30.0))
  assert bool(jnp.all(jnp.diff(out) >= 0))
  small = jnp.asarray([-0.3, 0.0, 0.2], jnp.float32)
  chex.assert_trees_all_close(masks.softcap(30.0)(small, 0, 0, 0, 0), 30 * np.tanh(small / 30),
                              **tolerances.output(jnp.float32))
  with pytest.raises(ValueError, match="cap"):
    masks.softcap(0.0)


def test_additive_bias():
  rng = np.random.default_rng(4)
  score = rng.normal(size=(B, N, T, S)).astype(np.float32)
  for shape in [(B, N, T, S), (1, N, T, S), (B, 1, 1, S)]:
    bias = rng.normal(size=shape).astype(np.float32)
    out = masks.additive_bias(jnp.asarray(bias))(jnp.asarray(score),
                                                 *masks.index_grid((B, N, T, S)))
    chex.assert_trees_all_close(out, score + bias, **tolerances.output(jnp.float32))
  with pytest.raises(ValueError, match="4 dims"):
    masks.additive_bias(jnp.ones((T, S)))


def _t5_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
  """T5's `_relative_position_bucket` (mesh_tensorflow / HF transformers), in numpy, float32 log as
  upstream."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int64) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # Upstream takes log(0) = -inf where the small branch is chosen anyway; use 1 there to stay
  # finite.
  n_large = np.where(is_small, 1, n).astype(np.float32)
  val_if_large = max_exact + (
      np.log(n_large / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
      * np.float32(num_buckets - max_exact)).astype(np.int64)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (8, 20)])
def test_t5_buckets(bidirectional, num_buckets, max_distance):
  rel = np.arange(-400, 401)
  got = masks.relative_position_bucket(jnp.asarray(rel, jnp.int32), bidirectional=bidirectional,
                                       num_buckets=num_buckets, max_distance=max_distance)
  want = _t5_bucket(rel, bidirectional, num_buckets, max_distance)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert np.asarray(got).min() >= 0 and np.asarray(got).max() < num_buckets


def test_t5_bucket_known_values():
  # Bidirectional, 32 buckets, max_distance 128: 0..7 exact, keys before the query use buckets
  # 0..15, keys after it 16..31; distance >= 128 saturates.
  rel = jnp.asarray([0, -1, -7, -8, -200, 1, 7, 200], jnp.int32)
  got = np.asarray(masks.relative_position_bucket(rel))
  np.testing.assert_array_equal(got, [0, 1, 7, 8, 15, 17, 23, 31])


def test_relative_position_bias():
  num_buckets = 32
  table = np.random.default_rng(5).normal(size=(num_buckets, N)).astype(np.float32)
  for bidirectional in (True, False):
    mod = masks.relative_position_bias(jnp.asarray(table), bidirectional=bidirectional,
                                       max_distance=40)
    out = mod(jnp.zeros((B, N, T, S)), *masks.index_grid((B, N, T, S)))
    q, kv = grid()
    bucket = _t5_bucket(kv - q, bidirectional, num_buckets, 40)
    want = np.broadcast_to(np.moveaxis(table[bucket], -1, 0)[None], (B, N, T, S))
    chex.assert_trees_all_close(out, want, **tolerances.output(jnp.float32))


def test_score_mod_gradients_reach_captured_arrays():
  table = jnp.ones((8, N))
  grid_ = masks.index_grid((1, N, T, S))
  g = jax.grad(lambda t: jnp.sum(
      masks.relative_position_bias(t, max_distance=16)(jnp.zeros((1, N, T, S)), *grid_)))(table)
  # Every (q, kv) pair contributes one count to its bucket, per head.
  assert float(jnp.sum(g)) == N * T * S
  slopes = jnp.ones((N,))
  gs = jax.grad(lambda s: jnp.sum(masks.alibi(s)(jnp.zeros((1, N, T, S)), *grid_)))(slopes)
  q, kv = grid()
  chex.assert_trees_all_close(gs, -np.full(N, np.sum(q - kv), np.float32),
                              **tolerances.output(jnp.float32))


def test_compose_score_mods():
  assert masks.compose_score_mods(None, None) is None
  cap = masks.softcap(2.0)
  assert masks.compose_score_mods(None, cap) is cap
  bias = masks.additive_bias(jnp.full((1, 1, 1, 1), 5.0))
  score = jnp.asarray([0.5, -1.0])
  composed = masks.compose_score_mods(bias, cap)
  chex.assert_trees_all_close(composed(score, 0, 0, 0, 0), 2.0 * jnp.tanh((score + 5.0) / 2.0),
                              **tolerances.output(jnp.float32))
