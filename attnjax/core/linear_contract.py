"""Feature-mapped linear attention under the operator contract (see `attnjax.registry`).

A linear-attention mechanism maps q and k through its feature map φ, builds its gate, and hands the
rest to `attnjax.core.linear` through this module:

  feature_linear_attention    the entry point: `(φ(q), φ(k), v)` under the call contract, returning
                              the output (or `(output, state)` for recurrent decoding)
  sequence_linear_attention   its forward over a sequence or a KV cache (float32 result): full
                              sequences use the chunked / parallel / scan forms, queries at an
                              offset over a cache `gated_linear_attention_cached`
  recurrent_linear_attention  its decoding form: the new tokens of one causal sequence, carrying the
                              float32 state `[B,N,F,h(+1)]`
  check_recurrent_args        the recurrent form's contract (causal, unpacked, T == S)
  map_output                  applies a function to the output, passing a returned state through
  visible_key_counts          `[B,T,N,1]` number of keys each query sees under the contract
  self_segment_ids            a single `[B,S]` `segment_ids` array, else None
  recurrent_state_floats      the `Mechanism.state_size` of the recurrence
  sequence_form               a scope in which another form (context-parallel) runs the causal
                              recurrence over whole sequences

Implementations: causal attention has three forms of the primitive ("xla" chunked, "parallel"
quadratic, "reference" scan): `CAUSAL_IMPLEMENTATIONS`. Non-causal attention has two: "xla", the
linear `φ(Q)(φ(K)ᵀ V)`, and "reference" (= "parallel"), the quadratic `(φ(Q) φ(K)ᵀ ⊙ mask) V`
that materializes the weights: `NONCAUSAL_IMPLEMENTATIONS`, listed by mechanisms that are only
non-causal.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Optional

import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import implementations
from attnjax.core import linear

_F32 = jnp.float32
CAUSAL_IMPLEMENTATIONS = ("xla", "parallel", "reference")
NONCAUSAL_IMPLEMENTATIONS = ("xla", "reference")

__all__ = ["CAUSAL_IMPLEMENTATIONS", "NONCAUSAL_IMPLEMENTATIONS", "check_recurrent_args",
           "feature_linear_attention", "map_output", "recurrent_linear_attention",
           "recurrent_state_floats", "self_segment_ids", "sequence_form",
           "sequence_linear_attention",
           "visible_key_counts"]


# The form that runs the causal recurrence over whole sequences inside `sequence_form` (None: the
# single-device one). A context variable, so that a layer can choose it without a code path of its
# own in every mechanism: the mechanism maps its features as always and hands them on here.
_SEQUENCE_FORM: contextvars.ContextVar[Optional[Callable]] = contextvars.ContextVar(
    "linear_sequence_form", default=None)


@contextlib.contextmanager
def sequence_form(form: Optional[Callable]):
  """Within this scope, `feature_linear_attention`'s causal recurrence over a whole unpadded
  sequence calls `form(qf, kf, v, log_decay=, normalize=, scale=, segment_ids=, chunk_size=,
  implementation=)` (the arguments of `gated_linear_attention`), which returns the output or None
  to leave the call to the single-device form. `form=None` changes nothing."""
  token = _SEQUENCE_FORM.set(form)
  try:
    yield
  finally:
    _SEQUENCE_FORM.reset(token)


def _is_full_sequence(T, S, q_offset):
  return T == S and isinstance(q_offset, int) and q_offset == 0


def feature_linear_attention(op, qf, kf, v, *, causal, segment_ids, q_offset, kv_lengths,
                             implementation, log_decay=None, normalize=False, scale=1.0,
                             chunk_size=64, initial_state=None, return_final_state=False):
  """Gated linear attention on feature-mapped `qf [B,T,N,F]`, `kf [B,S,K,F]` under the contract.

  `log_decay` is `[B,S,N]` / `[B,S,N,F]` over the key positions. Non-causal attention ignores
  positions; causal attention over a full sequence uses the primitive's forms; causal queries at an
  offset (decoding over a cache) use the cached form. The result has v's dtype.

  Recurrent decoding (`return_final_state=True`): q, k, v are the T new tokens of a causal
  self-attention, `initial_state` the state after the earlier ones (None: none yet); returns
  `(out, state)` with the float32 state `[B,N,F,h(+1)]`. Positions are implicit in the state, so
  `q_offset` is not used here.
  """
  if return_final_state:
    return recurrent_linear_attention(
        op, qf, kf, v, causal=causal, segment_ids=segment_ids, kv_lengths=kv_lengths,
        implementation=implementation, log_decay=log_decay, normalize=normalize, scale=scale,
        chunk_size=chunk_size, initial_state=initial_state)
  if initial_state is not None:
    raise ValueError(f"{op}: `initial_state` needs `return_final_state=True` (recurrent decoding)")
  out = sequence_linear_attention(
      op, qf, kf, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
      kv_lengths=kv_lengths, implementation=implementation, log_decay=log_decay,
      normalize=normalize, scale=scale, chunk_size=chunk_size)
  return out.astype(v.dtype)   # the features are float32; the result takes the input's dtype


def check_recurrent_args(op, *, causal, segment_ids, T, S):
  """The recurrent form's contract: causal self-attention over the new tokens of one sequence."""
  if not causal:
    raise ValueError(f"{op}: recurrent decoding (`return_final_state`) is for causal attention")
  if segment_ids is not None:
    raise ValueError(f"{op}: recurrent decoding carries one sequence per batch row; "
                     "`segment_ids` are not supported there")
  if T != S:
    raise ValueError(f"{op}: recurrent decoding takes the new tokens only: q and k must have the "
                     f"same length, got T={T}, S={S}")


