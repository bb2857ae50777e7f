"""The decode-time steps of `attnjax.nn.MultiHeadAttention`, kept out of its file: a step over the
contiguous KV cache (with TidalDecode's selection), over a recurrent mechanism's fixed-size state,
over a per-row cache (paged or StreamingLLM), and Shared Attention's value-only step; plus the
mechanism call they share with the full forward. Each step takes the layer (`self`) and runs inside
its `__call__`, so the cache variables it reads and writes belong to the layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.core import paged_attention
from attnjax.nn import layer_parts
from attnjax.ops.sparse import tidal_decode

__all__ = ["attend", "decode_step", "recurrent_step", "row_cache_step", "shared_weights_step",
           "weights_times_values"]


def decode_step(self, mech, query, key, value, kwargs, tokens, rotate, selection, select_top_k):
  """Writes the new keys/values (and side-"kv" per-token arrays) at `cache_index` and attends
  over the whole cache (over the `selection` only, on a TidalDecode sparse layer's single-token
  step); returns the output, for `select_top_k` the step's selection (else None), and the
  queries, keys and mask keywords of the step (for `return_weights`)."""
  cached_key = self.variable("cache", "cached_key")
  # A mechanism that does not read v (Slim attention: values from keys) caches keys only.
  keys_only = "v" not in mech.reads
  cached_value = None if keys_only else self.variable("cache", "cached_value")
  cache_index = self.variable("cache", "cache_index")
  B, T = query.shape[:2]
  s_max = cached_key.value.shape[1]
  if cached_key.value.shape[0] != B or cached_key.value.shape[2:] != key.shape[2:]:
    raise ValueError(f"MultiHeadAttention: decode input gives keys {key.shape}, incompatible "
                     f"with the cache {cached_key.value.shape} [B, S_max, K, H]")
  if T > s_max:
    raise ValueError(f"MultiHeadAttention: {T} new tokens do not fit in a cache of length "
                     f"{s_max}")
  index = cache_index.value
  layer_parts.check_cache_room(index, T, s_max)
  if rotate is not None:
    pos = index + jnp.arange(T, dtype=jnp.int32)
    query = rotate(query, pos, index + T)
    key = rotate(key, pos, index + T)
  # dynamic_update_slice would clamp a write past S_max onto earlier slots: _check_cache_room
  # stops that above.
  zero = jnp.zeros((), index.dtype)
  cached_key.value = jax.lax.dynamic_update_slice(
      cached_key.value, key.astype(cached_key.value.dtype), (zero, index, zero, zero))
  if keys_only:
    values = jnp.zeros(cached_key.value.shape[:3] + value.shape[3:], value.dtype)
  else:
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, value.astype(cached_value.value.dtype), (zero, index, zero, zero))
    values = cached_value.value
  tokens = dict(tokens)
  for spec in mech.token_inputs:
    if spec.side == "kv":
      cached = self.variable("cache", f"cached_{spec.name}")
      new = tokens[spec.name].astype(cached.value.dtype)
      cached.value = jax.lax.dynamic_update_slice(
          cached.value, new, (zero, index) + (zero,) * (new.ndim - 2))
      tokens[spec.name] = cached.value
  cache_index.value = index + T
  kv_lengths = jnp.full((B,), index + T)
  # TidalDecode acts on single-token steps only; a prefill (T > 1) is full attention.
  chosen = None
  if select_top_k is not None and T == 1:
    chosen = tidal_decode.tidal_select(query, cached_key.value, select_top_k, q_offset=index,
                                       kv_lengths=kv_lengths, scale=self.scale)
  if selection is not None and T == 1:
    indices, valid = selection
    out = tidal_decode.tidal_sparse_attention(query, cached_key.value, values,
                                              indices, valid, scale=self.scale)
  else:
    out = attend(mech, query, cached_key.value, values, causal=self.causal,
                       cross=False, segment_ids=None, kv_lengths=kv_lengths,
                       kwargs={**kwargs, **tokens, "q_offset": index})
  return out, chosen, (query, cached_key.value, dict(causal=self.causal, q_offset=index,
                                                     kv_lengths=kv_lengths))

def shared_weights_step(self, weights, value, decode, initialized):
  """`o = weights · V` with this layer's values (over its value-only cache when decoding)."""
  if decode and initialized:
    cached_value = self.variable("cache", "cached_value")
    cache_index = self.variable("cache", "cache_index")
    index, T = cache_index.value, value.shape[1]
    layer_parts.check_cache_room(index, T, cached_value.value.shape[1])
    zero = jnp.zeros((), index.dtype)
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, value.astype(cached_value.value.dtype), (zero, index, zero, zero))
    cache_index.value = index + T
    value = cached_value.value
  elif decode:
    # First call (init): a value-only cache as long as this input.
    self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
  S, K = value.shape[1], value.shape[2]
  if (weights.ndim != 4 or weights.shape[0] != value.shape[0] or weights.shape[3] != S
      or weights.shape[1] % K):
    raise ValueError(f"MultiHeadAttention: `shared_weights` must have shape [B, N, T, S] = "
                     f"[{value.shape[0]}, N, T, {S}] (N a multiple of {K}), got {weights.shape}")
  return weights_times_values(weights, value)

