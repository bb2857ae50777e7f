"""AFiLM: attention-based feature-wise modulation of a 1-D signal. The features are max-pooled into
blocks, a transformer encoder runs self-attention across the blocks, and its output for each block is
the per-channel scale that multiplies every feature of that block.

    p_n = max_{t ∈ block n} x[t] ∈ R^C,   n = 0 … ⌈L / b⌉ - 1,
    e⁰ = √C · p + PE,   eˡ⁺¹ = Enc(eˡ),
    a = LN₁(e + MHA(e)),   Enc(e) = LN₂(a + W₂ ReLU(W₁ a + b₁) + b₂),
    MHA(e) = [softmax(Q_h K_hᵀ / √d) V_h]_h W_o + b_o,   Q = e W_q + b_q, K = e W_k, V = e W_v + b_v,
    y[t, c] = x[t, c] · e^{layers}[⌊t / b⌋, c],

PE the sinusoidal position encoding, LN layer norms with ε = 1e-6 (the reference code's post-norm
encoder; dropout is a training-time regularizer and left out; the key projection's bias of the
reference code is left out because softmax cancels it: it adds q·b_k to a whole row of scores). As
in the authors' code the modulation is a scale only (no shift). A trailing partial block (L not a
multiple of b, which the reference code does not accept) is pooled over its own positions and scaled
like the others. Shapes:
`x [B, L, C] -> [B, L, C]`; encoder weights stacked over layers: `wq, wk, wv, wo [layers, C, C]`,
`bq, bv, bo, ln1_scale, ln1_bias, ln2_scale, ln2_bias, ff2_bias [layers, C]`, `ff1 [layers, C, F]`,
`ff1_bias [layers, F]`, `ff2 [layers, F, C]`.
Paper: Rakotonirina, "Self-Attention for Audio Super-Resolution", arXiv:2108.11637.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnjax import modules
from attnjax.typing import Array, Float

__all__ = ["AttentionFiLM", "attention_film", "block_max_pool", "sinusoidal_encoding"]

Signal = Float[Array, "B L C"]
_WEIGHTS = ("wq", "bq", "wk", "wv", "bv", "wo", "bo", "ln1_scale", "ln1_bias", "ff1", "ff1_bias",
            "ff2", "ff2_bias", "ln2_scale", "ln2_bias")


def sinusoidal_encoding(length: int, dim: int) -> np.ndarray:
  """`[length, dim]`: sin at even, cos at odd features, angle pos / 10000^(2⌊i/2⌋ / dim)."""
  pos, i = np.arange(length)[:, None], np.arange(dim)[None, :]
  angle = pos / np.power(10000.0, 2 * (i // 2) / dim)
  return np.where(i % 2 == 0, np.sin(angle), np.cos(angle))


def block_max_pool(x, block_size: int):
  """`[B, L, C] -> [B, ⌈L / b⌉, C]`: the max over each block of b positions (the last may be short)."""
  B, L, C = x.shape
  n = -(-L // block_size)
  padded = jnp.pad(x, [(0, 0), (0, n * block_size - L), (0, 0)], constant_values=-jnp.inf)
  return jnp.max(padded.reshape(B, n, block_size, C), axis=2)


def _layer_norm(x, scale, bias, eps):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _encoder_layer(e, w, num_heads, eps):
  B, N, C = e.shape
  d = C // num_heads
  heads = lambda a: a.reshape(B, N, num_heads, d)
  q, k, v = heads(e @ w["wq"] + w["bq"]), heads(e @ w["wk"]), heads(e @ w["wv"] + w["bv"])
  weights = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", q, k) / jnp.sqrt(float(d)), axis=-1)
  att = jnp.einsum("bhnm,bmhd->bnhd", weights, v).reshape(B, N, C) @ w["wo"] + w["bo"]
  a = _layer_norm(e + att, w["ln1_scale"], w["ln1_bias"], eps)
  ffn = jax.nn.relu(a @ w["ff1"] + w["ff1_bias"]) @ w["ff2"] + w["ff2_bias"]
  return _layer_norm(a + ffn, w["ln2_scale"], w["ln2_bias"], eps)


def attention_film(x: Signal, *, wq, bq, wk, wv, bv, wo, bo, ln1_scale, ln1_bias, ff1, ff1_bias,
                   ff2, ff2_bias, ln2_scale, ln2_bias, block_size: int = 8, num_heads: int = 8,
                   eps: float = 1e-6, return_scale: bool = False):
  """AFiLM: `x` scaled per block by a transformer encoder over its block maxima (module docstring).

  Args:
    x: `[B, L, C]`, C a multiple of `num_heads`.
    wq, bq, …, ln2_bias: the encoder's weights, stacked over layers (shapes in the module docstring).
    block_size: positions per block b. num_heads: attention heads. eps: the layer norms' epsilon.
    return_scale: also return the per-block scales `[B, ⌈L / b⌉, C]` (float32).

  Returns:
    `[B, L, C]` in x's dtype (and the scales).
  """
  op = "attention_film"
  if jnp.ndim(x) != 3 or 0 in jnp.shape(x):
    raise ValueError(f"{op}: `x` must be a signal [B, L, C] (no empty axis), got shape {jnp.shape(x)}")
  B, L, C = x.shape
  if C % num_heads:
    raise ValueError(f"{op}: the channels C = {C} of `x` must be a multiple of `num_heads` = "
                     f"{num_heads}")
  if block_size < 1:
    raise ValueError(f"{op}: `block_size` must be >= 1, got {block_size}")
  w = dict(zip(_WEIGHTS, (wq, bq, wk, wv, bv, wo, bo, ln1_scale, ln1_bias, ff1, ff1_bias, ff2,
                          ff2_bias, ln2_scale, ln2_bias), strict=True))
  layers = jnp.shape(wq)[0]
  for name in ("wq", "wk", "wv", "wo"):
    if jnp.shape(w[name]) != (layers, C, C):
      raise ValueError(f"{op}: `{name}` must have shape [layers, C, C] = [{layers}, {C}, {C}], got "
                       f"{jnp.shape(w[name])}")
  w = {n: jnp.asarray(a, jnp.float32) for n, a in w.items()}
  xf = x.astype(jnp.float32)
  pooled = block_max_pool(xf, block_size)
  n = pooled.shape[1]
  e = pooled * jnp.sqrt(float(C)) + jnp.asarray(sinusoidal_encoding(n, C), jnp.float32)
  for layer in range(layers):
    e = _encoder_layer(e, {k: a[layer] for k, a in w.items()}, num_heads, eps)
  scale = jnp.repeat(e, block_size, axis=1)[:, :L]
  y = (xf * scale).astype(x.dtype)
  return (y, e) if return_scale else y


class AttentionFiLM(nn.Module):
  """Creates AFiLM's transformer encoder weights (`num_layers` post-norm layers of `num_heads` heads
  and a `ff_dim` ReLU feed-forward; the paper's 4, 8, 2048) and calls `attention_film`."""
  block_size: int = 8
  num_layers: int = 4
  num_heads: int = 8
  ff_dim: int = 2048
  eps: float = 1e-6
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C, nl = x.shape[-1], self.num_layers
    # Keras Dense defaults (Glorot uniform, zero bias) per layer; layer norms start at identity.
    dense = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", batch_axis=(0,))
    p = lambda name, init, *shape: self.param(name, init, (nl, *shape), self.param_dtype)
    zeros, ones = nn.initializers.zeros, nn.initializers.ones
    weights = {}
    for n in "qkvo":
      weights[f"w{n}"] = p(f"w{n}", dense, C, C)
      if n != "k":
        weights[f"b{n}"] = p(f"b{n}", zeros, C)
    weights.update(ln1_scale=p("ln1_scale", ones, C), ln1_bias=p("ln1_bias", zeros, C),
                   ff1=p("ff1", dense, C, self.ff_dim), ff1_bias=p("ff1_bias", zeros, self.ff_dim),
                   ff2=p("ff2", dense, self.ff_dim, C), ff2_bias=p("ff2_bias", zeros, C),
                   ln2_scale=p("ln2_scale", ones, C), ln2_bias=p("ln2_bias", zeros, C))
    return attention_film(x, **weights, block_size=self.block_size, num_heads=self.num_heads,
                          eps=self.eps)


modules.register_module(modules.Module(
    name="attention_film", fn=attention_film, linen=AttentionFiLM, kind="signal",
    family="channel-spatial", seeds=(107,), paper="Self-Attention for Audio Super-Resolution",
    arxiv="2108.11637", example={"block_size": 4, "num_layers": 2, "ff_dim": 32}))
