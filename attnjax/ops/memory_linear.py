"""Compressive-memory linear mechanisms: Infini-attention (#75), LAVO orthogonal memory (#151) and
CHELA short-long convolutions with tiled linear attention (#218).

Each compresses the context into a state whose size does not depend on the sequence length, and each
is a thin function over the library's primitives: the linear recurrences run on
`attnjax.core.linear.gated_linear_attention` (its chunked "xla" form is the Lightning-2 tiling), the
softmax parts on `attnjax.core.flex.flex_attention` / `attnjax.ops.dot_product_attention`, and joint
softmaxes over several parts are merged with `attnjax.core.merge.merge_attention_states`.

Decoding over a KV cache: the cache holds every key, so a query at absolute position p reads the
state its recurrence would have at p. The key stream is processed as in the full forward (slots at
or past `kv_lengths` zeroed first, so cache garbage reaches nothing) and each query is placed on the
stream at its position (`_to_stream` / `_from_stream`); the cost per call is linear in S, as softmax
decoding over the same cache.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import flex
from attnjax.core import masks
from attnjax.core.linear import gated_linear_attention
from attnjax.core.merge import merge_attention_states
from attnjax.ops.dot_product import contract_mask, dot_product_attention
from attnjax.registry import Mechanism, ParamSpec, example_params, register

_F32 = jnp.float32

# ----------------------------------------------------------------------------------------------------
# Shared helpers


def _check_call(op: str, T: int, S: int, q_offset, kv_lengths, segment_ids) -> bool:
  """Validates the self-attention call; True for a full forward (T == S, q_offset 0)."""
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


def _check_params(op: str, shapes: dict, params: dict):
  for name, (expected, letters) in shapes.items():
    checks.check_shape(op, name, params[name], expected, letters)


def _elu1(x):
  """σ(x) = ELU(x) + 1 > 0: the feature map of Infini-attention (and of Katharopoulos et al.)."""
  return jax.nn.elu(x) + 1.0


def _key_valid(B: int, S: int, kv_lengths) -> jax.Array:
  """`[B, S]` True at keys below `kv_lengths` (all True without lengths)."""
  if kv_lengths is None:
    return jnp.ones((B, S), bool)
  return jnp.arange(S, dtype=jnp.int32)[None] < jnp.asarray(kv_lengths, jnp.int32)[:, None]


def _positions(B: int, T: int, q_offset) -> jax.Array:
  """Absolute query positions `q_offset + t`: `[B, T]` int32."""
  off = jnp.asarray(q_offset, jnp.int32)
  off = off[:, None] if off.ndim == 1 else off
  return jnp.broadcast_to(off + jnp.arange(T, dtype=jnp.int32)[None], (B, T))


def _to_stream(x, pos, S: int, full: bool):
  """Places queries `x: [B, T, ...]` on the key stream at positions `pos: [B, T]` -> `[B, S, ...]`
  (zeros where no query sits; positions past S are dropped)."""
  if full:
    return x
  return jax.vmap(lambda xb, pb: jnp.zeros((S,) + xb.shape[1:], xb.dtype).at[pb].set(
      xb, mode="drop"))(x, pos)


def _from_stream(y, pos, full: bool):
  """Reads `y: [B, S, ...]` back at the query positions `pos: [B, T]` -> `[B, T, ...]`."""
  if full:
    return y
  return jax.vmap(lambda yb, pb: yb[jnp.clip(pb, 0, yb.shape[0] - 1)])(y, pos)


def _doc_bounds(segment_ids, B: int, S: int):
  """(first position, one past the last position) of each token's packed document: `[B, S]` each."""
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


def _segment_bounds(segment_ids, B: int, S: int, length: int):
  """Each token's segment of `length` positions, counted from its document's start: (start, end)."""
  doc_start, doc_end = _doc_bounds(segment_ids, B, S)
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


# ----------------------------------------------------------------------------------------------------
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


