"""StreamingLLM's KV cache policy: attention sinks kept forever plus a sliding window of recent tokens.

A query at absolute position p sees the key at position j when

    0 <= j <= p   and   (j < sinks   or   p - j < window)                                      (1)

the first `sinks` tokens (the attention sinks) and the `window` most recent ones, its own included
(`sink_window_visible`; the same pairs as `masks.sink_window(sinks, window)`, and as Live2Diff's
warm-up + window mask, `attnjax.ops.decode.live2diff`, with warmup = sinks for every query past the
sinks: Live2Diff's warm-up frames also see each other both ways). Keys outside (1) are evicted, so
the cache has a fixed size, `sinks + window` slots per row, whatever the length streamed:

    k [B, sinks + window, K, H]    v [B, sinks + window, K, h]    lengths [B] (tokens appended)

The token at position p lives in slot p when p < sinks, else in slot `sinks + (p - sinks) mod
window` of a ring buffer, where it overwrites the oldest window token. Rows of a batch stream at
their own lengths (`append(..., num_new=[B])`).

Attention over the cache (`attention`, `extend`) keeps each stored key at its original position:
with keys rotated (RoPE) at their absolute positions before they are appended, or with position-free
keys, it equals full-sequence attention under the mask (1) (the tests use un-rotated keys). The
paper's own convention, which lets a model stream past its trained length, stores keys un-rotated
and rotates them at their position *within the cache* at each step: `cache_positions` gives those
(sinks 0 .. sinks-1, then the window tokens in order of age), the query taking the position after
the last key it sees (its own). The choice is the caller's: the cache stores whatever keys it is
given.

Paper: Xiao, Tian, Chen, Han and Lewis, "Efficient Streaming Language Models with Attention Sinks",
arXiv:2309.17453.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import flex
from attnjax.typing import Array, Int, Key, Output, Query, Value

__all__ = ["SinkWindowCache", "sink_window_visible", "check_sinks_and_window"]

Positions = Int[Array, "B L"]


def check_sinks_and_window(op: str, sinks, window, *, sinks_name: str = "sinks",
                           window_name: str = "window") -> tuple[int, int]:
  """`(sinks, window)` as Python ints after checking `sinks >= 0`, `window >= 1` (a ValueError naming
  `op` and the argument otherwise)."""
  for name, value, low in ((sinks_name, sinks, 0), (window_name, window, 1)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{op}: `{name}` must be an int >= {low}, got {value!r}")
  return int(sinks), int(window)


def sink_window_visible(q_pos, kv_pos, *, sinks: int, window: int,
                        bidirectional_sinks: bool = False) -> jax.Array:
  """Rule (1) of the module docstring on broadcastable integer positions: True where a query at
  `q_pos` sees a key at `kv_pos` (negative `kv_pos`: an empty slot, never seen).

  `bidirectional_sinks`: a query inside the sinks also sees the later sink positions (Live2Diff's
  warm-up frames attend to each other both ways); queries past the sinks are unaffected.
  """
  q_pos, kv_pos = jnp.asarray(q_pos), jnp.asarray(kv_pos)
  in_sinks = kv_pos < sinks
  if not bidirectional_sinks:
    in_sinks = in_sinks & (kv_pos <= q_pos)
  recent = (q_pos - kv_pos >= 0) & (q_pos - kv_pos < window)
  return (kv_pos >= 0) & (in_sinks | recent)


def _per_row(op: str, name: str, value, B: int, default: int) -> jax.Array:
  """An int or `[B]` as `[B]` int32 (`default` when None)."""
  if value is None:
    return jnp.full((B,), default, jnp.int32)
  value = jnp.asarray(value, jnp.int32)
  if value.ndim == 0:
    return jnp.full((B,), value, jnp.int32)
  checks.check_shape(op, name, value, (B,), "[B]")
  return value


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SinkWindowCache:
  """Attention sinks + a ring buffer of the last `window` tokens (see the module docstring):
  keys `[B, sinks + window, K, H]`, values `[B, sinks + window, K, h]`, tokens appended `[B]`."""
  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  sinks: int = dataclasses.field(metadata=dict(static=True))
  window: int = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def create(cls, batch: int, sinks: int, window: int, num_kv_heads: int, head_dim: int,
             value_head_dim: Optional[int] = None, dtype=jnp.float32) -> "SinkWindowCache":
    """An empty cache of `sinks + window` slots per row (the paper keeps 4 sinks); `value_head_dim`
    defaults to `head_dim`."""
    sinks, window = check_sinks_and_window("SinkWindowCache.create", sinks, window)
    hv = head_dim if value_head_dim is None else value_head_dim
    slots = sinks + window
    return cls(jnp.zeros((batch, slots, num_kv_heads, head_dim), dtype),
               jnp.zeros((batch, slots, num_kv_heads, hv), dtype),
               jnp.zeros((batch,), jnp.int32), sinks=sinks, window=window)

  @property
  def capacity(self) -> int:
    """Slots per row, `sinks + window`: the cache never holds more."""
    return self.sinks + self.window

  def slot_positions(self) -> Positions:
    """`[B, sinks + window]` int32: the absolute position of the token each slot holds, -1 for an
    empty slot."""
    length = self.lengths[:, None]
    sink_slots = jnp.arange(self.sinks, dtype=jnp.int32)[None]
    ring = jnp.arange(self.window, dtype=jnp.int32)[None]
    first = self.sinks + ring                           # the first position stored in ring slot r
    # The newest position p < length with p = first (mod window).
    latest = first + self.window * (jnp.maximum(length - 1 - first, 0) // self.window)
    return jnp.concatenate([jnp.where(sink_slots < length, sink_slots, -1),
                            jnp.where(length > first, latest, -1)], axis=1)

  def cache_positions(self) -> Positions:
    """`[B, sinks + window]` int32: StreamingLLM's positions within the cache (module docstring):
    each held token's rank by age among the held tokens, -1 for an empty slot."""
    pos = self.slot_positions()
    length = self.lengths[:, None]
    held_sinks = jnp.minimum(length, self.sinks)
    oldest_recent = jnp.maximum(self.sinks, length - self.window)
    rank = jnp.where(pos < self.sinks, pos, held_sinks + pos - oldest_recent)
    return jnp.where(pos >= 0, rank, -1)

  def append(self, k_new, v_new, num_new=None) -> "SinkWindowCache":
    """Streams `k_new: [B, T, K, H]`, `v_new: [B, T, K, h]` in at each row's length: the first
    `num_new[b]` tokens of row b (all T when None; an int or `[B]`, the rest are padding) take
    positions `lengths[b] + t`; tokens that fall out of the window (even ones of this call, T may
    exceed it) are evicted. Lengths grow by `num_new`; the arrays keep their shape.

    Raises:
      ValueError: when `k_new` / `v_new` are not `[B, T, K, H]` / `[B, T, K, h]` with the cache's
        B, K, H, h.
    """
    op = "SinkWindowCache.append"
    B, _, K, H = self.k.shape
    checks.check_shape(op, "k_new", k_new, (B, None, K, H), "[B, T, K, H]")
    T = k_new.shape[1]
    checks.check_shape(op, "v_new", v_new, (B, T, K, self.v.shape[3]), "[B, T, K, h]")
    count = _per_row(op, "num_new", num_new, B, T)
    t = jnp.arange(T, dtype=jnp.int32)[None]
    pos = self.lengths[:, None] + t                                        # [B, T]
    end = (self.lengths + count)[:, None]
    # Only survivors are written: at most `window` consecutive positions past the sinks, so their
    # ring slots are distinct and the scatter has no colliding writes.
    keep = (t < count[:, None]) & ((pos < self.sinks) | (pos >= end - self.window))
    slot = jnp.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % self.window)
    slot = jnp.where(keep, slot, self.capacity)                           # out of range: dropped
    write = jax.vmap(lambda buf, new, idx: buf.at[idx].set(new, mode="drop"))
    return dataclasses.replace(self, k=write(self.k, k_new.astype(self.k.dtype), slot),
                               v=write(self.v, v_new.astype(self.v.dtype), slot),
                               lengths=self.lengths + count)

  def attention(self, q: Query, *, scale: Optional[float] = None,
                implementation: Optional[str] = None) -> Output:
    """Softmax attention of the queries of each row's T newest tokens (positions `lengths - T + t`,
    already appended) over the held keys each one sees under (1): `[B, T, N, h]` in q's dtype.

    Exact (equal to full-sequence attention under (1)) for every query whose window is still held:
    always for T = 1 (token-by-token decoding). After an append of T > 1 tokens the earliest
    queries' windows were partly evicted by the later tokens: use `extend`, which attends before
    evicting.
    """
    op = "SinkWindowCache.attention"
    B, T, _, _, _, _, _ = checks.check_qkv(op, q, self.k, self.v)
    q_pos = self.lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None]
    return self._attend(q, self.k, self.v, q_pos, self.slot_positions(), scale, implementation)

  def extend(self, q: Query, k_new: Key, v_new: Value, *, num_new=None,
             scale: Optional[float] = None,
             implementation: Optional[str] = None) -> tuple[Output, "SinkWindowCache"]:
    """`(out, cache)`: attention of T new tokens' queries over the held keys and the new tokens
    under (1), then `append(k_new, v_new, num_new)`. Exact for any T (a chunked prefill, a
    streaming chunk): nothing a new query sees has been evicted yet. Queries past `num_new[b]`
    (padding) get zeros.

    Args:
      q: `[B, T, N, H]` at positions `lengths + t`; k_new: `[B, T, K, H]`; v_new: `[B, T, K, h]`.
      num_new: int or `[B]`, the real new tokens of each row (default T).
      scale: defaults to `H ** -0.5`. implementation: flex attention's.
    """
    op = "SinkWindowCache.extend"
    B, T, _, _, _, _, _ = checks.check_qkv(op, q, k_new, v_new)
    count = _per_row(op, "num_new", num_new, B, T)
    t = jnp.arange(T, dtype=jnp.int32)[None]
    q_pos = self.lengths[:, None] + t
    new_pos = jnp.where(t < count[:, None], q_pos, -1)     # padding keys: empty slots
    k_all = jnp.concatenate([self.k, k_new.astype(self.k.dtype)], axis=1)
    v_all = jnp.concatenate([self.v, v_new.astype(self.v.dtype)], axis=1)
    kv_pos = jnp.concatenate([self.slot_positions(), new_pos], axis=1)
    out = self._attend(q, k_all, v_all, jnp.where(t < count[:, None], q_pos, -1), kv_pos, scale,
                       implementation)
    return out, self.append(k_new, v_new, count)

  def _attend(self, q, k, v, q_pos, kv_pos, scale, implementation):
    """Flex attention with rule (1) on the given query and key positions (a query at -1: none)."""
    sinks, window = self.sinks, self.window

    def mask_mod(b, n, q_idx, kv_idx):
      del n
      qp = q_pos[b, q_idx]
      return (qp >= 0) & sink_window_visible(qp, kv_pos[b, kv_idx], sinks=sinks, window=window)

    return flex.flex_attention(q, k, v, mask_mod=mask_mod, scale=scale,
                               implementation=implementation)
