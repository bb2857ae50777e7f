"""Threshold Relative Attention (TRA): selective sparsity and a distance that counts kept keys only.

    s_ij   = scale · q_i·k_j                                   the semantic score
    keep_ij = visible_ij and s_ij > τ                          selective sparsity (τ = `threshold`)
    c_ij   = #{l : j <= l <= i, keep_il}                       contextualised distance
    w_ij   = softmax over kept j of (s_ij + δ_i · c_ij)        zero weight for every dropped key
    o_i    = Σ_j w_ij v_j

δ_i = log σ(x_i·w_δ + b_δ) ≤ 0 is a forget gate per query token and head (`log_forget [B, T, N]`,
projected by the layer from its input): a kept key's logit falls by -δ_i for every kept key between
it and the query, so irrelevant keys (s ≤ τ) neither take weight nor make the relevant ones seem far
away. With τ = -∞ every visible key is kept, c_ij = i - j + 1, and TRA is a relative bias δ_i (i - j)
(a per-row constant apart): ALiBi with a data-dependent slope per query.

This is the authors' computation (the TRA notebook of their flip-flop experiments: `S = relu(scale ·
q kᵀ)` with causal entries at -1e11, `mask = S == 0`, `D = ((~mask) · δ).flip(-1).cumsum(-1).flip(-1)`,
softmax of `S + D` over the unmasked entries, rows with nothing kept set to zero): their threshold is
τ = 0; `threshold` makes it a setting. Not included: their QK-norm (an RMSNorm of q and k without a
scale, a layer option applied before the mechanism).

Reference-only: c_ij is a cumulative count over each score row, so this is a dense float32 form
(O(T·S) memory). Causal self-attention only (the paper's decoder setting: "between key and query"
needs the query's own position among the keys); decoding over a KV cache equals the full forward, as
the count runs over the visible keys j..q_offset + t, and packed documents count only their own keys.
The hard threshold is a discontinuity: a key whose score lies within rounding of τ is kept or dropped
by the last bit, so bf16 inputs can give a visibly different row from fp32 ones where a score sits
that close to τ (the weight jumps between e^{s + δc}/Z and 0), as in the authors' form.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `log_forget [B,T,N]` (≤ 0) → `[B,T,N,h]`.
Paper: Opper, Fernandez, Smolensky and Gao, "TRA: Better Length Generalisation with Threshold
Relative Attention", arXiv:2503.23174.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.registry import Mechanism, TokenInput, register
from attnjax.typing import Key, Lengths, Output, Query, QueryHeadScalars, Value

__all__ = ["threshold_relative_attention"]

_HIGHEST = jax.lax.Precision.HIGHEST


def threshold_relative_attention(q: Query, k: Key, v: Value, *, log_forget: QueryHeadScalars,
                                 causal: bool = True, segment_ids=None, q_offset=0,
                                 kv_lengths: Optional[Lengths] = None,
                                 scale: Optional[float] = None,
                                 implementation: Optional[str] = None,
                                 threshold: float = 0.0) -> Output:
  """TRA: softmax over keys scoring above a threshold, biased by δ_i · (kept keys from j to i)."""
  op = "threshold_relative_attention"
  B, T, S, N, K, H, _ = checks.check_qkv(op, q, k, v)
  checks.check_implementation(op, implementation, ("reference",))
  checks.check_shape(op, "log_forget", log_forget, (B, T, N), "[B, T, N]")
  if not causal:
    raise ValueError(f"{op}: TRA is causal (its distance counts the kept keys between a key and "
                     "its query); pass causal=True")
  mask_mod = contract.contract_mask(B=B, T=T, S=S, causal=True, q_offset=q_offset,
                                    segment_ids=segment_ids, kv_lengths=kv_lengths, op=op)
  idx = lambda n, axis: jnp.arange(n, dtype=jnp.int32).reshape([-1 if a == axis else 1
                                                                for a in range(4)])
  # The contract's masks do not depend on the head: one [B, 1, T, S] plane.
  visible = jnp.broadcast_to(mask_mod(idx(B, 0), jnp.zeros((1, 1, 1, 1), jnp.int32), idx(T, 2),
                                      idx(S, 3)), (B, 1, T, S))
  scale = H ** -0.5 if scale is None else scale
  kf = jnp.repeat(k.astype(jnp.float32), N // K, axis=2)
  vf = jnp.repeat(v.astype(jnp.float32), N // K, axis=2)
  s = scale * jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kf, precision=_HIGHEST)
  keep = visible & (s > threshold)
  # c_ij: kept keys at or after j in row i (the causal mask stops the count at the query's position).
  count = jnp.flip(jnp.cumsum(jnp.flip(keep.astype(jnp.float32), -1), axis=-1), -1)
  delta = jnp.moveaxis(log_forget.astype(jnp.float32), 1, 2)[..., None]          # [B, N, T, 1]
  logits = jnp.where(keep, s + delta * count, -jnp.inf)
  # Softmax over the kept keys; a row with none gives zeros. The shift carries no gradient, and a
  # dropped key's exponent is -inf (weight and gradient exactly 0, never inf · 0).
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  e = jnp.exp(logits - shift)
  den = jnp.sum(e, axis=-1, keepdims=True)
  w = e / jnp.where(den == 0.0, 1.0, den)
  return jnp.einsum("bnts,bsnh->btnh", w, vf, precision=_HIGHEST).astype(q.dtype)


register(Mechanism(
    name="threshold_relative_attention", fn=threshold_relative_attention, family="positional",
    seeds=(161,),
    paper="TRA: Better Length Generalisation with Threshold Relative Attention", arxiv="2503.23174",
    patterns=frozenset({"causal_self"}), implementations=("reference",),
    # The forget gate δ = log σ(x w + b) per query token and head (the notebook's `delta_proj`).
    token_inputs=(TokenInput("log_forget", side="q", shape=lambda N, K, H: (N,),
                             activation=jax.nn.log_sigmoid),)))
