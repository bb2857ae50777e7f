"""Cog attention: signed attention weights whose absolute values sum to one.

    w_ij = sign(s_ij) · e^{|s_ij|} / Σ_j e^{|s_ij|}          s_ij = scale · q_i·k_j

A head can copy (w > 0), delete (w < 0) or keep (w ≈ 0) a token's value; Σ_j |w_ij| = 1 for every row
with a visible key whose score is not 0 (a score of exactly 0 gets weight 0, as sign(0) = 0).

Stable and streamable in two passes over flex attention, so no `[T, S]` matrix is needed:
  1. `L_i = log Σ_j e^{|s_ij|}`: flex's softmax with the score_mod `|s|` (its log-sum-exp residual);
  2. `o_i = Σ_{s_ij > 0} e^{s_ij - L_i} v_j - Σ_{s_ij < 0} e^{-s_ij - L_i} v_j`: flex's unnormalized
     `exp` normalizer with a score_mod that keeps one sign and subtracts L_i (every exponent ≤ 0),
     once per sign.
The `xla` path skips empty tiles in all three calls; a fully masked row has L = -inf and gives zeros.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.
Paper: Lv et al., "More Expressive Attention with Negative Weights", arXiv:2411.07176.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core.contract import flex_with_contract
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["cog_attention"]


def cog_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None, q_offset=0,
                  kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                  implementation: Optional[str] = None) -> Output:
  """Cog attention (see the module docstring) under the common contract's masks."""
  op = "cog_attention"
  checks.check_qkv(op, q, k, v)
  call = lambda **kw: flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                         q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                         implementation=implementation, **kw)
  _, lse = call(score_mod=lambda s, b, n, qi, ki: jnp.abs(s), return_residuals=True)
  # An empty row (L = -inf) gets exponents -inf - (-inf); a finite stand-in keeps them -inf.
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

  def signed(sign):
    def score_mod(s, b, n, qi, ki):
      # lse is [B, T, N]; the indices broadcast as [B, ., ., T, .] with n the query head.
      L = lse[b, qi, n]
      return jnp.where(sign * s > 0, sign * s - L, -jnp.inf)
    return call(score_mod=score_mod, normalizer="exp").astype(jnp.float32)

  return (signed(1.0) - signed(-1.0)).astype(q.dtype)


register(Mechanism(name="cog_attention", fn=cog_attention, family="softmax-variant", seeds=(83,),
                   paper="More Expressive Attention with Negative Weights", arxiv="2411.07176"))
