"""Infini-attention (#75): causal local softmax per segment mixed with a compressive linear memory.

Paper: Munkhdalai et al., "Leave No Context Behind: Efficient Infinite Context Transformers with
Infini-attention", arXiv:2404.07143. The memory's linear rule runs on
`attnjax.core.linear.gated_linear_attention` (its chunked "xla" form), the local softmax on
`attnjax.core.flex.flex_attention` (segments folded into the batch by `attnjax.core.local_blocks` in
a full forward).

Decoding over a KV cache: the cache holds every key, so a query at absolute position p reads the
memory its recurrence would have at p. The key stream is processed as in the full forward (slots at
or past `kv_lengths` zeroed first, so cache garbage reaches nothing) and each query is placed on the
stream at its position (`contract.scatter_positions` / `gather_positions`); the cost per call is
linear in S, as softmax decoding over the same cache.

Recurrent decoding (`initial_state`, `return_final_state`): the state is the memory (M, z) of the
complete segments plus the keys and values of the current segment (at most L - 1), a fixed size
whatever the number of tokens; a call may carry any number of new tokens across segment ends.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import flex
from attnjax.core import implementations
from attnjax.core import masks
from attnjax.core import memory_state
from attnjax.core.feature_maps import elu_plus_one
from attnjax.core.linear import gated_linear_attention
from attnjax.core.local_blocks import block_local_attention
from attnjax.registry import Mechanism, ParamSpec, example_params, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value

_F32 = jnp.float32


def _segment_bounds(segment_ids, B: int, S: int, length: int):
  """Each token's segment of `length` positions, counted from its document's start: (start, end)."""
  doc_start, doc_end = contract.document_bounds(segment_ids, B, S)
  idx = jnp.arange(S, dtype=jnp.int32)[None]
  start = doc_start + (idx - doc_start) // length * length
  return start, jnp.minimum(start + length, doc_end)


def _safe_ratio(num, den):
  """`num / den[..., None]`, zero where the normalizer is zero (an empty memory reads zeros)."""
  den = den[..., None]
  return jnp.where(den == 0, 0.0, num / jnp.where(den == 0, 1.0, den))


def _group(x, K: int):
  """`[B, S, N, d]` -> `[B, S, K, G, d]`: query head n belongs to key/value head n // G."""
  B, S, N, d = x.shape
  return x.reshape(B, S, K, N // K, d)


# --------------------------------------------------------------------------------------------------
# Infini-attention


def _read_memory(x, M, z):
  """Retrieval `σ(x) M / (σ(x) z)`: x `[B, K, G, F]` (features), M `[B, K, F, h]`, z `[B, K, F]`."""
  return _safe_ratio(jnp.einsum("bkgf,bkfh->bkgh", x, M), jnp.einsum("bkgf,bkf->bkg", x, z))


def _memory_update(kf, vf, M, z, rule: str):
  """One segment's write. kf `[B, L, K, F]`, vf `[B, L, K, h]` (padding rows zero) -> (ΔM, Δz):
  linear `σ(K)ᵀ V`; delta `σ(K)ᵀ (V - σ(K) M / (σ(K) z))` (Infini-attention eqs. (4), (6))."""
  if rule == "delta":
    ret = jax.vmap(_read_memory, in_axes=(1, None, None), out_axes=1)(kf[:, :, :, None], M, z)
    vf = vf - ret[:, :, :, 0]
  return jnp.einsum("blkf,blkh->bkfh", kf, vf), jnp.sum(kf, axis=1)


def _memory_segment_scan(qf, kf, vf, length: int, rule: str, init=None, complete=None):
  """Segment-level recurrence over aligned segments `[sL, (s+1)L)` (no packed documents).

  qf `[B, S, N, F]` (zeros where no query), kf `[B, S, K, F]`, vf `[B, S, K, h]` with padding rows
  zero. Returns (retrievals `[B, S, N, h]`, final memory M `[B, K, F, h]`, z `[B, K, F]`): O(S), a
  scan of S / L steps. `init`: the memory (M, z) before the first segment (zeros when None);
  `complete`: a scalar, only the first `complete` segments are written (the rest are read only: a
  segment still being filled is not committed), every segment when None.
  """
  B, S, N, F = qf.shape
  K, h = kf.shape[2], vf.shape[3]
  ns = -(-S // length)
  pad = ns * length - S
  seg = lambda x: jnp.moveaxis(jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)).reshape(
      (B, ns, length) + x.shape[2:]), 1, 0)

  def step(carry, xs):
    M, z = carry
    i, q_s, k_s, v_s = xs
    read = jax.vmap(_read_memory, in_axes=(1, None, None), out_axes=1)(_group(q_s, K), M, z)
    write = lambda: tuple(a + d for a, d in zip((M, z), _memory_update(k_s, v_s, M, z, rule),
                                                strict=True))
    if complete is None:
      return write(), read
    # A real branch (`complete` is one scalar): decoding pays the write once per segment only.
    return jax.lax.cond(i < complete, write, lambda: (M, z)), read

  if init is None:
    init = (jnp.zeros((B, K, F, h), _F32), jnp.zeros((B, K, F), _F32))
  xs = (jnp.arange(ns, dtype=jnp.int32), seg(qf), seg(kf), seg(vf))
  (M, z), reads = jax.lax.scan(step, init, xs)
  reads = jnp.moveaxis(reads, 0, 1).reshape(B, ns * length, N, h)[:, :S]
  return reads, M, z