def recurrent_linear_attention(op, qf, kf, v, *, causal, segment_ids, kv_lengths, implementation,
                               log_decay, normalize, scale, chunk_size, initial_state):
  """Recurrent decoding of `feature_linear_attention`: `(out in v's dtype, float32 state)`."""
  check_recurrent_args(op, causal=causal, segment_ids=segment_ids, T=qf.shape[1], S=kf.shape[1])
  if kv_lengths is not None:
    checks.check_shape(op, "kv_lengths", kv_lengths, (qf.shape[0],), "[B]")
  out, state = linear.gated_linear_attention(
      qf, kf, v, log_decay=log_decay, causal=True, normalize=normalize, scale=scale,
      initial_state=initial_state, return_final_state=True, kv_lengths=kv_lengths,
      chunk_size=chunk_size, implementation=implementation)
  return out.astype(v.dtype), state


def map_output(result, f):
  """Applies `f` to the output of `feature_linear_attention`, passing a returned state through."""
  if isinstance(result, tuple):
    return f(result[0]), result[1]
  return f(result)


def sequence_linear_attention(op, qf, kf, v, *, causal, segment_ids, q_offset, kv_lengths,
                              implementation, log_decay, normalize, scale, chunk_size):
  """The forward of `feature_linear_attention` over a sequence or a cache (float32 result)."""
  B, T, N, _ = qf.shape
  S = kf.shape[1]
  if isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = segment_ids
    checks.check_shape(op, "segment_ids (query)", q_seg, (B, T), "[B, T]")
    checks.check_shape(op, "segment_ids (key)", kv_seg, (B, S), "[B, S]")
    pair = (q_seg, kv_seg)
  elif segment_ids is not None:
    if T != S:
      raise ValueError(f"{op}: a single `segment_ids` array is for self-attention (T == S); "
                       f"got T={T}, S={S}: pass (q_segment_ids [B,T], kv_segment_ids [B,S])")
    checks.check_shape(op, "segment_ids", segment_ids, (B, T), "[B, T]")
    pair = (segment_ids, segment_ids)
  else:
    pair = None
  if kv_lengths is not None:
    checks.check_shape(op, "kv_lengths", kv_lengths, (B,), "[B]")
  if not causal:
    def quadratic():
      # `(φ(Q) φ(K)ᵀ ⊙ mask) V` (every key visible: offset S), the plain definition, and the one
      # form for documents across two sequences.
      return linear.gated_linear_attention_cached(
          qf, kf, v, q_offset=jnp.full((B,), S), kv_lengths=kv_lengths, normalize=normalize,
          scale=scale, segment_ids=pair)

    def linear_form():
      # `φ(Q)(φ(K)ᵀ V)`; documents across two sequences have no per-document state sum here.
      if pair is not None and T != S:
        return quadratic()
      return linear.gated_linear_attention(
          qf, kf, v, causal=False, normalize=normalize, scale=scale, segment_ids=segment_ids,
          kv_lengths=kv_lengths, chunk_size=chunk_size, implementation="xla")

    # "parallel" and "reference" name the same quadratic form, so that a mechanism listing the
    # causal forms accepts each of them non-causally too.
    table = (("xla", linear_form, ()), ("parallel", quadratic, ()), ("reference", quadratic, ()))
    return implementations.dispatch(op, table, implementation)
  if _is_full_sequence(T, S, q_offset) and not isinstance(segment_ids, (tuple, list)):
    form = _SEQUENCE_FORM.get()
    out = None if form is None or kv_lengths is not None else form(
        qf, kf, v, log_decay=log_decay, normalize=normalize, scale=scale, segment_ids=segment_ids,
        chunk_size=chunk_size, implementation=implementation)
    if out is not None:
      return out
    return linear.gated_linear_attention(
        qf, kf, v, log_decay=log_decay, causal=True, normalize=normalize, scale=scale,
        segment_ids=segment_ids, kv_lengths=kv_lengths, chunk_size=chunk_size,
        implementation=implementation)
  return linear.gated_linear_attention_cached(
      qf, kf, v, q_offset=q_offset, kv_lengths=kv_lengths, log_decay=log_decay,
      normalize=normalize, scale=scale, segment_ids=pair)


def self_segment_ids(segment_ids, B, S):
  """`segment_ids` if it is one `[B,S]` array, else None (a pair, or a malformed array, which the
  contract then rejects with its own error)."""
  if segment_ids is None or isinstance(segment_ids, (tuple, list)):
    return None
  return jnp.asarray(segment_ids) if jnp.shape(segment_ids) == (B, S) else None


def visible_key_counts(op, q, k, *, causal, segment_ids, q_offset, kv_lengths):
  """Number of keys each query sees, `[B,T,N,1]` float32 (by running the contract on ones)."""
  B, T, N, _ = q.shape
  S, K = k.shape[1], k.shape[2]
  ones_q = jnp.ones((B, T, N, 1), _F32)
  ones_k = jnp.ones((B, S, K, 1), _F32)
  return feature_linear_attention(op, ones_q, ones_k, ones_k, causal=causal,
                                  segment_ids=segment_ids, q_offset=q_offset,
                                  kv_lengths=kv_lengths, implementation=None)


def recurrent_state_floats(features=lambda H: H, extra=1):
  """`Mechanism.state_size` of `feature_linear_attention`'s recurrence: `features(H)` features per
  head and `h + extra` value columns (extra = 1 for a normalizer row), `N · F · (h + extra)`."""
  return lambda T, N, K, H, h, kwargs: N * features(H) * (h + extra)
