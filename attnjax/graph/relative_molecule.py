"""Relative molecule self-attention (R-MAT): atom-pair relations (bonds, graph distance, 3-D
distance) embedded per head and mixed into both the attention logits and the values.

Maziarka, Majchrowski, Danel, Gaiński, Tabor, Podolak, Morkisz, Jastrzębski, "Relative Molecule
Self-Attention Transformer", arXiv:2110.05841. Following the authors' code (gmum/huggingmolecules,
`models_rmat.py`, `RMatAttention`): with per-head queries, keys, values q, k, v of the atoms and
e_ij the pair features (bond features ‖ one-hot graph distance ‖ radial basis of the 3-D distance),

    r^K_ij = MLP_K(e_ij),  r^V_ij = MLP_V(e_ij)       [H, d] per pair (Linear-LeakyReLU(0.1)-Linear)
    s_ij   = (q_i·k_j + (q_i + k_i)·r^K_ij) / sqrt(d) + r^K_ij·w
    α_ij   = softmax_j(s_ij)  (padding atoms masked)
    o_i    = Σ_j α_ij (v_j + r^V_ij)

w is a learned per-head vector. The code adds k_i (the query atom's own key) to q_i in the relation
term, kept as it is. It also adds k_i·u with a learned u: that term is constant along j, so the
softmax removes it and u never receives a gradient; it is left out, and so is the final bias of
MLP_K, which shifts every s_ij of a row alike for the same reason. The distance embedding is the
code's `BesselBasisLayerEnvelope` (`bessel_basis`): sin(n π d / c) times a polynomial envelope that
reaches 0 at the cutoff c.

Shapes: `x [B, N, D]` atoms, `pairs [B, N, N, E]`, `mask [B, N]` → `[B, N, D]`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.typing import Array, Bool, Float

__all__ = ["RelativeMoleculeAttention", "bessel_basis", "relative_molecule_attention"]

Atoms = Float[Array, "B N D"]
PairFeatures = Float[Array, "B N N E"]
AtomMask = Bool[Array, "B N"]
Distances = Float[Array, "B N N"]
Basis = Float[Array, "B N N R"]
Params = Mapping[str, Any]
_SLOPE = 0.1   # the edge MLPs' LeakyReLU slope in the authors' code


def bessel_basis(distances: Distances, *, num_radial: int = 8, cutoff: float = 5.0,
                 exponent: int = 5) -> Basis:
  """`env(d/c) · sin(n π d / c)` for n = 1..R, with env(x) = 1/x + a x^(p-1) + b x^p + c x^(p+1)
  for x < 1 and 0 beyond (p = exponent + 1, a = -(p+1)(p+2)/2, b = p(p+2), c = -p(p+1)/2;
  DimeNet's envelope, as R-MAT's code); distances are shifted by 1e-6 as there."""
  x = (distances.astype(jnp.float32)[..., None] + 1e-6) / cutoff
  p = exponent + 1
  a, b, c = -(p + 1) * (p + 2) / 2, p * (p + 2), -p * (p + 1) / 2
  env = 1.0 / x + a * x ** (p - 1) + b * x ** p + c * x ** (p + 1)
  env = jnp.where(x < 1, env, 0.0)
  n = jnp.arange(1, num_radial + 1, dtype=jnp.float32)
  return env * jnp.sin(n * jnp.pi * x)


def _edge_mlp(e: jax.Array, p: Params, heads: int) -> jax.Array:
  h = jax.nn.leaky_relu(e @ p["w1"] + p["b1"], _SLOPE) @ p["w2"]             # [B, N, N, H·d]
  if "b2" in p:
    h = h + p["b2"]
  return h.reshape(h.shape[:3] + (heads, -1))


def relative_molecule_attention(x: Atoms, pairs: PairFeatures, mask: Optional[AtomMask] = None, *,
                                query, key, value, out, edge_key: Params, edge_value: Params,
                                w) -> Atoms:
  """R-MAT attention (module docstring). `query`/`key`/`value` `[D, H, d]`, `out` `[H, d, D]`,
  `edge_key` {"w1" [E, d], "b1" [d], "w2" [d, H·d]}, `edge_value` the same and "b2" [H·d],
  `w` `[H, d]`."""
  op = "relative_molecule_attention"
  if jnp.ndim(x) != 3:
    raise ValueError(f"{op}: `x` must be [B, N, D], got shape {jnp.shape(x)}")
  b, n, _ = x.shape
  if jnp.ndim(pairs) != 4 or pairs.shape[:3] != (b, n, n):
    raise ValueError(f"{op}: `pairs` must be [B, N, N, E] = [{b}, {n}, {n}, E], got shape "
                     f"{jnp.shape(pairs)}")
  if mask is not None and jnp.shape(mask) != (b, n):
    raise ValueError(f"{op}: `mask` must be [B, N] = [{b}, {n}], got shape {jnp.shape(mask)}")
  f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
  query, key, value, out, w = f32((query, key, value, out, w))
  heads, d = w.shape
  h = x.astype(jnp.float32)
  e = pairs.astype(jnp.float32)
  q = jnp.einsum("bnc,chd->bnhd", h, query)
  k = jnp.einsum("bnc,chd->bnhd", h, key)
  v = jnp.einsum("bnc,chd->bnhd", h, value)
  rk = _edge_mlp(e, f32(edge_key), heads)                                     # [B, N, N, H, d]
  rv = _edge_mlp(e, f32(edge_value), heads)
  scale = 1.0 / jnp.sqrt(jnp.float32(d))
  s = (jnp.einsum("bihd,bjhd->bhij", q, k) + jnp.einsum("bihd,bijhd->bhij", q + k, rk)) * scale
  s = s + jnp.einsum("bijhd,hd->bhij", rk, w)
  if mask is not None:
    keep = mask[:, None, None, :]
    a = jax.nn.softmax(jnp.where(keep, s, -jnp.inf), axis=-1, where=keep)
    a = jnp.where(keep, a, 0.0)
  else:
    a = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bhij,bjhd->bihd", a, v) + jnp.einsum("bhij,bijhd->bihd", a, rv)
  return jnp.einsum("bihd,hdc->bic", o, out).astype(x.dtype)


class _EdgeMLP(nn.Module):
  hidden: int
  width: int
  final_bias: bool = True

  @nn.compact
  def __call__(self, edge_dim: int) -> dict:
    init = nn.initializers.lecun_normal()
    weights = {"w1": self.param("w1", init, (edge_dim, self.hidden)),
               "b1": self.param("b1", nn.initializers.zeros, (self.hidden,)),
               "w2": self.param("w2", init, (self.hidden, self.width))}
    if self.final_bias:
      weights["b2"] = self.param("b2", nn.initializers.zeros, (self.width,))
    return weights


class RelativeMoleculeAttention(nn.Module):
  """Creates R-MAT's projections, edge MLPs and w (`num_heads` heads of width D / heads) and
  calls `relative_molecule_attention` on `(x, pairs, mask=None)`."""
  num_heads: int = 4

  @nn.compact
  def __call__(self, x: Atoms, pairs: PairFeatures, mask: Optional[AtomMask] = None) -> Atoms:
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f"RelativeMoleculeAttention: width {dim} must be divisible by num_heads "
                       f"({self.num_heads})")
    d = dim // self.num_heads
    init = nn.initializers.lecun_normal()
    proj = lambda name, shape: self.param(name, init, shape)  # noqa: E731
    small = nn.initializers.normal(d ** -0.5)
    return relative_molecule_attention(
        x, pairs, mask, query=proj("query", (dim, self.num_heads, d)),
        key=proj("key", (dim, self.num_heads, d)), value=proj("value", (dim, self.num_heads, d)),
        out=proj("out", (self.num_heads, d, dim)),
        edge_key=_EdgeMLP(d, dim, final_bias=False, name="edge_key")(pairs.shape[-1]),
        edge_value=_EdgeMLP(d, dim, name="edge_value")(pairs.shape[-1]),
        w=self.param("w", small, (self.num_heads, d)))


modules.register_module(modules.Module(
    name="relative_molecule_attention", fn=relative_molecule_attention,
    linen=RelativeMoleculeAttention, kind="points", family="graph", seeds=(106,),
    paper="Relative Molecule Self-Attention Transformer", arxiv="2110.05841",
    extra_inputs=(modules.ExtraInput("pairs", lambda s: (s[0], s[1], s[1], 5)),),
    example={"num_heads": 2}))
