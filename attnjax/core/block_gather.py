"""Attention over per-query lists of key blocks, as dense tiles of the queries that chose each block.

When every query token picks its own few key blocks (MoBA, NSA's selected branch), the queries of a
flex tile rarely agree, so a tile-level `BlockMask` (the union of the tile's choices) visits nearly
every block and skips little. This path groups the (query, block) pairs by block instead, as MoBA's
efficient kernel does (it gathers, for each key block, the queries that selected it, runs dense
attention on them and merges the partial results by their log-sum-exp):

  pairs   (t, j) for every query t and each of its m listed blocks j (invalid entries dropped)
  tiles   the pairs sorted by block, each block's pairs padded to whole tiles of `tile_q` rows:
          at most ceil(T·m / tile_q) + nb tiles, each one block
  attend  per tile, one dense product of its gathered queries with its block's keys, masked by the
          call contract's `mask_mod`: per pair the max m_i, the sum l_i = Σ e^{s - m_i} and the
          unnormalized output o_i = Σ e^{s - m_i} v
  merge   per query, over its m pairs: o_t = Σ_i e^{m_i - M} o_i / Σ_i e^{m_i - M} l_i, M = max_i m_i
          (a query with no visible key gives zeros)

The work is O(T·m·block_size·H) in matmul tiles whatever the overlap of the queries' choices; the
scores take O(T·m·block_size) memory per head. Gradients are those of these array operations (the
gathers become scatter-adds). It computes exactly what `flex_attention` gives under the selection's
mask (`attnjax.core.sparse.attend_selected` uses it, and the tests tie the two).

Shapes: `q [B, T, N, H]`, `k [B, S, K, H]`, `v [B, S, K, h]`, `blocks` / `valid` `[B, Nm, T, m]`
(Nm in {1, N}) → `[B, T, N, h]` in q's dtype.
Paper: Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs", arXiv:2502.13189 (the
grouping of queries by selected block).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.typing import Bool, Int, Key, MaskMod, Output, Query, Value

# Each query head's (or each query's, broadcast over heads) listed key blocks and their validity.
BlockLists = Int[jax.Array, "B Nm T m"]
ListValid = Bool[jax.Array, "B Nm T m"]

__all__ = ["attend_block_lists", "block_lists", "tile_rows"]


def block_lists(selected, per_query: int):
  """A selection table `selected [..., nb]` (bool) → `(blocks, valid)` `[..., per_query]`: each row's
  selected block indices in increasing order, `valid` False past the row's count. A row with more
  than `per_query` selected blocks is a caller's error (its extra blocks would be dropped)."""
  nb = selected.shape[-1]
  m = min(int(per_query), nb)
  # Selected blocks rank first, lower indices before higher (top_k keeps the lower index on ties).
  _, idx = jax.lax.top_k(selected.astype(jnp.float32), m)
  blocks = jnp.sort(jnp.where(jnp.take_along_axis(selected, idx, axis=-1), idx, nb), axis=-1)
  valid = blocks < nb
  return jnp.where(valid, blocks, 0).astype(jnp.int32), valid


