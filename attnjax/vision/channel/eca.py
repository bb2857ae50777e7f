"""ECA: efficient channel attention, a 1-D convolution across the channel descriptors instead of SE's
two fully connected layers (no dimensionality reduction; k parameters).

    z = GAP(x) ∈ R^C,   s = σ(conv1d_k(z)) ∈ (0, 1)^C,   y = x ⊙ s,
    k = ψ(C) = | log₂(C) / γ + b / γ |_odd   (γ = 2, b = 1: t = int(|…|), k = t if t is odd else t + 1)

so C = 64, 128, 256, 512 give k = 3, 5, 5, 5 (the paper's formula, as timm computes it). The
convolution is zero padded (k - 1) / 2 on each side and has no bias. Shapes: `x [B, H, W, C] -> [B,
H, W, C]`, `kernel [k]`.
Paper: Wang, Wu, Zhu, Li, Zuo and Hu, "ECA-Net: Efficient Channel Attention for Deep Convolutional
Neural Networks", arXiv:1910.03151.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float

__all__ = ["EfficientChannelAttention", "eca_channel_attention", "eca_kernel_size"]

FeatureMap = Float[Array, "B H W C"]
Taps = Float[Array, "k"]


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
  """ψ(C): the odd kernel size adapted to the channel count (module docstring)."""
  if channels < 1:
    raise ValueError(f"eca_kernel_size: `channels` must be >= 1, got {channels}")
  t = int(abs((math.log2(channels) + b) / gamma))
  return max(1, t if t % 2 else t + 1)


def eca_channel_attention(x: FeatureMap, *, kernel: Taps, return_gate: bool = False):
  """ECA: `x ⊙ σ(conv1d_k(GAP(x)))` across channels (module docstring).

  Args:
    x: `[B, H, W, C]`.
    kernel: `[k]`, k odd (`eca_kernel_size(C)` in the paper).
    return_gate: also return the gate `[B, C]` (float32, in (0, 1)).

  Returns:
    `[B, H, W, C]` in x's dtype (and the gate).
  """
  op = "eca_channel_attention"
  conv2d.check_feature_map(op, x)
  if jnp.ndim(kernel) != 1 or kernel.shape[0] % 2 == 0:
    raise ValueError(f"{op}: `kernel` must have shape [k] with k odd, got {jnp.shape(kernel)}")
  z = conv2d.global_avg_pool(x).astype(jnp.float32)
  gate = jax.nn.sigmoid(conv2d.channel_conv1d(z, jnp.asarray(kernel, jnp.float32)))
  y = (x.astype(jnp.float32) * gate[:, None, None, :]).astype(x.dtype)
  return (y, gate) if return_gate else y


class EfficientChannelAttention(nn.Module):
  """Creates ECA's kernel (`kernel_size`, default ψ(C) with `gamma`, `b`) and calls
  `eca_channel_attention`; sows the gate as ("intermediates", "gate")."""
  kernel_size: Optional[int] = None
  gamma: float = 2.0
  b: float = 1.0
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size or eca_kernel_size(x.shape[-1], self.gamma, self.b)
    # PyTorch's Conv1d default (uniform in ±1/sqrt(fan_in)), as timm's EcaModule gets.
    init = torch_uniform(k)
    y, gate = eca_channel_attention(x, kernel=self.param("kernel", init, (k,), self.param_dtype),
                                    return_gate=True)
    self.sow("intermediates", modules.GATE, gate)
    return y


modules.register_module(modules.Module(
    name="eca_channel_attention", fn=eca_channel_attention, linen=EfficientChannelAttention,
    kind="feature_map", family="channel-spatial", seeds=(188,),
    paper="ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks",
    arxiv="1910.03151", gate_range=(0.0, 1.0)))
