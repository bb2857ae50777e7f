"""Residual attention module: a trunk branch T(x) of residual units and a bottom-up top-down
(hourglass) mask branch M(x) whose sigmoid output softly weights the trunk, with attention residual
learning so that a mask near 0 keeps the trunk instead of erasing it:

    T = RU_T(x)
    M = σ(W_2 ReLU(W_1 ReLU(up(RU_M(maxpool_{3×3, stride 2}(x)))) + b_1) + b_2) ∈ (0, 1)^{H×W×C}
    y = (1 + M) ⊙ T

with the pre-activation bottleneck residual unit RU(v) = v + W_c ReLU(K_b ⊛ ReLU(W_a ReLU(v) + b_a)
+ b_b) + b_c (1×1 to C/4, 3×3, 1×1 back to C; the reference code's batch norms fold into the
convolutions at inference), `maxpool` padded by 1 (so H -> ⌈H/2⌉) and `up` bilinear interpolation
back to H×W (corners aligned, as the reference code's UpsamplingBilinear2d). The paper's module has
p = 1 pre/post units, t = 2 trunk units and r = 1 unit per mask stage; this is the smallest module,
one down/up stage with one unit per branch. Shapes: `x [B, H, W, C] -> [B, H, W, C]`; per unit
(prefix `t_` trunk, `m_` mask): `w_a [C, C/4]`, `b_a [C/4]`, `k_b [3, 3, C/4, C/4]`, `b_b [C/4]`,
`w_c [C/4, C]`, `b_c [C]`; mask head `w_1, w_2 [C, C]`, `b_1, b_2 [C]`.
Paper: Wang, Jiang, Qian, Yang, Li, Zhang, Wang and Tang, "Residual Attention Network for Image
Classification", arXiv:1704.06904.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float

__all__ = ["ResidualAttention", "residual_attention_module", "residual_unit"]

FeatureMap = Float[Array, "B H W C"]
UNIT = ("w_a", "b_a", "k_b", "b_b", "w_c", "b_c")


def residual_unit(v, w_a, b_a, k_b, b_b, w_c, b_c):
  """Pre-activation bottleneck unit `v + W_c ReLU(K_b ⊛ ReLU(W_a ReLU(v) + b_a) + b_b) + b_c`."""
  h = jax.nn.relu(jax.nn.relu(v) @ w_a + b_a)
  h = jax.nn.relu(conv2d.conv2d(h, k_b, b_b))
  return v + h @ w_c + b_c


def _upsample_aligned(v, H, W):
  """Bilinear interpolation `[B, h, w, C] -> [B, H, W, C]` with the corners aligned."""
  def axis_weights(n_in, n_out):
    pos = jnp.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, n_in - 1)
    hi = jnp.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(v.dtype)
  lo, hi, f = axis_weights(v.shape[1], H)
  v = v[:, lo] * (1 - f)[None, :, None, None] + v[:, hi] * f[None, :, None, None]
  lo, hi, f = axis_weights(v.shape[2], W)
  return v[:, :, lo] * (1 - f)[None, None, :, None] + v[:, :, hi] * f[None, None, :, None]


def residual_attention_module(x: FeatureMap, *, t_w_a, t_b_a, t_k_b, t_b_b, t_w_c, t_b_c, m_w_a,
                              m_b_a, m_k_b, m_b_b, m_w_c, m_b_c, w_1, b_1, w_2, b_2,
                              return_gate: bool = False):
  """Residual attention: `(1 + M(x)) ⊙ T(x)` (module docstring).

  Args:
    x: `[B, H, W, C]`.
    t_*, m_*: the trunk's and the mask's residual-unit weights; w_1, b_1, w_2, b_2: the mask head
      (shapes in the module docstring).
    return_gate: also return the mask `[B, H, W, C]` (float32, in (0, 1)).

  Returns:
    `[B, H, W, C]` in x's dtype (and the mask).
  """
  op = "residual_attention_module"
  B, H, W, C = conv2d.check_feature_map(op, x)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  units = {}
  for prefix, ws in (("t_", (t_w_a, t_b_a, t_k_b, t_b_b, t_w_c, t_b_c)),
                     ("m_", (m_w_a, m_b_a, m_k_b, m_b_b, m_w_c, m_b_c))):
    d = jnp.shape(ws[0])[-1] if jnp.ndim(ws[0]) == 2 else -1
    want = ((C, d), (d,), (3, 3, d, d), (d,), (d, C), (C,))
    for name, w, shape in zip(UNIT, ws, want, strict=True):
      if jnp.shape(w) != shape:
        raise ValueError(f"{op}: `{prefix}{name}` must have shape {list(shape)}, got {jnp.shape(w)}")
    units[prefix] = [f32(w) for w in ws]
  for name, w, shape in (("w_1", w_1, (C, C)), ("b_1", b_1, (C,)), ("w_2", w_2, (C, C)),
                         ("b_2", b_2, (C,))):
    if jnp.shape(w) != shape:
      raise ValueError(f"{op}: `{name}` must have shape {list(shape)}, got {jnp.shape(w)}")
  xf = x.astype(jnp.float32)
  trunk = residual_unit(xf, *units["t_"])
  down = jax.lax.reduce_window(xf, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))
  up = _upsample_aligned(residual_unit(down, *units["m_"]), H, W)
  mask = jax.nn.sigmoid(jax.nn.relu(jax.nn.relu(up) @ f32(w_1) + f32(b_1)) @ f32(w_2) + f32(b_2))
  y = ((1.0 + mask) * trunk).astype(x.dtype)
  return (y, mask) if return_gate else y


class ResidualAttention(nn.Module):
  """Creates the trunk unit, the mask unit (bottleneck width C / `bottleneck`) and the mask head, and
  calls `residual_attention_module`; sows the mask as ("intermediates", "gate")."""
  bottleneck: int = 4
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    d = max(1, C // self.bottleneck)

    # PyTorch's Conv2d default: uniform in ±1/sqrt(fan_in), weights and biases.
    def p(name, fan_in, shape):
      return self.param(name, torch_uniform(fan_in), shape, self.param_dtype)

    weights = {}
    for prefix in ("t_", "m_"):
      for name, fan_in, shape in (("w_a", C, (C, d)), ("b_a", C, (d,)), ("k_b", 9 * d, (3, 3, d, d)),
                                  ("b_b", 9 * d, (d,)), ("w_c", d, (d, C)), ("b_c", d, (C,))):
        weights[prefix + name] = p(prefix + name, fan_in, shape)
    for name, shape in (("w_1", (C, C)), ("b_1", (C,)), ("w_2", (C, C)), ("b_2", (C,))):
      weights[name] = p(name, C, shape)
    y, mask = residual_attention_module(x, **weights, return_gate=True)
    self.sow("intermediates", modules.GATE, mask)
    return y


modules.register_module(modules.Module(
    name="residual_attention_module", fn=residual_attention_module, linen=ResidualAttention,
    kind="feature_map", family="channel-spatial", seeds=(130,),
    paper="Residual Attention Network for Image Classification", arxiv="1704.06904",
    gate_range=(0.0, 1.0)))
