"""TransDAE's dual attention: efficient (linear) spatial attention followed by transposed channel
attention, each on a layer-normed input and added back (the paper's dual attention transformer block,
as in DAE-Former, which TransDAE builds on).

With `X ∈ R^{P x C}` the P = H·W pixels of one image:

  efficient spatial attention (Shen et al.; heads h of d_k key and d_v value channels):
    Q = LN₁(X) W_q + b_q,  K = LN₁(X) W_k + b_k,  V = LN₁(X) W_v + b_v
    ρ_q(Q_h) = softmax over each pixel's d_k channels,  ρ_k(K_h) = softmax over the P pixels
    E_h = ρ_q(Q_h) (ρ_k(K_h)ᵀ V_h)          (a d_k x d_v context: cost linear in P)
    X₁ = X + concat_h(E_h) W_o + b_o

  transposed channel attention (channels as tokens, C x C affinity over all pixels; G heads):
    Q', K', V' = LN₂(X₁) W_qkv,  A_g = softmax(τ_g q̂'_gᵀ k̂'_g) with q̂, k̂ L2-normalized over pixels
    Y = X₁ + concat_g((A_g V'_gᵀ)ᵀ) W_p + b_p

Shapes: `x [B, H, W, C] -> [B, H, W, C]`; `ea_wq, ea_wk [C, d_k]`, `ea_wv [C, d_v]`, `ea_wo [d_v, C]`
(the 1x1 convolutions, with biases except the key's, which cancels in the softmax over pixels);
`ca_w_qkv [C, 3C]` (no bias, as the reference code), `ca_temperature [G]`, `ca_w_proj [C, C]`,
`ca_b_proj [C]`; LayerNorm scales and biases `[C]`. The gates
are `(ρ_q(Q) [B, P, d_k], ρ_k(K) [B, P, d_k], A [B, G, C/G, C/G])`, all softmax outputs. Left out: the
Mix-FFNs between and after the attentions (feed-forward layers, not attention) and the inter-scale
skip-interaction module, which connects encoder and decoder stages of the network (model-level).
Paper: Azad et al., "TransDAE: Dual Attention Mechanism in a Hierarchical Transformer for Efficient
Medical Image Segmentation", arXiv:2409.02018 (block of "DAE-Former", arXiv:2212.13504).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core import layer_norm
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float
from attnjax.vision.tokens import common

__all__ = ["TransDAEDualAttention", "efficient_attention", "transdae_dual_attention"]

FeatureMap = Float[Array, "B H W C"]
Matrix = Float[Array, "C_in C_out"]
HeadScale = Float[Array, "G"]
Vector = Float[Array, "C_out"]


def efficient_attention(tokens, wq, bq, wk, wv, bv, *, heads: int):
  """Efficient attention on `tokens [B, P, C]` (float32): per head, `softmax_ch(Q) (softmax_px(K)ᵀ
  V)`; returns `(E [B, P, d_v], ρ_q(Q) [B, P, d_k], ρ_k(K) [B, P, d_k])`. The key convolution's
  bias is left out: a per-channel constant cancels in the softmax over pixels."""
  B, P, _ = tokens.shape
  q, k, v = tokens @ wq + bq, tokens @ wk, tokens @ wv + bv
  dk, dv = q.shape[-1] // heads, v.shape[-1] // heads
  q, k, v = q.reshape(B, P, heads, dk), k.reshape(B, P, heads, dk), v.reshape(B, P, heads, dv)
  rho_q = jax.nn.softmax(q, axis=-1)                             # over each pixel's key channels
  rho_k = jax.nn.softmax(k, axis=1)                              # over the pixels
  context = jnp.einsum("bphk,bphv->bhkv", rho_k, v)              # [B, heads, d_k, d_v]
  out = jnp.einsum("bphk,bhkv->bphv", rho_q, context).reshape(B, P, heads * dv)
  return out, rho_q.reshape(B, P, heads * dk), rho_k.reshape(B, P, heads * dk)


def transdae_dual_attention(x: FeatureMap, *, ln1_scale: Vector, ln1_bias: Vector, ea_wq: Matrix,
                            ea_bq: Vector, ea_wk: Matrix, ea_wv: Matrix, ea_bv: Vector,
                            ea_wo: Matrix, ea_bo: Vector, ln2_scale: Vector, ln2_bias: Vector,
                            ca_w_qkv: Matrix, ca_temperature: HeadScale, ca_w_proj: Matrix,
                            ca_b_proj: Vector, spatial_heads: int = 1, channel_heads: int = 4,
                            return_gate: bool = False):
  """TransDAE's dual attention block: `X₁ = X + EffAttn(LN₁ X)`, `Y = X₁ + ChannelAttn(LN₂ X₁)`
  (module docstring).

  Args:
    x: `[B, H, W, C]`.
    ln1_scale, ln1_bias, ln2_scale, ln2_bias: `[C]`.
    ea_wq, ea_wk: `[C, d_k]`; ea_bq: `[d_k]` (no key bias: it cancels in ρ_k);
      ea_wv: `[C, d_v]`; ea_bv: `[d_v]`; ea_wo: `[d_v, C]`; ea_bo: `[C]`
      (d_k, d_v divisible by `spatial_heads`).
    ca_w_qkv: `[C, 3C]`; ca_temperature: `[channel_heads]`; ca_w_proj: `[C, C]`; ca_b_proj: `[C]`.
    spatial_heads: heads of the efficient attention; channel_heads: G, dividing C.
    return_gate: also return `(ρ_q(Q), ρ_k(K), A)` (float32 softmax outputs).

  Returns:
    `[B, H, W, C]` in x's dtype (and the gates).
  """
  op = "transdae_dual_attention"
  B, H, W, C = conv2d.check_feature_map(op, x)
  if channel_heads < 1 or C % channel_heads:
    raise ValueError(f"{op}: `channel_heads` must divide the channel count C={C}, got {channel_heads}")
  dk, dv = int(jnp.shape(ea_wq)[-1]), int(jnp.shape(ea_wv)[-1])
  if spatial_heads < 1 or dk % spatial_heads or dv % spatial_heads:
    raise ValueError(f"{op}: `spatial_heads` must divide d_k={dk} and d_v={dv}, got {spatial_heads}")
  shapes = dict(ln1_scale=(C,), ln1_bias=(C,), ea_wq=(C, dk), ea_bq=(dk,), ea_wk=(C, dk),
                ea_wv=(C, dv), ea_bv=(dv,), ea_wo=(dv, C), ea_bo=(C,), ln2_scale=(C,),
                ln2_bias=(C,), ca_w_qkv=(C, 3 * C), ca_temperature=(channel_heads,),
                ca_w_proj=(C, C), ca_b_proj=(C,))
  given = dict(ln1_scale=ln1_scale, ln1_bias=ln1_bias, ea_wq=ea_wq, ea_bq=ea_bq, ea_wk=ea_wk,
               ea_wv=ea_wv, ea_bv=ea_bv, ea_wo=ea_wo, ea_bo=ea_bo, ln2_scale=ln2_scale,
               ln2_bias=ln2_bias, ca_w_qkv=ca_w_qkv, ca_temperature=ca_temperature,
               ca_w_proj=ca_w_proj, ca_b_proj=ca_b_proj)
  for name, shape in shapes.items():
    if tuple(jnp.shape(given[name])) != shape:
      raise ValueError(f"{op}: `{name}` must have shape {list(shape)}, got "
                       f"{list(jnp.shape(given[name]))}")
  w = {name: jnp.asarray(a, jnp.float32) for name, a in given.items()}
  tokens = jnp.asarray(x, jnp.float32).reshape(B, H * W, C)
  spatial, rho_q, rho_k = efficient_attention(
      layer_norm.layer_norm(tokens, w["ln1_scale"], w["ln1_bias"]), w["ea_wq"], w["ea_bq"], w["ea_wk"],
      w["ea_wv"], w["ea_bv"], heads=spatial_heads)
  x1 = tokens + spatial @ w["ea_wo"] + w["ea_bo"]
  qkv = (layer_norm.layer_norm(x1, w["ln2_scale"], w["ln2_bias"]) @ w["ca_w_qkv"]).reshape(
      B, H * W, 3, channel_heads, C // channel_heads)
  mixed, attn = common.transposed_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                            w["ca_temperature"])
  y = x1 + mixed.reshape(B, H * W, C) @ w["ca_w_proj"] + w["ca_b_proj"]
  y = y.reshape(B, H, W, C).astype(x.dtype)
  return (y, (rho_q, rho_k, attn)) if return_gate else y


class TransDAEDualAttention(nn.Module):
  """Creates the dual attention block's weights (PyTorch defaults for the 1x1 convolutions and linear
  layers, LayerNorm ones / zeros, temperatures one, as the reference code) and calls
  `transdae_dual_attention`; key and value widths default to C. Sows the three softmax gates as
  ("intermediates", "gate")."""
  key_channels: int = 0
  value_channels: int = 0
  spatial_heads: int = 1
  channel_heads: int = 4
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    dk, dv = self.key_channels or C, self.value_channels or C
    p = lambda name, init, shape: self.param(name, init, shape, self.param_dtype)
    ones, zeros = nn.initializers.ones, nn.initializers.zeros
    from_c, from_v = torch_uniform(C), torch_uniform(dv)
    y, gates = transdae_dual_attention(
        x, ln1_scale=p("ln1_scale", ones, (C,)), ln1_bias=p("ln1_bias", zeros, (C,)),
        ea_wq=p("ea_wq", from_c, (C, dk)), ea_bq=p("ea_bq", from_c, (dk,)),
        ea_wk=p("ea_wk", from_c, (C, dk)),
        ea_wv=p("ea_wv", from_c, (C, dv)), ea_bv=p("ea_bv", from_c, (dv,)),
        ea_wo=p("ea_wo", from_v, (dv, C)), ea_bo=p("ea_bo", from_v, (C,)),
        ln2_scale=p("ln2_scale", ones, (C,)), ln2_bias=p("ln2_bias", zeros, (C,)),
        ca_w_qkv=p("ca_w_qkv", from_c, (C, 3 * C)),
        ca_temperature=p("ca_temperature", ones, (self.channel_heads,)),
        ca_w_proj=p("ca_w_proj", from_c, (C, C)), ca_b_proj=p("ca_b_proj", from_c, (C,)),
        spatial_heads=self.spatial_heads, channel_heads=self.channel_heads, return_gate=True)
    for gate in gates:
      self.sow("intermediates", modules.GATE, gate)
    return y


modules.register_module(modules.Module(
    name="transdae_dual_attention", fn=transdae_dual_attention, linen=TransDAEDualAttention,
    kind="feature_map", family="channel-spatial", seeds=(8,),
    paper="TransDAE: Dual Attention Mechanism in a Hierarchical Transformer for Efficient Medical "
          "Image Segmentation", arxiv="2409.02018", gate_range=(0.0, 1.0)))
