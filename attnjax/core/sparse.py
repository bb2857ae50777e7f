"""Data-dependent block sparsity: choose key blocks per query from pooled scores, and attend to them.

The selection mechanisms (MoBA, NSA's selected branch, SeerAttention, FlexPrefill, HiP, ...) share one
pipeline; each paper differs only in how it scores blocks and which it keeps:

  pool_blocks        k `[B, S, K, H]` → block summaries `[B, nb, K, H]` (mean or max over each block's
                     real tokens; `kv_lengths` padding excluded)
  block_scores       queries (per token, or mean-pooled over `q_block` tokens) against block summaries:
                     `[B, N, U, nb]` float32 (U = ceil(T / q_block) query units); `share_gqa` sums each
                     GQA group's scores so the group selects one set (NSA)
  candidate_blocks   bool `[B, 1, U, nb]`: the blocks a unit may select (causal: not past its last query;
                     padding: not wholly past `kv_lengths`)
  top_k_blocks       bool `[B, N, U, nb]`: the `top_k` highest-scoring candidates, plus `always` (a
                     unit's own block, the first block), and-ed with the candidates
  selection_mask     the selection as a `mask_mod` (and-ed with the call contract's) and a traced
                     `BlockMask` whose tiles are exactly those some unit of the tile selected, so
                     `flex_attention`'s `xla` path visits only selected tiles; built from the selection
                     table in O(T · nb), never from a dense `[T, S]` mask
  select_blocks      all of the above: `(block_mask, mask_mod, selected)` for MoBA-style top-k
  attend_selected    attention over a selection table under the call contract (the last step of
                     every selection mechanism)
  gather_tokens / token_top_k   the decode path: the `top_k` keys of each query by a score
                     `[B, N, T, S]`, gathered, and attention over them (exact when top_k = S)

Selecting every candidate gives exactly the contract's full attention (the mask is then the contract
mask). Selection itself is not differentiable (a top-k); gradients flow through the attention over
the selected keys, and through whatever scores a paper trains by another path (gates, distillation).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from attnjax.core import block_gather
from attnjax.core import block_mask as bm
from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import flex

__all__ = ["pool_blocks", "block_scores", "candidate_blocks", "top_k_blocks", "selection_mask",
           "select_blocks", "attend_selected", "token_top_k", "gather_tokens", "num_blocks",
           "own_and_first", "ALWAYS", "GATHERED"]

ALWAYS = ("own", "first")
# The `implementation` of `attend_selected` that gathers each block's queries into tiles.
GATHERED = "gathered"
POOLS = ("mean", "max")


def num_blocks(length: int, block_size: int) -> int:
  """Blocks of `block_size` that cover `length` tokens (the last may be partial)."""
  return -(-length // block_size)


def pool_blocks(x, block_size: int, *, pool: str = "mean", lengths=None):
  """`x [B, L, K, H]` → `[B, nb, K, H]` float32: the mean (or max) of each block of `block_size`
  tokens over its tokens below `lengths [B]` (all when None). A block with no such token gives 0."""
  if pool not in POOLS:
    raise ValueError(f"pool_blocks: `pool` must be one of {POOLS}, got {pool!r}")
  B, L = x.shape[:2]
  nb = num_blocks(L, block_size)
  valid = contract.valid_slots(B, L, lengths)
  pad = nb * block_size - L
  xb = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
  vb = jnp.pad(valid, ((0, 0), (0, pad)))
  xb = xb.reshape((B, nb, block_size) + x.shape[2:])
  vb = vb.reshape(B, nb, block_size)[..., None, None]
  count = jnp.sum(vb, axis=2)
  if pool == "mean":
    return jnp.sum(jnp.where(vb, xb, 0.0), axis=2) / jnp.maximum(count, 1)
  top = jnp.max(jnp.where(vb, xb, -jnp.inf), axis=2)
  return jnp.where(count > 0, top, 0.0)


def block_scores(q, k_blocks, *, q_block: int = 1, scale: Optional[float] = None,
                 share_gqa: bool = False, q_lengths=None):
  """Scores of query units against block summaries: `q [B, T, N, H]`, `k_blocks [B, nb, K, H]` →
  float32 `[B, N, U, nb]` (query head n against key head n // (N/K); U = ceil(T / q_block), each unit
  the mean of its queries). `share_gqa`: every head of a group gets the group's summed score."""
  B, T, N, H = q.shape
  K = k_blocks.shape[2]
  qu = pool_blocks(q, q_block, lengths=q_lengths) if q_block > 1 else q.astype(jnp.float32)
  scale = H ** -0.5 if scale is None else scale
  s = jnp.einsum("bukgh,bjkh->bkguj", qu.reshape(B, -1, K, N // K, H),
                 k_blocks.astype(jnp.float32)) * scale
  if share_gqa:
    s = jnp.broadcast_to(jnp.sum(s, axis=2, keepdims=True), s.shape)
  return s.reshape(B, N, s.shape[3], s.shape[4])


def _unit_positions(B: int, T: int, q_block: int, q_offset):
  """(first, last) absolute query position of each unit `[B, U]`."""
  pos = contract.query_positions(B, T, q_offset)                           # [B, T]
  U = num_blocks(T, q_block)
  pad = U * q_block - T
  first = jnp.pad(pos, ((0, 0), (0, pad)), mode="edge").reshape(B, U, q_block)
  return first[..., 0], first[..., -1]


def candidate_blocks(*, B: int, T: int, S: int, q_block: int, block_size: int, causal: bool = False,
                     q_offset=0, kv_lengths=None):
  """bool `[B, 1, U, nb]`: the key blocks a query unit may select: with `causal`, blocks that start
  at or before the unit's last query; with `kv_lengths`, blocks that start below the length."""
  nb = num_blocks(S, block_size)
  start = jnp.arange(nb) * block_size
  ok = jnp.ones((B, num_blocks(T, q_block), nb), bool)
  if causal:
    _, last = _unit_positions(B, T, q_block, q_offset)
    ok = ok & (start[None, None, :] <= last[..., None])
  if kv_lengths is not None:
    ok = ok & (start[None, None, :] < jnp.asarray(kv_lengths)[:, None, None])
  return ok[:, None]


def top_k_blocks(scores, top_k: int, *, candidates=None, always=None):
  """bool `[B, N, U, nb]`: for each unit, the `top_k` highest `scores` among `candidates`, or-ed with
  `always` (blocks kept whatever their score), and-ed with `candidates`. Ties go to lower indices."""
  if not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"top_k_blocks: `top_k` must be an int >= 0, got {top_k!r}")
  nb = scores.shape[-1]
  candidates = jnp.ones(scores.shape, bool) if candidates is None else candidates
  candidates = jnp.broadcast_to(candidates, scores.shape)
  chosen = jnp.zeros(scores.shape, bool)
  if top_k:
    ranked = jnp.where(candidates, jax.lax.stop_gradient(scores), -jnp.inf)
    _, idx = jax.lax.top_k(ranked, min(top_k, nb))
    chosen = jnp.any(idx[..., :, None] == jnp.arange(nb), axis=-2)
  if always is not None:
    chosen = chosen | always
  return chosen & candidates


