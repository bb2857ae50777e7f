"""Relative-position terms on flex attention: a table of query·embedding products read by a score_mod.

Mechanisms that add `q_i · a_{r(i, j)}` to the logits, with `a` a learned table of relative-position
embeddings (Shaw et al.'s key term, Music Transformer's relative logits, DeBERTa's c2p), never build the
`[T, S, H]` embeddings: they compute the `[B, T, N, R]` table `q_i · a_r` once (O(T·R·H)) and a
score_mod gathers `table[b, i, n, r(i, j)]` for each visible pair, so flex's streaming paths serve them.

Positions are absolute: a query at row t sits at `q_offset + t` (`q_offset` an int or `[B]`), a key at
its slot index, so a decode step over a KV cache sees the distances of the full forward, and packed
documents see the distances they would alone (a distance within a document does not depend on where
the document starts).

  clipped_relative_index  `clip(j - i, -c, c) + c` in [0, 2c] (Shaw et al., arXiv:1803.02155)
  query_position          `q_offset + q_idx` on flex's broadcast index arrays
  relative_query_table    `[B, T, N, R]` float32 `q_i · table_r` (table `[R, H]` or per head)
  relative_key_score_mod  a score_mod adding `scale · table_qr[b, i, n, index(i, j)]`
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from attnjax.typing import ScoreMod

__all__ = ["clipped_relative_index", "query_position", "relative_query_table",
           "relative_key_score_mod"]


def query_position(q_offset, b, q_idx):
  """Absolute query positions `q_offset + q_idx` for flex's broadcast index arrays (`q_offset` an int
  or a `[B]` array indexed by the batch index `b`)."""
  off = jnp.asarray(q_offset, jnp.int32)
  return (off[b] if off.ndim == 1 else off) + q_idx


def clipped_relative_index(q_pos, kv_idx, max_distance: int):
  """`clip(kv_idx - q_pos, -c, c) + c`: the row of a `[2c+1, ...]` table of relative embeddings for
  key position `kv_idx` seen from query position `q_pos` (distances beyond c share the edge rows)."""
  return jnp.clip(kv_idx - q_pos, -max_distance, max_distance) + max_distance


def relative_query_table(q: jax.Array, table: jax.Array, *, heads_axis: Optional[int] = None
                         ) -> jax.Array:
  """`[B, T, N, R]` float32 products `q[b, t, n] · table[r]`.

  Args:
    q: `[B, T, N, H]` queries.
    table: `[R, H]` (shared by every head) or `[R, M, H]` with `heads_axis=1` (one row set per head
      group: M divides N, query head n reads group n // (N / M), as GQA reads key heads).
    heads_axis: None for a shared table, 1 for a per-group table.
  """
  qf = q.astype(jnp.float32)
  table = table.astype(jnp.float32)
  if heads_axis is None:
    return jnp.einsum("btnh,rh->btnr", qf, table)
  B, T, N, H = q.shape
  M = table.shape[1]
  qg = qf.reshape(B, T, M, N // M, H)
  return jnp.einsum("btmgh,rmh->btmgr", qg, table).reshape(B, T, N, -1)


def relative_key_score_mod(table_qr: jax.Array, index: Callable, *, q_offset, scale: float
                           ) -> ScoreMod:
  """A score_mod adding `scale · table_qr[b, i, n, index(q_pos, kv_idx)]`.

  `table_qr: [B, T, N, R]` (from `relative_query_table`), `index(q_pos, kv_idx)` the table row of a
  pair from the query's absolute position and the key slot (e.g. `clipped_relative_index`).
  """

  def score_mod(s, b, n, q_idx, kv_idx):
    # Indices broadcast as [B, ., ., T, .]: b batch, n query head, q_idx query row, kv_idx key slot.
    r = index(query_position(q_offset, b, q_idx), kv_idx)
    return s + scale * table_qr[b, q_idx, n, r]

  return score_mod
