"""Pervasive Attention: one 2-D convolutional network over the grid of (target, source) token pairs
in place of an encoder, a decoder and the attention between them.

    X[i, j] = [ s_j ; t_i ] ∈ R^{C0}        (source embedding j, embedding of target input i = y_{i-1})
    H⁰ = X W_r + b_r                          (a linear layer dividing the channels, C0 -> C1)
    F^l = Conv_masked( relu(N₂( relu(N₁([H⁰, F¹, …, F^{l-1}])) W₁^l )) ; K^l )   l = 1 … L  (DenseNet)
    H = [H⁰, F¹, …, F^L] ∈ R^{T x S x (C1 + L·g)}
    h_i = max_j H[i, j]                       (max-pooling over the source axis)

`Conv_masked` is a k×k convolution whose kernel rows past the centre on the target axis are zero
(`K[u, :] = 0` for u > k // 2): row i of every layer reads only rows ≤ i, so h_i depends on the
target inputs y_{<i} and on the whole source, and a model predicting y_i from h_i is autoregressive
with no other mask. Along the source axis the kernel is whole (the source is read both ways).
W₁^l is the 1×1 bottleneck to 4·g channels (DenseNet-BC), g the growth rate.

N₁, N₂ normalize each grid position over its channels, `γ (x - mean) / (std + ε) + β` with the
unbiased std (positional normalization, as the authors' released code does; the paper's 2018
networks used batch normalization, which mixes the examples of a batch).

Padded source positions (`source_mask` False) act as the convolutions' zero padding: the grid and
every layer's input are zero there and the max skips them, so the output equals the output on the
grid cut to the real source (the authors' code zeroes only each layer's output there); a target
row with no real source gives zeros.

Shapes: `grid [B, T, S, C0] -> [B, T, C1 + L·g]`; weights `reduce [C0, C1]`, `reduce_bias [C1]`,
and per layer l (C_l = C1 + l·g inputs): `l{l}_scale1, l{l}_bias1 [C_l]`, `l{l}_w1 [C_l, 4g]`,
`l{l}_scale2, l{l}_bias2 [4g]`, `l{l}_w2 [k, k, 4g, g]` (HWIO: target, source).
Paper: Elbayad, Besacier and Verbeek, "Pervasive Attention: 2D Convolutional Neural Networks for
Sequence-to-Sequence Prediction", arXiv:1808.03867. The sequence model around it (embeddings,
output layer) is `attnjax.models.PervasiveSeq2Seq` (arch "pervasive").
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Bool, Float

__all__ = ["PervasiveAttention", "pervasive_attention", "pervasive_grid", "pervasive_layer_count"]

Grid = Float[Array, "B T S C0"]
Pooled = Float[Array, "B T C"]
SourceMask = Bool[Array, "B S"]
TargetSeq = Float[Array, "B T Dt"]
SourceSeq = Float[Array, "B S Ds"]
_LAYER_WEIGHTS = ("scale1", "bias1", "w1", "scale2", "bias2", "w2")


def pervasive_grid(target: TargetSeq, source: SourceSeq) -> Grid:
  """`X [B, T, S, Ds + Dt]` with `X[b, i, j] = [source[b, j]; target[b, i]]` (source channels
  first, as the authors' code concatenates them)."""
  if jnp.ndim(target) != 3 or jnp.ndim(source) != 3 or target.shape[0] != source.shape[0]:
    raise ValueError(f"pervasive_grid: `target` [B, T, Dt] and `source` [B, S, Ds] must be 3-D with "
                     f"one batch, got {jnp.shape(target)} and {jnp.shape(source)}")
  B, T, _ = target.shape
  S = source.shape[1]
  dtype = jnp.result_type(target, source)
  src = jnp.broadcast_to(source[:, None].astype(dtype), (B, T, S, source.shape[-1]))
  tgt = jnp.broadcast_to(target[:, :, None].astype(dtype), (B, T, S, target.shape[-1]))
  return jnp.concatenate([src, tgt], axis=-1)


def pervasive_layer_count(weights) -> int:
  """L, the number of DenseNet layers that `weights` (the keyword arrays) hold."""
  return sum(1 for name in weights if name.endswith("_w1") and name.startswith("l"))


def _position_norm(x, scale, bias, eps):
  """Per grid position over channels, with PyTorch's unbiased std (module docstring)."""
  mean = x.mean(axis=-1, keepdims=True)
  std = jnp.sqrt(((x - mean) ** 2).sum(axis=-1, keepdims=True) / (x.shape[-1] - 1))
  return scale * (x - mean) / (std + eps) + bias


def pervasive_attention(grid: Grid, source_mask: Optional[SourceMask] = None, *, reduce,
                        reduce_bias, eps: float = 1e-5, **layers) -> Pooled:
  """The masked DenseNet over the (target, source) grid, max-pooled over sources (module docstring).

  Args:
    grid: `[B, T, S, C0]`, e.g. `pervasive_grid(target_embeddings, source_embeddings)`.
    source_mask: optional `[B, S]` bool, True at real source tokens.
    reduce, reduce_bias: `[C0, C1]`, `[C1]`, the first linear layer.
    eps: the normalizations' ε.
    **layers: `l{l}_scale1 … l{l}_w2` for l = 0 … L-1 (module docstring; k odd, ≥ 1).

  Returns:
    `[B, T, C1 + L·g]` in grid's dtype.
  """
  op = "pervasive_attention"
  if jnp.ndim(grid) != 4 or 0 in jnp.shape(grid):
    raise ValueError(f"{op}: `grid` must be [B, T, S, C0] (no empty axis), got {jnp.shape(grid)}")
  B, T, S, C0 = grid.shape
  if jnp.ndim(reduce) != 2 or reduce.shape[0] != C0 or jnp.shape(reduce_bias) != reduce.shape[1:]:
    raise ValueError(f"{op}: `reduce` must be [C0, C1] with C0 = {C0} and `reduce_bias` [C1], got "
                     f"{jnp.shape(reduce)} and {jnp.shape(reduce_bias)}")
  if source_mask is not None and jnp.shape(source_mask) != (B, S):
    raise ValueError(f"{op}: `source_mask` must be [B, S] = [{B}, {S}], got "
                     f"{jnp.shape(source_mask)}")
  L = pervasive_layer_count(layers)
  expected = {f"l{i}_{w}" for i in range(L) for w in _LAYER_WEIGHTS}
  if set(layers) != expected:
    raise ValueError(f"{op}: the layer weights must be l<i>_{{{', '.join(_LAYER_WEIGHTS)}}} for i in "
                     f"0 … {L - 1}; missing {sorted(expected - set(layers))}, unexpected "
                     f"{sorted(set(layers) - expected)}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  keep = (jnp.ones((B, 1, S, 1), bool) if source_mask is None
          else jnp.asarray(source_mask, bool)[:, None, :, None])
  zero_pad = lambda a: jnp.where(keep, a, 0.0)
  features = [zero_pad(zero_pad(f32(grid)) @ f32(reduce) + f32(reduce_bias))]
  for i in range(L):
    w = {name: f32(layers[f"l{i}_{name}"]) for name in _LAYER_WEIGHTS}
    x = jnp.concatenate(features, axis=-1)
    k = w["w2"].shape[0]
    if (w["w1"].shape[0] != x.shape[-1] or jnp.ndim(w["w2"]) != 4 or k % 2 == 0
        or w["w2"].shape[1] != k or w["w2"].shape[2] != w["w1"].shape[1]):
      raise ValueError(f"{op}: layer {i}: `l{i}_w1` must be [{x.shape[-1]}, M] and `l{i}_w2` "
                       f"[k, k, M, g] with k odd, got {w['w1'].shape} and {w['w2'].shape}")
    y = jax.nn.relu(_position_norm(x, w["scale1"], w["bias1"], eps)) @ w["w1"]
    y = zero_pad(jax.nn.relu(_position_norm(y, w["scale2"], w["bias2"], eps)))
    # Kernel rows u > k // 2 would read target rows i + u - k // 2 > i: zero them (causal target).
    causal = (jnp.arange(k) <= k // 2).astype(jnp.float32)[:, None, None, None]
    features.append(zero_pad(conv2d.conv2d(y, w["w2"] * causal)))
  h = jnp.concatenate(features, axis=-1)
  pooled = jnp.max(jnp.where(keep, h, -jnp.inf), axis=2)
  return jnp.where(jnp.isfinite(pooled), pooled, 0.0).astype(grid.dtype)


def _out_shape(x_shape, settings):
  B, T, _, C0 = x_shape
  c1 = C0 // settings.get("divide_channels", 2)
  return (B, T, c1 + settings.get("num_layers", 24) * settings.get("growth_rate", 32))


class PervasiveAttention(nn.Module):
  """Creates the DenseNet's weights (the paper's 24 layers of growth 32, 3×3 kernels, bottleneck
  4·g, input channels halved; PyTorch's default convolution init, Xavier-uniform linear layer with
  zero bias, norms at identity) and calls `pervasive_attention` on `[B, T, S, C0]`."""
  num_layers: int = 24
  growth_rate: int = 32
  kernel_size: int = 3
  bottleneck: int = 4
  divide_channels: int = 2
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, grid, source_mask=None):
    C0, g, k = grid.shape[-1], self.growth_rate, self.kernel_size
    if k % 2 == 0 or C0 % self.divide_channels:
      raise ValueError(f"PervasiveAttention: `kernel_size` must be odd ({k}) and `divide_channels` "
                       f"({self.divide_channels}) must divide the grid's {C0} channels")
    p = lambda name, init, shape: self.param(name, init, shape, self.param_dtype)
    c, mid = C0 // self.divide_channels, self.bottleneck * g
    weights = {"reduce": p("reduce", nn.initializers.xavier_uniform(), (C0, c)),
               "reduce_bias": p("reduce_bias", nn.initializers.zeros, (c,))}
    for i in range(self.num_layers):
      weights.update({
          f"l{i}_scale1": p(f"l{i}_scale1", nn.initializers.ones, (c,)),
          f"l{i}_bias1": p(f"l{i}_bias1", nn.initializers.zeros, (c,)),
          f"l{i}_w1": p(f"l{i}_w1", torch_uniform(c), (c, mid)),
          f"l{i}_scale2": p(f"l{i}_scale2", nn.initializers.ones, (mid,)),
          f"l{i}_bias2": p(f"l{i}_bias2", nn.initializers.zeros, (mid,)),
          f"l{i}_w2": p(f"l{i}_w2", torch_uniform(k * k * mid), (k, k, mid, g))})
      c += g
    return pervasive_attention(grid, source_mask, **weights)


modules.register_module(modules.Module(
    name="pervasive_attention", fn=pervasive_attention, linen=PervasiveAttention, kind="pair",
    family="alternative-mixer", seeds=(115,), keeps_shape=False, out_shape=_out_shape,
    paper="Pervasive Attention: 2D Convolutional Neural Networks for Sequence-to-Sequence Prediction",
    arxiv="1808.03867", example={"num_layers": 2, "growth_rate": 4}))
