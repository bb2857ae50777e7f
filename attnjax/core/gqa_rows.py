"""The G = N / K query heads that share a key/value head, laid out as query rows of that kv head.

    q [B, T, N, H] (head n = kh · G + g)  <->  rows [B, T·G, K, H] (row t · G + g of kv head kh)

Attention over rows `[B, T·G, K, H]` against `k [B, S, K, H]` is multi-head attention with N = K, so
each key is read once per kv head rather than once per query head (FlashInfer's and FlashDecoding's
GQA decode layout); a mask over query positions applies to row r as to position r // G.
"""

from __future__ import annotations

import jax

__all__ = ["heads_to_rows", "rows_to_heads"]


def heads_to_rows(x: jax.Array, num_kv_heads: int) -> jax.Array:
  """`[B, T, N, d] -> [B, T·G, K, d]` with G = N / K (K = `num_kv_heads`)."""
  B, T, N, d = x.shape
  K = num_kv_heads
  return x.reshape(B, T, K, N // K, d).transpose(0, 1, 3, 2, 4).reshape(B, T * (N // K), K, d)


def rows_to_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """The inverse for an output `[B, T·G, K, d] -> [B, T, N, d]`, or an lse `[B, T·G, K] -> [B, T, N]`
  (N = `num_heads`)."""
  B, R, K = x.shape[:3]
  G = num_heads // K
  rest = x.shape[3:]
  y = x.reshape(B, R // G, G, K, *rest)
  return y.transpose(0, 1, 3, 2, *range(4, y.ndim)).reshape(B, R // G, num_heads, *rest)
