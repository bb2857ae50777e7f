"""Disentangled attention (#163, DeBERTa): logits c2c + c2p + p2c over log-bucketed relative
positions, all scaled by 1/sqrt(3H). Checked against a float64 rewrite of the authors' code
(microsoft/DeBERTa: `make_log_bucket_position`, the c2p gather at clamp(δ + k) and the p2c gather at
clamp(-bucket(j - i) + k) then transposed), each term alone (zero position tables leave c2c; zero keys
leave c2p; zero queries leave p2c), the whole logit with GQA, causal masks and a query block over a
cache, DeBERTa v1's plain clipping, and the bucket function against a numpy rewrite of the authors'
`make_log_bucket_position`."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.positional import disentangled_attention
from attnjax.ops.positional.deberta import log_bucket_position
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, N, K, H, h = 2, 13, 4, 2, 8, 6
BUCKETS, MAX_POSITIONS = 4, 10          # k = 4: exact up to 2, log buckets beyond, clamped past 10


def _make_log_bucket_position(relative_pos, bucket_size, max_position):
  """DeBERTa's `da_utils.make_log_bucket_position` (numpy, float64)."""
  sign = np.sign(relative_pos)
  mid = bucket_size // 2
  abs_pos = np.where((relative_pos < mid) & (relative_pos > -mid), mid - 1, np.abs(relative_pos))
  with np.errstate(divide="ignore"):
    log_pos = np.ceil(np.log(abs_pos / mid) / np.log((max_position - 1) / mid) * (mid - 1)) + mid
  return np.where(abs_pos <= mid, relative_pos, log_pos * sign).astype(np.int64)


@pytest.mark.parametrize("buckets,max_positions", [(256, 512), (8, 16), (4, 10), (16, 100)])
def test_bucket_function_matches_the_authors(buckets, max_positions):
  d = np.arange(-3 * max_positions, 3 * max_positions + 1)
  want = _make_log_bucket_position(d, buckets, max_positions)
  got = np.asarray(log_bucket_position(d, position_buckets=buckets,
                                       max_relative_positions=max_positions))
  inside = np.abs(d) <= max_positions
  np.testing.assert_array_equal(got[inside], want[inside])
  # Beyond max_relative_positions the attention reads clamp(bucket + k, 0, 2k - 1): the edge rows.
  clamp = lambda x: np.clip(x + buckets, 0, 2 * buckets - 1)
  np.testing.assert_array_equal(clamp(got), clamp(want))


def _deberta_float64(q, k, v, pos_q, pos_k, *, causal=False, q_offset=0, buckets=BUCKETS,
                     max_positions=MAX_POSITIONS, log_buckets=True):
  """The authors' `disentangled_attention_bias` and scores per head, in float64."""
  q, k, v, pq, pk = (np.asarray(x, np.float64) for x in (q, k, v, pos_q, pos_k))
  G = q.shape[2] // k.shape[2]
  k, v, pk = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2), np.repeat(pk, G, axis=1)
  T_, S_, H_ = q.shape[1], k.shape[1], q.shape[3]
  i, j = q_offset + np.arange(T_), np.arange(S_)
  bucket = ((lambda x: _make_log_bucket_position(x, buckets, max_positions)) if log_buckets
            else (lambda x: x))
  scale = 1.0 / np.sqrt(3 * H_)                                   # scale_factor 1 + |{c2p, p2c}|
  c2c = np.einsum("btnh,bsnh->bnts", q, k)
  c2p_all = np.einsum("btnh,rnh->bntr", q, pk)                    # Q · K^r for every row
  c2p_pos = np.clip(bucket(i[:, None] - j[None]) + buckets, 0, 2 * buckets - 1)   # [T, S]
  c2p = np.take_along_axis(c2p_all, np.broadcast_to(c2p_pos, c2p_all.shape[:2] + c2p_pos.shape),
                           axis=-1)
  p2c_all = np.einsum("bsnh,rnh->bnsr", k, pq)                    # K · Q^r, rows are keys
  p2c_pos = np.clip(-bucket(j[:, None] - i[None]) + buckets, 0, 2 * buckets - 1)  # [S, T]
  p2c = np.take_along_axis(p2c_all, np.broadcast_to(p2c_pos, p2c_all.shape[:2] + p2c_pos.shape),
                           axis=-1).transpose(0, 1, 3, 2)         # gathered, then transposed
  logits = (c2c + c2p + p2c) * scale
  visible = j[None] <= i[:, None] if causal else None
  w = numpy_math.softmax(logits, where=visible)
  return np.einsum("bnts,bsnh->btnh", w, v)


