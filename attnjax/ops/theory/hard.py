"""Hard attention of the formal-language analyses of transformer encoders.

    s_ij = scale · q_i·k_j,   M_i = {j visible to i : s_ij = max_l s_il}
    unique:  w_ij = [j = min M_i]            (all weight on the leftmost maximal score)
    average: w_ij = [j ∈ M_i] / |M_i|        (uniform over the keys tied at the maximum)
    o_i = Σ_j w_ij v_j

Ties are exact float equality of the scores. A query with no visible key outputs zeros. The weights
are piecewise constant in q and k, so gradients reach only the values.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]` (query head n uses key head
n // (N/K)).
Paper: Yang, Chiang, Angluin, "Logical Languages Accepted by Transformer Encoders with Hard
Attention", arXiv:2310.03817.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import masks
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["hard_attention"]

MODES = ("unique", "average")


def hard_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                   q_offset=0, kv_lengths: Optional[Lengths] = None,
                   scale: Optional[float] = None, mode: str = "unique",
                   implementation: Optional[str] = None) -> Output:
  """Unique or average hard attention (see the module docstring) under the common contract.

  `implementation`: only "reference" (or None) exists.
  """
  checks.check_implementation("hard_attention", implementation, ("reference",))
  if mode not in MODES:
    raise ValueError(f"hard_attention: `mode` must be one of {MODES}, got {mode!r}")
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  if N % K:
    raise ValueError(f"hard_attention: query heads N={N} must be a multiple of key heads K={K}")
  scale = H ** -0.5 if scale is None else scale
  mask_mod = contract.contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                                    segment_ids=segment_ids, kv_lengths=kv_lengths,
                                    op="hard_attention")
  visible = masks.evaluate_mask(mask_mod, B, N, T, S)
  kr = jnp.repeat(k, N // K, axis=2)
  vr = jnp.repeat(v, N // K, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q, kr, preferred_element_type=jnp.float32) * scale
  s = jax.lax.stop_gradient(jnp.where(visible, s, -jnp.inf))
  top = jnp.max(s, axis=-1, keepdims=True)
  tied = visible & (s == top)
  if mode == "unique":
    # argmax returns the first maximal index: the leftmost tie.
    first = jnp.argmax(tied, axis=-1)
    w = jax.nn.one_hot(first, S, dtype=jnp.float32) * tied.any(-1, keepdims=True)
  else:
    count = tied.sum(-1, keepdims=True)
    w = tied / jnp.maximum(count, 1)
  out = jnp.einsum("bnts,bsnh->btnh", w.astype(jnp.float32), vr.astype(jnp.float32))
  return out.astype(v.dtype)


register(Mechanism(name="hard_attention", fn=hard_attention, family="theory", seeds=(203,),
                   paper="Logical Languages Accepted by Transformer Encoders with Hard Attention",
                   arxiv="2310.03817", implementations=("reference",),
                   complexity="O(T·S·H)", defaults=dict(mode="unique")))
