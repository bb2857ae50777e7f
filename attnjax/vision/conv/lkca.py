"""Large kernel convolutional attention (LKCA): ViT's spatial self-attention replaced by one large
depthwise convolution over the token grid,

    y[i, j, c] = b_c + Σ_{|u|, |v| ≤ r} w[u + r, v + r, c] · x[i + u, j + v, c]   (zero outside)

with K = 2r + 1. Read as attention, it is a static, translation-invariant local attention matrix per
channel, `y_c = A_c x_c + b_c` over the H·W tokens, with

    A_c[(i, j), (i', j')] = w[i' - i + r, j' - j + r, c]  if |i' - i| ≤ r and |j' - j| ≤ r, else 0

(`lkca_attention_matrix`): the weight a query gives a key depends only on their offset, and is zero
past the kernel's reach; the paper gives both implementations and finds them equivalent.
Shapes: `x [B, H, W, C] -> [B, H, W, C]`, `kernel [K, K, 1, C]` (K odd), `bias [C]`.
Paper: Li, Zeng, Lu, Shi, Chen, Liu and Zhu, "LKCA: Large Kernel Convolutional Attention",
arXiv:2401.05738.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float


__all__ = ["LargeKernelConvAttention", "large_kernel_conv_attention", "lkca_attention_matrix"]

FeatureMap = Float[Array, "B H W C"]
Kernel = Float[Array, "K K 1 C"]
Bias = Float[Array, "C"]
AttentionMatrix = Float[Array, "C HW HW"]


def _check_kernel(op, kernel, C=None):
  shape = jnp.shape(kernel)
  if (len(shape) != 4 or shape[0] != shape[1] or shape[0] % 2 == 0 or shape[2] != 1
      or (C is not None and shape[3] != C)):
    raise ValueError(f"{op}: `kernel` must have shape [K, K, 1, C] with K odd"
                     f"{'' if C is None else f' (C = {C})'}, got {shape}")


def large_kernel_conv_attention(x: FeatureMap, *, kernel: Kernel, bias: Bias) -> FeatureMap:
  """LKCA: one K×K depthwise convolution over the token grid (module docstring).

  Args:
    x: `[B, H, W, C]`, the tokens on their grid.
    kernel: `[K, K, 1, C]`, K odd; bias: `[C]`.

  Returns:
    `[B, H, W, C]` in x's dtype.
  """
  op = "large_kernel_conv_attention"
  _, _, _, C = conv2d.check_feature_map(op, x)
  _check_kernel(op, kernel, C)
  if jnp.shape(bias) != (C,):
    raise ValueError(f"{op}: `bias` must have shape [C] (C = {C}), got {jnp.shape(bias)}")
  y = conv2d.depthwise_conv2d(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32),
                              jnp.asarray(bias, jnp.float32))
  return y.astype(x.dtype)


def lkca_attention_matrix(kernel: Kernel, H: int, W: int) -> AttentionMatrix:
  """The attention view of LKCA: `A [C, H·W, H·W]` (row-major tokens) with `y_c = A_c x_c + b_c`
  (module docstring), built from the kernel's relative offsets."""
  _check_kernel("lkca_attention_matrix", kernel)
  r = kernel.shape[0] // 2
  i, j = jnp.divmod(jnp.arange(H * W), W)                       # token coordinates, row-major
  du = i[None, :] - i[:, None] + r                              # key row - query row + r
  dv = j[None, :] - j[:, None] + r
  inside = (du >= 0) & (du <= 2 * r) & (dv >= 0) & (dv <= 2 * r)
  w = jnp.asarray(kernel[:, :, 0, :], jnp.float32)              # [K, K, C]
  taps = w[jnp.clip(du, 0, 2 * r), jnp.clip(dv, 0, 2 * r)]      # [HW, HW, C]
  return jnp.moveaxis(jnp.where(inside[..., None], taps, 0.0), -1, 0)


class LargeKernelConvAttention(nn.Module):
  """Creates LKCA's `kernel_size`×`kernel_size` depthwise kernel and bias (PyTorch's default
  initializers) and calls `large_kernel_conv_attention`."""
  kernel_size: int = 7
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C, K = x.shape[-1], self.kernel_size
    if K % 2 == 0:
      raise ValueError(f"LargeKernelConvAttention: `kernel_size` must be odd, got {K}")
    init = torch_uniform(K * K)
    return large_kernel_conv_attention(
        x, kernel=self.param("kernel", init, (K, K, 1, C), self.param_dtype),
        bias=self.param("bias", init, (C,), self.param_dtype))


modules.register_module(modules.Module(
    name="large_kernel_conv_attention", fn=large_kernel_conv_attention,
    linen=LargeKernelConvAttention, kind="feature_map", family="alternative-mixer", seeds=(88,),
    paper="LKCA: Large Kernel Convolutional Attention", arxiv="2401.05738"))