def _memory_token_scan(qf, kf, vf, seg_start, doc_start, rule: str):
  """The definition, one token per step (reference; any segmentation, packed documents included).

  Carries the committed memory (M_{s-1}, z_{s-1}), read by the queries and the delta rule, and the
  memory being written (M_s, z_s); at a segment start the written memory is committed, at a document
  start both are reset. Shapes as `_memory_segment_scan`; seg_start, doc_start `[B, S]` bool.
  """
  B, S, N, F = qf.shape
  K, h = kf.shape[2], vf.shape[3]

  def step(carry, xs):
    Mc, zc, Ma, za = carry
    q_t, k_t, v_t, seg_t, doc_t = xs
    keep = lambda x, flag: jnp.where(flag.reshape((B,) + (1,) * (x.ndim - 1)), 0.0, x)
    pick = lambda new, old, flag: jnp.where(flag.reshape((B,) + (1,) * (old.ndim - 1)), new, old)
    Mc, zc = keep(pick(Ma, Mc, seg_t), doc_t), keep(pick(za, zc, seg_t), doc_t)
    Ma, za = keep(Ma, doc_t), keep(za, doc_t)
    read = _read_memory(q_t.reshape(B, K, N // K, F), Mc, zc)
    dM, dz = _memory_update(k_t[:, None], v_t[:, None], Mc, zc, rule)
    return (Mc, zc, Ma + dM, za + dz), read.reshape(B, N, h)

  zeros = (jnp.zeros((B, K, F, h), _F32), jnp.zeros((B, K, F), _F32))
  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (qf, kf, vf, seg_start, doc_start))
  _, reads = jax.lax.scan(step, zeros + zeros, xs)
  return jnp.moveaxis(reads, 0, 1)


def _memory_interleaved(qf, kf, vf, seg_start, seg_end, segment_ids, implementation: str):
  """Linear-rule retrieval through the gated linear attention primitive (exact, O(S)).

  A query in the segment [a, b) reads the keys before a. Interleave queries and keys into one stream
  of 2S slots, query j at slot `j + a_j` and key j at slot `j + b_j`: every query then sits after
  exactly the keys of earlier segments (of its document), so the causal normalized linear attention
  `σ(q)·Σ σ(k)vᵀ / σ(q)·Σ σ(k)` over the stream, read at the query slots, is the memory retrieval.
  Documents stay contiguous on the stream, so `segment_ids` carry over and reset the memory.
  """
  B, S = seg_start.shape
  idx = jnp.arange(S, dtype=jnp.int32)[None]
  slot_q, slot_k = idx + seg_start, idx + seg_end
  place = lambda x, slots: jax.vmap(lambda xb, sb: jnp.zeros((2 * S,) + xb.shape[1:], xb.dtype)
                                    .at[sb].set(xb))(x, slots)
  docs = None
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids)
    docs = jax.vmap(lambda sb, qb, kb: jnp.zeros((2 * S,), sb.dtype).at[qb].set(sb).at[kb].set(sb))(
        seg, slot_q, slot_k)
  out = gated_linear_attention(place(qf, slot_q), place(kf, slot_k), place(vf, slot_k),
                               normalize=True, causal=True, scale=1.0, segment_ids=docs,
                               implementation=implementation)
  return jax.vmap(lambda ob, sb: ob[sb])(out, slot_q)


