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
from attnjax.core import dense
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
  scores, visible = dense.contract_scores("hard_attention", q, k, v, causal=causal,
                                          segment_ids=segment_ids, q_offset=q_offset,
                                          kv_lengths=kv_lengths, scale=scale)
  S = scores.shape[-1]
  s = jax.lax.stop_gradient(jnp.where(visible, scores, -jnp.inf))
  top = jnp.max(s, axis=-1, keepdims=True)
  tied = visible & (s == top)
  if mode == "unique":
    # argmax returns the first maximal index: the leftmost tie.
    first = jnp.argmax(tied, axis=-1)
    w = jax.nn.one_hot(first, S, dtype=jnp.float32) * tied.any(-1, keepdims=True)
  else:
    count = tied.sum(-1, keepdims=True)
    w = tied / jnp.maximum(count, 1)
  return dense.weighted_values(w, v).astype(v.dtype)


register(Mechanism(name="hard_attention", fn=hard_attention, family="theory", seeds=(203,),
                   paper="Logical Languages Accepted by Transformer Encoders with Hard Attention",
                   arxiv="2310.03817", implementations=("reference",),
                   complexity="O(T·S·H)", defaults=dict(mode="unique")))
