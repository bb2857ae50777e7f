"""Polarized self-attention: a channel-only and a spatial-only branch, each keeping full resolution in
the dimension it attends (C/2 channels, H×W positions) while collapsing the other, with a softmax on
the collapsed dimension and a sigmoid gate on the kept one:

    channel-only:  q = W_q x ∈ R^{H×W}, v = W_v x + b_v ∈ R^{H×W×C/2}
                   z = Σ_{ij} softmax_{ij}(q)_{ij} v_{ij} ∈ R^{C/2}
                   A_ch = σ(LN(W_z z + b_z)) ∈ (0, 1)^C                 (LN over C, affine)
    spatial-only:  q' = GAP(W'_q x + b'_q) ∈ R^{C/2}, v' = W'_v x + b'_v ∈ R^{H×W×C/2}
                   A_sp = σ(Σ_c softmax_c(q')_c v'_{ij c}) ∈ (0, 1)^{H×W}
    parallel:      y = x ⊙ A_ch(x) + x ⊙ A_sp(x)          (so |y| < 2|x| elementwise)
    sequential:    u = x ⊙ A_ch(x),  y = u ⊙ A_sp(u)      (so |y| < |x| elementwise)

All W are 1×1 convolutions (matrices on the channel axis); the channel query has no bias (the
softmax over positions removes it). Shapes: `x [B, H, W, C] -> [B, H, W, C]`; `ch_wq [C]`, `ch_wv [C,
C/2]`, `ch_bv [C/2]`, `ch_wz [C/2, C]`, `ch_bz [C]`, `ln_scale [C]`, `ln_bias [C]`, `sp_wq [C, C/2]`,
`sp_bq [C/2]`, `sp_wv [C, C/2]`, `sp_bv [C/2]`.
Paper: Liu, Shao, Xiong and Tian, "Polarized Self-Attention: Towards High-quality Pixel-wise
Regression", arXiv:2107.00782.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float

__all__ = ["PolarizedSelfAttention", "polarized_self_attention"]

FeatureMap = Float[Array, "B H W C"]
LAYOUTS = ("parallel", "sequential")
_LN_EPS = 1e-5      # PyTorch's LayerNorm default, as the reference code uses


def _channel_gate(x, ch_wq, ch_wv, ch_bv, ch_wz, ch_bz, ln_scale, ln_bias):
  B, H, W, C = x.shape
  p = jax.nn.softmax((x @ ch_wq).reshape(B, H * W), axis=-1)               # [B, HW]
  z = jnp.einsum("bp,bpc->bc", p, (x @ ch_wv + ch_bv).reshape(B, H * W, -1))
  t = z @ ch_wz + ch_bz                                                    # [B, C]
  mu = t.mean(-1, keepdims=True)
  var = ((t - mu) ** 2).mean(-1, keepdims=True)
  return jax.nn.sigmoid((t - mu) / jnp.sqrt(var + _LN_EPS) * ln_scale + ln_bias)


def _spatial_gate(x, sp_wq, sp_bq, sp_wv, sp_bv):
  q = jax.nn.softmax(jnp.mean(x @ sp_wq + sp_bq, axis=(1, 2)), axis=-1)   # [B, C/2]
  return jax.nn.sigmoid(jnp.einsum("bc,bhwc->bhw", q, x @ sp_wv + sp_bv))  # [B, H, W]


def polarized_self_attention(x: FeatureMap, *, ch_wq, ch_wv, ch_bv, ch_wz, ch_bz, ln_scale, ln_bias,
                             sp_wq, sp_bq, sp_wv, sp_bv, layout: str = "parallel",
                             return_gate: bool = False):
  """Polarized self-attention, parallel `x⊙A_ch + x⊙A_sp` or sequential (module docstring).

  Args:
    x: `[B, H, W, C]`.
    ch_*, ln_*, sp_*: the weights of the module docstring (shapes there; C/2 may be any width d).
    layout: "parallel" or "sequential".
    return_gate: also return `(A_ch [B, C], A_sp [B, H, W])` (float32, in (0, 1)).

  Returns:
    `[B, H, W, C]` in x's dtype (and the two gates).
  """
  op = "polarized_self_attention"
  B, H, W, C = conv2d.check_feature_map(op, x)
  if layout not in LAYOUTS:
    raise ValueError(f"{op}: `layout` must be one of {LAYOUTS}, got {layout!r}")
  if jnp.ndim(ch_wv) != 2 or ch_wv.shape[0] != C:
    raise ValueError(f"{op}: `ch_wv` must have shape [{C}, d], got {jnp.shape(ch_wv)}")
  d = ch_wv.shape[1]
  want = dict(ch_wq=(C,), ch_bv=(d,), ch_wz=(d, C), ch_bz=(C,), ln_scale=(C,), ln_bias=(C,),
              sp_wq=(C, d), sp_bq=(d,), sp_wv=(C, d), sp_bv=(d,))
  got = dict(ch_wq=ch_wq, ch_bv=ch_bv, ch_wz=ch_wz, ch_bz=ch_bz, ln_scale=ln_scale, ln_bias=ln_bias,
             sp_wq=sp_wq, sp_bq=sp_bq, sp_wv=sp_wv, sp_bv=sp_bv)
  for name, shape in want.items():
    if jnp.shape(got[name]) != shape:
      raise ValueError(f"{op}: `{name}` must have shape {list(shape)}, got {jnp.shape(got[name])}")
  f = {k: jnp.asarray(v, jnp.float32) for k, v in got.items()}
  xf = x.astype(jnp.float32)
  a_ch = _channel_gate(xf, f["ch_wq"], jnp.asarray(ch_wv, jnp.float32), f["ch_bv"], f["ch_wz"],
                       f["ch_bz"], f["ln_scale"], f["ln_bias"])
  u = xf * a_ch[:, None, None, :]
  sp_in = xf if layout == "parallel" else u
  a_sp = _spatial_gate(sp_in, f["sp_wq"], f["sp_bq"], f["sp_wv"], f["sp_bv"])
  y = (u + xf * a_sp[..., None]) if layout == "parallel" else u * a_sp[..., None]
  y = y.astype(x.dtype)
  return (y, (a_ch, a_sp)) if return_gate else y


class PolarizedSelfAttention(nn.Module):
  """Creates PSA's weights (inner width C/2) and calls `polarized_self_attention` with `layout`;
  sows both gates as ("intermediates", "gate")."""
  layout: str = "parallel"
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    d = max(1, C // 2)

    # PyTorch's Conv2d default (uniform in ±1/sqrt(fan_in), weights and biases); LN: ones, zeros.
    uniform = torch_uniform

    p = lambda name, fan_in, shape: self.param(name, uniform(fan_in), shape, self.param_dtype)
    y, (a_ch, a_sp) = polarized_self_attention(
        x, ch_wq=p("ch_wq", C, (C,)), ch_wv=p("ch_wv", C, (C, d)), ch_bv=p("ch_bv", C, (d,)),
        ch_wz=p("ch_wz", d, (d, C)), ch_bz=p("ch_bz", d, (C,)),
        ln_scale=self.param("ln_scale", nn.initializers.ones, (C,), self.param_dtype),
        ln_bias=self.param("ln_bias", nn.initializers.zeros, (C,), self.param_dtype),
        sp_wq=p("sp_wq", C, (C, d)), sp_bq=p("sp_bq", C, (d,)), sp_wv=p("sp_wv", C, (C, d)),
        sp_bv=p("sp_bv", C, (d,)), layout=self.layout, return_gate=True)
    self.sow("intermediates", modules.GATE, a_ch)
    self.sow("intermediates", modules.GATE, a_sp)
    return y


modules.register_module(modules.Module(
    name="polarized_self_attention", fn=polarized_self_attention, linen=PolarizedSelfAttention,
    kind="feature_map", family="channel-spatial", seeds=(58,),
    paper="Polarized Self-Attention: Towards High-quality Pixel-wise Regression",
    arxiv="2107.00782", gate_range=(0.0, 1.0)))