def _memory_segment_scan(qf, kf, vf, length: int, rule: str):
  """Segment-level recurrence over aligned segments `[sL, (s+1)L)` (no packed documents).

  qf `[B, S, N, F]` (zeros where no query), kf `[B, S, K, F]`, vf `[B, S, K, h]` with padding rows
  zero. Returns (retrievals `[B, S, N, h]`, final memory M `[B, K, F, h]`, z `[B, K, F]`): O(S), a
  scan of S / L steps.
  """
  B, S, N, F = qf.shape
  K, h = kf.shape[2], vf.shape[3]
  ns = -(-S // length)
  pad = ns * length - S
  seg = lambda x: jnp.moveaxis(jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)).reshape(
      (B, ns, length) + x.shape[2:]), 1, 0)

  def step(carry, xs):
    M, z = carry
    q_s, k_s, v_s = xs
    read = jax.vmap(_read_memory, in_axes=(1, None, None), out_axes=1)(_group(q_s, K), M, z)
    dM, dz = _memory_update(k_s, v_s, M, z, rule)
    return (M + dM, z + dz), read

  init = (jnp.zeros((B, K, F, h), _F32), jnp.zeros((B, K, F), _F32))
  (M, z), reads = jax.lax.scan(step, init, (seg(qf), seg(kf), seg(vf)))
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


def infini_memory(k, v, *, segment_length: int, update_rule: str = "linear", kv_lengths=None):
  """The compressive memory after the whole sequence: (M `[B, K, F, h]`, z `[B, K, F]`), float32.

  M_s = M_{s-1} + σ(K_s)ᵀ V_s (linear) or the delta rule, z_s = z_{s-1} + Σ_t σ(K_s,t), over the
  segments of `segment_length` keys; F = H. Its size does not depend on the sequence length.
  """
  B, S, K, _ = k.shape
  valid = _key_valid(B, S, kv_lengths)[..., None, None]
  kf = jnp.where(valid, _elu1(k.astype(_F32)), 0.0)
  vf = jnp.where(valid, v.astype(_F32), 0.0)
  qf = jnp.zeros((B, S, K) + kf.shape[3:], _F32)
  _, M, z = _memory_segment_scan(qf, kf, vf, segment_length, update_rule)
  return M, z


def _local_blocks(q, k, v, *, length: int, kv_lengths, scale):
  """Causal softmax within aligned segments as a batch of `[L, L]` problems: O(T·L) (T == S)."""
  B, T, N, H = q.shape
  ns = -(-T // length)
  pad = ns * length - T
  fold = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
      (B * ns, length) + x.shape[2:])
  lengths = (jnp.full((B,), T, jnp.int32) if kv_lengths is None
             else jnp.asarray(kv_lengths, jnp.int32))
  seg_len = jnp.clip(lengths[:, None] - jnp.arange(ns, dtype=jnp.int32)[None] * length, 0, length)
  out = dot_product_attention(fold(q), fold(k), fold(v), causal=True,
                              kv_lengths=seg_len.reshape(B * ns), scale=scale, implementation="xla")
  return out.reshape(B, ns * length, N, -1)[:, :T]


def infini_attention(q, k, v, *, gate, segment_length: int = 2048, update_rule: str = "linear",
                     causal: bool = True, segment_ids=None, q_offset=0, kv_lengths=None, scale=None,
                     implementation: Optional[str] = None):
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

  Returns:
    `[B, T, N, h]` in q's dtype.
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
  full = _check_call(op, T, S, q_offset, kv_lengths, segment_ids)
  scale = H ** -0.5 if scale is None else scale

  # Local causal softmax within the query's segment.
  seg_start, seg_end = _segment_bounds(segment_ids, B, S, segment_length)
  pos = _positions(B, T, q_offset)
  if impl == "xla" and full and segment_ids is None:
    local = _local_blocks(q, k, v, length=segment_length, kv_lengths=kv_lengths, scale=scale)
  else:
    q_start = seg_start if full else pos // segment_length * segment_length
    same = lambda b, n, qi, ki: q_start[b, qi] == seg_start[b, ki]
    base = contract_mask(B=B, T=T, S=S, causal=True, q_offset=q_offset, segment_ids=segment_ids,
                         kv_lengths=kv_lengths, op=op)
    local = flex.flex_attention(q, k, v, mask_mod=masks.combine_masks(base, same), scale=scale,
                                implementation=impl)

  # Memory retrieval from the segments before the query's.
  valid = _key_valid(B, S, kv_lengths)[..., None, None]
  kf = jnp.where(valid, _elu1(k.astype(_F32)), 0.0)     # where: cache garbage must not reach M
  vf = jnp.where(valid, v.astype(_F32), 0.0)
  qf = _to_stream(_elu1(q.astype(_F32)), pos, S, full)
  if impl == "xla" and update_rule == "linear":
    mem = _memory_interleaved(qf, kf, vf, seg_start, seg_end, segment_ids, "xla")
  elif impl == "xla" and segment_ids is None:
    mem, _, _ = _memory_segment_scan(qf, kf, vf, segment_length, update_rule)
  else:
    idx = jnp.arange(S, dtype=jnp.int32)[None]
    doc_start, _ = _doc_bounds(segment_ids, B, S)
    mem = _memory_token_scan(qf, kf, vf, seg_start == idx, doc_start == idx, update_rule)
  mem = _from_stream(mem, pos, full)

  g = jax.nn.sigmoid(jnp.asarray(gate, _F32))[:, None]
  out = g * mem + (1.0 - g) * local.astype(_F32)
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------------------------------
# LAVO: linear attention via orthogonal memory


