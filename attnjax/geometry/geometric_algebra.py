"""Geometric algebra attention: attention over a point cloud whose pair scores and values are built
from rotation-invariant attributes of geometric products of the points' vectors.

Spellings, "Geometric Algebra Attention Networks for Small Point Clouds", arXiv:2110.02393; the
rank-2 `VectorAttention` of the author's library (klarh/geometric_algebra_attention, `base/
internal.py`, `base/VectorAttention.py`, `jax/geometric_algebra.py`) with mean merge and join. For
point vectors r_j (e.g. neighbours' displacements from a centre) carrying values v_j:

    r_j r_i = r_j·r_i + r_j∧r_i                       the geometric product (scalar + bivector)
    I_ij = [r_j·r_i, |r_j∧r_i|]                       invariant_mode "single"
           [r_j·r_i, |r_j∧r_i|, |r_j|]                "partial" (the rank-1 step's norm too)
           [r_j·r_i, |r_j∧r_i|, |r_j|, |r_i|]          "full"
    u_ij = ( value_net(I_ij) + (v_i + v_j)/2 ) / 2    join of invariants and the merged values
    s_ij = score_net(u_ij)
    out_i = Σ_j softmax_j(s_ij) u_ij                  reduce=False: one output per point
    out   = Σ_{i,j} softmax_{(i,j)}(s_ij) u_ij        reduce=True: one per cloud

Every quantity is invariant to a rotation (or reflection) applied to all r, so the outputs are; and
equivariant (reduce=False) or invariant (reduce=True) to a permutation of the points. The library
takes any value and score networks; here value_net is one linear layer (invariants → D) and
score_net Dense-ReLU-Dense to a scalar, as its examples build them. |r_j∧r_i| is the norm of the
bivector, which in 3-D equals |r_j × r_i|.

Shapes: `values [B, N, D]`, `positions [B, N, 3]` → `[B, N, D]` (or `[B, D]` with reduce).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.typing import Array, Float

__all__ = ["GeometricAlgebraAttention", "INVARIANT_DIMS", "geometric_algebra_attention",
           "pair_invariants"]

INVARIANT_DIMS = {"single": 2, "partial": 3, "full": 4}
Values = Float[Array, "B N D"]
Positions = Float[Array, "B N 3"]
Invariants = Float[Array, "B N N I"]


def _norm(x: jax.Array) -> jax.Array:
  # The library's custom norm: a finite derivative at 0 (a zero displacement is common).
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def pair_invariants(positions: Positions, invariant_mode: str = "single") -> Invariants:
  """I_ij (module docstring), `[B, N_i, N_j, I]`, in float32."""
  if invariant_mode not in INVARIANT_DIMS:
    raise ValueError(f"pair_invariants: `invariant_mode` must be one of {sorted(INVARIANT_DIMS)}, "
                     f"got {invariant_mode!r}")
  r = positions.astype(jnp.float32)
  ri, rj = r[:, :, None, :], r[:, None, :, :]
  dot = jnp.sum(rj * ri, axis=-1, keepdims=True)
  wedge = _norm(jnp.cross(jnp.broadcast_to(rj, jnp.broadcast_shapes(ri.shape, rj.shape)),
                          jnp.broadcast_to(ri, jnp.broadcast_shapes(ri.shape, rj.shape))))
  parts = [dot, wedge]
  shape = dot.shape
  if invariant_mode in ("partial", "full"):
    parts.append(jnp.broadcast_to(_norm(rj), shape))
  if invariant_mode == "full":
    parts.append(jnp.broadcast_to(_norm(ri), shape))
  return jnp.concatenate(parts, axis=-1)


def geometric_algebra_attention(values: Values, positions: Positions, *, value_kernel,
                                value_bias, score_kernel, score_bias, score_out,
                                reduce: bool = False, invariant_mode: str = "single"):
  """Rank-2 geometric algebra attention (module docstring).

  Args:
    values: `[B, N, D]`; positions: `[B, N, 3]`.
    value_kernel `[I, D]`, value_bias `[D]`: value_net; score_kernel `[D, S]`, score_bias `[S]`,
      score_out `[S]`: score_net = ReLU(u W + b)·w_out.
    reduce: one output per cloud (softmax over all pairs) instead of one per point.
    invariant_mode: "single", "partial" or "full" (I = 2, 3, 4).
  """
  op = "geometric_algebra_attention"
  if jnp.ndim(values) != 3:
    raise ValueError(f"{op}: `values` must be [B, N, D], got shape {jnp.shape(values)}")
  b, n, d = values.shape
  if jnp.shape(positions) != (b, n, 3):
    raise ValueError(f"{op}: `positions` must be [B, N, 3] = [{b}, {n}, 3], got shape "
                     f"{jnp.shape(positions)}")
  inv = pair_invariants(positions, invariant_mode)
  if jnp.shape(value_kernel) != (inv.shape[-1], d):
    raise ValueError(f"{op}: `value_kernel` must be [I, D] = [{inv.shape[-1]}, {d}] for "
                     f"invariant_mode={invariant_mode!r}, got shape {jnp.shape(value_kernel)}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  v = values.astype(jnp.float32)
  u = (inv @ f32(value_kernel) + f32(value_bias) + (v[:, :, None] + v[:, None, :]) / 2) / 2
  s = jax.nn.relu(u @ f32(score_kernel) + f32(score_bias)) @ f32(score_out)       # [B, N, N]
  if reduce:
    w = jax.nn.softmax(s.reshape(b, n * n), axis=-1).reshape(b, n, n)
    out = jnp.einsum("bij,bijd->bd", w, u)
  else:
    out = jnp.einsum("bij,bijd->bid", jax.nn.softmax(s, axis=-1), u)
  return out.astype(values.dtype)


class GeometricAlgebraAttention(nn.Module):
  """Creates the value and score networks (`score_hidden` units; None: D) and calls
  `geometric_algebra_attention` on `(values, positions)`."""
  reduce: bool = False
  invariant_mode: str = "single"
  score_hidden: Optional[int] = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, values: Values, positions: Positions):
    d = values.shape[-1]
    s = self.score_hidden or d
    i = INVARIANT_DIMS.get(self.invariant_mode, 2)
    init = nn.initializers.lecun_normal()
    return geometric_algebra_attention(
        values, positions,
        value_kernel=self.param("value_kernel", init, (i, d), self.param_dtype),
        value_bias=self.param("value_bias", nn.initializers.zeros, (d,), self.param_dtype),
        score_kernel=self.param("score_kernel", init, (d, s), self.param_dtype),
        score_bias=self.param("score_bias", nn.initializers.zeros, (s,), self.param_dtype),
        score_out=self.param("score_out", nn.initializers.normal(s ** -0.5), (s,),
                             self.param_dtype),
        reduce=self.reduce, invariant_mode=self.invariant_mode)


modules.register_module(modules.Module(
    name="geometric_algebra_attention", fn=geometric_algebra_attention,
    linen=GeometricAlgebraAttention, kind="points", family="geometric", seeds=(209,),
    paper="Geometric Algebra Attention Networks for Small Point Clouds", arxiv="2110.02393",
    extra_inputs=(modules.ExtraInput("positions", lambda s: (s[0], s[1], 3)),),
    example={"invariant_mode": "partial"}))