def own_and_first(*, B: int, T: int, S: int, q_block: int, block_size: int, q_offset=0,
                  include: Sequence[str] = ("own",)):
  """bool `[B, 1, U, nb]`: each unit's own block (the blocks its queries' positions fall in, for
  self-attention) and/or the first block (attention sinks), as `include` names them."""
  bad = set(include) - set(ALWAYS)
  if bad:
    raise ValueError(f"always_include: unknown entries {sorted(bad)}; use {ALWAYS}")
  nb = num_blocks(S, block_size)
  blocks = jnp.arange(nb)[None, None, :]
  keep = jnp.zeros((B, num_blocks(T, q_block), nb), bool)
  if "own" in include:
    first, last = _unit_positions(B, T, q_block, q_offset)
    keep = keep | ((blocks >= (first // block_size)[..., None])
                   & (blocks <= (last // block_size)[..., None]))
  if "first" in include:
    keep = keep | (blocks == 0)
  return keep[:, None]


def selection_mask(selected, *, T: int, S: int, q_block: int, block_size: int, base_mask=None,
                   tile_q: Optional[int] = None):
  """`(block_mask, mask_mod)` for a selection `selected [B, Nm, U, nb]` (Nm in {1, N}).

  `mask_mod(b, n, q_idx, kv_idx)` keeps a pair when the query's unit selected the key's block and
  `base_mask` (the call contract's mask_mod, or None) holds. The traced `BlockMask` has tiles of
  `tile_q` queries (a multiple of `q_block`; default: the multiple nearest 64) by `block_size` keys;
  a tile is visited (partial) when any unit in it selected that block."""
  B, Nm, U, nb = selected.shape
  if tile_q is None:
    tile_q = q_block * max(1, 64 // q_block)
  if tile_q % q_block:
    raise ValueError(f"selection_mask: `tile_q` ({tile_q}) must be a multiple of q_block ({q_block})")
  per_tile = tile_q // q_block
  nq = num_blocks(T, tile_q)
  padded = jnp.pad(selected, ((0, 0), (0, 0), (0, nq * per_tile - U), (0, 0)))
  visit = jnp.any(padded.reshape(B, Nm, nq, per_tile, nb), axis=3)
  classes = jnp.where(visit, bm.PARTIAL, bm.EMPTY).astype(jnp.int32)

  def mask_mod(b, n, q_idx, kv_idx):
    keep = selected[b, 0 if Nm == 1 else n, q_idx // q_block, kv_idx // block_size]
    return keep if base_mask is None else keep & base_mask(b, n, q_idx, kv_idx)

  block_mask = bm.BlockMask.from_classes(classes, seq_lengths=(T, S), block_size=(tile_q, block_size),
                                         mask_mod=mask_mod, varies=(True, Nm > 1))
  return block_mask, mask_mod


def attend_selected(op: str, q, k, v, selected, *, q_block: int, block_size: int, causal: bool,
                    q_offset=0, kv_lengths=None, segment_ids=None, scale: Optional[float] = None,
                    implementation: Optional[str] = None, per_query: Optional[int] = None):
  """Attention of each query over the key blocks its unit selected (`selected [B, Nm, U, nb]`), under
  the call contract. `[B, T, N, h]` in q's dtype.

  Two forms of one computation: the selection's traced `BlockMask` (`selection_mask`) on
  `flex_attention` (`implementation` "xla" / "reference": a tile is visited when any of its queries
  chose the block), and, when each query token chooses its own blocks (`q_block == 1`) at most
  `per_query` of them, `block_gather.attend_block_lists` (`implementation` "gathered", the default
  then: the queries that chose a block form its tiles, so the work is T·per_query blocks however
  little the queries of a tile agree)."""
  B, T, S = q.shape[0], q.shape[1], k.shape[1]
  base = contract.contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                                segment_ids=segment_ids, kv_lengths=kv_lengths, op=op)
  gathered = per_query is not None and q_block == 1
  if implementation == GATHERED and not gathered:
    raise ValueError(f"{op}: implementation {GATHERED!r} needs one selection per query token and "
                     "`per_query` (the most blocks a query selects)")
  if gathered and implementation in (None, GATHERED):
    blocks, valid = block_gather.block_lists(selected, per_query)
    return block_gather.attend_block_lists(q, k, v, blocks, valid, block_size=block_size,
                                           mask_mod=base, scale=scale,
                                           tile_q=block_gather.tile_rows(T * per_query, S, block_size))
  block_mask, _ = selection_mask(selected, T=T, S=S, q_block=q_block, block_size=block_size,
                                 base_mask=base)
  return flex.flex_attention(q, k, v, block_mask=block_mask, scale=scale,
                             implementation=implementation)


def select_blocks(q, k, *, block_size: int, top_k: Optional[int] = None,
                  threshold: Optional[float] = None, pool: str = "mean", q_block: int = 1,
                  causal: bool = False, q_offset=0, kv_lengths=None, segment_ids=None,
                  always_include: Sequence[str] = ("own",), share_gqa: bool = False,
                  scale: Optional[float] = None, op: str = "select_blocks", tile_q=None):
  """Top-k (and/or threshold) block selection by pooled scores: `(block_mask, mask_mod, selected)`.

  Units of `q_block` queries (1: each query token chooses, as MoBA and NSA) score each key block by
  `scale · q_u · pool(k_block)`; a unit keeps its `top_k` best candidate blocks (causal: none past
  its last query), those scoring at least `threshold`, and the `always_include` blocks ("own",
  "first"). `mask_mod` ands the selection with the call contract (causal, segments, lengths), and
  `block_mask` visits only selected tiles. With every candidate selected this is exactly full
  attention under the contract.
  """
  B, T, S, N, K, H, _ = checks.check_qkv(op, q, k, k)
  if top_k is None and threshold is None:
    raise ValueError(f"{op}: give `top_k` and/or `threshold`")
  for name, value in (("block_size", block_size), ("q_block", q_block)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{op}: `{name}` must be a positive int, got {value!r}")
  scores = block_scores(q, pool_blocks(k, block_size, pool=pool, lengths=kv_lengths),
                        q_block=q_block, scale=scale, share_gqa=share_gqa)
  dims = dict(B=B, T=T, S=S, q_block=q_block, block_size=block_size)
  candidates = candidate_blocks(**dims, causal=causal, q_offset=q_offset, kv_lengths=kv_lengths)
  always = own_and_first(**dims, q_offset=q_offset, include=tuple(always_include))
  selected = top_k_blocks(scores, top_k or 0, candidates=candidates, always=always)
  if threshold is not None:
    selected = selected | (candidates & (scores >= threshold))
  base = contract.contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                                segment_ids=segment_ids, kv_lengths=kv_lengths, op=op)
  block_mask, mask_mod = selection_mask(selected, T=T, S=S, q_block=q_block, block_size=block_size,
                                        base_mask=base, tile_q=tile_q)
  return block_mask, mask_mod, selected


def token_top_k(scores, top_k: int, *, visible=None):
  """`(indices [..., top_k] int32, valid [..., top_k] bool)`: the `top_k` highest `scores [..., S]`
  among `visible` keys (all when None); `valid` is False for slots a row could not fill."""
  S = scores.shape[-1]
  top_k = min(int(top_k), S)
  visible = jnp.ones(scores.shape, bool) if visible is None else jnp.broadcast_to(visible, scores.shape)
  ranked = jnp.where(visible, jax.lax.stop_gradient(scores).astype(jnp.float32), -jnp.inf)
  top, idx = jax.lax.top_k(ranked, top_k)
  return idx.astype(jnp.int32), jnp.isfinite(top)


def gather_tokens(q, k, v, indices, valid, *, scale: Optional[float] = None):
  """Attention of each query over its own gathered keys: `q [B, T, N, H]`, `k [B, S, K, H]`,
  `v [B, S, K, h]`, `indices`, `valid` `[B, N, T, k]` (key slots per query head) → `[B, T, N, h]`
  in q's dtype. Softmax over the valid slots; a row with none gives zeros. O(T · k) memory."""
  B, T, N, H = q.shape
  G = N // k.shape[2]
  scale = H ** -0.5 if scale is None else scale
  kv_head = jnp.arange(N) // G                                                # [N]
  b = jnp.arange(B)[:, None, None, None]
  kg = k.astype(jnp.float32)[b, indices, kv_head[None, :, None, None]]        # [B, N, T, k, H]
  vg = v.astype(jnp.float32)[b, indices, kv_head[None, :, None, None]]        # [B, N, T, k, h]
  s = jnp.einsum("btnh,bntjh->bntj", q.astype(jnp.float32), kg) * scale
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.where(valid, jnp.exp(jnp.where(valid, s - m, 0.0)), 0.0)
  den = jnp.sum(e, axis=-1, keepdims=True)
  w = e / jnp.where(den > 0, den, 1.0)
  return jnp.einsum("bntj,bntjh->btnh", w, vg).astype(q.dtype)
