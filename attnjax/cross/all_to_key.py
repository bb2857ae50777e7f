"""All-to-key attention (A2K) for arbitrary style transfer: each content position attends to region-
aggregated style keys (distributed attention) and to the positions of its best-matching style region
(progressive attention), instead of to every style position.

"All-to-key Attention for Arbitrary Style Transfer", arXiv:2212.04105 (ICCV 2023). Following the
authors' `A2K` module (LearningHx/StyA2K, `models/networks.py`): content c and style s feature maps
`[B, H, W, C]` of one size, split into non-overlapping r×r regions (P = r² positions each) and C into
8 heads of d channels; ĉ, ŝ are c, s normalized per channel over the map (mean, unbiased variance
+ 1e-5), and every projection is a 1×1 convolution (a dense layer with bias):

  distributed attention (DA)     q = W_q ĉ, k = W_k ŝ, v = W_v s
    κ_x = mean_y k_{x,y},  σ_{x,y} = sigmoid(β + α κ_x·k_{x,y})          per style region x
    k̄_x = (Σ_y σ_{x,y} k_{x,y} + κ_x) / (P + 1),  v̄_x likewise with the mean of v
    DA_{x,y} = Σ_z softmax_z(q_{x,y}·k̄_z) v̄_z                            every region's summary
  progressive attention (PA)     q' = W'_q ĉ, k' = W'_k ŝ, v' = W'_v s
    m(x) = argmax_z Σ_y q'_{x,y}·k'_{z,y}           the best style region of content region x
    PA_{x,y} = Σ_u softmax_u(q'_{x,y}·k'_{m(x),u}) v'_{m(x),u}             its P positions
  out = F_1 DA + F_2 PA + c

There is no 1/√d on the logits (as the code). The code's W'_k has a bias; it is left out here: it
adds q'·b to every logit of a row and to every candidate of a region match, which softmax and argmax
cancel (it gets no gradient). α, β are learned scalars (init 1, 0). The region match
is an argmax (its gradient flows through the chosen region's keys and values). Positions of a map
whose side is not a multiple of r lie in no region: as the code's unfold/fold, their DA and PA are 0,
so their output is the fusion biases plus c. The paper uses r = 8 on VGG relu4_1 and r = 4 on
relu5_1.

Shapes: `x [B, H, W, C]` (content), `style [B, H, W, C]` → `[B, H, W, C]`; kernels `[C, C]`, biases
`[C]`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.typing import Array, Float

__all__ = ["AllToKeyAttention", "all_to_key_attention"]

FeatureMap = Float[Array, "B H W C"]
HEADS = 8
_NORM_EPS = 1e-5
_PROJECTIONS = ("q", "k", "v", "q2", "k2", "v2", "fusion1", "fusion2")


def _mean_variance_norm(x):
  """Per (example, channel) over the map: (x − mean) / sqrt(unbiased variance + 1e-5)."""
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  var = jnp.var(x, axis=(1, 2), keepdims=True, ddof=1)
  return (x - mean) / jnp.sqrt(var + _NORM_EPS)


def _blocks(x, r, heads):
  """`[B, H, W, C]` → `[B, n, P, heads, d]`: the whole r×r regions, row-major, positions row-major."""
  B, H, W, C = x.shape
  hb, wb = H // r, W // r
  x = x[:, :hb * r, :wb * r].reshape(B, hb, r, wb, r, heads, C // heads)
  return x.transpose(0, 1, 3, 2, 4, 5, 6).reshape(B, hb * wb, r * r, heads, C // heads)


def _unblocks(y, H, W, r):
  """Inverse of `_blocks`, zeros where no whole region lies (the code's fold)."""
  B, _, _, heads, d = y.shape
  hb, wb = H // r, W // r
  y = y.reshape(B, hb, wb, r, r, heads * d).transpose(0, 1, 3, 2, 4, 5).reshape(B, hb * r, wb * r, -1)
  return jnp.pad(y, ((0, 0), (0, H - hb * r), (0, W - wb * r), (0, 0)))


def all_to_key_attention(x: FeatureMap, style: FeatureMap, *, q_kernel, q_bias, k_kernel, k_bias,
                         v_kernel, v_bias, q2_kernel, q2_bias, k2_kernel, v2_kernel, v2_bias,
                         fusion1_kernel, fusion1_bias, fusion2_kernel, fusion2_bias,
                         sim_alpha, sim_beta, region: int = 8) -> FeatureMap:
  """A2K (module docstring): content `x` attends to `style` through region summaries (DA) and its
  best-matching style region (PA); `region` is r."""
  op = "all_to_key_attention"
  if jnp.ndim(x) != 4:
    raise ValueError(f"{op}: `x` must be [B, H, W, C], got shape {jnp.shape(x)}")
  if jnp.shape(style) != jnp.shape(x):
    raise ValueError(f"{op}: `style` must have the content's shape [B, H, W, C] = "
                     f"{list(jnp.shape(x))}, got {list(jnp.shape(style))}")
  B, H, W, C = x.shape
  if C % HEADS:
    raise ValueError(f"{op}: the channels C = {C} must split into {HEADS} heads")
  if not isinstance(region, int) or not 1 <= region <= min(H, W):
    raise ValueError(f"{op}: `region` must be an int in [1, min(H, W)] = [1, {min(H, W)}], "
                     f"got {region!r}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  w = {name: (f32(kern), f32(bias)) for name, kern, bias in (
      ("q", q_kernel, q_bias), ("k", k_kernel, k_bias), ("v", v_kernel, v_bias),
      ("q2", q2_kernel, q2_bias), ("k2", k2_kernel, jnp.zeros((C,))), ("v2", v2_kernel, v2_bias),
      ("fusion1", fusion1_kernel, fusion1_bias), ("fusion2", fusion2_kernel, fusion2_bias))}
  for name, (kern, bias) in w.items():
    if kern.shape != (C, C) or bias.shape != (C,):
      raise ValueError(f"{op}: `{name}_kernel` must be [C, C] and `{name}_bias` [C] with C = {C}, "
                       f"got {list(kern.shape)} and {list(bias.shape)}")
  content, sty = f32(x), f32(style)
  nc, ns = _mean_variance_norm(content), _mean_variance_norm(sty)
  proj = lambda name, a: a @ w[name][0] + w[name][1]  # noqa: E731
  blk = lambda a: _blocks(a, region, HEADS)  # noqa: E731
  P = region * region

  # Distributed attention: every content position against every style region's summary.
  q, k, v = blk(proj("q", nc)), blk(proj("k", ns)), blk(proj("v", sty))      # [B, n, P, h, d]
  k_centre, v_centre = jnp.mean(k, axis=2), jnp.mean(v, axis=2)              # [B, n, h, d]
  sim = jax.nn.sigmoid(f32(sim_beta) + f32(sim_alpha) * jnp.einsum("bxhd,bxyhd->bxyh", k_centre, k))
  k_agg = (jnp.einsum("bxyh,bxyhd->bxhd", sim, k) + k_centre) / (P + 1)
  v_agg = (jnp.einsum("bxyh,bxyhd->bxhd", sim, v) + v_centre) / (P + 1)
  weights = jax.nn.softmax(jnp.einsum("bxyhd,bzhd->bxyhz", q, k_agg), axis=-1)
  da = jnp.einsum("bxyhz,bzhd->bxyhd", weights, v_agg)

  # Progressive attention: each content region's best style region, then its positions.
  q2, k2, v2 = blk(proj("q2", nc)), blk(proj("k2", ns)), blk(proj("v2", sty))
  match = jnp.argmax(jnp.einsum("bxyhd,bzyhd->bhxz", q2, k2), axis=-1)       # [B, h, n]
  pick = lambda a: jnp.take_along_axis(  # noqa: E731
      a.transpose(0, 3, 1, 2, 4), match[..., None, None], axis=2)            # [B, h, n, P, d]
  k_sel, v_sel = pick(k2), pick(v2)
  weights2 = jax.nn.softmax(jnp.einsum("bxyhd,bhxud->bxyhu", q2, k_sel), axis=-1)
  pa = jnp.einsum("bxyhu,bhxud->bxyhd", weights2, v_sel)

  out = proj("fusion1", _unblocks(da, H, W, region)) + proj("fusion2", _unblocks(pa, H, W, region))
  return (out + content).astype(x.dtype)


