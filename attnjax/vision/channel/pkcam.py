"""PKCAM: previous-knowledge channel attention, an ECA gate on the current layer fused with an ECA
gate on a fusion of the current and the previous layer's channel descriptors.

    z = GAP(x) ∈ R^C,   p = GAP(prev) ∈ R^{C'} tiled to C channels (p̃_c = p_{c mod C'}),
    s_local = σ(conv1d_k(z; κ_l)),   f_c = ReLU(a₀ p̃_c + a₁ z_c),   s_global = σ(conv1d_k(f; κ_g)),
    s_c = σ(b₀ s_local,c + b₁ s_global,c) ∈ (0, 1),   y = x ⊙ (1 + s),

the input and output fusions being the reference code's kernel-2, stride-2 convolutions over the
interleaved pair (no bias), k = ψ(C) ECA's adaptive kernel size, and the previous layer's map of any
size with C' dividing C (its descriptor repeated across the channels, the reference code's default
in place of a learned upsampling). The gate multiplies as `1 + s`, the residual form of the
reference code. Shapes: `x [B, H, W, C]`, `prev [B, H', W', C'] -> [B, H, W, C]`; `local_kernel,
global_kernel [k]`, `in_fusion, out_fusion [2]`.
Paper: Bakr, El Sallab and Rashwan, "PKCAM: Previous Knowledge Channel Attention Module",
arXiv:2211.07521.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float
from attnjax.vision.channel.eca import eca_kernel_size

__all__ = ["PreviousKnowledgeChannelAttention", "pkcam_channel_attention"]

FeatureMap = Float[Array, "B H W C"]
PrevMap = Float[Array, "B Hp Wp Cp"]
Kernel = Float[Array, "k"]
Pair = Float[Array, "2"]


def pkcam_channel_attention(x: FeatureMap, prev: PrevMap, *,
                            local_kernel: Kernel, global_kernel: Kernel,
                            in_fusion: Pair, out_fusion: Pair,
                            return_gate: bool = False):
  """PKCAM: `x ⊙ (1 + σ(b₀ s_local + b₁ s_global))`, s_global from the previous layer (module
  docstring).

  Args:
    x: `[B, H, W, C]`, the current layer's features.
    prev: `[B, H', W', C']`, the previous layer's features (C' divides C).
    local_kernel, global_kernel: `[k]`, k odd, the two ECA convolutions.
    in_fusion: `[2]` (a₀ previous, a₁ current); out_fusion: `[2]` (b₀ local, b₁ global).
    return_gate: also return the gate s `[B, C]` (float32, in (0, 1)).

  Returns:
    `[B, H, W, C]` in x's dtype (and the gate).
  """
  op = "pkcam_channel_attention"
  B, _, _, C = conv2d.check_feature_map(op, x)
  Bp, _, _, Cp = conv2d.check_feature_map(op, prev, name="prev")
  if Bp != B or C % Cp:
    raise ValueError(f"{op}: `prev` must have shape [B, H', W', C'] with B = {B} and C' dividing "
                     f"C = {C}, got {jnp.shape(prev)}")
  for name, kernel in (("local_kernel", local_kernel), ("global_kernel", global_kernel)):
    if jnp.ndim(kernel) != 1 or kernel.shape[0] % 2 == 0:
      raise ValueError(f"{op}: `{name}` must have shape [k] with k odd, got {jnp.shape(kernel)}")
  for name, fusion in (("in_fusion", in_fusion), ("out_fusion", out_fusion)):
    if jnp.shape(fusion) != (2,):
      raise ValueError(f"{op}: `{name}` must have shape [2], got {jnp.shape(fusion)}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  z = conv2d.global_avg_pool(x).astype(jnp.float32)
  p = jnp.tile(conv2d.global_avg_pool(prev).astype(jnp.float32), (1, C // Cp))
  a, b = f32(in_fusion), f32(out_fusion)
  local = jax.nn.sigmoid(conv2d.channel_conv1d(z, f32(local_kernel)))
  fused = jax.nn.relu(a[0] * p + a[1] * z)
  glob = jax.nn.sigmoid(conv2d.channel_conv1d(fused, f32(global_kernel)))
  gate = jax.nn.sigmoid(b[0] * local + b[1] * glob)
  y = (x.astype(jnp.float32) * (1.0 + gate[:, None, None, :])).astype(x.dtype)
  return (y, gate) if return_gate else y


class PreviousKnowledgeChannelAttention(nn.Module):
  """Creates PKCAM's two ECA kernels (`kernel_size`, default ψ(C)) and its two fusion kernels, and
  calls `pkcam_channel_attention(x, prev)`; sows the gate as ("intermediates", "gate")."""
  kernel_size: Optional[int] = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, prev):
    k = self.kernel_size or eca_kernel_size(x.shape[-1])
    # PyTorch's Conv1d default (uniform in ±1/sqrt(fan_in)), as the reference code gets.
    uniform = torch_uniform
    y, gate = pkcam_channel_attention(
        x, prev, local_kernel=self.param("local_kernel", uniform(k), (k,), self.param_dtype),
        global_kernel=self.param("global_kernel", uniform(k), (k,), self.param_dtype),
        in_fusion=self.param("in_fusion", uniform(2), (2,), self.param_dtype),
        out_fusion=self.param("out_fusion", uniform(2), (2,), self.param_dtype), return_gate=True)
    self.sow("intermediates", modules.GATE, gate)
    return y


modules.register_module(modules.Module(
    name="pkcam_channel_attention", fn=pkcam_channel_attention,
    linen=PreviousKnowledgeChannelAttention, kind="feature_map", family="channel-spatial",
    seeds=(204,), paper="PKCAM: Previous Knowledge Channel Attention Module", arxiv="2211.07521",
    # The previous layer: larger, with half the channels (a stage boundary of a ResNet).
    extra_inputs=(modules.ExtraInput("prev", lambda s: (s[0], s[1] + 4, s[2] + 2, s[3] // 2)),),
    gate_range=(0.0, 1.0)))
