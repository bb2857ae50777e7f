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
from attnjax.core import dense
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
  qk, visible = dense.contract_scores(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                      q_offset=q_offset, kv_lengths=kv_lengths, scale=scale)
  B, N, _, S = qk.shape
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  # -||q - k||² / 2σ² without the per-row ||q||² (it cancels in the normalization); query head n
  # reads key head n // (N/K).
  k_norms = jnp.repeat(jnp.sum(jnp.square(k.astype(jnp.float32)), -1), N // k.shape[2], axis=2)
  s = qk - 0.5 * scale * jnp.swapaxes(k_norms, 1, 2)[:, :, None, :]
  if log_prior is not None:
    checks.check_shape(op, "log_prior", log_prior, (B, S), "[B, S]")
    s = s + log_prior.astype(jnp.float32)[:, None, None, :]
  # Softmax over the visible keys; a row with none gets zeros (and finite gradients).
  lse = dense.masked_logsumexp(s, visible)
  w = jnp.where(visible, jnp.exp(jnp.where(visible, s, lse) - lse), 0.0)
  return dense.weighted_values(w, v).astype(v.dtype)


register(Mechanism(name="marginal_attention", fn=marginal_attention, family="theory", seeds=(36,),
                   paper="Attention: Marginal Probability is All You Need?", arxiv="2304.04556",
                   implementations=("reference",), complexity="O(T·S·H)"))