def orthogonal_basis(num_bases: int, dim: int) -> np.ndarray:
  """`num_bases` orthonormal rows in R^dim (B Bᵀ = I): the first rows of the orthonormal DCT-II
  matrix, `b_j[i] = √((1 + [j > 0]) / dim) · cos(π (i + ½) j / dim)`; deterministic, no learning,
  and ordered from low to high frequency along the head dimension."""
  if not 1 <= num_bases <= dim:
    raise ValueError(f"orthogonal_basis: need 1 <= num_bases <= dim, got {num_bases}, {dim}")
  j = np.arange(num_bases)[:, None]
  i = np.arange(dim)[None, :]
  basis = np.cos(np.pi * (i + 0.5) * j / dim) * np.sqrt(2.0 / dim)
  basis[0] *= np.sqrt(0.5)
  return basis.astype(np.float32)


def _visible_counts(valid, segment_ids, *, causal: bool):
  """Number of keys each stream position's query sees: `[B, S]` (same document, not padding, and
  at or before it when causal)."""
  B, S = valid.shape
  cs = jnp.cumsum(valid.astype(jnp.int32), axis=1)
  doc_start, doc_end = _doc_bounds(segment_ids, B, S)
  before = jnp.where(doc_start > 0, jnp.take_along_axis(cs, jnp.maximum(doc_start - 1, 0), 1), 0)
  upto = cs if causal else jnp.take_along_axis(cs, doc_end - 1, 1)
  return upto - before


