"""The operator contract's masks and bookkeeping, shared by every mechanism (see `attnjax.registry`).

  contract_mask     the mask_mod of `causal`, `q_offset`, `segment_ids`, `kv_lengths` (and q lengths)
  valid_slots       `[B, S]` True at key slots below `kv_lengths` (a KV cache's filled part)
  zero_padded       keys/values in float32 with the slots at or past `kv_lengths` zeroed
  lengths_or_full   `kv_lengths` validated as `[B]` int32, or S for every row
  query_positions   `[B, T]` absolute query positions `q_offset + t`
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.core import checks
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
