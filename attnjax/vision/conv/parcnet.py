"""ParCNetV2's token mixer: an oversized depthwise convolution (a kernel about twice the input, so every
output sees the whole map) inside a bifurcate gate (one branch multiplies the other):

    [u, v] = W₁ x + b₁                         (1×1 conv to 2·E channels, split in two halves)
    g = GELU(v)
    a = OC(g) + DW_k(g)                         (oversized + local depthwise convolution)
    y = W₂ (u ⊙ a)                              (1×1 conv back to C, no bias)

The oversized convolution is separable: a `[k_h, 1]` depthwise kernel along H then a `[1, k_w]` one
along W, zero padded by `k_h // 2` and `k_w // 2` (no bias), with `k_h = 2H - 1`, `k_w = 2W - 1` for
an H×W input. An output row i reads every input row i' through the tap `i' - i + H - 1`: which part
of the kernel a position uses depends on where it is, so the effective kernels are position-dependent
(the paper's implicit positional encoding: a constant input gives a different output at every
position, and a circular shift of the input does not circularly shift the output). `DW_k` is a k×k
depthwise convolution (k = 7 in the paper, no bias). Shapes: `x [B, H, W, C] -> [B, H, W, C]`;
`pw1_kernel [C, 2E]`, `pw1_bias [2E]`, `h_kernel [k_h, E]`, `w_kernel [k_w, E]`,
`local_kernel [k, k, 1, E]`, `pw2_kernel [E, C]` (E = expansion_ratio · C / 2).
Paper: Xu, Zhang, Hu, Zhang and Wang, "ParCNetV2: Oversized Kernel with Enhanced Attention",
arXiv:2211.07157.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.typing import Array, Float

__all__ = ["OversizedConvBifurcateGate", "oversized_conv", "oversized_conv_bifurcate_gate"]

FeatureMap = Float[Array, "B H W C"]
AxisKernel = Float[Array, "k E"]          # one 1-D depthwise kernel per channel


def oversized_conv(g: FeatureMap, h_kernel: AxisKernel, w_kernel: AxisKernel) -> FeatureMap:
  """The separable oversized depthwise convolution: `[k_h, 1]` along H then `[1, k_w]` along W, each
  zero padded by half its length (module docstring), in float32."""
  kh, kw = h_kernel.shape[0], w_kernel.shape[0]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  g = conv2d.depthwise_conv2d(f32(g), f32(h_kernel)[:, None, None, :],
                              padding=((kh // 2, kh // 2), (0, 0)))
  return conv2d.depthwise_conv2d(g, f32(w_kernel)[None, :, None, :],
                                 padding=((0, 0), (kw // 2, kw // 2)))


def oversized_conv_bifurcate_gate(x: FeatureMap, *, pw1_kernel, pw1_bias, h_kernel, w_kernel,
                                  local_kernel, pw2_kernel) -> FeatureMap:
  """ParCNetV2 mixer: `W₂ (u ⊙ (OC(GELU(v)) + DW(GELU(v))))`, `[u, v] = W₁ x + b₁` (module
  docstring).

  Args:
    x: `[B, H, W, C]`.
    pw1_kernel: `[C, 2E]`, pw1_bias: `[2E]`.
    h_kernel: `[k_h, E]`, w_kernel: `[k_w, E]` (odd lengths; 2H - 1 and 2W - 1 in the paper).
    local_kernel: `[k, k, 1, E]` (k odd).
    pw2_kernel: `[E, C]`.

  Returns:
    `[B, H, W, C]` in x's dtype.
  """
  op = "oversized_conv_bifurcate_gate"
  _, _, _, C = conv2d.check_feature_map(op, x)
  if jnp.ndim(pw1_kernel) != 2 or pw1_kernel.shape[0] != C or pw1_kernel.shape[1] % 2:
    raise ValueError(f"{op}: `pw1_kernel` must have shape [C, 2E] (C = {C}), got "
                     f"{jnp.shape(pw1_kernel)}")
  E = pw1_kernel.shape[1] // 2
  if jnp.shape(pw1_bias) != (2 * E,):
    raise ValueError(f"{op}: `pw1_bias` must have shape [2E] = [{2 * E}], got {jnp.shape(pw1_bias)}")
  for name, k in (("h_kernel", h_kernel), ("w_kernel", w_kernel)):
    if jnp.ndim(k) != 2 or k.shape[1] != E or k.shape[0] % 2 == 0:
      raise ValueError(f"{op}: `{name}` must have shape [k, E] with k odd (E = {E}), got "
                       f"{jnp.shape(k)}")
  ls = jnp.shape(local_kernel)
  if len(ls) != 4 or ls[0] != ls[1] or ls[0] % 2 == 0 or ls[2:] != (1, E):
    raise ValueError(f"{op}: `local_kernel` must have shape [k, k, 1, E] with k odd (E = {E}), "
                     f"got {ls}")
  if jnp.shape(pw2_kernel) != (E, C):
    raise ValueError(f"{op}: `pw2_kernel` must have shape [E, C] = [{E}, {C}], got "
                     f"{jnp.shape(pw2_kernel)}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  uv = f32(x) @ f32(pw1_kernel) + f32(pw1_bias)
  u, v = uv[..., :E], uv[..., E:]
  g = jax.nn.gelu(v, approximate=False)                         # PyTorch's nn.GELU (erf)
  a = oversized_conv(g, h_kernel, w_kernel) + conv2d.depthwise_conv2d(g, f32(local_kernel))
  return ((u * a) @ f32(pw2_kernel)).astype(x.dtype)


class OversizedConvBifurcateGate(nn.Module):
  """Creates the ParCNetV2 mixer's weights (truncated normal σ = 0.02, zero bias, as the reference
  code) and calls `oversized_conv_bifurcate_gate`. `global_kernel_size` None: `2H - 1` along H and
  `2W - 1` along W, from the input at initialization (the paper's kernel twice the input)."""
  expansion_ratio: float = 2.0
  global_kernel_size: Optional[int] = None
  local_kernel_size: int = 7
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    _, H, W, C = x.shape
    E = int(self.expansion_ratio * C) // 2
    kh, kw = ((2 * H - 1, 2 * W - 1) if self.global_kernel_size is None
              else (self.global_kernel_size, self.global_kernel_size))
    k = self.local_kernel_size
    init = nn.initializers.truncated_normal(0.02)
    p = lambda name, shape, i=init: self.param(name, i, shape, self.param_dtype)
    return oversized_conv_bifurcate_gate(
        x, pw1_kernel=p("pw1_kernel", (C, 2 * E)),
        pw1_bias=p("pw1_bias", (2 * E,), nn.initializers.zeros),
        h_kernel=p("h_kernel", (kh, E)), w_kernel=p("w_kernel", (kw, E)),
        local_kernel=p("local_kernel", (k, k, 1, E)), pw2_kernel=p("pw2_kernel", (E, C)))


modules.register_module(modules.Module(
    name="oversized_conv_bifurcate_gate", fn=oversized_conv_bifurcate_gate,
    linen=OversizedConvBifurcateGate, kind="feature_map", family="alternative-mixer", seeds=(182,),
    paper="ParCNetV2: Oversized Kernel with Enhanced Attention", arxiv="2211.07157"))
