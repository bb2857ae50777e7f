"""DAS: a deformable attention gate for CNNs. A depthwise-separable convolution summarizes the
features, a plain convolution predicts per-position offsets for the 3×3 taps of a deformable
convolution, and the deformable convolution (bilinear sampling at the shifted taps) gives a sigmoid
saliency gate that multiplies the input, all in O(H·W):

    z = IN(PW(DW(x)))                                    (3×3 depthwise, 1×1 pointwise, instance norm)
    Δ = Conv₃ₓ₃(z) ∈ R^{H×W×2K}                           ((Δy_k, Δx_k) for the K = 9 taps, row-major)
    d[p] = b + Σ_k W_k · z(p + p_k + Δ_k(p))             (bilinear sampling; zero outside the map)
    s = σ(LN(d)),   y = x ⊙ s                            (LN over channels, per position)

`bilinear_sample` reads `z(py, px) = Σ_{corners} (1 - |py - y_c|)(1 - |px - x_c|) z[y_c, x_c]` over the
four integer corners (zero past the border), so a zero offset reads the plain tap and the deformable
convolution with Δ = 0 is the ordinary 3×3 convolution. The depthwise-separable convolution has no
biases: the instance norm right after it removes any constant per channel, so they would not change
the output. Shapes: `x [B, H, W, C] -> [B, H, W, C]`; `dw_kernel [3, 3, 1, C]`, `pw_kernel
[1, 1, C, D]`, `offset_kernel [3, 3, D, 2K]`, `offset_bias [2K]`, `deform_kernel [3, 3, D, C]`,
`deform_bias [C]`, `ln_scale [C]`, `ln_bias [C]`.
Paper: Salajegheh, Asadi, Saryazdi and Mudur, "DAS: A Deformable Attention to Capture Salient
Information in CNNs", arXiv:2311.12091.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float


__all__ = ["DeformableAttentionGate", "bilinear_sample", "deformable_attention_gate",
           "deformable_conv2d"]

FeatureMap = Float[Array, "B H W C"]
Points = Float[Array, "B P Q K"]            # sampling coordinates, K per output position
Samples = Float[Array, "B P Q K C"]
Offsets = Float[Array, "B H W K2"]          # (Δy, Δx) per tap, interleaved
Kernel = Float[Array, "k k D O"]
Bias = Float[Array, "O"]
_EPS = 1e-5      # PyTorch's InstanceNorm2d and LayerNorm default


def bilinear_sample(z: FeatureMap, py: Points, px: Points) -> Samples:
  """`z` (float32) read at the real positions `(py, px)` by bilinear interpolation over the four
  integer corners; corners outside the map contribute zero (module docstring)."""
  B, H, W, C = z.shape
  flat = z.reshape(B, H * W, C)
  y0, x0 = jnp.floor(py), jnp.floor(px)
  out = 0.0
  for dy in (0, 1):
    for dx in (0, 1):
      yc, xc = y0 + dy, x0 + dx
      weight = (1.0 - jnp.abs(py - yc)) * (1.0 - jnp.abs(px - xc))
      inside = (yc >= 0) & (yc <= H - 1) & (xc >= 0) & (xc <= W - 1)
      idx = (jnp.clip(yc, 0, H - 1) * W + jnp.clip(xc, 0, W - 1)).astype(jnp.int32)
      vals = jnp.take_along_axis(flat, idx.reshape(B, -1, 1), axis=1).reshape(*idx.shape, C)
      out = out + jnp.where(inside, weight, 0.0)[..., None] * vals
  return out


def deformable_conv2d(z: FeatureMap, offsets: Offsets, kernel: Kernel, bias: Bias) -> FeatureMap:
  """Deformable k×k convolution (stride 1, padding k // 2): output position p reads tap k at
  `p + p_k + (Δy_k, Δx_k)` with `offsets[..., 2k], offsets[..., 2k + 1]` = (Δy_k, Δx_k), taps
  row-major; in float32."""
  B, H, W, _ = z.shape
  k = kernel.shape[0]
  r = k // 2
  ty, tx = jnp.divmod(jnp.arange(k * k), k)                     # tap grid offsets, row-major
  off = offsets.reshape(B, H, W, k * k, 2)
  py = jnp.arange(H)[None, :, None, None] + (ty - r) + off[..., 0]
  px = jnp.arange(W)[None, None, :, None] + (tx - r) + off[..., 1]
  samples = bilinear_sample(z, py, px)                          # [B, H, W, K, D]
  w = kernel.reshape(k * k, kernel.shape[2], kernel.shape[3])
  return jnp.einsum("bhwkd,kdo->bhwo", samples, w) + bias


def _norm(v, axes):
  mean = jnp.mean(v, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(v - mean), axis=axes, keepdims=True)
  return (v - mean) * jax.lax.rsqrt(var + _EPS)


def deformable_attention_gate(x: FeatureMap, *, dw_kernel, pw_kernel,
                              offset_kernel, offset_bias, deform_kernel, deform_bias, ln_scale,
                              ln_bias, return_gate: bool = False):
  """DAS: `x ⊙ σ(LN(DeformConv(z, Conv(z))))`, `z = IN(PW(DW(x)))` (module docstring).

  Args:
    x: `[B, H, W, C]`.
    dw_kernel: `[3, 3, 1, C]`; pw_kernel: `[1, 1, C, D]` (no biases: the instance norm cancels them).
    offset_kernel: `[3, 3, D, 2K]`, offset_bias: `[2K]` (K = k² taps of the deformable kernel).
    deform_kernel: `[k, k, D, C]` (k odd), deform_bias: `[C]`.
    ln_scale, ln_bias: `[C]`, the affine of the layer norm over channels.
    return_gate: also return the gate `[B, H, W, C]` (float32, in (0, 1)).

  Returns:
    `[B, H, W, C]` in x's dtype (and the gate).
  """
  op = "deformable_attention_gate"
  _, _, _, C = conv2d.check_feature_map(op, x)
  dk = jnp.shape(deform_kernel)
  if len(dk) != 4 or dk[0] != dk[1] or dk[0] % 2 == 0 or dk[3] != C:
    raise ValueError(f"{op}: `deform_kernel` must have shape [k, k, D, C] with k odd (C = {C}), "
                     f"got {dk}")
  k, D = dk[0], dk[2]
  want = {"dw_kernel": (3, 3, 1, C), "pw_kernel": (1, 1, C, D),
          "offset_kernel": (3, 3, D, 2 * k * k), "offset_bias": (2 * k * k,), "deform_bias": (C,),
          "ln_scale": (C,), "ln_bias": (C,)}
  given = {"dw_kernel": dw_kernel, "pw_kernel": pw_kernel,
           "offset_kernel": offset_kernel, "offset_bias": offset_bias, "deform_bias": deform_bias,
           "ln_scale": ln_scale, "ln_bias": ln_bias}
  for name, shape in want.items():
    if jnp.shape(given[name]) != shape:
      raise ValueError(f"{op}: `{name}` must have shape {list(shape)} (C = {C}, D = {D}, k = {k}), "
                       f"got {jnp.shape(given[name])}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  x32 = f32(x)
  z = conv2d.depthwise_conv2d(x32, f32(dw_kernel))
  z = _norm(conv2d.conv2d(z, f32(pw_kernel)), (1, 2))                 # instance norm, no affine
  offsets = conv2d.conv2d(z, f32(offset_kernel), f32(offset_bias))
  d = deformable_conv2d(z, offsets, f32(deform_kernel), f32(deform_bias))
  gate = jax.nn.sigmoid(_norm(d, (-1,)) * f32(ln_scale) + f32(ln_bias))
  y = (x32 * gate).astype(x.dtype)
  return (y, gate) if return_gate else y


class DeformableAttentionGate(nn.Module):
  """Creates DAS's weights (hidden width D = C // `reduction`, a `kernel_size`² deformable kernel;
  PyTorch's default initializers, LayerNorm scale 1 and bias 0) and calls
  `deformable_attention_gate`; sows the gate as ("intermediates", "gate")."""
  reduction: int = 1
  kernel_size: int = 3
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    D, k = max(1, C // self.reduction), self.kernel_size
    p = lambda name, fan_in, shape: self.param(name, torch_uniform(fan_in), shape,
                                               self.param_dtype)
    y, gate = deformable_attention_gate(
        x, dw_kernel=p("dw_kernel", 9, (3, 3, 1, C)), pw_kernel=p("pw_kernel", C, (1, 1, C, D)),
        offset_kernel=p("offset_kernel", 9 * D, (3, 3, D, 2 * k * k)),
        offset_bias=p("offset_bias", 9 * D, (2 * k * k,)),
        deform_kernel=p("deform_kernel", k * k * D, (k, k, D, C)),
        deform_bias=p("deform_bias", k * k * D, (C,)),
        ln_scale=self.param("ln_scale", nn.initializers.ones, (C,), self.param_dtype),
        ln_bias=self.param("ln_bias", nn.initializers.zeros, (C,), self.param_dtype),
        return_gate=True)
    self.sow("intermediates", modules.GATE, gate)
    return y


modules.register_module(modules.Module(
    name="deformable_attention_gate", fn=deformable_attention_gate, linen=DeformableAttentionGate,
    kind="feature_map", family="channel-spatial", seeds=(120,),
    paper="DAS: A Deformable Attention to Capture Salient Information in CNNs", arxiv="2311.12091",
    gate_range=(0.0, 1.0)))
