"""Input preparation shared by the attention-free token mixers (`attnjax.ops.mixers`).

A token mixer reads one stream, the values `v`, with no query-key scores. Every mixer needs the
same bookkeeping before its own computation, and this module holds it once:

  prepare_mixer_inputs  checks the contract (self-attention or a KV cache of the queries' own
                        tokens, no `scale`), and returns `MixerInputs`: float32 values in query-head
                        layout (GQA repeated, zero at padding) and the packed-run bookkeeping
  take_query_rows       the outputs at the query rows of a KV cache (`q_offset + i`)
  run_cumsum            inclusive cumulative sum along the sequence that restarts at each packed run
  run_total             the sum over each slot's whole run
  visible_prefix        `[B, S]` slots a causal query sees: its run, up to itself, below the length
  check_param           a learned array's shape, as float32
  check_max_length      a sequence no longer than a position-indexed array's first dim
  check_self_pattern    the causal / non-causal forms a mixer offers
  reject_scale          `scale` must be None (no scores to scale)

Packed sequences (`segment_ids`) are taken as contiguous runs: a token mixes only tokens of its own
run, and positions (for position-indexed weights) restart at each run's first token. Every
statistic is per example: no example of a batch affects another.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax.core import checks
from attnjax.core.contract import valid_slots

# Maximum sequence length of the position-indexed arrays the Flax layer creates by default.
DEFAULT_MAX_LENGTH = 256


def precise_einsum(spec: str, *arrays) -> jax.Array:
  """`jnp.einsum` at HIGHEST precision: the mixers' float32 statistics are compared to float64."""
  return jnp.einsum(spec, *arrays, precision=lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class MixerInputs:
  """Float32 values in query-head layout and the sequence bookkeeping shared by the mixers.

  v: `[B, S, N, h]`, zero at hidden slots (at or past `kv_lengths`); q and k are never read.
  valid: `[B, S]` slots below `kv_lengths`. starts: `[B, S]` run start flags; start: `[B, S]` index
  of each slot's run start; pos: `[B, S]` position within the run. rows: `[B, T]` the slot of each
  query (`q_offset + i`); full_rows: True when rows are exactly `0 … S-1` (no gather needed).
  segmented: `segment_ids` were given. dims: `(B, T, S, N, K, H, h)`.
  """
  v: jax.Array
  valid: jax.Array
  starts: jax.Array
  start: jax.Array
  pos: jax.Array
  rows: jax.Array
  full_rows: bool
  segmented: bool
  dims: tuple[int, ...]


def prepare_mixer_inputs(op: str, q, k, v, *, segment_ids, q_offset, kv_lengths, scale,
                         decode: bool) -> MixerInputs:
  """Validates a mixer's call and builds its `MixerInputs`.

  Args:
    op: operator name, for error messages.
    q: `[B, T, N, H]`, k: `[B, S, K, H]`: shapes only. v: `[B, S, K, h]`.
    segment_ids: None or one `[B, T]` array (self-attention, T == S).
    q_offset: int or `[B]`: the cache slot of the first query.
    kv_lengths: None or `[B]`: slots at or past the length are padding.
    scale: must be None.
    decode: the queries may be the last T <= S tokens of a KV cache (else T == S).
  """
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  reject_scale(op, scale)
  if jnp.ndim(q_offset) not in (0, 1) or (jnp.ndim(q_offset) == 1 and jnp.shape(q_offset) != (B,)):
    raise ValueError(f"{op}: `q_offset` must be an int or have shape [B] = [{B}], "
                     f"got shape {jnp.shape(q_offset)}")
  if not decode and T != S:
    raise ValueError(f"{op}: a token mixer is self-attention only: `k` and `v` must be the "
                     f"queries' own tokens (T == S), got T={T}, S={S}")
  if T > S:
    raise ValueError(f"{op}: {T} queries but only {S} key/value slots; over a KV cache the cache "
                     "holds the queries' own tokens (T <= S)")
  if isinstance(q_offset, (int, np.integer)) and not 0 <= q_offset <= S - T:
    raise ValueError(f"{op}: `q_offset` + T must be <= S = {S} (queries sit inside the cache), "
                     f"got q_offset={q_offset}, T={T}")
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)) or T != S:
      raise ValueError(f"{op}: `segment_ids` must be one [B, T] array for self-attention "
                       f"(T == S = {S}); got T={T}, S={S}")
    checks.check_shape(op, "segment_ids", segment_ids, (B, T), "[B, T]")
  if kv_lengths is not None:
    checks.check_shape(op, "kv_lengths", kv_lengths, (B,), "[B]")

  slots = jnp.arange(S)
  valid = valid_slots(B, S, kv_lengths)
  if segment_ids is None:
    starts = jnp.zeros((B, S), bool).at[:, 0].set(True)
    start = jnp.zeros((B, S), jnp.int32)
  else:
    seg = jnp.asarray(segment_ids)
    starts = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start = lax.cummax(jnp.where(starts, slots[None, :], 0), axis=1).astype(jnp.int32)
  pos = slots[None, :] - start
  full_rows = T == S and isinstance(q_offset, (int, np.integer)) and q_offset == 0
  rows = jnp.broadcast_to(jnp.reshape(jnp.asarray(q_offset), (-1, 1)) + jnp.arange(T), (B, T))
  rows = jnp.clip(rows, 0, S - 1)
  # jnp.where (not a product) keeps cache garbage such as 1e4 or inf out of every sum.
  hidden_v = jnp.where(valid[:, :, None, None],
                       jnp.repeat(v.astype(jnp.float32), N // K, axis=2), 0.0)
  return MixerInputs(v=hidden_v, valid=valid, starts=starts, start=start, pos=pos,
                     rows=rows, full_rows=full_rows, segmented=segment_ids is not None,
                     dims=(B, T, S, N, K, H, h))


def take_query_rows(x: jax.Array, p: MixerInputs) -> jax.Array:
  """`x[b, rows[b, i]]` for `x: [B, S, ...]`: the outputs of the query rows, `[B, T, ...]`."""
  if p.full_rows:
    return x
  idx = p.rows.reshape(p.rows.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def run_cumsum(x: jax.Array, p: MixerInputs) -> jax.Array:
  """Inclusive cumulative sum of `x: [B, S, ...]` along axis 1 that restarts at each packed run
  (a segmented scan)."""
  if not p.segmented:
    return jnp.cumsum(x, axis=1)
  flags = jnp.broadcast_to(p.starts.reshape(p.starts.shape + (1,) * (x.ndim - 2)), x.shape)

  def combine(a, b):
    fa, xa = a
    fb, xb = b
    return fa | fb, jnp.where(fb, xb, xa + xb)

  return lax.associative_scan(combine, (flags, x), axis=1)[1]


def run_total(x: jax.Array, p: MixerInputs) -> jax.Array:
  """Sum of `x: [B, S, ...]` over each slot's whole run, at every slot of the run."""
  if not p.segmented:
    return jnp.broadcast_to(jnp.sum(x, axis=1, keepdims=True), x.shape)
  S = x.shape[1]
  slots = jnp.arange(S)
  ends = jnp.concatenate([p.starts[:, 1:], jnp.ones((p.starts.shape[0], 1), bool)], axis=1)
  end = lax.cummin(jnp.where(ends, slots[None, :], S - 1), axis=1, reverse=True)
  idx = end.reshape(end.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(run_cumsum(x, p), idx, axis=1)


def visible_prefix(p: MixerInputs, row: jax.Array) -> jax.Array:
  """`[B, S]` slots that the query at cache slot `row: [B]` sees: its run, up to itself, valid."""
  slots = jnp.arange(p.valid.shape[1])
  run_start = jnp.take_along_axis(p.start, row[:, None], axis=1)
  return (slots[None] <= row[:, None]) & (slots[None] >= run_start) & p.valid


def check_param(op: str, name: str, x, expected: tuple, letters: str) -> jax.Array:
  """`x` checked to have shape `expected` (named `letters`, e.g. "[N, h]"), as float32."""
  checks.check_shape(op, name, x, expected, letters)
  return jnp.asarray(x, jnp.float32)


def check_max_length(op: str, name: str, array, S: int):
  """Raises unless the sequence length S fits the position-indexed `array` (first dim = max L)."""
  if S > array.shape[0]:
    raise ValueError(f"{op}: sequence length {S} exceeds the maximum length {array.shape[0]} of "
                     f"the position-indexed array `{name}` (its first dim); create it longer "
                     f"(default {DEFAULT_MAX_LENGTH} in attnjax.nn)")


def check_self_pattern(op: str, causal: bool, *, allowed: tuple[bool, ...]):
  """Raises unless `causal` is one of the forms `allowed` of the mixer `op`."""
  if causal not in allowed:
    kind = "causal" if causal else "non-causal"
    raise ValueError(f"mechanism {op!r} does not support {kind} self attention")


def reject_scale(op: str, scale):
  """A mixer computes no query-key scores: any `scale` but None is an error, never ignored."""
  if scale is not None:
    raise ValueError(f"{op}: `scale` must be None: the mixer computes no query-key scores, so a "
                     f"logit scale has no meaning (got scale={scale!r})")
