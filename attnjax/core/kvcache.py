"""Contiguous KV cache and split-K decode attention.

The cache holds `k: [B, Smax, K, H]`, `v: [B, Smax, K, h]` and `lengths: [B]` (tokens filled per
row; rows may differ). `append` writes new tokens at each row's own length. `decode_attention`
attends the T newest queries (positions `lengths - T .. lengths - 1`) to the filled part of the
cache.

Split-K (Lean Attention, flash-decoding): during decoding T is tiny, so parallelism comes from the
key axis. The cache is cut into chunks; each chunk gives a partial state (o_c, lse_c) and the chunks
are combined exactly by `merge_attention_states`:

    lse = log Σ_c exp(lse_c),      o = Σ_c exp(lse_c - lse) · o_c.

Paper: Sanovar et al., "Lean Attention: Hardware-Aware Scalable Attention Mechanism for the
Decode-Phase of Transformers", arXiv:2405.10480.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import flex
from attnjax.core import masks
from attnjax.core.merge import merge_attention_states
from attnjax.typing import Key, Output, Query, Value

# Keys per split when neither `num_splits` nor `split_size` is given.
DEFAULT_SPLIT_SIZE = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys `[B, Smax, K, H]`, values `[B, Smax, K, h]`, filled lengths `[B]` (int32)."""
  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @classmethod
  def create(cls, batch: int, max_length: int, num_kv_heads: int, head_dim: int,
             value_head_dim: Optional[int] = None, dtype=jnp.float32) -> "KVCache":
    """An empty cache (zeros, lengths 0) of `max_length` slots per row; `value_head_dim` defaults
    to `head_dim`."""
    hv = head_dim if value_head_dim is None else value_head_dim
    return cls(jnp.zeros((batch, max_length, num_kv_heads, head_dim), dtype),
               jnp.zeros((batch, max_length, num_kv_heads, hv), dtype),
               jnp.zeros((batch,), jnp.int32))

  @property
  def max_length(self) -> int:
    return self.k.shape[1]

  def append(self, k_new, v_new) -> "KVCache":
    """Writes `k_new: [B, T, K, H]`, `v_new: [B, T, K, h]` at each row's length; lengths grow by T.

    Overflow: lengths are traced, so it cannot be checked here. A row whose `length + T` passes
    `Smax` has its write moved back to the last T slots (`lax.dynamic_update_slice` clamps the start
    index), overwriting the tokens stored there, and its length still grows by T; `decode_attention`
    then attends to at most the `Smax` stored keys, so the result is no longer full attention. Size
    the cache for the longest sequence (or check `lengths` on the host).

    Raises:
      ValueError: when `k_new` is not `[B, T, K, H]` or `v_new` not `[B, T, K, h]` (B, K, H, h those
        of the cache), or T exceeds `Smax`.
    """
    B, _, K, H = self.k.shape
    checks.check_shape("KVCache.append", "k_new", k_new, (B, None, K, H), "[B, T, K, H]")
    T = k_new.shape[1]
    checks.check_shape("KVCache.append", "v_new", v_new, (B, T, K, self.v.shape[3]), "[B, T, K, h]")
    if T > self.max_length:
      raise ValueError(f"KVCache.append: {T} new tokens exceed the cache length {self.max_length}")
    write = jax.vmap(lambda buf, new, at: jax.lax.dynamic_update_slice_in_dim(buf, new, at, axis=0))
    return KVCache(write(self.k, k_new.astype(self.k.dtype), self.lengths),
                   write(self.v, v_new.astype(self.v.dtype), self.lengths),
                   self.lengths + T)


