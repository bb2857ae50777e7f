"""Squeeze-and-excitation: the channel gate the catalog's channel-attention modules build on and are
compared against (a baseline, registered without a catalog row).

    z = GAP(x) ∈ R^C,   s = σ(W₂ δ(W₁ z + b₁) + b₂) ∈ (0, 1)^C,   y = x ⊙ s   (per channel)

with W₁ `[C, C/r]`, W₂ `[C/r, C]`, δ = ReLU. Shapes: `x [B, H, W, C] -> [B, H, W, C]`.
Paper: Hu, Shen, Albanie, Sun and Wu, "Squeeze-and-Excitation Networks", arXiv:1709.01507.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.typing import Array, Float

__all__ = ["SqueezeExcitation", "squeeze_excitation", "excitation"]

FeatureMap = Float[Array, "B H W C"]


def excitation(z, w1, b1, w2, b2):
  """The excitation MLP on descriptors `z [..., C]`: `σ(W₂ ReLU(W₁ z + b₁) + b₂)`, in float32."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  hidden = jax.nn.relu(f32(z) @ f32(w1) + f32(b1))
  return jax.nn.sigmoid(hidden @ f32(w2) + f32(b2))


def squeeze_excitation(x: FeatureMap, *, w1, b1, w2, b2, return_gate: bool = False):
  """Squeeze-and-excitation: `x ⊙ σ(W₂ ReLU(W₁ GAP(x) + b₁) + b₂)` (module docstring).

  Args:
    x: `[B, H, W, C]`.
    w1: `[C, C/r]`, b1: `[C/r]`, w2: `[C/r, C]`, b2: `[C]`.
    return_gate: also return the gate `[B, C]` (float32, in (0, 1)).

  Returns:
    `[B, H, W, C]` in x's dtype (and the gate).
  """
  conv2d.check_feature_map("squeeze_excitation", x)
  gate = excitation(conv2d.global_avg_pool(x), w1, b1, w2, b2)
  y = (x.astype(jnp.float32) * gate[:, None, None, :]).astype(x.dtype)
  return (y, gate) if return_gate else y


class SqueezeExcitation(nn.Module):
  """Creates SE's weights (reduction `reduction`, hidden width at least `min_hidden`) and calls
  `squeeze_excitation`; sows the gate as ("intermediates", "gate")."""
  reduction: int = 4
  min_hidden: int = 4
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    hidden = max(self.min_hidden, C // self.reduction)
    init = nn.initializers.lecun_normal()
    y, gate = squeeze_excitation(
        x, w1=self.param("w1", init, (C, hidden), self.param_dtype),
        b1=self.param("b1", nn.initializers.zeros, (hidden,), self.param_dtype),
        w2=self.param("w2", init, (hidden, C), self.param_dtype),
        b2=self.param("b2", nn.initializers.zeros, (C,), self.param_dtype), return_gate=True)
    self.sow("intermediates", modules.GATE, gate)
    return y


modules.register_module(modules.Module(
    name="squeeze_excitation", fn=squeeze_excitation, linen=SqueezeExcitation, kind="feature_map",
    family="channel-spatial", seeds=(), baseline=True, paper="Squeeze-and-Excitation Networks",
    arxiv="1709.01507", gate_range=(0.0, 1.0)))
