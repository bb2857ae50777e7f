"""ULSAM: ultra-lightweight subspace attention. The channels are split into g subspaces; each learns
one spatial attention map, a softmax over its H·W positions, that reweights its own features:

    F = [F_1, ..., F_g],   F_n ∈ R^{H×W×C/g}
    A_n = softmax_{(i, j)}( PW_n( maxpool_{3×3, stride 1, pad 1}( DW_n(F_n) ) ) ) ∈ (0, 1)^{H×W},
          Σ_{i, j} A_n[i, j] = 1
    F̂_n = A_n ⊙ F_n + F_n,   y = concat(F̂_1, ..., F̂_g)

DW_n is a depthwise convolution (k×k, the paper's k = 1) and PW_n a 1×1 convolution from C/g channels
to one map. The paper's equations have no bias (a bias before the max pool or after PW_n only shifts
every position's logit equally, which the softmax removes); the reference code's batch norm + ReLU
layers fold into the convolutions at inference and are left out. The max pool pads with -inf.
Shapes: `x [B, H, W, C] -> [B, H, W, C]`, `dw_kernel [k, k, 1, C]`, `pw_kernel [g, C/g]`.
Paper: Saini, Jha, Das, Mittal and Mohan, "ULSAM: Ultra-Lightweight Subspace Attention Module for
Compact Convolutional Neural Networks", arXiv:2006.15102.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float

__all__ = ["SubspaceAttention", "ulsam_subspace_attention"]

FeatureMap = Float[Array, "B H W C"]
DepthwiseKernel = Float[Array, "k k 1 C"]
PointKernel = Float[Array, "g Cg"]


def _max_pool_3x3(u):
  """3×3 max pool, stride 1, padding 1 (padding never wins: -inf)."""
  return jax.lax.reduce_window(u, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


def ulsam_subspace_attention(x: FeatureMap, *, dw_kernel: DepthwiseKernel, pw_kernel: PointKernel,
                             return_gate: bool = False):
  """ULSAM: per channel group, `F_n + softmax_positions(PW(maxpool(DW(F_n)))) ⊙ F_n` (module docstring).

  Args:
    x: `[B, H, W, C]`.
    dw_kernel: `[k, k, 1, C]`, the depthwise kernels (k odd).
    pw_kernel: `[g, C/g]`, group n's 1×1 convolution to one map; g divides C.
    return_gate: also return the maps `[B, H, W, g]` (float32, positive, each sums to 1 over H, W).

  Returns:
    `[B, H, W, C]` in x's dtype (and the maps).
  """
  op = "ulsam_subspace_attention"
  B, H, W, C = conv2d.check_feature_map(op, x)
  if jnp.ndim(dw_kernel) != 4 or dw_kernel.shape[2:] != (1, C) or dw_kernel.shape[0] % 2 == 0:
    raise ValueError(f"{op}: `dw_kernel` must have shape [k, k, 1, {C}] with k odd, got "
                     f"{jnp.shape(dw_kernel)}")
  if jnp.ndim(pw_kernel) != 2 or pw_kernel.shape[0] * pw_kernel.shape[1] != C:
    raise ValueError(f"{op}: `pw_kernel` must have shape [g, C/g] with g * C/g = {C}, got "
                     f"{jnp.shape(pw_kernel)}")
  g, cg = pw_kernel.shape
  xf = x.astype(jnp.float32)
  u = _max_pool_3x3(conv2d.depthwise_conv2d(xf, jnp.asarray(dw_kernel, jnp.float32)))
  logits = jnp.einsum("bhwnc,nc->bhwn", u.reshape(B, H, W, g, cg), pw_kernel.astype(jnp.float32))
  gate = jax.nn.softmax(logits.reshape(B, H * W, g), axis=1).reshape(B, H, W, g)
  groups = xf.reshape(B, H, W, g, cg)
  y = (groups * gate[..., None] + groups).reshape(B, H, W, C).astype(x.dtype)
  return (y, gate) if return_gate else y


class SubspaceAttention(nn.Module):
  """Creates ULSAM's kernels (`groups` subspaces, depthwise kernel size `kernel_size`) and calls
  `ulsam_subspace_attention`; sows the maps as ("intermediates", "gate")."""
  groups: int = 4
  kernel_size: int = 1
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    if C % self.groups:
      raise ValueError(f"SubspaceAttention: `groups` ({self.groups}) must divide C ({C})")
    k, cg = self.kernel_size, C // self.groups

    # PyTorch's Conv2d default: uniform in ±1/sqrt(fan_in) (fan_in k² for depthwise, C/g for PW).
    uniform = torch_uniform

    y, gate = ulsam_subspace_attention(
        x, dw_kernel=self.param("dw_kernel", uniform(k * k), (k, k, 1, C), self.param_dtype),
        pw_kernel=self.param("pw_kernel", uniform(cg), (self.groups, cg), self.param_dtype),
        return_gate=True)
    self.sow("intermediates", modules.GATE, gate)
    return y


modules.register_module(modules.Module(
    name="ulsam_subspace_attention", fn=ulsam_subspace_attention, linen=SubspaceAttention,
    kind="feature_map", family="channel-spatial", seeds=(111,),
    paper="ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural "
    "Networks", arxiv="2006.15102", gate_range=(0.0, 1.0)))