def decode_attention(q: Query, cache: KVCache, *, num_splits: Optional[int] = None,
                     split_size: Optional[int] = None, scale=None, causal: bool = True,
                     implementation: Optional[str] = None) -> Output:
  """Attention of the T newest tokens' queries over the cache, by split-K with an exact merge.

  Query t of row b sits at position p = lengths[b] - T + t and sees keys j < lengths[b] (and j <= p
  when `causal`):  o = Σ_c e^{lse_c - lse} o_c over the key chunks c, which equals
  softmax_j(scale · q·k_j) v_j over the visible keys. A row with no visible key returns zeros.

  Args:
    q: `[B, T, N, H]`, the queries of the last T appended tokens (already in the cache).
    cache: the `KVCache`, with `lengths` counting those T tokens.
    num_splits / split_size: how to cut the cache's key axis (give at most one; by default chunks of
      `DEFAULT_SPLIT_SIZE` keys). The last chunk may be shorter.
    scale: defaults to `H ** -0.5`.
    causal: mask keys after each query's position (False: every filled key is visible).
    implementation: flex_attention implementation for the chunks, or `"pallas_triton"` for the
      split-K decode kernel (see `split_k_attention`).

  Returns:
    `[B, T, N, h]` in q's dtype, equal to full attention over the filled prefix.

  Raises:
    ValueError: when q is not `[B, T, N, H]` with the cache's B and H and N a multiple of its K,
      when both `num_splits` and `split_size` are given, or either is < 1.
  """
  Smax = cache.max_length
  _, T, _, _, _, _, _ = checks.check_qkv("decode_attention", q, cache.k, cache.v)
  if num_splits is not None and split_size is not None:
    raise ValueError("decode_attention: give `num_splits` or `split_size`, not both")
  if num_splits is not None:
    if num_splits < 1:
      raise ValueError(f"decode_attention: `num_splits` must be >= 1, got {num_splits}")
    split_size = -(-Smax // num_splits)
  elif split_size is None:
    split_size = DEFAULT_SPLIT_SIZE
  elif split_size < 1:
    raise ValueError(f"decode_attention: `split_size` must be >= 1, got {split_size}")
  split_size = min(split_size, Smax)
  return split_k_attention(q, cache.k, cache.v, split_size=split_size, scale=scale,
                           q_offset=cache.lengths - T, kv_lengths=cache.lengths, causal=causal,
                           implementation=implementation)


def split_k_attention(q: Query, k: Key, v: Value, *, split_size: int, q_offset=0, kv_lengths=None,
                      causal: bool = False, extra_mask=None, scale=None,
                      implementation: Optional[str] = None) -> Output:
  """Softmax attention computed over key chunks of `split_size` and merged by log-sum-exp.

  The chunks are a batched axis (not a Python loop): keys are padded to a whole number of chunks and
  reshaped to `[num_splits, split_size, ...]`; padded keys are hidden. Each chunk's `(o_c, lse_c)`
  comes from `flex_attention(return_residuals=True)` and `merge_attention_states` combines them.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`.
    split_size: keys per chunk (the last chunk may be shorter).
    q_offset: int or `[B]`, the absolute position of the first query (for `causal`).
    kv_lengths: `[B]`; keys at or past the length are hidden (default: all S keys).
    causal: hide keys after the query's absolute position.
    extra_mask: a mask_mod in global key positions, and-ed with the causal / length masks.
    scale: defaults to `H ** -0.5`.
    implementation: flex_attention implementation for the chunks; `"pallas_triton"` without an
      `extra_mask` runs the whole split-K in one Pallas kernel (`attnjax.kernels.decode_triton`,
      interpret mode on a CPU), whose chunks are rounded to whole key tiles (the merge is exact, so
      only rounding differs); where the kernel does not serve the input (forward-mode autodiff, more
      than its query rows per kv head) the chunks run on flex's default.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  B, _, S, _, K, _, _ = checks.check_qkv("split_k_attention", q, k, v)
  if split_size < 1:
    raise ValueError(f"split_k_attention: `split_size` must be >= 1, got {split_size}")
  splits = -(-S // split_size)
  if implementation == "pallas_triton" and extra_mask is None:
    # Imported here: the core package does not load Pallas unless a kernel is asked for.
    from attnjax.kernels import decode_triton  # pylint: disable=import-outside-toplevel
    try:
      return decode_triton.decode_attention(q, k, v, kv_lengths=kv_lengths, q_offset=q_offset,
                                            causal=causal, scale=scale, num_splits=splits,
                                            implementation=implementation)
    except NotImplementedError:   # not served by the kernel (jax.jvp, a long query block)
      implementation = None       # the chunks below, on flex's default
  pad = splits * split_size - S
  chunked = lambda x: jnp.moveaxis(
      jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, splits, split_size, K, -1), 1, 0)
  if kv_lengths is None:
    kv_lengths = jnp.full((B,), S, jnp.int32)
  checks.check_shape("split_k_attention", "kv_lengths", kv_lengths, (B,), "[B]")
  kv_lengths = jnp.asarray(kv_lengths)
  base = [masks.padding(kv_lengths=jnp.minimum(kv_lengths, S))]
  if causal:
    base.append(masks.causal(q_offset))
  if extra_mask is not None:
    base.append(extra_mask)
  global_mask = masks.and_masks(*base)

  def one_chunk(start, k_c, v_c):
    # Mask mods see chunk-local key indices; shift them back to global positions.
    mask_mod = lambda b, n, qi, ki: global_mask(b, n, qi, ki + start)
    return flex.flex_attention(q, k_c, v_c, mask_mod=mask_mod, scale=scale, return_residuals=True,
                               implementation=implementation)

  starts = jnp.arange(splits, dtype=jnp.int32) * split_size
  outs, lses = jax.vmap(one_chunk)(starts, chunked(k), chunked(v))
  return merge_attention_states(outs, lses)[0]