def infini_memory(k: Key, v: Value, *, segment_length: int, update_rule: str = "linear",
                  kv_lengths: Optional[Lengths] = None) -> tuple[jax.Array, jax.Array]:
  """The compressive memory after the whole sequence: (M `[B, K, F, h]`, z `[B, K, F]`), float32.

  M_s = M_{s-1} + σ(K_s)ᵀ V_s (linear) or the delta rule, z_s = z_{s-1} + Σ_t σ(K_s,t), over the
  segments of `segment_length` keys; F = H. Its size does not depend on the sequence length.
  """
  B, S, K, _ = k.shape
  kf = contract.zero_padded(elu_plus_one(k), kv_lengths)
  vf = contract.zero_padded(v, kv_lengths)
  qf = jnp.zeros((B, S, K) + kf.shape[3:], _F32)
  _, M, z = _memory_segment_scan(qf, kf, vf, segment_length, update_rule)
  return M, z


def _local_masked(q, k, v, *, seg_start, segment_length, segment_ids, q_offset, kv_lengths, scale,
                  full, implementation):
  """Causal softmax within the query's segment as masked flex attention, any call."""
  B, T, S = q.shape[0], q.shape[1], k.shape[1]
  pos = contract.query_positions(B, T, q_offset)
  q_start = seg_start if full else pos // segment_length * segment_length
  same = lambda b, n, qi, ki: q_start[b, qi] == seg_start[b, ki]
  base = contract.contract_mask(B=B, T=T, S=S, causal=True, q_offset=q_offset,
                                segment_ids=segment_ids, kv_lengths=kv_lengths,
                                op="infini_attention")
  return flex.flex_attention(q, k, v, mask_mod=masks.combine_masks(base, same), scale=scale,
                             implementation=implementation)


def _local_xla(q, k, v, **call):
  """Segments as a batch of `[L, L]` problems in a full forward without documents; otherwise the
  masked form's "xla" flex attention."""
  if call["full"] and call["segment_ids"] is None:
    return block_local_attention(q, k, v, block=call["segment_length"], causal=True,
                                 kv_lengths=call["kv_lengths"], scale=call["scale"],
                                 op="infini_attention")
  return _local_masked(q, k, v, implementation="xla", **call)


def _local_reference(q, k, v, **call):
  """Dense masked local attention."""
  return _local_masked(q, k, v, implementation="reference", **call)


def _memory_reference(qf, kf, vf, *, seg_start, seg_end, segment_ids, segment_length,
                      update_rule):
  """Memory retrieval by the definition, one token per step (`_memory_token_scan`)."""
  del seg_end, segment_length
  B, S = seg_start.shape
  idx = jnp.arange(S, dtype=jnp.int32)[None]
  doc_start, _ = contract.document_bounds(segment_ids, B, S)
  return _memory_token_scan(qf, kf, vf, seg_start == idx, doc_start == idx, update_rule)


def _memory_xla(qf, kf, vf, **call):
  """Linear rule: the interleaved stream through `gated_linear_attention`'s chunked form; delta
  rule: a scan over segments (over tokens with packed documents)."""
  if call["update_rule"] == "linear":
    return _memory_interleaved(qf, kf, vf, call["seg_start"], call["seg_end"],
                               call["segment_ids"], "xla")
  if call["segment_ids"] is None:
    return _memory_segment_scan(qf, kf, vf, call["segment_length"], call["update_rule"])[0]
  return _memory_reference(qf, kf, vf, **call)


_LOCAL_IMPLEMENTATIONS = (("xla", _local_xla, ()), ("reference", _local_reference, ()))
_MEMORY_IMPLEMENTATIONS = (("xla", _memory_xla, ()), ("reference", _memory_reference, ()))