def orthogonal_memory_attention(q, k, v, *, relative_slope, num_bases: Optional[int] = None,
                                window: int = 32, causal: bool = False, segment_ids=None,
                                q_offset=0, kv_lengths=None, scale=None,
                                implementation: Optional[str] = None, chunk_size: int = 64):
  """LAVO: softmax over r orthogonal-memory slots and a local window, in linear time.

  Paper: Zhang et al., "Linear Attention via Orthogonal Memory", arXiv:2312.11135 (orthogonal
  memory, context dissecting, embedded relative positions). Per key/value head, with the fixed
  orthonormal bases b_1..b_r (`orthogonal_basis`, B Bᵀ = I) and the c_t keys the query at t sees
  (causal: the prefix of its document; non-causal: the whole document):

      w_i   = B k_i ∈ R^r                                   key i decomposed on the bases
      K̃_t[j] = (1/c_t) Σ_{i≤t} w_ij k_i,   Ṽ_t[j] = (1/c_t) Σ_{i≤t} w_ij v_i    r memory slots
      global: softmax_j(scale · q_t·K̃_t[j]) over the r slots, values Ṽ_t[j]
      local:  softmax(scale · q_t·k_i - m_n |t - i|) over the keys within `window` of t
      O_t = one softmax over the slots and the local keys together (the two parts merged)

  The memory is a running average of the basis-weighted keys and values (state `r·(H + h)` per
  head, independent of T). Both memory reads are linear attentions, so they run on
  `gated_linear_attention` without materializing the per-step memory: the slot logits are
  `(scale/c_t) Σ_i (q_t·k_i) w_i` (queries q, keys k, values w) and the output is
  `(1/c_t) Σ_i (p_t·w_i) v_i` (queries p_t = the slot softmax, keys w, values v). The local part is
  flex attention with a sliding-window mask; its relative position encoding is a learned per-head
  linear distance penalty m_n = softplus(`relative_slope`_n) (ALiBi form, initialized at ALiBi's
  slopes), so its parameters do not depend on the window. Interpretation: the paper's projection
  onto the bases is read as basis-weighted averaging of the tokens into r slots; its local
  dissected context as a sliding window attended jointly with the slots.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`.
    relative_slope: `[N]`, softplus-inverse of the local relative-distance slopes.
    num_bases: r <= H (default H).
    window: local keys at distance < window (causal: the last `window` positions).
    causal, segment_ids, q_offset, kv_lengths, scale: the common contract.
    implementation: "xla" (chunked linear attention, tiled flex) or "reference" (scan, dense).
    chunk_size: chunk of the linear attention's "xla" form.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "orthogonal_memory_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  checks.check_shape(op, "relative_slope", relative_slope, (N,), "[N]")
  if window < 1:
    raise ValueError(f"{op}: `window` must be >= 1, got {window}")
  r = H if num_bases is None else num_bases
  if not 1 <= r <= H:
    raise ValueError(f"{op}: `num_bases` must be in [1, H={H}], got {num_bases}")
  impl = checks.check_implementation(op, implementation)
  full = _check_call(op, T, S, q_offset, kv_lengths, segment_ids)
  scale = H ** -0.5 if scale is None else scale
  pos = _positions(B, T, q_offset)

  # Global part: the r orthogonal-memory slots.
  valid = _key_valid(B, S, kv_lengths)
  kf = jnp.where(valid[..., None, None], k.astype(_F32), 0.0)
  vf = jnp.where(valid[..., None, None], v.astype(_F32), 0.0)
  w = jnp.einsum("bskh,rh->bskr", kf, jnp.asarray(orthogonal_basis(r, H)))
  count = _visible_counts(valid, segment_ids, causal=causal)[..., None, None].astype(_F32)
  inv = 1.0 / jnp.maximum(count, 1.0)
  lin = dict(causal=causal, segment_ids=segment_ids, chunk_size=chunk_size,
             implementation="xla" if impl == "xla" else "reference")
  qs = _to_stream(q.astype(_F32), pos, S, full)
  logits = gated_linear_attention(qs, kf, w, scale=scale, **lin) * inv          # [B, S, N, r]
  lse_mem = jnp.where(count[..., 0] > 0, jax.nn.logsumexp(logits, axis=-1), -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  mem = gated_linear_attention(probs, w, vf, scale=1.0, **lin) * inv            # [B, S, N, h]
  mem, lse_mem = _from_stream(mem, pos, full), _from_stream(lse_mem, pos, full)

  # Local part: sliding window with the relative-distance penalty.
  base = contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset, segment_ids=segment_ids,
                       kv_lengths=kv_lengths, op=op)
  near = masks.sliding_window(window - 1, 0 if causal else window - 1, offset=q_offset)
  slopes = jax.nn.softplus(jnp.asarray(relative_slope, _F32))
  local, lse_loc = flex.flex_attention(
      q, k, v, mask_mod=masks.combine_masks(base, near), scale=scale, return_residuals=True,
      score_mod=masks.alibi(slopes, offset=q_offset, symmetric=not causal), implementation=impl)
  out, _ = merge_attention_states([local.astype(_F32), mem], [lse_loc, lse_mem])
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------------------------------
# CHELA: short-long convolutions + tiled linear attention

SHORT_KERNEL = 3     # taps of the short convolution
LONG_KERNEL = 64     # taps of the learned long convolution (its decay makes later taps negligible)


def stabilized_long_kernel(long_kernel, long_decay):
  """The long kernel, stabilized: `κ_l = w_l e^{-λ l} / Σ_l |w_l e^{-λ l}|`, λ = softplus(decay).

  The exponential window keeps distant taps small (near emphasized, far neglected, the SSM memory
  pattern) and the L1 normalization bounds the convolution's gain by 1 (|y| <= max |x|) whatever
  the raw weights, the hand-made regularization long convolutions otherwise need.
  `long_kernel: [K, H, L]`, `long_decay: [K, H]` -> `[K, H, L]` float32.
  """
  w = jnp.asarray(long_kernel, _F32)
  lam = jax.nn.softplus(jnp.asarray(long_decay, _F32))[..., None]
  kern = w * jnp.exp(-lam * jnp.arange(w.shape[-1], dtype=_F32))
  return kern / jnp.maximum(jnp.sum(jnp.abs(kern), axis=-1, keepdims=True), 1e-6)


def causal_conv(x, kernel, *, method: str = "direct", segment_ids=None):
  """Depthwise causal convolution `y_t = Σ_{l<L} κ_l x_{t-l}` (within each packed document).

  `x: [B, S, K, H]`, `kernel: [K, H, L]` -> `[B, S, K, H]` float32. "direct" sums the L shifted
  taps (a scan, O(S·L) time, O(S) memory, honours `segment_ids`); "fft" multiplies spectra of
  length S + L (O(S log S); no documents, since the FFT would mix them).
  """
  x = jnp.asarray(x, _F32)
  kernel = jnp.asarray(kernel, _F32)
  B, S = x.shape[:2]
  L = min(kernel.shape[-1], S)          # taps beyond S never reach a position
  kernel = kernel[..., :L]
  if method == "fft":
    if segment_ids is not None:
      raise ValueError("causal_conv: the FFT method cannot honour `segment_ids`; use 'direct'")
    n = S + L
    spec = jnp.fft.rfft(x, n=n, axis=1) * jnp.moveaxis(jnp.fft.rfft(kernel, n=n, axis=-1), -1, 0)
    return jnp.fft.irfft(spec, n=n, axis=1)[:, :S]
  if method != "direct":
    raise ValueError(f"causal_conv: `method` must be 'direct' or 'fft', got {method!r}")
  xp = jnp.pad(x, ((0, 0), (L, 0), (0, 0), (0, 0)))       # zeros before the start
  seg = jnp.zeros((B, S), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
  segp = jnp.pad(seg, ((0, 0), (L, 0)), mode="edge")

  def tap(acc, inp):
    lag, kern_l = inp
    shifted = jax.lax.dynamic_slice_in_dim(xp, L - lag, S, axis=1)
    same = jax.lax.dynamic_slice_in_dim(segp, L - lag, S, axis=1) == seg
    return acc + kern_l * jnp.where(same[..., None, None], shifted, 0.0), None

  y, _ = jax.lax.scan(tap, jnp.zeros_like(x), (jnp.arange(L), jnp.moveaxis(kernel, -1, 0)))
  return y


def chela_attention(q, k, v, *, short_kernel, long_kernel, long_decay, query_kappa, query_mu,
                    key_kappa, key_mu, gate_weight, gate_bias, causal: bool = False,
                    segment_ids=None, q_offset=0, kv_lengths=None, scale=None,
                    implementation: Optional[str] = None, chunk_size: int = 64):
  """CHELA: short-long convolutions feed a tiled (divide-and-conquer) linear attention.

  Paper: Liu et al., "Short-Long Convolutions Help Hardware-Efficient Linear Attention to Focus on
  Long Sequences", arXiv:2406.08128 (section 4). Per key/value head, on the stream x = k (the
  layer's input X, projected):

      Z   = LongConv(SiLU(ShortConv(x)))     short: 3 taps; long: stabilized kernel (see
                                             `stabilized_long_kernel`); both causal, depthwise
      Q_t = φ(κ_q ⊙ Z_p + μ_q),  K_j = φ(κ_k ⊙ Z_j + μ_k),  V = v     φ = ELU + 1
      O_t = Σ_j Q_t·K_j v_j / Σ_j Q_t·K_j    (j ≤ p when causal)     gated_linear_attention
      Y_t = σ(w_g · x_p + b_g) ⊙ O_t         output gate from the token's own input

  (p = q_offset + t.) The linear attention runs as `gated_linear_attention`'s "xla" form:
  intra-chunk quadratic, inter-chunk recurrent state (the paper's tiling), O(T·C) time and memory.

  Adaptation to the contract (as Mega, whose structure CHELA keeps): the paper derives queries and
  keys from one shared stream, the convolution output Z of its single input X, and has no query
  projection. X is represented by the key stream, so Q_t is read from Z at the query's position p
  (self-attention only; decoding reads the cache) and the output gate, which the paper computes
  from X, from x_p. The operator therefore does not read `q` (registered `reads={"k", "v"}`: the
  layer creates no query projection and passes zeros; `q` gives only the shape [B, T, N, H] and
  the output dtype). V is v. The normalization by Q·ΣK keeps the output's scale independent of T,
  and it cancels any logit scale, so `scale` must be None. Output projections are the layer's.

  Args:
    q: `[B, T, N, H]` (not read); k: `[B, S, K, H]`; v: `[B, S, K, h]`.
    short_kernel: `[K, H, 3]`; long_kernel: `[K, H, L]` raw weights; long_decay: `[K, H]`.
    query_kappa, query_mu: `[N, H]`; key_kappa, key_mu: `[K, H]`.
    gate_weight: `[N, H]` (query head n reads key head n // (N/K)); gate_bias: `[N]`.
    causal, segment_ids, q_offset, kv_lengths: the common contract. scale: must be None.
    implementation: "xla" (FFT long convolution, chunked linear attention) or "reference" (direct
      convolution, scanned recurrence).
    chunk_size: C of the chunked linear attention.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "chela_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  L = jnp.shape(long_kernel)[-1]
  _check_params(op, {"short_kernel": ((K, H, SHORT_KERNEL), f"[K, H, {SHORT_KERNEL}]"),
                     "long_kernel": ((K, H, L), "[K, H, L]"), "long_decay": ((K, H), "[K, H]"),
                     "query_kappa": ((N, H), "[N, H]"), "query_mu": ((N, H), "[N, H]"),
                     "key_kappa": ((K, H), "[K, H]"), "key_mu": ((K, H), "[K, H]"),
                     "gate_weight": ((N, H), "[N, H]"), "gate_bias": ((N,), "[N]")},
                dict(short_kernel=short_kernel, long_kernel=long_kernel, long_decay=long_decay,
                     query_kappa=query_kappa, query_mu=query_mu, key_kappa=key_kappa,
                     key_mu=key_mu, gate_weight=gate_weight, gate_bias=gate_bias))
  if scale is not None:
    raise ValueError(f"{op}: `scale` must be None: the normalized linear attention divides by "
                     f"Q·ΣK, which cancels any logit scale (got scale={scale!r})")
  impl = checks.check_implementation(op, implementation)
  full = _check_call(op, T, S, q_offset, kv_lengths, segment_ids)
  pos = _positions(B, T, q_offset)
  f32 = lambda x: jnp.asarray(x, _F32)

  valid = _key_valid(B, S, kv_lengths)[..., None, None]
  x = jnp.where(valid, k.astype(_F32), 0.0)              # cache garbage must not enter the FFT
  method = "fft" if impl == "xla" and segment_ids is None else "direct"
  z = causal_conv(jax.nn.silu(causal_conv(x, short_kernel, segment_ids=segment_ids)),
                  stabilized_long_kernel(long_kernel, long_decay), method=method,
                  segment_ids=segment_ids)
  keys = _elu1(f32(key_kappa) * z + f32(key_mu))
  queries = _elu1(f32(query_kappa) * jnp.repeat(z, N // K, axis=2) + f32(query_mu))
  o = gated_linear_attention(queries, keys, v, normalize=True, causal=causal, scale=1.0,
                             segment_ids=segment_ids, kv_lengths=kv_lengths, chunk_size=chunk_size,
                             implementation="xla" if impl == "xla" else "reference")
  # The gate of the token at p reads its own input x_p (query head n: key head n // (N/K)).
  x_q = _from_stream(jnp.repeat(x, N // K, axis=2), pos, full)
  gate = jax.nn.sigmoid(jnp.einsum("btnh,nh->btn", x_q, f32(gate_weight)) + f32(gate_bias))
  o = _from_stream(o.astype(_F32), pos, full)
  return (gate[..., None] * o).astype(q.dtype)


# ----------------------------------------------------------------------------------------------------
# Registration

_init = jax.nn.initializers


def _alibi_slope_logits(key, shape, dtype=jnp.float32):
  # softplus⁻¹ of ALiBi's geometric slopes: the local bias starts as ALiBi's.
  del key
  slopes = masks.alibi_slopes(shape[0])
  return jnp.asarray(np.log(np.expm1(slopes)), dtype)


def _fan_in_normal(key, shape, dtype=jnp.float32):
  # A gate weight reads an H-vector: std H^-½ keeps its logit O(1).
  return (jax.random.normal(key, shape) * shape[-1] ** -0.5).astype(dtype)


def _short_identity(key, shape, dtype=jnp.float32):
  # The short convolution starts near the identity (tap 0 = 1) plus small noise.
  return (jnp.zeros(shape).at[..., 0].set(1.0) + 0.1 * jax.random.normal(key, shape)).astype(dtype)


_INFINI_SPECS = (ParamSpec("gate", lambda N, K, H: (N,), _init.zeros),)
_LAVO_SPECS = (ParamSpec("relative_slope", lambda N, K, H: (N,), _alibi_slope_logits),)
_CHELA_SPECS = (
    ParamSpec("short_kernel", lambda N, K, H: (K, H, SHORT_KERNEL), _short_identity),
    ParamSpec("long_kernel", lambda N, K, H: (K, H, LONG_KERNEL), _init.normal(1.0)),
    ParamSpec("long_decay", lambda N, K, H: (K, H), _init.constant(-2.0)),
    ParamSpec("query_kappa", lambda N, K, H: (N, H), _init.ones),
    ParamSpec("query_mu", lambda N, K, H: (N, H), _init.zeros),
    ParamSpec("key_kappa", lambda N, K, H: (K, H), _init.ones),
    ParamSpec("key_mu", lambda N, K, H: (K, H), _init.zeros),
    ParamSpec("gate_weight", lambda N, K, H: (N, H), _fan_in_normal),
    ParamSpec("gate_bias", lambda N, K, H: (N,), _init.zeros),
)


register(Mechanism(
    name="infini_attention", fn=infini_attention, family="recurrent-memory", seeds=(75,),
    paper="Leave No Context Behind: Efficient Infinite Context Transformers with Infini-attention",
    arxiv="2404.07143", patterns=frozenset({"causal_self"}), gqa=True, decode=True, packed=True,
    complexity="O(T·L) (L = segment length); memory state O(1) in T",
    implementations=("xla", "reference"), params=_INFINI_SPECS,
    defaults=dict(segment_length=2048, update_rule="linear"),
    example=lambda: dict(segment_length=5, **example_params(_INFINI_SPECS, perturb=1.0)),
    # The compressive memory and its normaliser per kv head, plus the current segment's keys/values.
    state_size=lambda T, N, K, H, h, kw: (K * H * (h + 1)
                                          + min(kw["segment_length"], T) * K * (H + h))))

register(Mechanism(
    name="orthogonal_memory_attention", fn=orthogonal_memory_attention, family="linear",
    seeds=(151,), paper="Linear Attention via Orthogonal Memory", arxiv="2312.11135",
    patterns=frozenset({"self", "causal_self"}), gqa=True, decode=True, packed=True,
    complexity="O(T·(r·(H + h) + w)) (r bases, window w)", implementations=("xla", "reference"),
    params=_LAVO_SPECS, example=lambda: dict(window=4, num_bases=5, chunk_size=8,
                                             **example_params(_LAVO_SPECS, perturb=0.3)),
    defaults=dict(window=32),
    # r key and value memory slots (r = num_bases, default H) per kv head, plus the local window.
    state_size=lambda T, N, K, H, h, kw: ((kw.get("num_bases") or H) + min(kw["window"], T))
                                         * K * (H + h)))

register(Mechanism(
    name="chela_attention", fn=chela_attention, family="linear", seeds=(218,),
    paper="Short-Long Convolutions Help Hardware-Efficient Linear Attention to Focus on Long "
          "Sequences", arxiv="2406.08128",
    patterns=frozenset({"self", "causal_self"}), gqa=True, decode=True, packed=True,
    complexity="O(T·(C + log T)) (chunk C)", implementations=("xla", "reference"),
    # Queries and keys come from one shared convolution stream of the keys: q is not read.
    reads=frozenset({"k", "v"}), params=_CHELA_SPECS,
    example=lambda: dict(chunk_size=8, **example_params(_CHELA_SPECS, perturb=0.3)),
    # The linear-attention state and normaliser per kv head, plus the convolutions' input buffers.
    state_size=lambda T, N, K, H, h, kw: K * H * (h + 1) + (LONG_KERNEL + SHORT_KERNEL) * K * H))
