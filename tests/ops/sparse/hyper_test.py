"""HyperAttention (#85): exact attention within sortLSH blocks plus a uniform column sample of the
rest, weighted by L / m; causal attention by the paper's recursion over halves.

Checked against a float64 rewrite of the algorithm (hash buckets, sorted blocks, the sampled residual
and the merge, the causal recursion) drawn with the same keys; without a key, and with one block
covering every key, it is exact attention; and the paper's estimate converges: the error against
exact attention, averaged over seeds, shrinks as the number of samples grows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.sparse import gray_code_order, hyper_attention
from attnjax.ops.softmax import softmax_attention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)


def _lse(x):
  m = np.max(x, -1, keepdims=True)
  if not np.isfinite(m).all():
    m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):  # an empty row: log 0 = -inf, as the contract's lse
    return (m + np.log(np.sum(np.exp(x - m), -1, keepdims=True)))[..., 0]


def _noncausal64(q, k, v, lengths, key, planes, *, bk, m):
  """Rows `(out [B,T,N,h], lse [B,T,N])` of the non-causal algorithm, per head, float64."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G, nb, r = N // K, -(-S // bk), planes.shape[1]
  order = gray_code_order(r)
  bucket = lambda x: order[((x @ planes) > 0).astype(int) @ (2 ** np.arange(r))]  # noqa: E731
  draw = np.asarray(jax.random.uniform(key, (B, N, m)), np.float64)
  out, lse = np.zeros((B, T, N, v.shape[-1])), np.full((B, T, N), -np.inf)
  for b in range(B):
    L = int(lengths[b])
    for n in range(N):
      kb = np.where(np.arange(S) < L, bucket(k[b, :, n // G]), 2 ** r)
      qo, ko = np.argsort(bucket(q[b, :, n]), kind="stable"), np.argsort(kb, kind="stable")
      samples = np.minimum((draw[b, n] * np.float32(L)).astype(int), max(L - 1, 0))
      for rank, t in enumerate(qo):
        g = rank * nb // T
        keys = [ko[s] for s in range(S) if s // bk == g and s < L]
        parts = []
        if keys:
          s = q[b, t, n] @ k[b, keys, n // G].T / np.sqrt(H)
          parts.append((s, v[b, keys, n // G], 0.0))
        if m and nb > 1 and L:
          rest = [ko[j] for j in samples if j // bk != g]
          if rest:
            s = q[b, t, n] @ k[b, rest, n // G].T / np.sqrt(H)
            parts.append((s, v[b, rest, n // G], np.log(L / m)))
        if parts:
          lses = [_lse(s) + w for s, _, w in parts]
          total = _lse(np.array(lses))
          out[b, t, n] = sum(np.exp(ls - total) * (np.exp(s - _lse(s)) @ vv)
                             for ls, (s, vv, _) in zip(lses, parts, strict=True))
          lse[b, t, n] = total
  return out, lse


def _causal64(q, k, v, lengths, key, planes, *, bk, m, min_len):
  T = q.shape[1]
  if T <= min_len:
    H = q.shape[-1]
    s = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, q.shape[2] // k.shape[2], 2)) / np.sqrt(H)
    vis = np.tril(np.ones((T, T), bool))[None, None] & (np.arange(T) < lengths[:, None])[:, None, None]
    s = np.where(vis, s, -np.inf)
    lse = _lse(s)
    w = np.where(vis, np.exp(s - np.where(np.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    out = np.einsum("bnts,bsnh->btnh", w, np.repeat(v, q.shape[2] // k.shape[2], 2))
    return out, np.moveaxis(lse, 1, 2)
  pad = T % 2
  if pad:
    q, k, v = (np.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (q, k, v))
  half = (T + pad) // 2
  first, rest = np.minimum(lengths, half), np.clip(lengths - half, 0, half)
  kw = dict(bk=bk, m=m)
  top = _causal64(q[:, :half], k[:, :half], v[:, :half], first, jax.random.fold_in(key, 0), planes,
                  min_len=min_len, **kw)
  right = _causal64(q[:, half:], k[:, half:], v[:, half:], rest, jax.random.fold_in(key, 1), planes,
                    min_len=min_len, **kw)
  left = _noncausal64(q[:, half:], k[:, :half], v[:, :half], first, jax.random.fold_in(key, 2),
                      planes, **kw)
  lse = np.logaddexp(right[1], left[1])
  safe = np.where(np.isfinite(lse), lse, 0.0)
  bottom = (np.exp(right[1] - safe)[..., None] * right[0] + np.exp(left[1] - safe)[..., None] * left[0])
  return (np.concatenate([top[0], bottom], 1)[:, :T], np.concatenate([top[1], lse], 1)[:, :T])


def _draws(rng, H, r):
  planes_key, key = jax.random.split(rng)
  return np.asarray(jax.random.normal(planes_key, (H, r)), np.float64), key


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_noncausal_matches_float64_rewrite(implementation):
  q, k, v = inputs.qkv(B=2, T=11, S=17, N=4, K=2, H=8, h=6, seed=2)
  lengths = jnp.array([17, 10])
  rng = jax.random.PRNGKey(3)
  fn = inputs.jit_with(hyper_attention, block_size=4, num_samples=5, num_projections=3,
                       min_seq_len=2, implementation=implementation)
  out = fn(q, k, v, kv_lengths=lengths, rng=rng)
  planes, key = _draws(rng, 8, 3)
  args = [np.asarray(x, np.float64) for x in (q, k, v)]
  want, _ = _noncausal64(*args, np.asarray(lengths), key, planes, bk=4, m=5)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_causal_recursion_matches_float64_rewrite():
  q, k, v = inputs.qkv(B=2, T=19, S=19, N=4, K=2, H=8, h=6, seed=4)
  lengths = jnp.array([19, 13])
  rng = jax.random.PRNGKey(5)
  fn = inputs.jit_with(hyper_attention, causal=True, block_size=2, num_samples=3,
                       num_projections=3, min_seq_len=4)
  out = fn(q, k, v, kv_lengths=lengths, rng=rng)
  planes, key = _draws(rng, 8, 3)
  args = [np.asarray(x, np.float64) for x in (q, k, v)]
  want, _ = _causal64(*args, np.asarray(lengths), key, planes, bk=2, m=3, min_len=4)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_exact_without_a_key_or_with_one_block():
  q, k, v = inputs.qkv(B=2, T=13, S=13, N=4, K=2, H=8, h=6, seed=6)
  want = inputs.jit_with(softmax_attention, causal=False)(q, k, v)
  no_key = inputs.jit_with(hyper_attention, min_seq_len=2)(q, k, v)
  one_block = inputs.jit_with(hyper_attention, block_size=13, num_samples=4, min_seq_len=2)(
      q, k, v, rng=jax.random.PRNGKey(0))
  for got in (no_key, one_block):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32)


def test_error_shrinks_as_samples_grow():
  # Scores scaled by 0.5 keep the rows spread out, so most mass is outside the LSH blocks and the
  # sampled residual carries it. 64x the samples: 1/√m predicts an 8x smaller error.
  q, k, v = inputs.qkv(B=2, T=24, S=24, N=2, K=2, H=8, h=6, seed=7)
  exact = inputs.jit_with(softmax_attention, scale=0.5)(q, k, v)
  errors = {}
  for m in (4, 256):
    fn = inputs.jit_with(hyper_attention, scale=0.5, block_size=4, num_samples=m,
                         num_projections=3, min_seq_len=2)
    errors[m] = np.mean([tolerances.rel_rms(fn(q, k, v, rng=jax.random.PRNGKey(s)), exact)
                         for s in range(8)])
  assert errors[4] / errors[256] > tolerances.MC_ERROR_RATIO_64X_MIN, errors
