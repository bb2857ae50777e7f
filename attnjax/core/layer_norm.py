"""Affine LayerNorm as a pure function of explicit weights, for modules that take their weights as
arrays (Flax's `nn.LayerNorm` owns its own):

    y = (x - mean(x)) / sqrt(var(x) + eps) · scale + bias          over the last axis
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["layer_norm"]


def layer_norm(x, scale, bias, eps: float = 1e-5):
  """LayerNorm over the last axis (biased variance; `eps` PyTorch's default, BERT uses 1e-12)."""
  mean = x.mean(axis=-1, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * scale + bias
