"""Large kernel attention (LKA, VAN): a K×K convolution decomposed into a (2d-1)×(2d-1) depthwise
convolution, a ⌈K/d⌉×⌈K/d⌉ depthwise convolution with dilation d and a 1×1 convolution; the result is
an attention map that multiplies the input element-wise (no sigmoid):

    A = Conv₁ₓ₁(DW-D-Conv_d(DW-Conv(x))),   y = A ⊙ x

Every convolution has a bias and is zero padded to keep H and W. With K = 21, d = 3 (the paper's
choice) the kernels are 5×5 and 7×7 (dilation 3); the composition of the two depthwise kernels is one
depthwise kernel of side (2d - 1) + (⌈K/d⌉ - 1)·d = 23, so an output sees a 23×23 window of the
input: the 21×21 kernel it stands for plus a one-pixel rim (the 2d - 1 local taps reach d - 1 past the
d-pixel gap between dilated taps).
Shapes: `x [B, H, W, C] -> [B, H, W, C]`; `dw_kernel [2d-1, 2d-1, 1, C]`, `dwd_kernel [⌈K/d⌉,
⌈K/d⌉, 1, C]`, `pw_kernel [1, 1, C, C]`, biases `[C]`.
Paper: Guo, Lu, Liu, Cheng and Hu, "Visual Attention Network", arXiv:2202.09741.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float


__all__ = ["LargeKernelAttention", "large_kernel_attention", "lka_kernel_sizes", "lka_receptive_field"]

FeatureMap = Float[Array, "B H W C"]


def lka_kernel_sizes(kernel_size: int = 21, dilation: int = 3) -> tuple[int, int]:
  """The paper's decomposition of a K×K kernel: `(2d - 1, ⌈K/d⌉)`, the sides of the depthwise and
  of the dilated depthwise kernels."""
  if kernel_size < 1 or dilation < 1:
    raise ValueError(f"lka_kernel_sizes: `kernel_size` and `dilation` must be >= 1, got "
                     f"{kernel_size}, {dilation}")
  return 2 * dilation - 1, math.ceil(kernel_size / dilation)


def lka_receptive_field(dw_size: int, dwd_size: int, dilation: int) -> int:
  """Side of the window an output of the two stacked depthwise convolutions sees:
  `dw_size + (dwd_size - 1) · dilation`."""
  return dw_size + (dwd_size - 1) * dilation


def _check_kernel(op, name, kernel, C, *, depthwise):
  shape = jnp.shape(kernel)
  ok = (len(shape) == 4 and shape[0] == shape[1] and shape[0] % 2 == 1
        and shape[2:] == ((1, C) if depthwise else (C, C)))
  if not ok:
    want = "[k, k, 1, C] with k odd" if depthwise else "[1, 1, C, C]"
    raise ValueError(f"{op}: `{name}` must have shape {want} (C = {C}), got {shape}")


def large_kernel_attention(x: FeatureMap, *, dw_kernel, dw_bias, dwd_kernel, dwd_bias, pw_kernel,
                           pw_bias, dilation: int = 3) -> FeatureMap:
  """LKA: `y = Conv₁ₓ₁(DW-D-Conv_d(DW-Conv(x))) ⊙ x` (module docstring).

  Args:
    x: `[B, H, W, C]`.
    dw_kernel: `[k₁, k₁, 1, C]` (k₁ = 2d - 1), dw_bias: `[C]`.
    dwd_kernel: `[k₂, k₂, 1, C]` (k₂ = ⌈K/d⌉), applied with dilation `dilation`; dwd_bias: `[C]`.
    pw_kernel: `[1, 1, C, C]`, pw_bias: `[C]`.
    dilation: d of the second depthwise convolution.

  Returns:
    `[B, H, W, C]` in x's dtype.
  """
  op = "large_kernel_attention"
  _, _, _, C = conv2d.check_feature_map(op, x)
  _check_kernel(op, "dw_kernel", dw_kernel, C, depthwise=True)
  _check_kernel(op, "dwd_kernel", dwd_kernel, C, depthwise=True)
  pw_shape = jnp.shape(pw_kernel)
  if pw_shape != (1, 1, C, C):
    raise ValueError(f"{op}: `pw_kernel` must have shape [1, 1, C, C] (C = {C}), got {pw_shape}")
  for name, b in (("dw_bias", dw_bias), ("dwd_bias", dwd_bias), ("pw_bias", pw_bias)):
    if jnp.shape(b) != (C,):
      raise ValueError(f"{op}: `{name}` must have shape [C] (C = {C}), got {jnp.shape(b)}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  x32 = f32(x)
  attn = conv2d.depthwise_conv2d(x32, f32(dw_kernel), f32(dw_bias))
  attn = conv2d.depthwise_conv2d(attn, f32(dwd_kernel), f32(dwd_bias), dilation=dilation)
  attn = conv2d.conv2d(attn, f32(pw_kernel), f32(pw_bias))
  return (attn * x32).astype(x.dtype)


class LargeKernelAttention(nn.Module):
  """Creates LKA's three convolutions for a `kernel_size`×`kernel_size` kernel with dilation
  `dilation` (PyTorch's default initializers, as the VAN code) and calls `large_kernel_attention`."""
  kernel_size: int = 21
  dilation: int = 3
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    k1, k2 = lka_kernel_sizes(self.kernel_size, self.dilation)
    p = lambda name, fan_in, shape: self.param(name, torch_uniform(fan_in), shape,
                                               self.param_dtype)
    return large_kernel_attention(
        x, dw_kernel=p("dw_kernel", k1 * k1, (k1, k1, 1, C)), dw_bias=p("dw_bias", k1 * k1, (C,)),
        dwd_kernel=p("dwd_kernel", k2 * k2, (k2, k2, 1, C)), dwd_bias=p("dwd_bias", k2 * k2, (C,)),
        pw_kernel=p("pw_kernel", C, (1, 1, C, C)), pw_bias=p("pw_bias", C, (C,)),
        dilation=self.dilation)


modules.register_module(modules.Module(
    name="large_kernel_attention", fn=large_kernel_attention, linen=LargeKernelAttention,
    kind="feature_map", family="alternative-mixer", seeds=(60,), paper="Visual Attention Network",
    arxiv="2202.09741"))
