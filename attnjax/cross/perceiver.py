"""Perceiver: a small learned latent array cross-attends to a large input array, then self-attends,
with the cross-attend + latent-transformer block repeated under shared weights.

Jaegle, Gimeno, Brock, Zisserman, Vinyals, Carreira, "Perceiver: General Perception with Iterative
Attention", arXiv:2103.03206. For an input array x [M, C] (any modality, flattened) with positions
p_m ∈ [-1, 1] along the array:

  φ(p) = [p, sin(π f_1 p), ..., sin(π f_K p), cos(π f_1 p), ..., cos(π f_K p)],
          f_k linearly spaced in [1, μ/2]                                 (Fourier features, Sec. 3.2;
                                                                           μ the sampling rate: M)
  x̃ = [x, φ(p)]                                                          [M, C + 2K + 1]
  z_0 = latents                                                           [N, D], learned
  block b:  z ← z + CrossAttn_b(LN(z), LN(x̃))   (cross_heads heads: queries from the latents)
            z ← z + MLP_b(LN(z))
            L times: z ← z + SelfAttn_l(LN(z)), z ← z + MLP_l(LN(z))      (the latent transformer)

Weights: the first block's cross-attention is its own; blocks 2.. share a second one ("cross_1");
the latent transformer is shared by all blocks (the paper's sharing scheme, Sec. 3.2 and Table 6).
Cost: cross-attention O(M·N), latent layers O(N²) each: linear in the input length M, which the
tests check on the compiled program's FLOP count. Shapes: `x [B, M, C] -> z [B, N, D]`.

  perceiver_block(x, *, latents, cross_0, cross_1, latent_layers, ...)   the pure function
  fourier_features(length, num_bands, max_freq)                          φ [M, 2K + 1]
  Perceiver                                                              the Linen module
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.typing import Array, Bool, Float

__all__ = ["Perceiver", "fourier_features", "perceiver_block"]

Inputs = Float[Array, "B M C"]
Latents = Float[Array, "N D"]
LatentOut = Float[Array, "B N D"]
Params = Mapping[str, Any]
PositionFeatures = Float[Array, "M F"]
InputMask = Bool[Array, "B M"]
_EPS = 1e-5


def fourier_features(length: int, num_bands: int, max_freq: Optional[float] = None
                     ) -> PositionFeatures:
  """φ(p) for `length` positions evenly spaced on [-1, 1]: `[M, 2·num_bands + 1]` (the raw position,
  then the sines, then the cosines), frequencies `linspace(1, max_freq / 2, num_bands)`;
  `max_freq` defaults to the array's sampling rate, `length` (the Nyquist frequency is then M / 2)."""
  pos = jnp.linspace(-1.0, 1.0, length)[:, None]
  freqs = jnp.linspace(1.0, (length if max_freq is None else max_freq) / 2.0, num_bands)[None, :]
  angles = jnp.pi * pos * freqs
  return jnp.concatenate([pos, jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _layer_norm(x: jax.Array, p: Params) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + _EPS) * p["scale"] + p["bias"]


def _attention(zq: jax.Array, xkv: jax.Array, p: Params, mask=None) -> jax.Array:
  """Multi-head attention, heads from the kernels' shapes: q [D, h, d], k, v [C, h, d], o [h, d, D];
  `mask [B, M]` drops keys (a latent with none left gets zeros)."""
  q = jnp.einsum("bnd,dhk->bnhk", zq, p["query"])
  k = jnp.einsum("bmc,chk->bmhk", xkv, p["key"])
  v = jnp.einsum("bmc,chk->bmhk", xkv, p["value"])
  logits = jnp.einsum("bnhk,bmhk->bhnm", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
  if mask is None:
    w = jax.nn.softmax(logits, axis=-1)
  else:
    keep = mask[:, None, None, :]
    w = jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1, where=keep)
    w = jnp.where(keep, w, 0.0)
  out = jnp.einsum("bhnm,bmhk->bnhk", w, v)
  return jnp.einsum("bnhk,hkd->bnd", out, p["out"])


def _mlp(x: jax.Array, p: Params) -> jax.Array:
  return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _cross(z: jax.Array, x: jax.Array, p: Params, mask=None) -> jax.Array:
  z = z + _attention(_layer_norm(z, p["norm_latents"]), _layer_norm(x, p["norm_inputs"]),
                     p["attention"], mask)
  return z + _mlp(_layer_norm(z, p["norm_mlp"]), p["mlp"])


def _self(z: jax.Array, p: Params) -> jax.Array:
  h = _layer_norm(z, p["norm_attention"])
  z = z + _attention(h, h, p["attention"])
  return z + _mlp(_layer_norm(z, p["norm_mlp"]), p["mlp"])


def perceiver_block(x: Inputs, *, latents: Latents, cross_0: Params, latent_layers: Params,
                    cross_1: Optional[Params] = None, num_blocks: int = 1, num_bands: int = 8,
                    max_freq: Optional[float] = None, fourier: bool = True,
                    mask: Optional[InputMask] = None) -> LatentOut:
  """The Perceiver (module docstring): `x [B, M, C]` → latents `[B, N, D]` after `num_blocks`
  blocks. `cross_0` / `cross_1`: the cross-attention + MLP weights of the first / later blocks;
  `latent_layers`: {"layer_0": ..., ...}, the shared latent transformer. `fourier=False` drops the
  position features (the input is then a set: permuting it changes nothing). `mask [B, M]`: the
  input elements the latents may read (padding False)."""
  op = "perceiver_block"
  if jnp.ndim(x) != 3:
    raise ValueError(f"{op}: `x` must be [B, M, C], got shape {jnp.shape(x)}")
  if jnp.ndim(latents) != 2:
    raise ValueError(f"{op}: `latents` must be [N, D], got shape {jnp.shape(latents)}")
  if num_blocks < 1 or (num_blocks > 1 and cross_1 is None):
    raise ValueError(f"{op}: num_blocks must be >= 1, and blocks after the first need `cross_1`; "
                     f"got num_blocks={num_blocks}, cross_1 {'missing' if cross_1 is None else 'given'}")
  b, m, _ = x.shape
  if mask is not None and jnp.shape(mask) != (b, m):
    raise ValueError(f"{op}: `mask` must be [B, M] = [{b}, {m}], got shape {jnp.shape(mask)}")
  f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
  h = x.astype(jnp.float32)
  if fourier:
    h = jnp.concatenate([h, jnp.broadcast_to(fourier_features(m, num_bands, max_freq)[None],
                                             (b, m, 2 * num_bands + 1))], axis=-1)
  z = jnp.broadcast_to(jnp.asarray(latents, jnp.float32)[None], (b,) + latents.shape)
  layers = [f32(latent_layers[k]) for k in sorted(latent_layers, key=lambda s: int(s.split("_")[-1]))]
  for block in range(num_blocks):
    z = _cross(z, h, f32(cross_0 if block == 0 else cross_1), mask)
    for p in layers:
      z = _self(z, p)
  return z.astype(x.dtype)


class _Weights(nn.Module):
  """Creates one block's weights as the nested dict `perceiver_block` reads (so the Linen
  parameter tree is that dict): attention (query [D, h, d], key / value [C, h, d], out [h, d, D]),
  the MLP, and the layer norms (cross: of the latents and of the inputs; self: one)."""
  latent_dim: int
  kv_width: int
  heads: int
  widening: int
  cross: bool
  param_dtype: Any

  @nn.compact
  def __call__(self) -> dict:
    d, dt, dh = self.latent_dim, self.param_dtype, self.latent_dim // self.heads
    init = nn.initializers.lecun_normal()
    zeros, ones = nn.initializers.zeros, nn.initializers.ones

    groups = {"attention": {"query": (init, (d, self.heads, dh)),
                            "key": (init, (self.kv_width, self.heads, dh)),
                            "value": (init, (self.kv_width, self.heads, dh)),
                            "out": (init, (self.heads, dh, d))},
              "mlp": {"w1": (init, (d, self.widening * d)), "b1": (zeros, (self.widening * d,)),
                      "w2": (init, (self.widening * d, d)), "b2": (zeros, (d,))}}
    norms = ([("norm_latents", d), ("norm_inputs", self.kv_width)] if self.cross
             else [("norm_attention", d)]) + [("norm_mlp", d)]
    for name, width in norms:
      groups[name] = {"scale": (ones, (width,)), "bias": (zeros, (width,))}
    return {name: _Group(shapes, dt, name=name)() for name, shapes in groups.items()}


class _Group(nn.Module):
  """A named group of parameters `{name: (initializer, shape)}`."""
  shapes: Mapping[str, Any]
  param_dtype: Any

  @nn.compact
  def __call__(self) -> dict:
    return {k: self.param(k, init, shape, self.param_dtype)
            for k, (init, shape) in self.shapes.items()}


class Perceiver(nn.Module):
  """Creates the Perceiver's weights (module docstring) and calls `perceiver_block`:
  `num_latents` x `latent_dim` latents (truncated normal, std 0.02), `cross_heads` cross-attention
  heads (the paper: 1), `num_heads` latent self-attention heads, `latent_layers` layers in the
  shared latent transformer, MLPs widened by `widening`."""
  num_latents: int = 16
  latent_dim: int = 32
  num_blocks: int = 2
  latent_layers: int = 2
  num_heads: int = 4
  cross_heads: int = 1
  widening: int = 1
  num_bands: int = 8
  max_freq: Optional[float] = None
  fourier: bool = True
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Inputs, mask: Optional[InputMask] = None) -> LatentOut:
    if self.latent_dim % self.num_heads or self.latent_dim % self.cross_heads:
      raise ValueError(f"Perceiver: latent_dim {self.latent_dim} must be divisible by num_heads "
                       f"({self.num_heads}) and cross_heads ({self.cross_heads})")
    c = x.shape[-1] + (2 * self.num_bands + 1 if self.fourier else 0)
    latents = self.param("latents", nn.initializers.truncated_normal(0.02),
                         (self.num_latents, self.latent_dim), self.param_dtype)
    cross = lambda name: _Weights(self.latent_dim, c, self.cross_heads, self.widening, True,  # noqa: E731
                                  self.param_dtype, name=name)()
    cross_0 = cross("cross_0")
    cross_1 = cross("cross_1") if self.num_blocks > 1 else None
    layers = _Stack(self.latent_dim, self.num_heads, self.widening, self.latent_layers,
                    self.param_dtype, name="latent_layers")()
    return perceiver_block(x, latents=latents, cross_0=cross_0, cross_1=cross_1,
                           latent_layers=layers, num_blocks=self.num_blocks,
                           num_bands=self.num_bands, max_freq=self.max_freq, fourier=self.fourier,
                           mask=mask)


class _Stack(nn.Module):
  """The shared latent transformer's weights: {"layer_0": ..., ...}."""
  latent_dim: int
  heads: int
  widening: int
  depth: int
  param_dtype: Any

  @nn.compact
  def __call__(self) -> dict:
    return {f"layer_{i}": _Weights(self.latent_dim, self.latent_dim, self.heads, self.widening,
                                   False, self.param_dtype, name=f"layer_{i}")()
            for i in range(self.depth)}


modules.register_module(modules.Module(
    name="perceiver_block", fn=perceiver_block, linen=Perceiver, kind="signal",
    family="cross-attention", seeds=(171,),
    paper="Perceiver: General Perception with Iterative Attention", arxiv="2103.03206",
    keeps_shape=False,
    out_shape=lambda x_shape, st: (x_shape[0], st.get("num_latents", 16), st.get("latent_dim", 32)),
    example={"num_latents": 4, "latent_dim": 8, "num_heads": 2, "latent_layers": 1,
             "num_bands": 3}))
