"""HiP (#84): each query block's key blocks are found by a tree search (2k chunks scored by their
centre key, keep k, halve, repeat until single blocks), then attended with one softmax.

Checked against an explicit-loop float64 rewrite of the search and of the attention over the kept
blocks (non-power-of-two lengths, GQA, query blocks of 1 and 3, causal and padded); the claim that a
budget covering every block is exact attention; and that under attention locality (a region of
high-scoring keys) the search descends to that region and keeps k of its blocks."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.sparse import hip_attention, hip_selection
from attnjax.ops.softmax import softmax_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)


def _search_float64(qu, k, span, *, bk, top_k, nb):
  """Kept blocks of one unit: `qu [qb, H]` queries, `k [S, H]`, `span` visible tokens."""
  n = -(-span // bk)
  chunks = [((j * n) // (2 * top_k), ((j + 1) * n) // (2 * top_k)) for j in range(2 * top_k)]

  def score(chunk):
    a, c = chunk[0] * bk, min(chunk[1] * bk, span)
    return -np.inf if c <= a else float(np.max(qu @ k[(a + c - 1) // 2]))

  while True:
    scored = [(score(ch), i, ch) for i, ch in enumerate(chunks)]
    # Highest score first, ties to the earlier chunk (lax.top_k's order).
    kept = [ch for s, _, ch in sorted(scored, key=lambda x: (-x[0], x[1]))[:top_k] if s > -np.inf]
    if all(c - a <= 1 for a, c in kept):
      return {a for a, c in kept}
    firsts = [(a, a + (c - a + 1) // 2) for a, c in kept]
    seconds = [(a + (c - a + 1) // 2, c) for a, c in kept]
    chunks = firsts + seconds


def _hip_float64(q, k, v, *, bk, top_k, qb, causal, kv_lengths):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  nb = -(-S // bk)
  vis = numpy_math.visible(B, T, S, causal=causal, kv_lengths=kv_lengths)[:, 0]
  out = np.zeros((B, T, N, v.shape[-1]))
  for b in range(B):
    for n in range(N):
      for u in range(-(-T // qb)):
        rows = list(range(u * qb, min(T, (u + 1) * qb)))
        span = int(kv_lengths[b]) if kv_lengths is not None else S
        if causal:
          span = min(span, rows[-1] + 1)
        kept = _search_float64(q[b, rows, n], k[b, :, n // G], span, bk=bk, top_k=top_k, nb=nb)
        in_kept = np.isin(np.arange(S) // bk, sorted(kept))
        for t in rows:
          keep = vis[b, t] & in_kept
          if keep.any():
            w = numpy_math.softmax(q[b, t, n] @ k[b, :, n // G].T / np.sqrt(H), where=keep)
            out[b, t, n] = np.where(keep, w, 0.0) @ v[b, :, n // G]
  return out


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("causal,q_block", [(True, 1), (False, 3)])
def test_matches_float64_rewrite(implementation, causal, q_block):
  q, k, v = inputs.qkv(B=2, T=21, S=21, N=4, K=2, H=8, h=6, seed=3)
  lengths = jnp.array([21, 15])
  fn = inputs.jit_with(hip_attention, causal=causal, block_size=2, top_k=2, q_block=q_block,
                       implementation=implementation)
  out = fn(q, k, v, kv_lengths=lengths)
  want = _hip_float64(q, k, v, bk=2, top_k=2, qb=q_block, causal=causal,
                      kv_lengths=np.asarray(lengths))
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_budget_covering_every_block_is_exact_attention():
  q, k, v = inputs.qkv(B=2, T=19, S=19, N=4, K=2, H=8, h=6, seed=5)
  lengths = jnp.array([19, 12])
  for causal in (False, True):
    out = inputs.jit_with(hip_attention, causal=causal, block_size=3, top_k=7, q_block=2)(
        q, k, v, kv_lengths=lengths)
    want = inputs.jit_with(softmax_attention, causal=causal)(q, k, v, kv_lengths=lengths)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), **F32)


def test_search_follows_attention_locality_to_a_planted_region():
  # Keys 24..29 equal 4x the query (a region of high scores, the locality HiP relies on) among 32;
  # blocks of 2, k = 2. Each level's chunk holding the region has a centre key inside it, so the
  # search descends to it and keeps 2 of its blocks 12, 13, 14, and nothing else.
  q, k, _ = inputs.qkv(B=1, T=1, S=32, N=1, K=1, H=8, h=4, seed=6)
  k = k.at[0, 24:30, 0].set(4.0 * q[0, 0, 0])
  sel = np.flatnonzero(np.asarray(inputs.jit_with(hip_selection, block_size=2, top_k=2)(q, k))[0, 0, 0])
  assert len(sel) == 2 and set(sel) <= {12, 13, 14}