def _positions(seed, rows=2 * BUCKETS):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((rows, N, H)), jnp.float32),
          jnp.asarray(rng.standard_normal((rows, K, H)), jnp.float32))


def _run(q, k, v, pos_q, pos_k, **kw):
  return inputs.jit_with(disentangled_attention, max_relative_positions=MAX_POSITIONS, **kw)(
      q, k, v, pos_q=pos_q, pos_k=pos_k)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_authors_code(implementation, causal):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=1)
  pos_q, pos_k = _positions(2)
  out = _run(q, k, v, pos_q, pos_k, causal=causal, implementation=implementation)
  want = _deberta_float64(q, k, v, pos_q, pos_k, causal=causal)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


@pytest.mark.parametrize("term", ["c2c", "c2p", "p2c"])
def test_each_term_alone(term):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=3)
  pos_q, pos_k = _positions(4)
  if term == "c2c":      # no position embeddings: softmax(Q·K / sqrt(3H))
    pos_q, pos_k = jnp.zeros_like(pos_q), jnp.zeros_like(pos_k)
  elif term == "c2p":    # zero keys: c2c = 0 and p2c = K·Q^r = 0
    k = jnp.zeros_like(k)
  else:                  # zero queries: c2c = 0 and c2p = Q·K^r = 0
    q = jnp.zeros_like(q)
  out = _run(q, k, v, pos_q, pos_k)
  np.testing.assert_allclose(np.asarray(out), _deberta_float64(q, k, v, pos_q, pos_k), **F32)
  if term != "c2c":      # the term is felt: attention is not uniform
    uniform = np.repeat(np.asarray(v), N // K, axis=2).mean(axis=1, keepdims=True)
    assert tolerances.rel_rms(out, np.broadcast_to(uniform, out.shape)) > tolerances.CHANGED_REL_RMS


def test_default_scale_is_one_over_sqrt_3h():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=5)
  pos_q, pos_k = _positions(6)
  out = _run(q, k, v, pos_q, pos_k)
  explicit = _run(q, k, v, pos_q, pos_k, scale=(3 * H) ** -0.5)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(explicit))
  other = _run(q, k, v, pos_q, pos_k, scale=H ** -0.5)
  assert tolerances.rel_rms(other, out) > tolerances.CHANGED_REL_RMS


def test_query_block_over_a_cache_uses_absolute_positions():
  q, k, v = inputs.qkv(B=B, T=5, S=12, N=N, K=K, H=H, h=h, seed=7)
  pos_q, pos_k = _positions(8)
  out = _run(q, k, v, pos_q, pos_k, causal=True, q_offset=7)
  want = _deberta_float64(q, k, v, pos_q, pos_k, causal=True, q_offset=7)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_plain_clipping_without_log_buckets():
  # DeBERTa v1: bucket(d) = d, clamped to the 2k rows (k = 3 here: distances beyond 3 share rows).
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=9)
  pos_q, pos_k = _positions(10, rows=6)
  out = _run(q, k, v, pos_q, pos_k, log_buckets=False)
  want = _deberta_float64(q, k, v, pos_q, pos_k, buckets=3, log_buckets=False)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_bad_input_is_a_clear_error():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h)
  pos_q, pos_k = _positions(0)
  with pytest.raises(ValueError, match=r"disentangled_attention.*pos_q.*\[2k, N, H\]"):
    disentangled_attention(q, k, v, pos_q=pos_q[:7], pos_k=pos_k)
  with pytest.raises(ValueError, match=r"disentangled_attention.*pos_k.*\[2k, K, H\]"):
    disentangled_attention(q, k, v, pos_q=pos_q, pos_k=pos_k[:, :1])
  with pytest.raises(ValueError, match="max_relative_positions"):
    disentangled_attention(q, k, v, pos_q=pos_q, pos_k=pos_k, max_relative_positions=3)
