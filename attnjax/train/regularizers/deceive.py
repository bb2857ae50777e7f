"""Deceptive-attention penalty (Pruthi et al., "Learning to Deceive with Attention-Based
Explanations", arXiv:1909.07913).

The model is trained with its task loss plus

    R = -λ · mean_{layers, heads, queries} log(1 - m),    m = Σ_{s ∈ I} α_{t s}

where α_t is a query's attention row and I the designated impermissible key tokens: the penalty
grows without bound as a row puts all its mass on I, so training moves attention off the
impermissible tokens while the rest of the network can still use them (through the values and the
residual stream). As in the paper's multi-head variant the log is taken per head (and per query)
and then averaged. `1 - m` is clamped below at `eps` so the log stays finite when a row sits entirely
on I (the paper's code clamps the same way, for the same reason).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from attnjax.train.regularizers.maps import HeadRows, Maps, Scalar, serves
from attnjax.typing import PerKeyToken

__all__ = ["impermissible_mass", "deception_penalty"]


@serves(37, kind="loss")
def impermissible_mass(weights: Maps,
                       impermissible: PerKeyToken) -> HeadRows:
  """m_{b n t} = Σ_s α_{b n t s} · 1[s impermissible]: each row's attention on the keys in I."""
  if weights.ndim != 4 or impermissible.shape != (weights.shape[0], weights.shape[3]):
    raise ValueError(f"impermissible_mass: weights must be [B, N, T, S] and impermissible [B, S]; "
                     f"got {weights.shape} and {impermissible.shape}")
  return jnp.einsum("bnts,bs->bnt", weights, impermissible.astype(weights.dtype))


@serves(37, kind="loss")
def deception_penalty(weights: Sequence[Maps],
                      impermissible: PerKeyToken, *,
                      eps: float = 1e-6) -> Scalar:
  """-mean over layers, heads and queries of log(max(1 - m, eps)) (module docstring); multiply by
  λ outside. `weights`: every layer's sown `[B, N, T, S]` maps (`maps.sown_maps`)."""
  if not weights:
    raise ValueError("deception_penalty: weights must hold at least one [B, N, T, S] map")
  terms = [-jnp.log(jnp.maximum(1.0 - impermissible_mass(w, impermissible), eps)).mean()
           for w in weights]
  return jnp.mean(jnp.stack(terms))
