"""Triple (Kronecker) attention: each query attends to pairs of keys, capturing third-order
correlations.

    s_i,jl = scale · <q_i, k_j ⊙ k'_l> = scale · Σ_c q_ic k_jc k'_lc
    w_i,jl = exp(s_i,jl) / Σ_{(j',l') visible} exp(s_i,j'l')     (normalized over all visible pairs)
    o_i    = Σ_{j,l} w_i,jl (v_j ⊙ v'_l)

A pair (j, l) is visible to query i when both keys are (causal, padding, documents). Naive
O(T·S²·H) time and memory: the reference computation of the paper's definition. The second keys /
values k', v' are the keyword arrays `k2 [B,S,K,H]` / `v2 [B,S,K,h]`, by default k and v themselves.
A query with no visible pair outputs zeros.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.
Paper: Alman, Song, "How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention
to Kronecker Computation", arXiv:2310.04064.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import masks
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["triple_attention"]


def triple_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                     q_offset=0, kv_lengths: Optional[Lengths] = None,
                     scale: Optional[float] = None, k2: Optional[Key] = None,
                     v2: Optional[Value] = None, implementation: Optional[str] = None) -> Output:
  """Triple attention over key pairs (see the module docstring) under the common contract."""
  op = "triple_attention"
  checks.check_implementation(op, implementation, ("reference",))
  _, _, _, N, K, H, _ = checks.check_qkv(op, q, k, v)
  k2 = k if k2 is None else k2
  v2 = v if v2 is None else v2
  checks.check_shape(op, "k2", k2, k.shape, "[B, S, K, H]")
  checks.check_shape(op, "v2", v2, v.shape, "[B, S, K, h]")
  scale = H ** -0.5 if scale is None else scale
  mask_mod = contract.contract_mask(B=q.shape[0], T=q.shape[1], S=k.shape[1], causal=causal,
                                    q_offset=q_offset, segment_ids=segment_ids,
                                    kv_lengths=kv_lengths, op=op)
  visible = masks.evaluate_mask(mask_mod, q.shape[0], N, q.shape[1], k.shape[1])
  pair_visible = visible[..., :, None] & visible[..., None, :]  # [B, N, T, S, S]
  rep = lambda x: jnp.repeat(x, N // K, axis=2).astype(jnp.float32)  # noqa: E731
  k1r, k2r, v1r, v2r = rep(k), rep(k2), rep(v), rep(v2)
  s = jnp.einsum("btnc,bjnc,blnc->bntjl", q.astype(jnp.float32), k1r, k2r) * scale
  s = jnp.where(pair_visible, s, -jnp.inf)
  m = jnp.max(s, axis=(-2, -1), keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(pair_visible, jnp.exp(s - m), 0.0)
  w = e / jnp.maximum(e.sum((-2, -1), keepdims=True), jnp.finfo(jnp.float32).tiny)
  return jnp.einsum("bntjl,bjnc,blnc->btnc", w, v1r, v2r).astype(v.dtype)


register(Mechanism(name="triple_attention", fn=triple_attention, family="theory", seeds=(178,),
                   paper="How to Capture Higher-order Correlations? Generalizing Matrix Softmax "
                         "Attention to Kronecker Computation", arxiv="2310.04064",
                   implementations=("reference",), complexity="O(T·S²·H)"))
