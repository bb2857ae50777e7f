"""Helpers of the sequence-pooling attentions (`attnjax.ops.pooling`): weights over a sentence's tokens.

  masked_softmax   softmax over one axis restricted to the entries a mask keeps, zeros for an empty set

    a_i = m_i e^{x_i} / Σ_j m_j e^{x_j}        (a = 0 when every m_j = 0)

Shapes: `logits` and `mask` broadcast together; the result has `logits`' shape, float32 statistics.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["masked_softmax"]


def masked_softmax(logits: jax.Array, mask: Optional[jax.Array], axis: int) -> jax.Array:
  """softmax over `axis` of the entries where `mask` holds (padding excluded); all-zero weights, with
  finite gradients, where no entry does. `mask=None` keeps every entry."""
  logits = logits.astype(jnp.float32)
  if mask is None:
    return jax.nn.softmax(logits, axis=axis)
  z = jnp.where(mask, logits, -jnp.inf)
  zmax = jnp.max(z, axis=axis, keepdims=True)
  e = jnp.where(mask, jnp.exp(z - jnp.where(jnp.isfinite(zmax), zmax, 0.0)), 0.0)
  den = jnp.sum(e, axis=axis, keepdims=True)
  return e / jnp.where(den > 0, den, 1.0)