class AllToKeyAttention(nn.Module):
  """Creates A2K's eight 1×1 convolutions (PyTorch's default init, as the code's `nn.Conv2d`) and
  the similarity scale and shift (1, 0), and calls `all_to_key_attention(x, style)`."""
  region: int = 8

  @nn.compact
  def __call__(self, x: FeatureMap, style: FeatureMap) -> FeatureMap:
    C = x.shape[-1]
    bound = C ** -0.5

    def uniform(key, shape, dtype=jnp.float32):
      return jax.random.uniform(key, shape, dtype, -bound, bound)

    weights = {}
    for name in _PROJECTIONS:
      weights[f"{name}_kernel"] = self.param(f"{name}_kernel", uniform, (C, C))
      if name != "k2":  # softmax and argmax cancel this bias (module docstring)
        weights[f"{name}_bias"] = self.param(f"{name}_bias", uniform, (C,))
    return all_to_key_attention(
        x, style, sim_alpha=self.param("sim_alpha", nn.initializers.ones, ()),
        sim_beta=self.param("sim_beta", nn.initializers.zeros, ()), region=self.region, **weights)


modules.register_module(modules.Module(
    name="all_to_key_attention", fn=all_to_key_attention, linen=AllToKeyAttention,
    kind="feature_map", family="cross-attention", seeds=(142,),
    paper="All-to-key Attention for Arbitrary Style Transfer", arxiv="2212.04105",
    extra_inputs=(modules.ExtraInput("style", lambda s: s),),
    # 4×4 regions on the suite's 9×11 map: two by two whole regions and an uncovered border.
    example={"region": 4}))
