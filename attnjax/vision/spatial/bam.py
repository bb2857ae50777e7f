"""BAM (for single image super-resolution): a balanced attention module that applies, in parallel, an
avg-pool channel-attention gate (ACAM) and a max-pool spatial-attention gate (MSAM) to the same
feature map:

    ACAM:  s = σ(W₂ PReLU_a(W₁ GAP(x))) ∈ (0, 1)^C                    (W₁ [C, C/r], W₂ [C/r, C])
    MSAM:  m = σ(conv_{k×k}(max_c x)) ∈ (0, 1)^{H×W}                   (one map, k = 7, zero padded)
    y = x ⊙ s ⊙ m                     (s broadcast over positions, m over channels)

The avg pool keeps the channel statistics smooth (ACAM), the max over channels keeps the sharpest
spatial responses (MSAM) that an average would wash out in SR feature maps; no biases (as the
paper's code), PReLU with one slope per hidden unit. Shapes: `x [B, H, W, C] -> [B, H, W, C]`.
Paper: Wang, Cheng, Chen and Shen, "BAM: A Balanced Attention Mechanism for Single Image Super
Resolution", arXiv:2104.07566.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float

__all__ = ["BalancedAttention", "balanced_attention_module"]

FeatureMap = Float[Array, "B H W C"]


def balanced_attention_module(x: FeatureMap, *, w1, prelu_slope, w2, spatial_kernel,
                              return_gate: bool = False):
  """BAM: `x ⊙ ACAM(x) ⊙ MSAM(x)` (module docstring).

  Args:
    x: `[B, H, W, C]`.
    w1: `[C, C/r]`, prelu_slope: `[C/r]`, w2: `[C/r, C]` (ACAM).
    spatial_kernel: `[k, k]`, k odd (MSAM's convolution on the channel-max map).
    return_gate: also return `(s [B, C], m [B, H, W])` (float32, in (0, 1)).

  Returns:
    `[B, H, W, C]` in x's dtype (and the two gates).
  """
  op = "balanced_attention_module"
  B, H, W, C = conv2d.check_feature_map(op, x)
  if jnp.ndim(w1) != 2 or w1.shape[0] != C:
    raise ValueError(f"{op}: `w1` must have shape [{C}, C/r], got {jnp.shape(w1)}")
  hidden = w1.shape[1]
  if jnp.shape(prelu_slope) != (hidden,) or jnp.shape(w2) != (hidden, C):
    raise ValueError(f"{op}: `prelu_slope` must have shape [{hidden}] and `w2` [{hidden}, {C}], got "
                     f"{jnp.shape(prelu_slope)} and {jnp.shape(w2)}")
  if jnp.ndim(spatial_kernel) != 2 or spatial_kernel.shape[0] != spatial_kernel.shape[1] or \
      spatial_kernel.shape[0] % 2 == 0:
    raise ValueError(f"{op}: `spatial_kernel` must have shape [k, k] with k odd, got "
                     f"{jnp.shape(spatial_kernel)}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  xf = f32(x)
  h = conv2d.global_avg_pool(xf) @ f32(w1)
  h = jnp.where(h >= 0, h, f32(prelu_slope) * h)
  s = jax.nn.sigmoid(h @ f32(w2))                                                # [B, C]
  peak = jnp.max(xf, axis=-1, keepdims=True)                                     # [B, H, W, 1]
  m = jax.nn.sigmoid(conv2d.conv2d(peak, f32(spatial_kernel)[:, :, None, None]))[..., 0]
  y = (xf * s[:, None, None, :] * m[..., None]).astype(x.dtype)
  return (y, (s, m)) if return_gate else y


class BalancedAttention(nn.Module):
  """Creates BAM's weights (ACAM reduction `reduction`, hidden width at least `min_hidden`; MSAM
  kernel `kernel_size`) and calls `balanced_attention_module`; sows both gates as ("intermediates",
  "gate")."""
  reduction: int = 16
  min_hidden: int = 4
  kernel_size: int = 7
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    hidden = max(self.min_hidden, C // self.reduction)
    k = self.kernel_size

    # PyTorch's Conv2d default (uniform in ±1/sqrt(fan_in)); PReLU's default slope 0.25.
    uniform = torch_uniform

    y, (s, m) = balanced_attention_module(
        x, w1=self.param("w1", uniform(C), (C, hidden), self.param_dtype),
        prelu_slope=self.param("prelu_slope", nn.initializers.constant(0.25), (hidden,),
                               self.param_dtype),
        w2=self.param("w2", uniform(hidden), (hidden, C), self.param_dtype),
        spatial_kernel=self.param("spatial_kernel", uniform(k * k), (k, k), self.param_dtype),
        return_gate=True)
    self.sow("intermediates", modules.GATE, s)
    self.sow("intermediates", modules.GATE, m)
    return y


modules.register_module(modules.Module(
    name="balanced_attention_module", fn=balanced_attention_module, linen=BalancedAttention,
    kind="feature_map", family="channel-spatial", seeds=(11,),
    paper="BAM: A Balanced Attention Mechanism for Single Image Super Resolution",
    arxiv="2104.07566", gate_range=(0.0, 1.0)))
