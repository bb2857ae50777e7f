"""Attention diversification loss (Guo et al., "Robustifying Token Attention for Vision
Transformers", arXiv:2303.11126).

With a_i the attention vector (row) of query token i in one head, the loss is the mean pairwise
cosine similarity between the rows of different query tokens,

    L = mean_{layers, b, heads} 1/(T(T-1)) Σ_{i≠j} <a_i, a_j> / (||a_i|| ||a_j||),

which is 1 when every token attends the same way (the "token overfocusing" the paper counters) and
0 when the rows have disjoint supports; minimizing it diversifies which keys different tokens use.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from attnjax.train.regularizers.maps import Maps, Scalar, serves

__all__ = ["pairwise_row_cosine", "attention_diversity_loss"]

# Guards the norm of an all-zero row (a fully masked query) against 0/0.
_NORM_FLOOR = 1e-12


@serves(222, kind="loss")
def pairwise_row_cosine(weights: Maps) -> jnp.ndarray:
  """Mean over ordered pairs i≠j of cos(a_i, a_j) per batch element and head; needs T >= 2."""
  if weights.ndim != 4 or weights.shape[2] < 2:
    raise ValueError(f"pairwise_row_cosine: weights must be [B, N, T, S] with T >= 2; got "
                     f"{weights.shape}")
  t = weights.shape[2]
  unit = weights / jnp.maximum(jnp.linalg.norm(weights, axis=-1, keepdims=True), _NORM_FLOOR)
  gram = jnp.einsum("bnis,bnjs->bnij", unit, unit)
  off_diagonal = gram.sum((-1, -2)) - jnp.trace(gram, axis1=-2, axis2=-1)
  return off_diagonal / (t * (t - 1))


@serves(222, kind="loss")
def attention_diversity_loss(weights: Sequence[Maps]) -> Scalar:
  """L of the module docstring over every layer's sown `[B, N, T, S]` maps."""
  if not weights:
    raise ValueError("attention_diversity_loss: weights must hold at least one [B, N, T, S] map")
  return jnp.mean(jnp.stack([pairwise_row_cosine(w).mean() for w in weights]))
