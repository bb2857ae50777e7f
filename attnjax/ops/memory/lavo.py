"""LAVO (#151): softmax over r orthogonal-memory slots and a local window, in linear time.

Paper: Zhang et al., "Linear Attention via Orthogonal Memory", arXiv:2312.11135. Both memory reads
run on `attnjax.core.linear.gated_linear_attention`, the local window on
`attnjax.core.flex.flex_attention`; the two parts are merged into one softmax with
`attnjax.core.merge.merge_attention_states`. Over a KV cache, queries are placed on the key stream
at their positions (`contract.scatter_positions` / `gather_positions`), as in Infini-attention.
Recurrent decoding carries the memory's sums and the last window - 1 keys and values instead: a fixed
size whatever the number of tokens.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import flex
from attnjax.core import masks
from attnjax.core import memory_state
from attnjax.core.linear import gated_linear_attention
from attnjax.core.merge import merge_attention_states
from attnjax.registry import Mechanism, ParamSpec, example_params, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value

_F32 = jnp.float32


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
  doc_start, doc_end = contract.document_bounds(segment_ids, B, S)
  before = jnp.where(doc_start > 0, jnp.take_along_axis(cs, jnp.maximum(doc_start - 1, 0), 1), 0)
  upto = cs if causal else jnp.take_along_axis(cs, doc_end - 1, 1)
  return upto - before


def orthogonal_memory_attention(q: Query, k: Key, v: Value, *, relative_slope,
                                num_bases: Optional[int] = None, window: int = 32,
                                causal: bool = False, segment_ids: Optional[SegmentIds] = None,
                                q_offset=0, kv_lengths: Optional[Lengths] = None, scale=None,
                                implementation: Optional[str] = None, chunk_size: int = 64,
                                initial_state: Optional[dict] = None,
                                return_final_state: bool = False
                                ) -> Output | tuple[Output, dict]:
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
    initial_state, return_final_state: recurrent decoding (`Mechanism.recurrent`, causal): q, k, v
      are the T new tokens after `q_offset` = n earlier ones (one scalar; c_t comes from it); the
      state is the memory's unnormalized sums and the last `window` - 1 keys and values,
      `{"key_memory": [B, K, H, r] = Σ k_i w_iᵀ, "value_memory": [B, K, r, h] = Σ w_i v_iᵀ,
      "keys": [B, window-1, K, H], "values": [B, window-1, K, h]}` float32 (None or zeros
      before the first token).

  Returns:
    `[B, T, N, h]` in q's dtype; with `return_final_state`, `(out, state after n + T tokens)`.
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
  scale = H ** -0.5 if scale is None else scale
  if return_final_state:
    memory_state.check_recurrent_call(op, causal=causal, segment_ids=segment_ids,
                                      kv_lengths=kv_lengths, q_offset=q_offset, T=T, S=S)
    return _lavo_recurrent(op, q, k, v, relative_slope, initial_state, r=r, window=window,
                           scale=scale, q_offset=q_offset, impl=impl, chunk_size=chunk_size)
  if initial_state is not None:
    raise ValueError(f"{op}: `initial_state` needs `return_final_state=True` (recurrent decoding)")
  full = contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                       segment_ids=segment_ids)
  pos = contract.query_positions(B, T, q_offset)
  at_queries = lambda x: x if full else contract.gather_positions(x, pos)

  # Global part: the r orthogonal-memory slots.
  valid = contract.valid_slots(B, S, kv_lengths)
  kf, vf = contract.zero_padded(k, kv_lengths), contract.zero_padded(v, kv_lengths)
  w = jnp.einsum("bskh,rh->bskr", kf, jnp.asarray(orthogonal_basis(r, H)))
  count = _visible_counts(valid, segment_ids, causal=causal)[..., None, None].astype(_F32)
  inv = 1.0 / jnp.maximum(count, 1.0)
  lin = dict(causal=causal, segment_ids=segment_ids, chunk_size=chunk_size, implementation=impl)
  qs = q.astype(_F32) if full else contract.scatter_positions(q.astype(_F32), pos, S)
  logits = gated_linear_attention(qs, kf, w, scale=scale, **lin) * inv          # [B, S, N, r]
  lse_mem = jnp.where(count[..., 0] > 0, jax.nn.logsumexp(logits, axis=-1), -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  mem = gated_linear_attention(probs, w, vf, scale=1.0, **lin) * inv            # [B, S, N, h]
  mem, lse_mem = at_queries(mem), at_queries(lse_mem)

  # Local part: sliding window with the relative-distance penalty.
  base = contract.contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                                segment_ids=segment_ids, kv_lengths=kv_lengths, op=op)
  near = masks.sliding_window(window - 1, 0 if causal else window - 1, offset=q_offset)
  slopes = jax.nn.softplus(jnp.asarray(relative_slope, _F32))
  local, lse_loc = flex.flex_attention(
      q, k, v, mask_mod=masks.combine_masks(base, near), scale=scale, return_residuals=True,
      score_mod=masks.alibi(slopes, offset=q_offset, symmetric=not causal), implementation=impl)
  out, _ = merge_attention_states([local.astype(_F32), mem], [lse_loc, lse_mem])
  return out.astype(q.dtype)


def _lavo_recurrent(op, q, k, v, relative_slope, state, *, r, window, scale, q_offset, impl,
                    chunk_size):
  """The new tokens of a causal sequence from the carried state (see
  `orthogonal_memory_attention`): `(out, state)`.

  The slot logits and read are the linear attentions of the full forward, started from the carried
  sums (`memory_state.linear_with_state`) and divided by c_t = n + t + 1; the local window attends
  over the stream (last window - 1 tokens, new tokens), whose slot i holds position n - W + i.
  """
  B, T, N, H = q.shape
  K, h = k.shape[2], v.shape[3]
  W = window - 1
  state = memory_state.checked_state(
      op, state, {"key_memory": (B, K, H, r), "value_memory": (B, K, r, h),
                  "keys": (B, W, K, H), "values": (B, W, K, h)},
      {"key_memory": "[B, K, H, r]", "value_memory": "[B, K, r, h]",
       "keys": "[B, window-1, K, H]", "values": "[B, window-1, K, h]"})
  n = jnp.asarray(q_offset, jnp.int32)

  # Global part: the r slots from the carried sums plus the new tokens.
  kf, vf = k.astype(_F32), v.astype(_F32)
  w = jnp.einsum("btkh,rh->btkr", kf, jnp.asarray(orthogonal_basis(r, H)))
  count = (n + 1 + jnp.arange(T, dtype=jnp.int32)).astype(_F32)[None, :, None, None]
  lin = dict(chunk_size=chunk_size, implementation=impl)
  logits, key_memory = memory_state.linear_with_state(q, kf, w, state["key_memory"], scale=scale,
                                                      **lin)
  logits = logits / count
  mem, value_memory = memory_state.linear_with_state(jax.nn.softmax(logits, axis=-1), w, vf,
                                                     state["value_memory"], scale=1.0, **lin)
  mem = mem / count

  # Local part: the window over (buffer, new tokens); query t sits at stream slot W + t.
  xk, keys = memory_state.shift_in(state["keys"], k)
  xv, values = memory_state.shift_in(state["values"], v)

  def window_mask(b, n_head, q_idx, kv_idx):
    del b, n_head
    return (kv_idx <= q_idx + W) & (kv_idx >= q_idx) & (kv_idx >= W - n)   # slot >= 0: a token

  local, lse_loc = flex.flex_attention(
      q, xk.astype(k.dtype), xv.astype(v.dtype), mask_mod=window_mask, scale=scale,
      score_mod=masks.alibi(jax.nn.softplus(jnp.asarray(relative_slope, _F32)), offset=W),
      return_residuals=True, implementation=impl)
  out, _ = merge_attention_states([local.astype(_F32), mem],
                                  [lse_loc, jax.nn.logsumexp(logits, axis=-1)])
  new_state = {"key_memory": key_memory, "value_memory": value_memory, "keys": keys,
               "values": values}
  return out.astype(q.dtype), new_state


# --------------------------------------------------------------------------------------------------
# Registration


def _alibi_slope_logits(key, shape, dtype=jnp.float32):
  # softplus⁻¹ of ALiBi's geometric slopes: the local bias starts as ALiBi's.
  del key
  slopes = masks.alibi_slopes(shape[0])
  return jnp.asarray(np.log(np.expm1(slopes)), dtype)


LAVO_SPECS = (ParamSpec("relative_slope", lambda N, K, H: (N,), _alibi_slope_logits),)


def _example(*, N: int, K: int, H: int) -> dict:
  # window, num_bases (at most H), chunk_size: example settings small enough to exercise every
  # part (several chunks, a window shorter than the sequence, fewer bases than channels).
  return dict(window=4, num_bases=min(5, H), chunk_size=8,
              **example_params(LAVO_SPECS, N=N, K=K, H=H, perturb=0.3))


register(Mechanism(
    name="orthogonal_memory_attention", fn=orthogonal_memory_attention, family="linear",
    seeds=(151,), paper="Linear Attention via Orthogonal Memory", arxiv="2312.11135",
    patterns=frozenset({"self", "causal_self"}), gqa=True, decode=True, recurrent=True,
    packed=True, complexity="O(T·(r·(H + h) + w)) (r bases, window w)",
    implementations=("xla", "reference"), params=LAVO_SPECS, example=_example, defaults=dict(window=32),
    # r key and value memory slots (r = num_bases, default H) per kv head, plus the local window's
    # window - 1 earlier keys and values (the new token is the window's last).
    state_size=lambda T, N, K, H, h, kw: ((kw.get("num_bases") or H) + kw["window"] - 1)
                                         * K * (H + h)))

__all__ = ["orthogonal_memory_attention", "orthogonal_basis", "LAVO_SPECS"]
