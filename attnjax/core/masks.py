"""Mask and score modifications: the vocabulary of FlexAttention.

A `mask_mod(b, n, q_idx, kv_idx) -> bool` says whether query `q_idx` of batch row `b`, head `n` may see
key `kv_idx`; a `score_mod(score, b, n, q_idx, kv_idx) -> score` rewrites the scaled logit
`s = scale * q·k` before normalization. Both are called on *broadcastable integer index arrays* (any
shapes that broadcast together, e.g. `b: [B,1,1,1]`, `n: [1,N,1,1]`, `q_idx: [1,1,T,1]`,
`kv_idx: [1,1,1,S]`, or the tile shapes a kernel uses), so they must be written with elementwise
`jnp` operations and array indexing only. They may close over arrays (segment ids, bias tables, slopes);
gradients flow to closed-over float arrays.

Index positions are those of the arrays passed to the operator: `q_idx` in `[0, T)`, `kv_idx` in
`[0, S)`. Mods that need absolute positions (a decode step whose queries sit at the end of a cache) take
an `offset` added to `q_idx`.

Paper: Dong et al., "Flex Attention: A Programming Model for Generating Optimized Attention Kernels",
arXiv:2412.05496. ALiBi: Press et al., "Train Short, Test Long", arXiv:2108.12409. T5 buckets: Raffel
et al., arXiv:1910.10683. Soft-capping: Gemma 2, arXiv:2408.00118. Sinks: Xiao et al., "Efficient
Streaming Language Models with Attention Sinks", arXiv:2309.17453.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.typing import MaskMod, ScoreMod

# ----------------------------------------------------------------------------------------------------
# Combinators


def and_masks(*mods: MaskMod) -> MaskMod:
  """Pairs visible under every one of `mods`."""
  if not mods:
    raise ValueError("and_masks needs at least one mask_mod")

  def mask_mod(b, n, q_idx, kv_idx):
    out = mods[0](b, n, q_idx, kv_idx)
    for mod in mods[1:]:
      out = jnp.logical_and(out, mod(b, n, q_idx, kv_idx))
    return out

  return mask_mod


def or_masks(*mods: MaskMod) -> MaskMod:
  """Pairs visible under at least one of `mods`."""
  if not mods:
    raise ValueError("or_masks needs at least one mask_mod")

  def mask_mod(b, n, q_idx, kv_idx):
    out = mods[0](b, n, q_idx, kv_idx)
    for mod in mods[1:]:
      out = jnp.logical_or(out, mod(b, n, q_idx, kv_idx))
    return out

  return mask_mod


def not_mask(mod: MaskMod) -> MaskMod:
  """The complement of `mod`."""
  return lambda b, n, q_idx, kv_idx: jnp.logical_not(mod(b, n, q_idx, kv_idx))


def compose_score_mods(*mods: Optional[ScoreMod]) -> Optional[ScoreMod]:
  """Applies score mods left to right; `None` entries are skipped, and no mods gives `None`."""
  mods = tuple(m for m in mods if m is not None)
  if not mods:
    return None
  if len(mods) == 1:
    return mods[0]

  def score_mod(score, b, n, q_idx, kv_idx):
    for mod in mods:
      score = mod(score, b, n, q_idx, kv_idx)
    return score

  return score_mod


def combine_masks(*mods: Optional[MaskMod]) -> Optional[MaskMod]:
  """`and_masks` over the non-`None` entries; `None` when there are none (no masking)."""
  mods = tuple(m for m in mods if m is not None)
  if not mods:
    return None
  return mods[0] if len(mods) == 1 else and_masks(*mods)


# ----------------------------------------------------------------------------------------------------
# Mask library


def full_mask(b, n, q_idx, kv_idx):
  """Every pair visible."""
  del b, n
  return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx)), dtype=bool)


def _per_batch(value, b):
  """`value` as a scalar or indexed by batch row when it is a `[B]` array."""
  value = jnp.asarray(value)
  return value if value.ndim == 0 else value[b]


def causal(offset=0) -> MaskMod:
  """`q_idx + offset >= kv_idx`: causal with queries at absolute positions `q_idx + offset`.

  `offset` is an int or a `[B]` array (per batch row, e.g. the number of cached tokens before the
  queries). `offset=0` is top-left aligned, as `jax.nn.dot_product_attention(is_causal=True)`.
  """

  def mask_mod(b, n, q_idx, kv_idx):
    del n
    return q_idx + _per_batch(offset, b) >= kv_idx

  return mask_mod


def sliding_window(left: Optional[int], right: Optional[int] = 0, *, offset=0) -> MaskMod:
  """Query at position p sees keys in `[p - left, p + right]` (`None` = unbounded on that side).

  `left` and `right` are distances, not key counts, as in
  `jax.nn.dot_product_attention(local_window_size=(left, right))`: `sliding_window(0, 0)` sees only
  position p. A window of `w` keys in the library's sense (the `sliding_window` mechanism's
  `window`, `dot_product_attention(window=w)`) is `sliding_window(w - 1, w - 1)`; causal over the
  last `w` tokens (Mistral's window) is `sliding_window(w - 1, 0)`.
  """
  for name, value in (("left", left), ("right", right)):
    if value is not None and value < 0:
      raise ValueError(f"sliding_window: `{name}` must be >= 0 or None, got {value}")

  def mask_mod(b, n, q_idx, kv_idx):
    del n
    pos = q_idx + _per_batch(offset, b)
    keep = full_mask(b, None, q_idx, kv_idx)
    if left is not None:
      keep = jnp.logical_and(keep, pos - kv_idx <= left)
    if right is not None:
      keep = jnp.logical_and(keep, kv_idx - pos <= right)
    return keep

  return mask_mod


def prefix_lm(prefix_length, *, offset=0) -> MaskMod:
  """Bidirectional over the first `prefix_length` keys, causal after (PaLM / T5 prefix LM).

  `prefix_length` is an int or a `[B]` array.
  """

  def mask_mod(b, n, q_idx, kv_idx):
    return jnp.logical_or(kv_idx < _per_batch(prefix_length, b), causal(offset)(b, n, q_idx, kv_idx))

  return mask_mod


def document(q_segment_ids: jax.Array, kv_segment_ids: Optional[jax.Array] = None) -> MaskMod:
  """Packed sequences: a query sees only keys of its own document (`segment_ids[b, pos]` equal).

  `q_segment_ids: [B, T]`, `kv_segment_ids: [B, S]` (defaults to `q_segment_ids`, for self-attention).
  Combine with `causal()` for packed causal language modelling.
  """
  kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
  q_segment_ids, kv_segment_ids = jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)

  def mask_mod(b, n, q_idx, kv_idx):
    del n
    return q_segment_ids[b, q_idx] == kv_segment_ids[b, kv_idx]

  return mask_mod


def padding(kv_lengths=None, q_lengths=None) -> MaskMod:
  """Keys at or past `kv_lengths[b]` (and queries at or past `q_lengths[b]`) are padding: hidden.

  A padded query sees nothing, so its output is zeros (the operator contract for empty rows).
  """

  def mask_mod(b, n, q_idx, kv_idx):
    keep = full_mask(b, n, q_idx, kv_idx)
    if kv_lengths is not None:
      keep = jnp.logical_and(keep, kv_idx < _per_batch(kv_lengths, b))
    if q_lengths is not None:
      keep = jnp.logical_and(keep, q_idx < _per_batch(q_lengths, b))
    return keep

  return mask_mod


def chunked(chunk_size: int, *, offset=0) -> MaskMod:
  """Block-local attention: query and key in the same chunk of `chunk_size` positions."""
  if chunk_size <= 0:
    raise ValueError(f"chunked: `chunk_size` must be > 0, got {chunk_size}")

  def mask_mod(b, n, q_idx, kv_idx):
    del n
    return (q_idx + _per_batch(offset, b)) // chunk_size == kv_idx // chunk_size

  return mask_mod


def dilated(dilation: int, *, offset=0) -> MaskMod:
  """Keys at distances that are multiples of `dilation` (Longformer's dilated window when and-ed
  with `sliding_window`)."""
  if dilation <= 0:
    raise ValueError(f"dilated: `dilation` must be > 0, got {dilation}")

  def mask_mod(b, n, q_idx, kv_idx):
    del n
    return (q_idx + _per_batch(offset, b) - kv_idx) % dilation == 0

  return mask_mod


def global_tokens(num_global: int) -> MaskMod:
  """The first `num_global` positions see and are seen by everyone (Longformer / BigBird globals).

  Or it with a local mask: `or_masks(sliding_window(d, d), global_tokens(g))` (d: a distance).
  """

  def mask_mod(b, n, q_idx, kv_idx):
    del b, n
    return jnp.logical_or(q_idx < num_global, kv_idx < num_global)

  return mask_mod


def sink_window(num_sinks: int, window: int, *, offset=0) -> MaskMod:
  """Causal attention to the first `num_sinks` keys plus the last `window` keys (StreamingLLM)."""
  recent = sliding_window(window - 1, 0, offset=offset)
  return and_masks(causal(offset), or_masks(lambda b, n, q, kv: kv < num_sinks, recent))


def from_array(mask: jax.Array) -> MaskMod:
  """A boolean mask array broadcastable to `[B, N, T, S]` (True keeps) as a mask_mod."""
  mask = jnp.asarray(mask)
  if mask.ndim != 4:
    raise ValueError(f"mask must have 4 dims broadcastable to [B, N, T, S], got shape {mask.shape}")
  return lambda b, n, q_idx, kv_idx: _gather4(mask, b, n, q_idx, kv_idx)


def _gather4(table, b, n, q_idx, kv_idx):
  """`table[b, n, q, kv]` where size-1 dims of `table` broadcast."""
  idx = tuple(0 if table.shape[d] == 1 else i for d, i in enumerate((b, n, q_idx, kv_idx)))
  return table[idx]


# ----------------------------------------------------------------------------------------------------
# Score-mod library


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi head slopes: the geometric sequence 2^(-8i/n), i = 1..n, for n a power of two; otherwise
  the paper's rule (the slopes of the nearest lower power of two, then every other slope of the next)."""

  def pow2(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  if num_heads <= 0:
    raise ValueError(f"alibi_slopes: `num_heads` must be > 0, got {num_heads}")
  if math.log2(num_heads).is_integer():
    slopes = pow2(num_heads)
  else:
    lower = 2 ** math.floor(math.log2(num_heads))
    slopes = pow2(lower) + pow2(2 * lower)[0::2][: num_heads - lower]
  return np.asarray(slopes, dtype=np.float32)


def alibi(slopes, *, offset=0, symmetric: bool = False) -> ScoreMod:
  """ALiBi: `score - slopes[n] * (q_pos - kv_idx)` (causal form), or `- slopes[n] * |q_pos - kv_idx|`
  with `symmetric=True` for encoders. `slopes: [N]` (see `alibi_slopes`)."""
  slopes = jnp.asarray(slopes)

  def score_mod(score, b, n, q_idx, kv_idx):
    dist = (q_idx + _per_batch(offset, b) - kv_idx).astype(score.dtype)
    if symmetric:
      dist = jnp.abs(dist)
    return score - slopes[n].astype(score.dtype) * dist

  return score_mod


def softcap(cap: float) -> ScoreMod:
  """Tanh soft-capping `cap * tanh(score / cap)` (Gemma 2, Grok): logits stay in (-cap, cap)."""
  if cap <= 0:
    raise ValueError(f"softcap: `cap` must be > 0, got {cap}")
  return lambda score, b, n, q_idx, kv_idx: cap * jnp.tanh(score / cap)


def additive_bias(bias: jax.Array) -> ScoreMod:
  """Adds `bias[b, n, q, kv]` (a 4-d array broadcastable to `[B, N, T, S]`); its gradient flows."""
  bias = jnp.asarray(bias)
  if bias.ndim != 4:
    raise ValueError(f"bias must have 4 dims broadcastable to [B, N, T, S], got shape {bias.shape}")
  return lambda score, b, n, q_idx, kv_idx: score + _gather4(bias, b, n, q_idx, kv_idx).astype(
      score.dtype)


def relative_position_bucket(relative_position, *, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128):
  """T5's bucketing of `kv_idx - q_idx`: exact for small distances, logarithmic up to `max_distance`."""
  relative_position = jnp.asarray(relative_position)
  ret = jnp.zeros_like(relative_position)
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(relative_position.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # Clamp before the log so that n = 0 does not produce -inf (the branch is discarded there anyway).
  val_if_large = max_exact + (
      jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
      / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(relative_position.dtype)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


def relative_position_bias(table: jax.Array, *, bidirectional: bool = True, max_distance: int = 128,
                           offset=0) -> ScoreMod:
  """T5-style learned relative bias: adds `table[bucket(kv_idx - q_pos), n]`.

  `table: [num_buckets, N]`.
  """
  table = jnp.asarray(table)
  num_buckets = table.shape[0]

  def score_mod(score, b, n, q_idx, kv_idx):
    bucket = relative_position_bucket(kv_idx - (q_idx + _per_batch(offset, b)),
                                      bidirectional=bidirectional, num_buckets=num_buckets,
                                      max_distance=max_distance)
    return score + table[bucket, n].astype(score.dtype)

  return score_mod


def evaluate_mask(mask_mod: Optional[MaskMod], B: int, N: int, T: int, S: int) -> jax.Array:
  """The dense boolean `[B, N, T, S]` mask of `mask_mod` (all True for `None`).

  For tests and analysis.
  """
  b, n, q, kv = index_grid((B, N, T, S))
  if mask_mod is None:
    return jnp.ones((B, N, T, S), bool)
  return jnp.broadcast_to(mask_mod(b, n, q, kv), (B, N, T, S))


def index_grid(shape: Sequence[int]):
  """Broadcastable int32 index arrays `b, n, q_idx, kv_idx` for a `[B, N, T, S]` grid."""
  return tuple(
      jnp.arange(size, dtype=jnp.int32).reshape([size if i == d else 1 for i in range(4)])
      for d, size in enumerate(shape))
