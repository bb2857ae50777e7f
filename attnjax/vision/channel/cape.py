"""CAPE's parameter embedding block: channel attention computed from the PDE's parameters, applied to
three convolution branches of a neural PDE surrogate's input field.

    e = sigmoid(log p) = p / (1 + p)                   p [B, P] > 0, the PDE parameters (ν, β, ...)
    a_m = W_mb gelu(W_ma e + b_ma) + b_mb ∈ R^{B x F}   m = 0, 1, 2: three channel-attention vectors
    y  = gelu(K₀ ⊛ x)                                  k×k, C -> F/2, no bias
    y₀ = up_r( Spectral( avgpool_r(y) ) ) ⊙ a₀         FNO spectral convolution on the r-pooled field
    y₁ = (y W_ac + b_ac) ⊙ a₁                          1×1 convolution
    y₂ = (K_ad ⊛_grouped y) ⊙ a₂                       k×k, F/2 groups (each input channel -> 2)
    z  = K₂ ⊛ gelu(y₀ + y₁ + y₂ + y W_1 + b_1)          k×k, F -> C, no bias
    out = x ⊙ (1 + LN_{H,W}(z))                        LayerNorm over each channel's H×W field

The attention vectors a_m weight the branches' F channels per example from p alone (unbounded: no
sigmoid); the surrogate then reads `out` beside x. `Spectral` keeps the lowest `modes` frequencies
of `rfft2` (the first and last `modes` rows, the first `modes` columns) and multiplies each by a
learned complex [F/2, F] matrix, as FNO's SpectralConv2d does (`spectral_conv2d`); `avgpool_r` and
`up_r` (nearest) use the paper's r = 4, so H and W must be multiples of `pool`.

Shapes: `x [B, H, W, C]`, `pde_params [B, P]` -> `[B, H, W, C]`.
Paper: Takamoto, Alesiani and Niepert, "Learning Neural PDE Solvers with Parameter-Guided Channel
Attention" (CAPE), arXiv:2304.14118; this is its 2-D `PrmEmb_Block_2d` with one embedding channel
per input channel (the default; more would repeat x along channels).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float

__all__ = ["CAPEParameterAttention", "pde_parameter_channel_attention", "spectral_conv2d"]

FeatureMap = Float[Array, "B H W C"]
PDEParams = Float[Array, "B P"]
_gelu = lambda a: jax.nn.gelu(a, approximate=False)   # PyTorch's F.gelu (erf)


def spectral_conv2d(y: FeatureMap, w_low_re, w_low_im, w_high_re, w_high_im) -> FeatureMap:
  """FNO's spectral convolution: `irfft2` of `rfft2(y)` with the frequency rows 0 … m-1 multiplied by
  `w_low` and rows H-m … H-1 by `w_high` (columns 0 … m-1 of the half spectrum), every other
  frequency zero; where the two row ranges overlap (2m > H) the last rows' weights win, as in FNO's
  layer (the paper's 9 modes on its 16×16 pooled grid overlap in rows 7 and 8). Weights
  `[C_in, C_out, m, m]` as real and imaginary parts; `y [B, H, W, C_in]` float32, m ≤ H and
  m ≤ W // 2 + 1."""
  B, H, W, _ = y.shape
  m = w_low_re.shape[-1]
  spec = jnp.fft.rfft2(jnp.moveaxis(y, -1, 1))                           # [B, C_in, H, W//2+1]
  mix = lambda s, re, im: jnp.einsum("bixy,ioxy->boxy", s, re + 1j * im)
  out = jnp.zeros((B, w_low_re.shape[1], H, W // 2 + 1), spec.dtype)
  out = out.at[:, :, :m, :m].set(mix(spec[:, :, :m, :m], w_low_re, w_low_im))
  out = out.at[:, :, H - m:, :m].set(mix(spec[:, :, H - m:, :m], w_high_re, w_high_im))
  return jnp.moveaxis(jnp.fft.irfft2(out, s=(H, W)), 1, -1)


def pde_parameter_channel_attention(x: FeatureMap, pde_params: PDEParams, *, w0, sc_low_re, sc_low_im,
                                    sc_high_re, sc_high_im, w_ad, w_ac, b_ac, w_1, b_1, w_2,
                                    fc0a_w, fc0a_b, fc0b_w, fc0b_b, fc1a_w, fc1a_b, fc1b_w, fc1b_b,
                                    fc2a_w, fc2a_b, fc2b_w, fc2b_b, ln_scale, ln_bias,
                                    pool: int = 4, eps: float = 1e-5) -> FeatureMap:
  """CAPE's parameter-guided channel attention block (module docstring).

  Args:
    x: `[B, H, W, C]`, H and W multiples of `pool`.
    pde_params: `[B, P]`, the positive PDE parameters of each example.
    w0: `[k, k, C, F/2]`; sc_*: `[F/2, F, m, m]`; w_ad: `[k, k, 1, F]`; w_ac, w_1: `[F/2, F]`;
      b_ac, b_1: `[F]`; w_2: `[k, k, F, C]`; fc{m}a_w: `[P, F/2]`, fc{m}a_b: `[F/2]`,
      fc{m}b_w: `[F/2, F]`, fc{m}b_b: `[F]`; ln_scale, ln_bias: `[H, W]`.
    pool: r, the spectral branch's pooling and upsampling factor.

  Returns:
    `[B, H, W, C]` in x's dtype.
  """
  op = "pde_parameter_channel_attention"
  B, H, W, C = conv2d.check_feature_map(op, x)
  if jnp.ndim(pde_params) != 2 or jnp.shape(pde_params)[0] != B:
    raise ValueError(f"{op}: `pde_params` must be [B, P] with B = {B}, got {jnp.shape(pde_params)}")
  if H % pool or W % pool:
    raise ValueError(f"{op}: the feature map's H = {H} and W = {W} must be multiples of `pool` = "
                     f"{pool} (the spectral branch pools and upsamples by it)")
  m = jnp.shape(sc_low_re)[-1]
  if m > H // pool or m > (W // pool) // 2 + 1:
    raise ValueError(f"{op}: {m} spectral modes need modes ≤ H / pool = {H // pool} and modes ≤ "
                     f"(W / pool) // 2 + 1 = {(W // pool) // 2 + 1}")
  if jnp.shape(ln_scale) != (H, W):
    raise ValueError(f"{op}: `ln_scale` must be [H, W] = [{H}, {W}], got {jnp.shape(ln_scale)}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  e = jax.nn.sigmoid(jnp.log(f32(pde_params)))
  attn = [_gelu(e @ f32(fa_w) + f32(fa_b)) @ f32(fb_w) + f32(fb_b)
          for fa_w, fa_b, fb_w, fb_b in ((fc0a_w, fc0a_b, fc0b_w, fc0b_b),
                                         (fc1a_w, fc1a_b, fc1b_w, fc1b_b),
                                         (fc2a_w, fc2a_b, fc2b_w, fc2b_b))]
  gate = lambda a: a[:, None, None, :]
  y = _gelu(conv2d.conv2d(f32(x), f32(w0)))
  pooled = y.reshape(B, H // pool, pool, W // pool, pool, -1).mean(axis=(2, 4))
  y0 = spectral_conv2d(pooled, f32(sc_low_re), f32(sc_low_im), f32(sc_high_re), f32(sc_high_im))
  y0 = jnp.repeat(jnp.repeat(y0, pool, axis=1), pool, axis=2) * gate(attn[0])
  y1 = (y @ f32(w_ac) + f32(b_ac)) * gate(attn[1])
  y2 = conv2d.conv2d(y, f32(w_ad), groups=y.shape[-1]) * gate(attn[2])
  z = conv2d.conv2d(_gelu(y0 + y1 + y2 + y @ f32(w_1) + f32(b_1)), f32(w_2))
  mean = z.mean(axis=(1, 2), keepdims=True)
  var = ((z - mean) ** 2).mean(axis=(1, 2), keepdims=True)
  ln = ((z - mean) / jnp.sqrt(var + eps) * f32(ln_scale)[None, :, :, None]
        + f32(ln_bias)[None, :, :, None])
  return (f32(x) * (1.0 + ln)).astype(x.dtype)


class CAPEParameterAttention(nn.Module):
  """Creates CAPE's block weights at the paper's sizes (widening factor F = 16, 5×5 kernels, 9
  spectral modes, pooling 4; PyTorch's default initializers, FNO's spectral init
  `U[0, 1) / (C_in · C_out)`, LayerNorm at identity) and calls `pde_parameter_channel_attention`
  on `(x [B, H, W, C], pde_params [B, P])`."""
  widening_factor: int = 16
  kernel_size: int = 5
  modes: int = 9
  pool: int = 4
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, pde_params):
    _, H, W, C = x.shape
    P, F, k, m = pde_params.shape[-1], self.widening_factor, self.kernel_size, self.modes
    if F % 2:
      raise ValueError(f"CAPEParameterAttention: `widening_factor` must be even, got {F}")
    h = F // 2
    p = lambda name, init, shape: self.param(name, init, shape, self.param_dtype)
    spectral = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype) / (h * F)
    weights = {
        "w0": p("w0", torch_uniform(k * k * C), (k, k, C, h)),
        **{f"sc_{n}": p(f"sc_{n}", spectral, (h, F, m, m))
           for n in ("low_re", "low_im", "high_re", "high_im")},
        "w_ad": p("w_ad", torch_uniform(k * k), (k, k, 1, F)),
        "w_ac": p("w_ac", torch_uniform(h), (h, F)), "b_ac": p("b_ac", torch_uniform(h), (F,)),
        "w_1": p("w_1", torch_uniform(h), (h, F)), "b_1": p("b_1", torch_uniform(h), (F,)),
        "w_2": p("w_2", torch_uniform(k * k * F), (k, k, F, C)),
        "ln_scale": p("ln_scale", nn.initializers.ones, (H, W)),
        "ln_bias": p("ln_bias", nn.initializers.zeros, (H, W)),
    }
    for i in range(3):
      weights.update({f"fc{i}a_w": p(f"fc{i}a_w", torch_uniform(P), (P, h)),
                      f"fc{i}a_b": p(f"fc{i}a_b", torch_uniform(P), (h,)),
                      f"fc{i}b_w": p(f"fc{i}b_w", torch_uniform(h), (h, F)),
                      f"fc{i}b_b": p(f"fc{i}b_b", torch_uniform(h), (F,))})
    return pde_parameter_channel_attention(x, pde_params, **weights, pool=self.pool)


modules.register_module(modules.Module(
    name="pde_parameter_channel_attention", fn=pde_parameter_channel_attention,
    linen=CAPEParameterAttention, kind="feature_map", family="channel-spatial", seeds=(103,),
    paper="Learning Neural PDE Solvers with Parameter-Guided Channel Attention",
    arxiv="2304.14118",
    extra_inputs=(modules.ExtraInput("pde_params", lambda s: (s[0], 2), positive=True),),
    example={"widening_factor": 8, "kernel_size": 3, "modes": 2, "pool": 1}))