def tile_rows(pairs: int, S: int, block_size: int) -> int:
  """Rows per tile: the largest of 256, 128, ..., 8 whose padding (about half a tile per block)
  stays within an eighth of the `pairs` (256-row tiles are where XLA's CPU matmuls get fast)."""
  nb = -(-S // block_size)
  for rows in (256, 128, 64, 32, 16):
    if 4 * nb * rows <= pairs:
      return rows
  return 8


def attend_block_lists(q: Query, k: Key, v: Value, blocks: BlockLists, valid: ListValid, *,
                       block_size: int, mask_mod: Optional[MaskMod] = None,
                       scale: Optional[float] = None, tile_q: int = 256) -> Output:
  """Softmax attention of each query head over the keys of its listed blocks (module docstring),
  restricted to the pairs `mask_mod(b, n, q_idx, kv_idx)` keeps."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  nb = -(-S // block_size)
  m = blocks.shape[-1]
  blocks = jnp.broadcast_to(blocks, (B, N, T, m))
  valid = jnp.broadcast_to(valid, blocks.shape)
  scale = H ** -0.5 if scale is None else scale
  P = T * m
  nt = -(-P // tile_q) + nb

  def layout(bl, ok):
    """One head's tiles: the query of each slot `[nt, tq]`, whether it is used, each tile's block
    `[nt]`, and each (query, list entry)'s slot `[T, m]`."""
    j = jnp.where(ok, bl, nb).reshape(P)                              # nb: dropped pair
    t = jnp.repeat(jnp.arange(T, dtype=jnp.int32), m)
    order = jnp.argsort(j, stable=True)
    js, ts = j[order], t[order]
    counts = jnp.zeros((nb + 1,), jnp.int32).at[j].add(1)[:nb]
    tiles = -(-counts // tile_q)
    jc = jnp.minimum(js, nb - 1)
    slot = (jnp.cumsum(tiles) - tiles)[jc] * tile_q + jnp.arange(P) - (jnp.cumsum(counts) - counts)[jc]
    slot = jnp.where(js < nb, slot, nt * tile_q)                      # out of range: dropped
    q_idx = jnp.zeros((nt * tile_q,), jnp.int32).at[slot].set(ts, mode="drop")
    used = jnp.zeros((nt * tile_q,), bool).at[slot].set(True, mode="drop")
    tile_block = jnp.minimum(jnp.searchsorted(jnp.cumsum(tiles), jnp.arange(nt), side="right"),
                             nb - 1).astype(jnp.int32)
    pair_slot = jnp.zeros((P,), jnp.int32).at[order].set(jnp.where(js < nb, slot, 0))
    return q_idx.reshape(nt, tile_q), used.reshape(nt, tile_q), tile_block, pair_slot.reshape(T, m)

  q_idx, used, tile_block, pair_slot = jax.vmap(jax.vmap(layout))(blocks, valid)
  b_ = jnp.arange(B)[:, None, None, None]
  n_ = jnp.arange(N)[None, :, None, None]
  q32 = q.astype(jnp.float32)
  pad = ((0, 0), (0, nb * block_size - S), (0, 0), (0, 0))
  kb = jnp.pad(k, pad).astype(jnp.float32).reshape(B, nb, block_size, K, H)
  vb = jnp.pad(v, pad).astype(jnp.float32).reshape(B, nb, block_size, K, -1)
  kv_head = (jnp.arange(N) // G)[None, :]
  steps = (jnp.moveaxis(q_idx, 2, 0), jnp.moveaxis(used, 2, 0), jnp.moveaxis(tile_block, 2, 0))

  @jax.checkpoint
  def tile(args):
    """One tile of every head, its queries and block gathered here (not all tiles' at once: the
    scores and the gathered rows stay in cache, and the backward recomputes them, as flash
    attention does, instead of storing them)."""
    qi, us, tb = args                                                          # [B, N, tq], [B, N]
    qs = q32[b_[..., 0], qi, n_[..., 0]]                                        # [B, N, tq, H]
    ks = kb[b_[..., 0, 0], tb, :, kv_head]                                      # [B, N, bs, H]
    vs = vb[b_[..., 0, 0], tb, :, kv_head]
    s = jnp.einsum("bnqh,bnkh->bnqk", qs, ks) * scale                          # [B, N, tq, bs]
    kv_idx = tb[..., None, None] * block_size + jnp.arange(block_size)          # [B, N, 1, bs]
    keep = us[..., None] & (kv_idx < S)
    if mask_mod is not None:
      keep = keep & mask_mod(b_, n_, qi[..., None], kv_idx)
    s = jnp.where(keep, s, -jnp.inf)
    mx = jax.lax.stop_gradient(jnp.max(s, axis=-1))
    p = jnp.where(keep, jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0)[..., None]), 0.0)
    return mx, jnp.sum(p, axis=-1), jnp.einsum("bnqk,bnkh->bnqh", p, vs)

  mx, part_l, part_o = jax.lax.map(tile, steps, batch_size=max(1, 512 // block_size))
  flat = lambda x: jnp.moveaxis(x, 0, 2).reshape((B, N, nt * tile_q) + x.shape[4:])
  mx, part_l, part_o = flat(mx), flat(part_l), flat(part_o)
  # Each query's m partial states (a dropped entry read slot 0 and is masked by `valid`).
  take = lambda x: jnp.take_along_axis(x, pair_slot.reshape(B, N, P), axis=2).reshape(
      (B, N, T, m) + x.shape[3:])
  # The merge of `merge_attention_states`, on unnormalized states: normalizing each pair first to
  # call it costs a pass over [B, N, T, m, h] and layout copies (MoBA's forward at 16k: 0.8 -> 1.2 s).
  pm = jnp.where(valid, take(mx), -jnp.inf)                                   # [B, N, T, m]
  top = jnp.max(pm, axis=-1, keepdims=True)
  w = jnp.where(jnp.isfinite(pm), jnp.exp(pm - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  den = jnp.sum(w * take(part_l), axis=-1)
  po = jnp.take_along_axis(part_o, pair_slot.reshape(B, N, P)[..., None], axis=2).reshape(
      B, N, T, m, -1)
  out = jnp.einsum("bntm,bntmh->btnh", w, po)
  return (out / jnp.where(den > 0, den, 1.0).transpose(0, 2, 1)[..., None]).astype(q.dtype)
