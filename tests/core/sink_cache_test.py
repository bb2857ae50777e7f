"""StreamingLLM's sink + window cache (arXiv:2309.17453): streaming a sequence through the fixed-size
cache (in chunks of any size, token by token, rows at different lengths) equals full-sequence
attention under the sinks + window mask (a float64 rewrite; un-rotated keys, so positions enter only
through the mask); the cache never grows; slots hold exactly the sinks and the last `window` tokens;
the within-cache positions are StreamingLLM's; past the sinks it is Live2Diff's warm-up + window
mask (#213)."""

import beartype
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from attnjax.core.sink_cache import SinkWindowCache
from attnjax.ops.decode import warmup_window_temporal_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
SINKS, WINDOW = 2, 4
N, K, H, HV = 4, 2, 8, 6


def _sink_window_float64(q, k, v, *, sinks, window):
  """Softmax attention of one row `[L, N, H]` over keys j <= p with j < sinks or p - j < window,
  float64, written as the paper's rule with an explicit loop over (p, j)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  L = q.shape[0]
  keep = np.zeros((L, L), bool)
  for p in range(L):
    for j in range(p + 1):
      keep[p, j] = j < sinks or p - j < window
  G = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
  s = np.einsum("pnh,jnh->npj", q, k) / np.sqrt(q.shape[-1])
  w = numpy_math.softmax(s, where=keep[None])
  return np.einsum("npj,jnh->pnh", w, v)


_extend = jax.jit(lambda cache, q, k, v, n: cache.extend(q, k, v, num_new=n))


def test_extend_in_chunks_with_rows_at_different_lengths_equals_the_masked_attention():
  # Row 0 streams 17 tokens in chunks 3, 1, 7, 1, 5; row 1 streams 13 in 2, 1, 5, 1, 4 (the rest
  # of each call is padding, garbage that must stay out).
  counts = np.array([[3, 1, 7, 1, 5], [2, 1, 5, 1, 4]])
  totals = counts.sum(1)
  q, k, v = inputs.qkv(B=2, T=int(totals.max()), N=N, K=K, H=H, h=HV, seed=1)
  q, k, v = (np.asarray(x) for x in (q, k, v))
  cache = SinkWindowCache.create(2, SINKS, WINDOW, K, H, HV)
  got = [[], []]
  for call in range(counts.shape[1]):
    T = int(counts[:, call].max())
    start = np.asarray(cache.lengths)
    chunk = []
    for x in (q, k, v):
      part = np.full((2, T) + x.shape[2:], 1e4, np.float32)
      for b in range(2):
        n = counts[b, call]
        part[b, :n] = x[b, start[b]:start[b] + n]
      chunk.append(part)
    out, cache = _extend(cache, *chunk, jnp.asarray(counts[:, call], jnp.int32))
    out = np.asarray(out)
    for b in range(2):
      got[b].append(out[b, :counts[b, call]])
      # Padding queries see nothing: zeros.
      np.testing.assert_array_equal(out[b, counts[b, call]:], 0.0)
  np.testing.assert_array_equal(np.asarray(cache.lengths), totals)
  for b in range(2):
    L = totals[b]
    want = _sink_window_float64(q[b, :L], k[b, :L], v[b, :L], sinks=SINKS, window=WINDOW)
    np.testing.assert_allclose(np.concatenate(got[b]), want, **F32)


@jax.jit
def _decode_token_by_token(q, k, v):
  """Append one token, then attend its query over what the cache holds; the cache after the last
  step."""
  cache = SinkWindowCache.create(q.shape[0], SINKS, WINDOW, K, H, HV)

  def step(cache, qkv_t):
    q_t, k_t, v_t = (x[:, None] for x in qkv_t)
    cache = cache.append(k_t, v_t)
    return cache, cache.attention(q_t)[:, 0]

  cache, outs = jax.lax.scan(step, cache, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v)))
  return jnp.moveaxis(outs, 0, 1), cache


def test_token_by_token_decode_equals_the_masked_attention_and_the_cache_never_grows():
  L = 23
  q, k, v = inputs.qkv(B=2, T=L, N=N, K=K, H=H, h=HV, seed=2)
  out, cache = _decode_token_by_token(q, k, v)
  for b in range(2):
    want = _sink_window_float64(q[b], k[b], v[b], sinks=SINKS, window=WINDOW)
    np.testing.assert_allclose(np.asarray(out[b]), want, **F32)
  # Fixed memory: sinks + window slots after 23 tokens, and after one more append of 50.
  assert cache.capacity == SINKS + WINDOW
  assert cache.k.shape == (2, SINKS + WINDOW, K, H) and cache.v.shape == (2, SINKS + WINDOW, K, HV)
  longer = jax.eval_shape(lambda c: c.append(jnp.zeros((2, 50, K, H)), jnp.zeros((2, 50, K, HV))),
                          cache)
  assert longer.k.shape == cache.k.shape and longer.v.shape == cache.v.shape


@pytest.mark.parametrize("length", [0, 1, 3, 6, 7, 13])
def test_slots_hold_the_sinks_and_the_last_window_tokens(length):
  # Each key is its own position (a [B, L, 1, 1] ramp), so the stored keys name the tokens kept.
  cache = SinkWindowCache.create(1, SINKS, WINDOW, 1, 1)
  ramp = jnp.arange(length, dtype=jnp.float32)[None, :, None, None]
  cache = cache.append(ramp, ramp)
  want = sorted(set(range(min(length, SINKS))) | set(range(max(SINKS, length - WINDOW), length)))
  pos = np.asarray(cache.slot_positions())[0]
  held = pos[pos >= 0]
  assert sorted(held.tolist()) == want
  np.testing.assert_array_equal(np.asarray(cache.k)[0, pos >= 0, 0, 0], held.astype(np.float32))
  # StreamingLLM's positions within the cache: each held token's rank by age.
  ranks = np.asarray(cache.cache_positions())[0]
  for slot, p in enumerate(pos):
    assert ranks[slot] == (want.index(p) if p >= 0 else -1)


def test_past_the_sinks_it_is_live2diffs_warmup_window_mask():
  # The same mask as #213 with warmup = sinks for every query past the sinks (Live2Diff's warm-up
  # frames also see each other both ways, StreamingLLM's sinks are causal).
  L = 15
  q, k, v = inputs.qkv(B=2, T=L, N=N, K=K, H=H, h=HV, seed=3)
  streamed, _ = _decode_token_by_token(q, k, v)
  live2diff = warmup_window_temporal_attention(q, k, v, warmup=SINKS, window=WINDOW)
  np.testing.assert_allclose(np.asarray(streamed)[:, SINKS:], np.asarray(live2diff)[:, SINKS:],
                             **F32)


def test_bad_arguments_name_the_method_and_the_argument():
  with pytest.raises(ValueError, match="SinkWindowCache.create: `window` must be an int >= 1"):
    SinkWindowCache.create(1, 2, 0, 1, 4)
  cache = SinkWindowCache.create(2, SINKS, WINDOW, K, H, HV)
  with pytest.raises(ValueError, match="SinkWindowCache.append.*k_new"):
    cache.append(jnp.zeros((2, 3, K, H + 1)), jnp.zeros((2, 3, K, HV)))
  with pytest.raises(ValueError, match="SinkWindowCache.append.*num_new"):
    cache.append(jnp.zeros((2, 3, K, H)), jnp.zeros((2, 3, K, HV)), num_new=jnp.ones((3,)))


def test_annotations_hold_under_jaxtyped():
  """The methods' jaxtyping annotations hold (GQA, h != H) and a key of another head dim fails the
  check before the body runs. Traced only."""
  checked = lambda fn: jaxtyping.jaxtyped(fn, typechecker=beartype.beartype)
  cache = SinkWindowCache.create(2, SINKS, WINDOW, K, H, HV)
  q, k, v = inputs.qkv(B=2, T=3, N=N, K=K, H=H, h=HV)
  out, new = jax.eval_shape(lambda c, *a: checked(SinkWindowCache.extend)(c, *a), cache, q, k, v)
  assert out.shape == (2, 3, N, HV) and new.k.shape == cache.k.shape
  out = jax.eval_shape(lambda c, q: checked(SinkWindowCache.attention)(c, q), cache, q[:, :1])
  assert out.shape == (2, 1, N, HV)
  pos = jax.eval_shape(lambda c: checked(SinkWindowCache.cache_positions)(c), cache)
  assert pos.shape == (2, SINKS + WINDOW)
  with pytest.raises(jaxtyping.TypeCheckError):
    jax.eval_shape(lambda c, *a: checked(SinkWindowCache.extend)(c, *a), cache, q, k[..., :H - 2], v)