def infini_attention(q: Query, k: Key, v: Value, *, gate, segment_length: int = 2048,
                     update_rule: str = "linear", causal: bool = True,
                     segment_ids: Optional[SegmentIds] = None, q_offset=0,
                     kv_lengths: Optional[Lengths] = None, scale=None,
                     implementation: Optional[str] = None, initial_state: Optional[dict] = None,
                     return_final_state: bool = False) -> Output | tuple[Output, dict]:
  """Infini-attention: causal local softmax per segment mixed with a compressive linear memory.

  Paper: Munkhdalai et al., "Leave No Context Behind: Efficient Infinite Context Transformers with
  Infini-attention", arXiv:2404.07143, eqs. (1)-(6). The sequence is cut into segments of L =
  `segment_length` positions (counted from each packed document's start); for a query in segment s:

      A_dot = softmax(scale · Q Kᵀ, causal within segment s) V
      A_mem = σ(Q) M_{s-1} / (σ(Q) z_{s-1})            σ = ELU + 1;  A_mem = 0 while z = 0
      M_s = M_{s-1} + σ(K_s)ᵀ V_s                       "linear"
      M_s = M_{s-1} + σ(K_s)ᵀ (V_s - σ(K_s) M_{s-1} / (σ(K_s) z_{s-1}))   "delta"
      z_s = z_{s-1} + Σ_t σ(K_s,t)
      O = sigmoid(β) ⊙ A_mem + (1 - sigmoid(β)) ⊙ A_dot   β: one learned scalar per head

  The memory (M, z) is `[K, H, h] + [K, H]` per sequence whatever T (one per key/value head; query
  head n reads head n // (N/K)). Cost O(T·L) time, O(T) memory.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`.
    gate: `[N]`, the gating logits β.
    segment_length: L.
    update_rule: "linear" or "delta".
    causal: must be True (the paper's language-model attention).
    segment_ids, q_offset, kv_lengths, scale: the common contract; `segment_ids` (a full forward
      only) reset the memory at document starts.
    implementation: "xla" (local attention as `[L, L]` blocks; linear-rule memory through
      `gated_linear_attention`'s chunked form; delta-rule memory as a scan over segments) or
      "reference" (dense masked local attention; memory as a scan over tokens).
    initial_state, return_final_state: recurrent decoding (`Mechanism.recurrent`): q, k, v are the
      T new tokens after `q_offset` = n earlier ones (one scalar); the state is the memory of the
      complete segments and the current segment's first n mod L keys and values,
      `{"memory": [B, K, H, h], "normalizer": [B, K, H], "keys": [B, L-1, K, H],
      "values": [B, L-1, K, h]}` float32 (None or zeros before the first token).

  Returns:
    `[B, T, N, h]` in q's dtype; with `return_final_state`, `(out, state after n + T tokens)`.
  """
  op = "infini_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  if not causal:
    raise ValueError(f"{op}: Infini-attention is causal; call with causal=True")
  if update_rule not in ("linear", "delta"):
    raise ValueError(f"{op}: `update_rule` must be 'linear' or 'delta', got {update_rule!r}")
  if segment_length < 1:
    raise ValueError(f"{op}: `segment_length` must be >= 1, got {segment_length}")
  checks.check_shape(op, "gate", gate, (N,), "[N]")
  impl = checks.check_implementation(op, implementation)
  scale = H ** -0.5 if scale is None else scale
  if return_final_state:
    memory_state.check_recurrent_call(op, causal=causal, segment_ids=segment_ids,
                                      kv_lengths=kv_lengths, q_offset=q_offset, T=T, S=S)
    return _infini_recurrent(op, q, k, v, gate, initial_state, L=segment_length,
                             rule=update_rule, scale=scale, q_offset=q_offset, impl=impl)
  if initial_state is not None:
    raise ValueError(f"{op}: `initial_state` needs `return_final_state=True` (recurrent decoding)")
  full = contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                       segment_ids=segment_ids)

  # Local causal softmax within the query's segment.
  seg_start, seg_end = _segment_bounds(segment_ids, B, S, segment_length)
  pos = contract.query_positions(B, T, q_offset)
  local = implementations.dispatch(op, _LOCAL_IMPLEMENTATIONS, impl, q, k, v, seg_start=seg_start,
                                   segment_length=segment_length, segment_ids=segment_ids,
                                   q_offset=q_offset, kv_lengths=kv_lengths, scale=scale, full=full)

  # Memory retrieval from the segments before the query's.
  kf = contract.zero_padded(elu_plus_one(k), kv_lengths)   # cache garbage must not reach M
  vf = contract.zero_padded(v, kv_lengths)
  qf = elu_plus_one(q)
  qf = qf if full else contract.scatter_positions(qf, pos, S)
  mem = implementations.dispatch(op, _MEMORY_IMPLEMENTATIONS, impl, qf, kf, vf,
                                 seg_start=seg_start, seg_end=seg_end, segment_ids=segment_ids,
                                 segment_length=segment_length, update_rule=update_rule)
  mem = mem if full else contract.gather_positions(mem, pos)
  return _gated(gate, mem, local).astype(q.dtype)


def _gated(gate, mem, local):
  """`sigmoid(β) ⊙ A_mem + (1 - sigmoid(β)) ⊙ A_dot` (eq. (6)), float32."""
  g = jax.nn.sigmoid(jnp.asarray(gate, _F32))[:, None]
  return g * mem + (1.0 - g) * local.astype(_F32)


