"""ELA: efficient local attention, positional gates along H and along W from strip-pooled
descriptors, each through one shared 1-D convolution, GroupNorm and a sigmoid, with no channel
reduction.

    z_h[h, c] = mean_w x[h, w, c],   z_w[w, c] = mean_h x[h, w, c],
    g_h = σ(GN(conv1d_k(z_h))) ∈ (0, 1)^{H×C},   g_w = σ(GN(conv1d_k(z_w))) ∈ (0, 1)^{W×C},
    y[h, w, c] = x[h, w, c] · g_h[h, c] · g_w[w, c],

the convolution (kernel k, `groups` channel groups, no bias, zero padded to keep the length) and the
GroupNorm (`num_groups`, affine) shared by both directions. The paper's variants: ELA-T (k = 5,
depthwise, 32 norm groups), ELA-B (k = 7, depthwise, 16), ELA-S (k = 5, C/8 conv groups, 16), ELA-L
(k = 7, C/8, 16); the default is ELA-B, the form of the reference code's plain `ELA`. Shapes:
`x [B, H, W, C] -> [B, H, W, C]`, `kernel [k, C / groups, C]`, `gn_scale, gn_bias [C]`.
Paper: Xu and Wan, "ELA: Efficient Local Attention for Deep Convolutional Neural Networks",
arXiv:2403.01123.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float

__all__ = ["ELA_VARIANTS", "EfficientLocalAttention", "ela_local_attention"]

FeatureMap = Float[Array, "B H W C"]
Kernel = Float[Array, "k Cg C"]
Channels = Float[Array, "C"]

# variant -> (kernel size, conv groups as a function of C, GroupNorm groups), the paper's table.
ELA_VARIANTS = {"T": (5, lambda C: C, 32), "B": (7, lambda C: C, 16),
                "S": (5, lambda C: max(1, C // 8), 16), "L": (7, lambda C: max(1, C // 8), 16)}


def _conv_gn_sigmoid(z, kernel, gn_scale, gn_bias, groups, num_groups, eps):
  """`z [B, L, C]` -> σ(GN(conv1d(z))) `[B, L, C]` in float32."""
  k = kernel.shape[0]
  y = jax.lax.conv_general_dilated(z, kernel.astype(jnp.float32), window_strides=(1,),
                                   padding=[(k // 2, (k - 1) // 2)],
                                   dimension_numbers=("NWC", "WIO", "NWC"),
                                   feature_group_count=groups)
  B, L, C = y.shape
  g = y.reshape(B, L, num_groups, C // num_groups)
  mean = jnp.mean(g, axis=(1, 3), keepdims=True)
  var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
  y = ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(B, L, C)
  return jax.nn.sigmoid(y * gn_scale.astype(jnp.float32) + gn_bias.astype(jnp.float32))


def ela_local_attention(x: FeatureMap, *, kernel: Kernel, gn_scale: Channels,
                        gn_bias: Channels, num_groups: int = 16, eps: float = 1e-5,
                        return_gate: bool = False):
  """ELA: `x ⊙ g_h ⊙ g_w`, gates σ(GN(conv1d(strip pool))) along H and W (module docstring).

  Args:
    x: `[B, H, W, C]`.
    kernel: `[k, C / groups, C]` (k odd; groups = C / kernel.shape[1] convolution groups).
    gn_scale, gn_bias: `[C]`, the GroupNorm's affine weights.
    num_groups: GroupNorm groups (C a multiple of it). eps: GroupNorm's epsilon.
    return_gate: also return the gates `(g_h [B, H, C], g_w [B, W, C])` (float32, in (0, 1)).

  Returns:
    `[B, H, W, C]` in x's dtype (and the gates).
  """
  op = "ela_local_attention"
  _, _, _, C = conv2d.check_feature_map(op, x)
  if (jnp.ndim(kernel) != 3 or kernel.shape[0] % 2 == 0 or kernel.shape[2] != C
      or C % kernel.shape[1]):
    raise ValueError(f"{op}: `kernel` must have shape [k, C / groups, C] with k odd and C = {C}, got "
                     f"{jnp.shape(kernel)}")
  if jnp.shape(gn_scale) != (C,) or jnp.shape(gn_bias) != (C,):
    raise ValueError(f"{op}: `gn_scale` and `gn_bias` must have shape [C] = [{C}], got "
                     f"{jnp.shape(gn_scale)} and {jnp.shape(gn_bias)}")
  if C % num_groups:
    raise ValueError(f"{op}: the channels C = {C} of `x` must be a multiple of `num_groups` = "
                     f"{num_groups}")
  groups = C // kernel.shape[1]
  xf = x.astype(jnp.float32)
  gate_h = _conv_gn_sigmoid(jnp.mean(xf, axis=2), kernel, gn_scale, gn_bias, groups, num_groups, eps)
  gate_w = _conv_gn_sigmoid(jnp.mean(xf, axis=1), kernel, gn_scale, gn_bias, groups, num_groups, eps)
  y = (xf * gate_h[:, :, None, :] * gate_w[:, None, :, :]).astype(x.dtype)
  return (y, (gate_h, gate_w)) if return_gate else y


class EfficientLocalAttention(nn.Module):
  """Creates ELA's shared convolution kernel and GroupNorm weights for the paper's `variant` ("T",
  "B", "S", "L"; default "B") and calls `ela_local_attention`; sows both gates as
  ("intermediates", "gate")."""
  variant: str = "B"
  eps: float = 1e-5
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.variant not in ELA_VARIANTS:
      raise ValueError(f"ela_local_attention: `variant` must be one of {sorted(ELA_VARIANTS)}, got "
                       f"{self.variant!r}")
    C = x.shape[-1]
    k, groups_of, num_groups = ELA_VARIANTS[self.variant]
    groups = groups_of(C)
    # PyTorch's Conv1d default (uniform in ±1/sqrt(fan_in)), as the reference code gets.
    init = torch_uniform(k * (C // groups))
    y, gates = ela_local_attention(
        x, kernel=self.param("kernel", init, (k, C // groups, C), self.param_dtype),
        gn_scale=self.param("gn_scale", nn.initializers.ones, (C,), self.param_dtype),
        gn_bias=self.param("gn_bias", nn.initializers.zeros, (C,), self.param_dtype),
        num_groups=min(num_groups, C), eps=self.eps, return_gate=True)
    for gate in gates:
      self.sow("intermediates", modules.GATE, gate)
    return y


modules.register_module(modules.Module(
    name="ela_local_attention", fn=ela_local_attention, linen=EfficientLocalAttention,
    kind="feature_map", family="channel-spatial", seeds=(50,),
    paper="ELA: Efficient Local Attention for Deep Convolutional Neural Networks", arxiv="2403.01123",
    gate_range=(0.0, 1.0)))
