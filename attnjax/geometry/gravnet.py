"""GravNetNorm: geometric attention in a learned space. Each point is embedded in a small learned
space; its neighbours there send it their features weighted by a Gaussian of the distance.

Murnane, Thais, Thete, "Graph Structure from Point Clouds: Geometric Attention is All You Need",
arXiv:2307.16662 (NeurIPS 2022 ML4PS). Following the authors' code (murnanedaniel/GeometricAttention,
`LightningModules/Models/gravconv.py`, `GravConv`), for point features h_i [C]:

    h'_i  = [h_i, mean_c(h_i)]                                 [C + 1]
    s_i   = S(h'_i),  s_i ← s_i / |s_i|  ("norm_embedding")    the learned space, [E]
    j ~ i ⟺ |s_i - s_j| < r  (radius graph, self-loop included) or j among i's k nearest in s
    w_ij  = exp(-g |s_i - s_j|² / r²)                          the attention kernel
    a_i   = Σ_{j ~ i} w_ij ĥ'_j,  ĥ' = h' / |h'|_1  ("norm_hidden")
    out_i = F([a_i, h'_i])

S is MLP (C+1 → C → E, ReLU between, no output activation), F is MLP (2(C+1) → D → D with ReLU
after every layer), as `make_mlp` builds them there without batch norm. The code's schedules of r, k
and g over training epochs are the caller's (they are arguments here); its random extra edges are
left out. The pairs are computed densely per point cloud (N x N), which suits jets of tens of
particles; the embedding is what makes the graph, so it carries gradient only through w_ij.

Shapes: `x [B, N, C]` → `[B, N, D]`; `mask [B, N]` drops padding points.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.typing import Array, Bool, Float

__all__ = ["GravNetNorm", "gravnet_norm", "learned_space_weights"]

Points = Float[Array, "B N C"]
Out = Float[Array, "B N D"]
PointMask = Bool[Array, "B N"]
Weights = Float[Array, "B N N"]
Params = Mapping[str, Any]


def _mlp(x: jax.Array, layers: Params, *, last_activation: bool) -> jax.Array:
  names = sorted(layers, key=lambda n: int(n.split("_")[-1]))
  for i, name in enumerate(names):
    x = x @ layers[name]["kernel"] + layers[name]["bias"]
    if i < len(names) - 1 or last_activation:
      x = jax.nn.relu(x)
  return x


def learned_space_weights(s: jax.Array, *, radius: float, grav_weight: float,
                          knn: Optional[int] = None, mask: Optional[PointMask] = None) -> Weights:
  """w_ij (module docstring) for embeddings `s [B, N, E]`: the Gaussian kernel on the pairs within
  `radius` (and, with `knn`, each point's k nearest), zero elsewhere; row i holds i's senders."""
  d2 = jnp.sum((s[:, :, None, :] - s[:, None, :, :]) ** 2, axis=-1)
  near = d2 < radius ** 2
  if knn is not None:
    k = min(int(knn), s.shape[1])
    kth = -jax.lax.top_k(-d2, k)[0][..., -1:]
    near = near | (d2 <= kth)
  if mask is not None:
    near = near & mask[:, None, :] & mask[:, :, None]
  return jnp.where(near, jnp.exp(-grav_weight * d2 / radius ** 2), 0.0)


def gravnet_norm(x: Points, mask: Optional[PointMask] = None, *, spatial: Params, feature: Params,
                 radius: float = 1.0, grav_weight: float = 3.0, knn: Optional[int] = None,
                 norm_embedding: bool = True, norm_hidden: bool = True) -> Out:
  """GravNetNorm's convolution (module docstring). `spatial` / `feature`: the MLPs S and F as
  {"layer_0": {"kernel", "bias"}, ...}."""
  op = "gravnet_norm"
  if jnp.ndim(x) != 3:
    raise ValueError(f"{op}: `x` must be [B, N, C], got shape {jnp.shape(x)}")
  if mask is not None and jnp.shape(mask) != x.shape[:2]:
    raise ValueError(f"{op}: `mask` must be [B, N] = {list(x.shape[:2])}, got {jnp.shape(mask)}")
  if radius <= 0 or grav_weight < 0:
    raise ValueError(f"{op}: need radius > 0 and grav_weight >= 0, got {radius}, {grav_weight}")
  f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
  h = x.astype(jnp.float32)
  h = jnp.concatenate([h, h.mean(axis=-1, keepdims=True)], axis=-1)
  s = _mlp(h, f32(spatial), last_activation=False)
  if norm_embedding:
    s = s / jnp.maximum(jnp.linalg.norm(s, axis=-1, keepdims=True), 1e-12)
  w = learned_space_weights(s, radius=radius, grav_weight=grav_weight, knn=knn, mask=mask)
  send = h / jnp.maximum(jnp.sum(jnp.abs(h), axis=-1, keepdims=True), 1e-12) if norm_hidden else h
  agg = jnp.einsum("bij,bjc->bic", w, send)
  out = _mlp(jnp.concatenate([agg, h], axis=-1), f32(feature), last_activation=True)
  return out.astype(x.dtype)


class _Layer(nn.Module):
  fan_in: int
  fan_out: int

  @nn.compact
  def __call__(self) -> dict:
    return {"kernel": self.param("kernel", nn.initializers.lecun_normal(),
                                 (self.fan_in, self.fan_out)),
            "bias": self.param("bias", nn.initializers.zeros, (self.fan_out,))}


class _MLPWeights(nn.Module):
  """{"layer_i": {"kernel", "bias"}} for consecutive `sizes` (the tree `gravnet_norm` reads)."""
  sizes: tuple[int, ...]

  @nn.compact
  def __call__(self) -> dict:
    return {f"layer_{i}": _Layer(a, b, name=f"layer_{i}")()
            for i, (a, b) in enumerate(zip(self.sizes[:-1], self.sizes[1:], strict=True))}


class GravNetNorm(nn.Module):
  """Creates S (to `emb_dims`) and F (to `features`, None: C) and calls `gravnet_norm`."""
  features: Optional[int] = None
  emb_dims: int = 4
  radius: float = 1.0
  grav_weight: float = 3.0
  knn: Optional[int] = None

  @nn.compact
  def __call__(self, x: Points, mask: Optional[PointMask] = None) -> Out:
    c = x.shape[-1]
    d = self.features or c
    spatial = _MLPWeights((c + 1, c, self.emb_dims), name="spatial")()
    feature = _MLPWeights((2 * (c + 1), d, d), name="feature")()
    return gravnet_norm(x, mask, spatial=spatial, feature=feature, radius=self.radius,
                        grav_weight=self.grav_weight, knn=self.knn)


modules.register_module(modules.Module(
    name="gravnet_norm", fn=gravnet_norm, linen=GravNetNorm, kind="points", family="graph",
    seeds=(51,), paper="Graph Structure from Point Clouds: Geometric Attention is All You Need",
    arxiv="2307.16662", example={"emb_dims": 3, "radius": 1.2}))