def _infini_recurrent(op, q, k, v, gate, state, *, L, rule, scale, q_offset, impl):
  """The new tokens from the carried state (see `infini_attention`): `(out, state)`.

  With r = n mod L tokens of the current segment buffered, the stream X = (buffered tokens, new
  tokens) starts at a segment boundary, so it is cut into aligned segments like a full forward:
  each new query reads the memory committed before its segment (scan over X's segments, starting
  from the carried memory; only segments completed inside X are written) and attends causally to
  X within its segment (one query: a masked row over X; a chunk: X's aligned segments as blocks).
  The segment still open at the end becomes the new buffer.
  """
  B, T, N, H = q.shape
  K, h = k.shape[2], v.shape[3]
  state = memory_state.checked_state(
      op, state, {"memory": (B, K, H, h), "normalizer": (B, K, H), "keys": (B, L - 1, K, H),
                  "values": (B, L - 1, K, h)},
      {"memory": "[B, K, H, h]", "normalizer": "[B, K, H]", "keys": "[B, L-1, K, H]",
       "values": "[B, L-1, K, h]"})
  r = q_offset % L if isinstance(q_offset, int) else jnp.asarray(q_offset, jnp.int32) % L
  P = L - 1 + T

  # X: slots [0, r) buffered, [r, r + T) new, zeros or stale after.
  place = lambda x, new: jax.lax.dynamic_update_slice_in_dim(x, new.astype(x.dtype), r, axis=1)
  stream = lambda buf, new: place(jnp.concatenate([buf, jnp.zeros((B, T) + buf.shape[2:])], 1), new)
  xk, xv = stream(state["keys"], k), stream(state["values"], v)
  end = r + T
  qf = place(jnp.zeros((B, P, N, H), _F32), elu_plus_one(q))
  # Slots at or past `end` lie in the open segment, never written, and no query reads them.
  reads, M, z = _memory_segment_scan(qf, elu_plus_one(xk), xv, L, rule, complete=end // L,
                                     init=(state["memory"], state["normalizer"]))
  mem = jax.lax.dynamic_slice_in_dim(reads, r, T, axis=1)

  xk_in, xv_in = xk.astype(k.dtype), xv.astype(v.dtype)
  if impl == "xla" and T > 1:
    # A chunk: X's segments are aligned blocks, so the local part costs O((L + T)·L), not O(T²).
    local = block_local_attention(place(jnp.zeros((B, P, N, H), q.dtype), q), xk_in, xv_in,
                                  block=L, causal=True, kv_lengths=None, scale=scale, op=op)
    local = jax.lax.dynamic_slice_in_dim(local, r, T, axis=1)
  else:
    def same_segment_causal(b, n, q_idx, kv_idx):
      del b, n
      pos = r + q_idx
      return (kv_idx <= pos) & (kv_idx >= pos // L * L)

    local = flex.flex_attention(q, xk_in, xv_in, mask_mod=same_segment_causal, scale=scale,
                                implementation=impl)
  # The open segment starts at end // L * L (at most P): its L - 1 slots are the new buffer.
  tail = lambda x: jax.lax.dynamic_slice_in_dim(
      jnp.pad(x, ((0, 0), (0, L - 1), (0, 0), (0, 0))), end // L * L, L - 1, axis=1)
  new_state = {"memory": M, "normalizer": z, "keys": tail(xk), "values": tail(xv)}
  return _gated(gate, mem, local).astype(q.dtype), new_state


# --------------------------------------------------------------------------------------------------
# Registration

INFINI_SPECS = (ParamSpec("gate", lambda N, K, H: (N,), jax.nn.initializers.zeros),)

register(Mechanism(
    name="infini_attention", fn=infini_attention, family="recurrent-memory", seeds=(75,),
    paper="Leave No Context Behind: Efficient Infinite Context Transformers with Infini-attention",
    arxiv="2404.07143", patterns=frozenset({"causal_self"}), gqa=True, decode=True,
    recurrent=True, packed=True,
    complexity="O(T·L) (L = segment length); memory state O(1) in T",
    implementations=("xla", "reference"), params=INFINI_SPECS,
    defaults=dict(segment_length=2048, update_rule="linear"),
    # segment_length: an example setting (a few segments at the suite's lengths).
    example=lambda *, N, K, H: dict(segment_length=5, **example_params(
        INFINI_SPECS, N=N, K=K, H=H, perturb=1.0)),
    # The compressive memory and its normaliser per kv head, plus the current segment's keys and
    # values (at most L - 1 of them: a complete segment is committed to the memory at once).
    state_size=lambda T, N, K, H, h, kw: (K * H * (h + 1)
                                          + (kw["segment_length"] - 1) * K * (H + h))))

__all__ = ["infini_attention", "infini_memory", "INFINI_SPECS"]
