"""Selective kernel attention: M convolution branches with different kernel sizes see the same
feature map; a softmax across the branches, computed per channel from the fused map's global
descriptor, picks each channel's receptive field (SKNet's mechanism, which the speaker-verification
paper applies to 2-D time-frequency maps, H = frequency, W = time):

    U_m = ReLU(conv_{k_m}(x) + c_m)          (m = 1..M, kernel sizes k_m, e.g. 3 and 5)
    U = Σ_m U_m,   s = GAP(U) ∈ R^C,   z = ReLU(W_z s + b_z) ∈ R^d
    a_m = exp(A_m z) / Σ_{m'} exp(A_{m'} z) ∈ (0, 1)^C        (Σ_m a_m = 1 per channel)
    y = Σ_m a_m ⊙ U_m

(the reference code's batch norms fold into the convolutions and W_z at inference). Shapes:
`x [B, H, W, C] -> [B, H, W, C]`, branch m: `kernel_m [k_m, k_m, C, C]`, `bias_m [C]`; `w_z [C, d]`,
`b_z [d]`, `w_select [M, d, C]`.
Paper: Mun, Jung, Han and Kim, "Frequency and Multi-Scale Selective Kernel Attention for Speaker
Verification", arXiv:2204.01005 (after Li, Wang, Hu and Yang, "Selective Kernel Networks",
arXiv:1903.06586).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float

__all__ = ["SelectiveKernelAttention", "selective_kernel_attention"]

FeatureMap = Float[Array, "B H W C"]
Kernel = Float[Array, "k k C C"]


def selective_kernel_attention(x: FeatureMap, *, kernel_0: Kernel, bias_0, kernel_1: Kernel, bias_1,
                               w_z, b_z, w_select, return_gate: bool = False):
  """Selective kernel attention over two branches: `Σ_m softmax_m(A_m z) ⊙ U_m` (module docstring).

  Args:
    x: `[B, H, W, C]`.
    kernel_0, kernel_1: `[k_m, k_m, C, C]` (k_m odd; the paper's 3 and 5), bias_0, bias_1: `[C]`.
    w_z: `[C, d]`, b_z: `[d]`, the squeeze to the compact descriptor z.
    w_select: `[2, d, C]`, the per-branch selection weights A_m.
    return_gate: also return the branch weights `[B, 2, C]` (float32, summing to 1 over branches).

  Returns:
    `[B, H, W, C]` in x's dtype (and the branch weights).
  """
  op = "selective_kernel_attention"
  B, H, W, C = conv2d.check_feature_map(op, x)
  for name, k in (("kernel_0", kernel_0), ("kernel_1", kernel_1)):
    if jnp.ndim(k) != 4 or k.shape[2:] != (C, C) or k.shape[0] != k.shape[1] or k.shape[0] % 2 == 0:
      raise ValueError(f"{op}: `{name}` must have shape [k, k, {C}, {C}] with k odd, got "
                       f"{jnp.shape(k)}")
  if jnp.ndim(w_z) != 2 or w_z.shape[0] != C:
    raise ValueError(f"{op}: `w_z` must have shape [{C}, d], got {jnp.shape(w_z)}")
  d = w_z.shape[1]
  if jnp.shape(w_select) != (2, d, C):
    raise ValueError(f"{op}: `w_select` must have shape [2, {d}, {C}], got {jnp.shape(w_select)}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  xf = f32(x)
  branches = jnp.stack([jax.nn.relu(conv2d.conv2d(xf, f32(k), f32(b)))
                        for k, b in ((kernel_0, bias_0), (kernel_1, bias_1))], axis=1)  # [B,2,H,W,C]
  s = jnp.mean(jnp.sum(branches, axis=1), axis=(1, 2))                                  # [B, C]
  z = jax.nn.relu(s @ f32(w_z) + f32(b_z))                                              # [B, d]
  gate = jax.nn.softmax(jnp.einsum("bd,mdc->bmc", z, f32(w_select)), axis=1)            # [B, 2, C]
  y = jnp.einsum("bmc,bmhwc->bhwc", gate, branches).astype(x.dtype)
  return (y, gate) if return_gate else y


class SelectiveKernelAttention(nn.Module):
  """Creates the two branches' kernels (`kernel_sizes`), the squeeze (width `max(C / reduction,
  min_hidden)`, SKNet's d = max(C/r, L)) and the selection weights, and calls
  `selective_kernel_attention`; sows the branch weights as ("intermediates", "gate")."""
  kernel_sizes: Sequence[int] = (3, 5)
  reduction: int = 4
  min_hidden: int = 4
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    if len(self.kernel_sizes) != 2:
      raise ValueError(f"SelectiveKernelAttention: `kernel_sizes` must name 2 branches, got "
                       f"{self.kernel_sizes}")
    d = max(self.min_hidden, C // self.reduction)

    # PyTorch's Conv2d / Linear default: uniform in ±1/sqrt(fan_in), weights and biases.
    uniform = torch_uniform

    branch = {}
    for m, k in enumerate(self.kernel_sizes):
      branch[f"kernel_{m}"] = self.param(f"kernel_{m}", uniform(k * k * C), (k, k, C, C),
                                         self.param_dtype)
      branch[f"bias_{m}"] = self.param(f"bias_{m}", uniform(k * k * C), (C,), self.param_dtype)
    y, gate = selective_kernel_attention(
        x, **branch, w_z=self.param("w_z", uniform(C), (C, d), self.param_dtype),
        b_z=self.param("b_z", uniform(C), (d,), self.param_dtype),
        w_select=self.param("w_select", uniform(d), (2, d, C), self.param_dtype), return_gate=True)
    self.sow("intermediates", modules.GATE, gate)
    return y


modules.register_module(modules.Module(
    name="selective_kernel_attention", fn=selective_kernel_attention,
    linen=SelectiveKernelAttention, kind="feature_map", family="channel-spatial", seeds=(127,),
    paper="Frequency and Multi-Scale Selective Kernel Attention for Speaker Verification",
    arxiv="2204.01005", gate_range=(0.0, 1.0)))
