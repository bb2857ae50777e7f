"""Attention as the posterior marginal of a pointer variable.

Generative model (stated here; the paper's view of attention as marginal probability): a pointer z
over the visible keys with prior π_j, and the query drawn as p(q | z = j) = N(q; k_j, σ² I). The
weights are the posterior marginals and the output is the posterior mean of the value:

    w_ij = p(z = j | q_i) = π_j exp(-||q_i - k_j||² / 2σ²) / Σ_l π_l exp(-||q_i - k_l||² / 2σ²)
    o_i  = E_{z | q_i}[v_z] = Σ_j w_ij v_j

Expanding the square, the ||q_i||² term cancels in the ratio, so
w_ij = softmax_j(q_i·k_j / σ² - ||k_j||² / 2σ² + log π_j): with keys of equal norm and a uniform
prior it is exactly softmax(q·k / σ²), dot-product attention with scale 1/σ².
`scale` is 1/σ² (default 1/√H, the usual dot-product scale); `log_prior [B, S]` is log π up to a
constant (default uniform). A query with no visible key outputs zeros.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.
Paper: "Attention: Marginal Probability is All You Need?", arXiv:2304.04556.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import masks
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["marginal_attention"]


def marginal_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                       q_offset=0, kv_lengths: Optional[Lengths] = None,
                       scale: Optional[float] = None, log_prior: Optional[jnp.ndarray] = None,
                       implementation: Optional[str] = None) -> Output:
  """Posterior-marginal attention (see the module docstring) under the common contract."""
  op = "marginal_attention"
  checks.check_implementation(op, implementation, ("reference",))
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  if N % K:
    raise ValueError(f"{op}: query heads N={N} must be a multiple of key heads K={K}")
  scale = H ** -0.5 if scale is None else scale
  mask_mod = contract.contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                                    segment_ids=segment_ids, kv_lengths=kv_lengths, op=op)
  visible = masks.evaluate_mask(mask_mod, B, N, T, S)
  kr = jnp.repeat(k, N // K, axis=2).astype(jnp.float32)
  vr = jnp.repeat(v, N // K, axis=2).astype(jnp.float32)
  qf = q.astype(jnp.float32)
  # -||q - k||² / 2σ² without the per-row ||q||² (it cancels in the normalization).
  s = (jnp.einsum("btnh,bsnh->bnts", qf, kr)
       - 0.5 * jnp.einsum("bsnh,bsnh->bns", kr, kr)[:, :, None, :]) * scale
  if log_prior is not None:
    checks.check_shape(op, "log_prior", log_prior, (B, S), "[B, S]")
    s = s + log_prior.astype(jnp.float32)[:, None, None, :]
  s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(visible, jnp.exp(s - m), 0.0)
  w = e / jnp.maximum(e.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
  return jnp.einsum("bnts,bsnh->btnh", w, vr).astype(v.dtype)


register(Mechanism(name="marginal_attention", fn=marginal_attention, family="theory", seeds=(36,),
                   paper="Attention: Marginal Probability is All You Need?", arxiv="2304.04556",
                   implementations=("reference",), complexity="O(T·S·H)"))