def weights_times_values(weights: jax.Array, value: jax.Array) -> jax.Array:
  """`o[b, t, n] = Σ_s weights[b, n, t, s] v[b, s, n // (N/K)]` `[B, T, N, h]`."""
  B, N, T, S = weights.shape
  K = value.shape[2]
  w = weights.reshape(B, K, N // K, T, S).astype(jnp.float32)
  out = jnp.einsum("bkgts,bskh->btkgh", w, value.astype(jnp.float32))
  return out.reshape(B, T, N, -1).astype(value.dtype)

def row_cache_step(self, name, query, key, value, num_new, rotate):
  """Appends each row's first `num_new` tokens at its own length and attends: over the row's pages
  (`attnjax.core.paged_attention`, causal by absolute position) for 'paged_kv', over the sinks
  and the window (`SinkWindowCache.extend`, attend then evict) for 'sink_kv'."""
  var = self.variable("cache", name)
  cache = var.value
  B, T = query.shape[:2]
  if num_new is None:
    num_new = jnp.full((B,), T, jnp.int32)
  start = cache.lengths
  if rotate is not None:
    pos = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    query = rotate(query, pos, start + num_new)
    key = rotate(key, pos, start + num_new)
  if name == "sink_kv":
    out, var.value = cache.extend(query, key, value, num_new=num_new, scale=self.scale)
    return out
  cache = cache.append(key, value, num_new)
  var.value = cache
  return paged_attention.paged_attention(query, cache.k_pages, cache.v_pages, cache.page_table,
                                         cache.lengths, q_offset=start, causal=True,
                                         scale=self.scale)

def recurrent_step(self, mech, query, key, value, kwargs, rotate):
  """Advances the mechanism's recurrent state over the new tokens (`Mechanism.recurrent`)."""
  state = self.variable("cache", "state")
  cache_index = self.variable("cache", "cache_index")
  index = cache_index.value
  if rotate is not None:
    T = query.shape[1]
    pos = index + jnp.arange(T, dtype=jnp.int32)
    query = rotate(query, pos, index + T)
    key = rotate(key, pos, index + T)
  out, state.value = attend(
      mech, query, key, value, causal=True, cross=False, segment_ids=None, kv_lengths=None,
      kwargs={**kwargs, "q_offset": index, "initial_state": state.value,
              "return_final_state": True})
  cache_index.value = index + query.shape[1]
  return out

def attend(mech: registry.Mechanism, query, key, value, *, causal: bool, cross: bool, segment_ids,
           kv_lengths, kwargs: dict):
  """The mechanism's call as the layer makes it: K/V heads repeated for a mechanism without GQA,
  `segment_ids` and `kv_lengths` passed only when given."""
  if not mech.gqa and key.shape[2] != query.shape[2]:
    # The mechanism wants one K/V head per query head: repeat (query head n reads n // G).
    groups = query.shape[2] // key.shape[2]
    key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
  if segment_ids is not None:
    kwargs = {**kwargs, "segment_ids": segment_ids}
  if kv_lengths is not None:
    kwargs = {**kwargs, "kv_lengths": kv_lengths}
  return mech(query, key, value, causal=causal, cross=cross, **kwargs)
