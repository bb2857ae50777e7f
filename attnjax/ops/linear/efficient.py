"""Efficient Attention (#70): `ρ_q(Q) (ρ_k(K)ᵀ V)`, multiplied right to left.

Shen et al., "Efficient Attention: Attention with Linear Complexities", arXiv:1812.01243.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import feature_maps as fm
from attnjax.core import linear
from attnjax.core.contract import valid_slots, zero_padded
from attnjax.core.linear_contract import (NONCAUSAL_IMPLEMENTATIONS, feature_linear_attention,
                                          visible_key_counts)
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value

__all__ = ["efficient_attention"]

_F32 = jnp.float32


def _segment_softmax_over_positions(x, segment_ids, kv_lengths):
  """Softmax of `x [B,S,K,F]` over positions, within each document and over real slots only."""
  B, S = x.shape[:2]
  x = x.astype(_F32)
  real = valid_slots(B, S, kv_lengths)
  x = jnp.where(real[..., None, None], x, -jnp.inf)
  if segment_ids is None:
    m = jnp.max(x, axis=1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(x - jax.lax.stop_gradient(m))
    return e / jnp.maximum(jnp.sum(e, axis=1, keepdims=True), 1e-30)
  run = linear.run_index(segment_ids)                                   # [B,S] in [0, S)
  seg_max = jax.vmap(lambda xb, rb: jax.ops.segment_max(xb, rb, num_segments=S))(x, run)
  m = jnp.take_along_axis(seg_max, run[:, :, None, None], axis=1)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(x - jax.lax.stop_gradient(m))
  seg_sum = jax.vmap(lambda eb, rb: jax.ops.segment_sum(eb, rb, num_segments=S))(e, run)
  return e / jnp.maximum(jnp.take_along_axis(seg_sum, run[:, :, None, None], axis=1), 1e-30)


def efficient_attention(q: Query, k: Key, v: Value, *, causal: bool = False,
                        segment_ids: Optional[SegmentIds] = None, q_offset=0,
                        kv_lengths: Optional[Lengths] = None, scale=None,
                        implementation: Optional[str] = None, normalization="softmax") -> Output:
  """Efficient attention `E = ρ_q(Q) (ρ_k(K)ᵀ V)`, multiplied right to left in O(T·F·h).

  `normalization="softmax"` (the paper's main form): ρ_q is a softmax of each query over its
  features, ρ_k a softmax of each key feature over positions (within its document when packed);
  `scale` multiplies q and k before them (default `H ** -0.25` each, the dot-product scaling split
  in two). `normalization="scaling"`: `ρ_q(Y) = ρ_k(Y) = Y / √n`, n the keys a query sees, under
  which E equals dot-product attention with the same normalization, `(scale · Q Kᵀ / n) V`,
  exactly (the paper's equivalence). Non-causal. Shen et al., "Efficient Attention: Attention with
  Linear Complexities", arXiv:1812.01243.
  """
  del q_offset
  op = "efficient_attention"
  H = q.shape[-1]
  sc = H ** -0.5 if scale is None else scale
  if causal:
    raise ValueError(f"{op}: non-causal only (ρ_k normalizes each key feature over all positions)")
  if isinstance(segment_ids, (tuple, list)):
    raise ValueError(f"{op}: segment_ids must be one [B,T] array (self-attention)")
  contract = dict(causal=False, segment_ids=segment_ids, q_offset=0, kv_lengths=kv_lengths)
  if normalization == "scaling":
    o = feature_linear_attention(
        op, q.astype(_F32) * sc, zero_padded(k, kv_lengths), v, scale=1.0,
        implementation=implementation, **contract)
    n = visible_key_counts(op, q, k, **contract)
    return (o.astype(_F32) / jnp.maximum(n, 1.0)).astype(q.dtype)
  if normalization != "softmax":
    raise ValueError(f"{op}: `normalization` must be 'softmax' or 'scaling', got {normalization!r}")
  qf = fm.softmax_features(q.astype(_F32) * sc ** 0.5)
  kf = _segment_softmax_over_positions(k.astype(_F32) * sc ** 0.5, segment_ids, kv_lengths)
  return feature_linear_attention(
      op, qf, kf, v, implementation=implementation, **contract)


register(Mechanism(
    name="efficient_attention", fn=efficient_attention, family="linear", seeds=(70,),
    paper="Efficient Attention: Attention with Linear Complexities", arxiv="1812.01243",
    patterns=frozenset({"self", "cross"}), decode=False, complexity="O((T+S)·H·h)",
    implementations=NONCAUSAL_IMPLEMENTATIONS))
