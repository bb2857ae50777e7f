"""RALA (#93): rank-augmented linear attention.

Fan et al., "Breaking the Low-Rank Dilemma of Linear Attention", arXiv:2411.07635.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import feature_maps as fm
from attnjax.core.contract import valid_slots
from attnjax.core.linear_contract import NONCAUSAL_IMPLEMENTATIONS, feature_linear_attention
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value

__all__ = ["rank_augmented_linear_attention"]

_F32 = jnp.float32


def rank_augmented_linear_attention(q: Query, k: Key, v: Value, *, causal: bool = False,
                                    segment_ids: Optional[SegmentIds] = None, q_offset=0,
                                    kv_lengths: Optional[Lengths] = None, scale=None,
                                    implementation: Optional[str] = None) -> Output:
  """RALA: a KV buffer weighted by a global query, and an element-wise output gate that lifts rank.

  `α_j = softmax_j(scale · q̄·k_j)` with q̄ the mean query; `KV = Σ_j α_j S φ(k_j) v_jᵀ`,
  `z = Σ_j α_j S φ(k_j)`; `o_i = (φ(q_i) KV / φ(q_i) z) ⊙ v_i`, φ = elu + 1. Plain linear
  attention's output has rank ≤ F; the element-wise product with the token's own projection (here
  its value vector, the contract's projection of x_i) raises it. Non-causal self-attention (the
  global query sees all tokens). Fan et al., "Breaking the Low-Rank Dilemma of Linear Attention",
  arXiv:2411.07635.
  """
  del q_offset
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  sc = H ** -0.5 if scale is None else scale
  real = valid_slots(B, S, kv_lengths)
  qbar = jnp.sum(jnp.where(real[..., None, None], q.astype(_F32), 0.0), 1) / jnp.maximum(
      jnp.sum(real, 1), 1)[:, None, None]                                      # [B,N,H]
  kr = jnp.repeat(k.astype(_F32), N // K, axis=2)
  logits = jnp.einsum("bnf,bsnf->bsn", qbar * sc, kr)
  logits = jnp.where(real[..., None], logits, -jnp.inf)
  alpha = jax.nn.softmax(logits, axis=1)
  alpha = jnp.where(real[..., None], alpha, 0.0) * S                           # [B,S,N]
  kf = fm.elu_plus_one(kr) * alpha[..., None]
  vr = jnp.repeat(v, N // K, axis=2)
  o = feature_linear_attention(
      "rank_augmented_linear_attention", fm.elu_plus_one(q), kf, vr, causal=causal,
      segment_ids=segment_ids, q_offset=0, kv_lengths=kv_lengths, implementation=implementation,
      normalize=True)
  return (o.astype(_F32) * vr.astype(_F32)).astype(q.dtype)


register(Mechanism(
    name="rank_augmented_linear_attention", fn=rank_augmented_linear_attention, family="linear",
    seeds=(93,), paper="Breaking the Low-Rank Dilemma of Linear Attention", arxiv="2411.07635",
    patterns=frozenset({"self"}), decode=False, packed=False, complexity="O(T·H·h)",
    implementations=NONCAUSAL_IMPLEMENTATIONS))
