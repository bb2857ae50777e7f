"""Pieces the token-attention modules share: the transposed (channel) attention of XCiT / Restormer
that DAE-Former, TransDAE and RealViformer use (their layer norm: `attnjax.core.layer_norm`)."""

from __future__ import annotations


import jax
import jax.numpy as jnp

__all__ = ["transposed_attention"]


def transposed_attention(q, k, v, temperature):
  """Channels as tokens with L2-normalized queries and keys (XCiT's cross-covariance attention):

      A_g = softmax( τ_g · q̂_gᵀ k̂_g ) ∈ (0, 1)^{C_g x C_g},  q̂ = q / ||q||₂ over the P pixels,
      out_g = (A_g v_gᵀ)ᵀ ∈ R^{P x C_g}

  Args:
    q, k, v: `[B, P, G, C_g]` float32 (P pixels, G heads of C_g channels).
    temperature: τ `[G]`, one learned scale per head.

  Returns:
    `(out [B, P, G, C_g], A [B, G, C_g, C_g])`.
  """
  # F.normalize's eps: a zero channel stays zero instead of dividing by zero.
  normalize = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  scores = jnp.einsum("bpgi,bpgj->bgij", normalize(q), normalize(k))
  attn = jax.nn.softmax(scores * temperature[None, :, None, None], axis=-1)
  return jnp.einsum("bgij,bpgj->bpgi", attn, v), attn
