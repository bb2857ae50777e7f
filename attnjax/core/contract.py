"""The operator contract's masks and bookkeeping, shared by every mechanism (see `attnjax.registry`).

  contract_mask     the mask_mod of `causal`, `q_offset`, `segment_ids`, `kv_lengths` (and q lengths)
  flex_with_contract  `flex_attention` under those masks (the body of a score/mask-mod mechanism)
  visible_key_counts  `[B, T]` how many keys each query sees under those masks (one flex pass)
  valid_slots       `[B, S]` True at key slots below `kv_lengths` (a KV cache's filled part)
  zero_padded       keys/values in float32 with the slots at or past `kv_lengths` zeroed
  lengths_or_full   `kv_lengths` validated as `[B]` int32, or S for every row
  query_positions   `[B, T]` absolute query positions `q_offset + t`
  check_self_attention  validates a call whose queries are read from the key stream
  reject_causal_or_packing  the error of a mechanism whose summary mixes every key position
  document_bounds   each token's packed document as (start, end)
  gather_positions / scatter_positions  a per-position stream read at / written from query positions
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import flex
from attnjax.core import masks


def contract_mask(*, B: int, T: int, S: int, causal: bool = False, q_offset=0, segment_ids=None,
                  kv_lengths=None, q_lengths=None, op: str = "attention"):
  """The mask_mod of the common call contract (see `attnjax.registry`), or None when nothing is
  masked.

  Validates shapes: `segment_ids` `[B,T]` (self, T == S) or a pair (`[B,T]`, `[B,S]`), lengths
  `[B]`, `q_offset` an int or `[B]`.
  """
  mods = []
  if jnp.ndim(q_offset) not in (0, 1) or (jnp.ndim(q_offset) == 1 and jnp.shape(q_offset) != (B,)):
    raise ValueError(f"{op}: `q_offset` must be an int or have shape [B] = [{B}], "
                     f"got shape {jnp.shape(q_offset)}")
  if causal:
    mods.append(masks.causal(q_offset))
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      q_seg, kv_seg = segment_ids
    else:
      if T != S:
        raise ValueError(f"{op}: a single `segment_ids` array is for self-attention (T == S); "
                         f"got T={T}, S={S}: pass (q_segment_ids [B,T], kv_segment_ids [B,S])")
      q_seg = kv_seg = segment_ids
    checks.check_shape(op, "segment_ids (query)", q_seg, (B, T), "[B, T]")
    checks.check_shape(op, "segment_ids (key)", kv_seg, (B, S), "[B, S]")
    mods.append(masks.document(q_seg, kv_seg))
  for name, lengths in (("kv_lengths", kv_lengths), ("q_lengths", q_lengths)):
    if lengths is not None:
      checks.check_shape(op, name, lengths, (B,), "[B]")
  if kv_lengths is not None or q_lengths is not None:
    mods.append(masks.padding(kv_lengths=kv_lengths, q_lengths=q_lengths))
  return masks.combine_masks(*mods)


def flex_with_contract(op: str, q, k, v, *, causal: bool, segment_ids, q_offset, kv_lengths, scale,
                       implementation, mask_mod=None, score_mod=None, block_mask=None,
                       normalizer="softmax", return_residuals: bool = False):
  """`flex_attention` with the contract's masks (causal, packed documents, lengths) and-ed with
  `mask_mod`: the body of every mechanism that is one score/mask mod or normalizer on flex."""
  B, T, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  base = contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset, segment_ids=segment_ids,
                       kv_lengths=kv_lengths, op=op)
  if block_mask is not None and base is not None:
    raise ValueError(f"{op}: a precomputed `block_mask` must already contain causal/segment/length "
                     "masking; pass them in its mask_mod instead")
  # With a block mask, `mask_mod` (if any) further restricts it: flex_attention intersects the two.
  return flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                             mask_mod=masks.combine_masks(base, mask_mod), normalizer=normalizer,
                             scale=scale, implementation=implementation,
                             return_residuals=return_residuals)


def valid_slots(B: int, S: int, kv_lengths=None) -> jax.Array:
  """`[B, S]` bool: True at the key slots below `kv_lengths` (every slot when None)."""
  if kv_lengths is None:
    return jnp.ones((B, S), bool)
  return jnp.arange(S, dtype=jnp.int32)[None] < jnp.asarray(kv_lengths, jnp.int32)[:, None]


def zero_padded(x: jax.Array, kv_lengths=None) -> jax.Array:
  """`x [B, S, ...]` in float32 with the slots at or past `kv_lengths` set to 0: a cache's unfilled
  slots may hold garbage that would otherwise enter statistics taken over all positions."""
  x = x.astype(jnp.float32)
  if kv_lengths is None:
    return x
  real = valid_slots(x.shape[0], x.shape[1], kv_lengths)
  return jnp.where(real.reshape(real.shape + (1,) * (x.ndim - 2)), x, 0.0)


def lengths_or_full(op: str, kv_lengths, B: int, S: int) -> jax.Array:
  """`kv_lengths` validated as `[B]` int32, or S for every row when absent."""
  if kv_lengths is None:
    return jnp.full((B,), S, jnp.int32)
  checks.check_shape(op, "kv_lengths", kv_lengths, (B,), "[B]")
  return jnp.asarray(kv_lengths, jnp.int32)


def query_positions(B: int, T: int, q_offset=0) -> jax.Array:
  """Absolute query positions `q_offset + t`: `[B, T]` int32 (`q_offset`: int or `[B]`)."""
  off = jnp.asarray(q_offset, jnp.int32)
  off = off[:, None] if off.ndim == 1 else off
  return jnp.broadcast_to(off + jnp.arange(T, dtype=jnp.int32)[None], (B, T))


def check_self_attention(op: str, *, T: int, S: int, q_offset=0, kv_lengths=None,
                         segment_ids=None) -> bool:
  """Validates a call of a mechanism whose queries are read from the key stream (self-attention:
  T == S, or a query block over a KV cache given by `q_offset` / `kv_lengths`); `segment_ids` only
  as one `[B, T]` array in a full forward. Returns whether the call is a full forward (T == S,
  `q_offset` a static 0)."""
  full = T == S and checks.is_static_zero(q_offset)
  if T != S and checks.is_static_zero(q_offset) and kv_lengths is None:
    raise ValueError(f"{op}: self-attention only (T == S, or T < S over a KV cache with `q_offset` "
                     f"and `kv_lengths`); got T={T}, S={S}")
  if segment_ids is not None and (not full or isinstance(segment_ids, (tuple, list))):
    raise ValueError(f"{op}: `segment_ids` must be one [B, T] array for a full self-attention "
                     "forward (T == S, q_offset == 0)")
  if jnp.ndim(q_offset) not in (0, 1):
    raise ValueError(f"{op}: `q_offset` must be an int or have shape [B], got "
                     f"{jnp.shape(q_offset)}")
  return full


def document_bounds(segment_ids, B: int, S: int) -> tuple[jax.Array, jax.Array]:
  """(first position, one past the last position) of each token's packed document, `[B, S]` int32
  each (the whole row without `segment_ids`)."""
  idx = jnp.arange(S, dtype=jnp.int32)[None]
  if segment_ids is None:
    return jnp.zeros((B, S), jnp.int32), jnp.full((B, S), S, jnp.int32)
  seg = jnp.asarray(segment_ids)
  change = seg[:, 1:] != seg[:, :-1]
  first = jnp.concatenate([jnp.ones((B, 1), bool), change], axis=1)
  last = jnp.concatenate([change, jnp.ones((B, 1), bool)], axis=1)
  start = jax.lax.cummax(jnp.where(first, idx, 0), axis=1)
  end = jax.lax.cummin(jnp.where(last, idx + 1, S), axis=1, reverse=True)
  return start, end


def gather_positions(x: jax.Array, pos: jax.Array) -> jax.Array:
  """`x[b, pos[b, t]]` for a stream `x: [B, S, ...]` and positions `pos: [B, T]` (clipped into
  range) -> `[B, T, ...]`: what the queries of a block read from a per-position stream."""
  return jax.vmap(lambda xb, pb: xb[jnp.clip(pb, 0, xb.shape[0] - 1)])(x, pos)


def scatter_positions(x: jax.Array, pos: jax.Array, S: int) -> jax.Array:
  """Places `x: [B, T, ...]` on a stream of S positions at `pos: [B, T]` -> `[B, S, ...]` (zeros
  where nothing sits; positions past S are dropped): the inverse of `gather_positions`."""
  return jax.vmap(lambda xb, pb: jnp.zeros((S,) + xb.shape[1:], xb.dtype).at[pb].set(
      xb, mode="drop"))(x, pos)


def reject_causal_or_packing(op: str, *, causal: bool, segment_ids, why: str) -> None:
  """Raises ValueError when `causal` or `segment_ids` is asked of a mechanism that mixes every key
  position into one summary (`why` says how)."""
  # Mechanism.__call__ checks patterns; direct calls of the function get the same clear error.
  if causal:
    raise ValueError(f"{op}: causal attention is not defined for this mechanism ({why})")
  if segment_ids is not None:
    raise ValueError(f"{op}: packed sequences (`segment_ids`) are not supported ({why})")


def visible_key_counts(op: str, q, k, *, causal: bool = False, segment_ids=None,
                       q_offset=0, kv_lengths=None,
                       implementation=None) -> jax.Array:
  """`[B, T]` float32: how many keys each query sees under the contract's masks (0 for an empty row).

  One flex pass over zero-width stand-ins (`[B, ., 1, 1]` zeros): every score is 0, so the softmax's
  log-sum-exp is log(count); rounding its exponential gives the integer back exactly.
  """
  B, T, S = q.shape[0], q.shape[1], k.shape[1]
  zeros_q = jnp.zeros((B, T, 1, 1), jnp.float32)
  zeros_k = jnp.zeros((B, S, 1, 1), jnp.float32)
  _, lse = flex_with_contract(op, zeros_q, zeros_k, zeros_k, causal=causal, segment_ids=segment_ids,
                              q_offset=q_offset, kv_lengths=kv_lengths, scale=1.0,
                              implementation=implementation, return_residuals=True)
  lse = lse[..., 0]
  return jax.lax.stop_gradient(jnp.where(jnp.isfinite(lse), jnp.round(jnp.exp(lse)), 0.0))
