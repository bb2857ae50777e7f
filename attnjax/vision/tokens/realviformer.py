"""RealViformer's improved channel attention (ICA): transposed (channel-covariance) attention inside a
squeeze-excite channel bottleneck, its output channels rescaled by a gate computed from the channel
covariance itself (the attention branch of the paper's Transformer block).

With `x ∈ R^{P x C}` (P = H·W pixels), squeeze factor s, `C' = C / s`, G heads of `c = C' / G`:

  squeeze:   X_s = conv3x3(x; W_sq) ∈ R^{P x C'}          (no bias, as the reference code)
             N = X_s / sqrt(Var_ch(X_s) + 1e-5) ⊙ λ         (bias-free LayerNorm over channels)
  attention: Q, K, V = dwconv3x3(N W_qkv)                  (Restormer's MDTA projections)
             Σ_g = τ_g q̂_g k̂_gᵀ ∈ R^{c x c},  q̂, k̂ L2-normalized over the P pixels (the covariance)
             A_g = softmax(Σ_g) ∈ (0, 1)^{c x c}
  rescaling: m_g = σ( GELU( a · max_j Σ_g[:, j] + b · mean_j Σ_g[:, j] ) W_m ) ∈ (0, 1)^c
             O_g = (A_g V_g) ⊙ m_g                          (each output channel scaled)
  excite:    y = conv3x3(concat_g(O_g) W_o; W_ex)          (back to C channels)

Shapes: `x [B, H, W, C] -> [B, H, W, C]`; `squeeze_kernel [3, 3, C, C']`, `norm_scale [C']`,
`qkv_kernel [C', 3C']`, `qkv_dw_kernel [3, 3, 1, 3C']`, `temperature [G]`, `mask_w1 [2]` (a, b),
`mask_w2 [c, c]`, `proj [C', C']`, `excite_kernel [3, 3, C', C]`; gates `(A [B, G, c, c], m [B, G,
c])`. The Transformer block around the module adds it to its input (`x + y`) and follows it with a
gated feed-forward network; both are block-level (as the other modules here, the module returns the
attention branch), and so is the recurrent video model.
Paper: Zhang and Yao, "RealViformer: Investigating Attention for Real-World Video Super-Resolution",
arXiv:2407.13987.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float

__all__ = ["ImprovedChannelAttention", "realviformer_channel_attention"]

FeatureMap = Float[Array, "B H W C"]
Kernel = Float[Array, "kh kw C_in C_out"]
Matrix = Float[Array, "C_in C_out"]
Vector = Float[Array, "C_out"]


def realviformer_channel_attention(
    x: FeatureMap, *, squeeze_kernel: Kernel, norm_scale: Vector, qkv_kernel: Matrix,
    qkv_dw_kernel: Kernel, temperature: Vector, mask_w1: Vector, mask_w2: Matrix, proj: Matrix,
    excite_kernel: Kernel, return_gate: bool = False):
  """RealViformer's ICA: squeezed transposed attention, covariance-based channel rescaling and
  expansion (module docstring).

  Args:
    x: `[B, H, W, C]`.
    squeeze_kernel: `[3, 3, C, C']`; norm_scale: `[C']`; qkv_kernel: `[C', 3C']`;
      qkv_dw_kernel: `[3, 3, 1, 3C']`; temperature: `[G]` (G divides C'); mask_w1: `[2]`;
      mask_w2: `[C'/G, C'/G]`; proj: `[C', C']`; excite_kernel: `[3, 3, C', C]`.
    return_gate: also return `(A [B, G, c, c], m [B, G, c])` (float32, in (0, 1)).

  Returns:
    `[B, H, W, C]` in x's dtype (and the gates).
  """
  op = "realviformer_channel_attention"
  B, H, W, C = conv2d.check_feature_map(op, x)
  cs, heads = int(jnp.shape(squeeze_kernel)[-1]), int(jnp.size(temperature))
  if heads < 1 or cs % heads:
    raise ValueError(f"{op}: `temperature` must have shape [G] with G dividing C'={cs}, got "
                     f"{list(jnp.shape(temperature))}")
  c = cs // heads
  shapes = dict(squeeze_kernel=(3, 3, C, cs), norm_scale=(cs,), qkv_kernel=(cs, 3 * cs),
                qkv_dw_kernel=(3, 3, 1, 3 * cs), temperature=(heads,), mask_w1=(2,),
                mask_w2=(c, c), proj=(cs, cs), excite_kernel=(3, 3, cs, C))
  given = dict(squeeze_kernel=squeeze_kernel, norm_scale=norm_scale, qkv_kernel=qkv_kernel,
               qkv_dw_kernel=qkv_dw_kernel, temperature=temperature, mask_w1=mask_w1,
               mask_w2=mask_w2, proj=proj, excite_kernel=excite_kernel)
  for name, shape in shapes.items():
    if tuple(jnp.shape(given[name])) != shape:
      raise ValueError(f"{op}: `{name}` must have shape {list(shape)}, got "
                       f"{list(jnp.shape(given[name]))}")
  w = {name: jnp.asarray(a, jnp.float32) for name, a in given.items()}
  xf = jnp.asarray(x, jnp.float32)
  xs = conv2d.conv2d(xf, w["squeeze_kernel"])
  # Bias-free LayerNorm (the reference's default): divide by the deviation, keep the mean.
  n = xs / jnp.sqrt(jnp.var(xs, axis=-1, keepdims=True) + 1e-5) * w["norm_scale"]
  qkv = conv2d.depthwise_conv2d(n @ w["qkv_kernel"], w["qkv_dw_kernel"])
  qkv = qkv.reshape(B, H * W, 3, heads, c)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  normalize = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  cov = jnp.einsum("bpgi,bpgj->bgij", normalize(q), normalize(k)) * w["temperature"][:, None, None]
  attn = jax.nn.softmax(cov, axis=-1)
  # Covariance-based rescaling: squeeze each row of the covariance to (max, mean), excite across the
  # head's channels.
  descriptor = w["mask_w1"][0] * cov.max(axis=-1) + w["mask_w1"][1] * cov.mean(axis=-1)
  mask = jax.nn.sigmoid(jax.nn.gelu(descriptor, approximate=False) @ w["mask_w2"])   # [B, G, c]
  out = jnp.einsum("bgij,bpgj->bpgi", attn, v) * mask[:, None]
  out = (out.reshape(B, H * W, cs) @ w["proj"]).reshape(B, H, W, cs)
  y = conv2d.conv2d(out, w["excite_kernel"]).astype(x.dtype)
  return (y, (attn, mask)) if return_gate else y


class ImprovedChannelAttention(nn.Module):
  """Creates ICA's weights (PyTorch's convolution / linear defaults, norm scale and temperatures one,
  as the reference code; squeeze factor and heads of its released model) and calls
  `realviformer_channel_attention`; sows the attention and the rescaling gate as ("intermediates",
  "gate")."""
  squeeze_factor: int = 4
  heads: int = 1
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    cs = max(1, C // self.squeeze_factor)
    c = cs // self.heads
    p = lambda name, init, shape: self.param(name, init, shape, self.param_dtype)
    torch = torch_uniform
    ones = nn.initializers.ones
    y, gates = realviformer_channel_attention(
        x, squeeze_kernel=p("squeeze_kernel", torch(9 * C), (3, 3, C, cs)),
        norm_scale=p("norm_scale", ones, (cs,)), qkv_kernel=p("qkv_kernel", torch(cs), (cs, 3 * cs)),
        qkv_dw_kernel=p("qkv_dw_kernel", torch(9), (3, 3, 1, 3 * cs)),
        temperature=p("temperature", ones, (self.heads,)), mask_w1=p("mask_w1", torch(2), (2,)),
        mask_w2=p("mask_w2", torch(c), (c, c)), proj=p("proj", torch(cs), (cs, cs)),
        excite_kernel=p("excite_kernel", torch(9 * cs), (3, 3, cs, C)), return_gate=True)
    for gate in gates:
      self.sow("intermediates", modules.GATE, gate)
    return y


modules.register_module(modules.Module(
    name="realviformer_channel_attention", fn=realviformer_channel_attention,
    linen=ImprovedChannelAttention, kind="feature_map", family="channel-spatial", seeds=(235,),
    paper="RealViformer: Investigating Attention for Real-World Video Super-Resolution",
    arxiv="2407.13987", gate_range=(0.0, 1.0)))
